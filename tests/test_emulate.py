import json
import subprocess
import sys


def test_emulate_exercises_every_device():
    p = subprocess.run([sys.executable, "-m", "vmsgamp", "emulate", "--duration", "0.1", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    by_name = {d["name"]: d["result"] for d in r["devices"]}
    assert set(by_name) == {"rng", "console", "i2c", "gpio"}
    assert by_name["rng"]["bytes"] > 0 and by_name["rng"]["mb_per_s"] > 0
    assert by_name["console"]["echoed"] == "vmsgamp console echo"
    assert by_name["i2c"]["match"] and by_name["i2c"]["written"] == by_name["i2c"]["read_back"]
    assert by_name["gpio"]["irq"] == "VALID"
    assert r["ping"]["count"] == 200 and r["device_process"]["exit_code"] == 0
    assert r["bus"]["timeouts"] == 0 and r["bus"]["rx_malformed"] == 0


def test_emulate_split_ring_and_layout_a():
    p = subprocess.run([sys.executable, "-m", "vmsgamp", "emulate", "--devices", "rng,i2c:sim",
                        "--packed", "off", "--layout", "a", "--duration", "0.1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "split ring" in p.stdout and "read back identical" in p.stdout
