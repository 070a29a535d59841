"""``vmsgamp bench devices`` end to end on tiny counts: every figure the issue
asks for is there and sane; the blk figures come from reads checked against
the image.  No assertion on speed."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from vmsgamp._bench import devices, harness

KEYS = ("ping_rtt_p50_us", "ping_shm_rtt_p50_us", "ping_ivshmem_rtt_p50_us", "console_rtt_p50_us", "rng_request_rtt_p50_us", "rng_mb_per_s",
        "blk_seq_mb_per_s", "blk_rand_iops", "fifo_busy_rtt_p50_us")


def _args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true")
    devices.add_arguments(p)
    return p.parse_args(["--duration", "0.05", "--pings", "30", "--round-trips", "30", "--blk-mb", "2",
                         *extra])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the same-run FIFO figure needs two CPUs")
def test_devices_json_has_every_figure() -> None:
    proc = subprocess.run([sys.executable, "-m", "vmsgamp", "bench", "devices", "--json", "--duration", "0.05",
                           "--pings", "30", "--round-trips", "30", "--blk-mb", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    for key in KEYS:
        assert r[key] > 0, key
    assert 0 < r["blk_seq_vs_memcpy"] and r["memcpy_mb_per_s"] > 0
    assert r["rng_source"] == "zero" and r["doorbell"] == "eventfd"
    for start, end in (("bus PING round trip", "(shm: polling, default wait)"),
                       ("bus PING round trip", "(ivshmem: eventfd doorbells, default wait)"),
                       ("console echo round trip", "us"), ("64-byte rng request round trip", "us")):
        found = [v for v in r["verdicts"] if v["target"].startswith(start) and v["target"].endswith(end)]
        assert len(found) == 1 and found[0]["status"] in ("PASS", "MISS"), (start, end)


def test_polling_doorbell_and_human_output() -> None:
    r = devices.run(_args("--doorbell", "polling", "--no-fifo", "--rng-source", "pattern"))
    assert r["doorbell"] == "polling" and "fifo_busy_rtt_p50_us" not in r
    assert r["ping_rtt_p50_us"] == r["ping_shm_rtt_p50_us"] and r["ping_ivshmem_rtt_p50_us"] > 0
    text = devices.format_human(r)
    assert "polling doorbells" in text and "shm: polling" in text
    assert text.count("\nverdict ") == len(r["verdicts"])
    assert next(v for v in r["verdicts"] if "MsgFifo" in v["target"])["status"] == "n/a"


def test_shm_image_and_memcpy(tmp_path) -> None:
    with devices.shm_image(2) as path:
        data = open(path, "rb").read()
        assert len(data) == 2 << 20 and data[1:256] == bytes(range(1, 256)) and data[1 << 20] == 1
        assert devices.memcpy_mb_per_s(path, 65536, 1 << 20) > 0
    assert not os.path.exists(path)


def test_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from vmsgamp._bench import plot

    r = {"ping_rtt_p50_us": 20.0, "ping_rtt_p99_us": 40.0, "console_split_rtt_p50_us": 90.0,
         "console_split_rtt_p99_us": 150.0, "fifo_busy_rtt_p50_us": 0.5, "fifo_busy_rtt_p99_us": 0.9,
         "blk_seq_split_mb_per_s": 900.0, "blk_seq_packed_mb_per_s": 1000.0, "memcpy_mb_per_s": 3000.0,
         "rng_split_mb_per_s": 300.0, "rng_packed_mb_per_s": 310.0, "blk_rand_iops": 50000.0}
    out = tmp_path / "devices.png"
    plot.devices(r, {"rng request (split)": [20.0, 22.0, 30.0]}, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = tmp_path / "fifo.png"
    plot.fifo({"send_msgs_per_s": 2e7, "burst_msgs_per_s": 9e7, "rtt_busy_p50_us": 0.5,
               "rtt_busy_p99_us": 0.6}, str(out2))
    assert out2.read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_is_one_clear_error(monkeypatch) -> None:
    import builtins

    from vmsgamp._bench import plot

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(harness.BenchError, match=r"vmsgamp\[plot\]"):
        plot.fifo({}, "/nonexistent/x.png")
