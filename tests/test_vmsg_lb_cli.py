"""`vmsgamp serve --region vmsg-lb:` and `vmsgamp doctor vmsg-lb:` against
the fake user-API kernel.  serve runs in a child process (real signals):
the child hosts the fake kernel, whose drivers use the devices once they
are added and then send the signal; the kernel's record comes back as JSON
on stderr."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vmsgamp.cli import main
from vmsgamp.testing.fake_userapi import FakeUserApiKernel

SCRIPT = r"""
import json, os, signal, sys, threading
import vmsgamp.carriers.vmsg_lb as lb
from vmsgamp.cli import main
from vmsgamp.testing.fake_userapi import FakeUserApiKernel

opts = json.loads(sys.argv[1])
kernel = FakeUserApiKernel(base=0x70000000, **opts.get("kernel", {}))
real_open_nodes, lb.open_nodes = lb.open_nodes, kernel.open_nodes
if "remove_timeout" in opts:
    import vmsgamp._cmd._serve_vmsg_lb as serve_lb
    serve_lb.REMOVE_TIMEOUT = opts["remove_timeout"]
if opts.get("busy"):
    other = kernel.open_nodes()            # another device side already has the node open
record = {}

def drive():
    try:
        if kernel.wait_until(lambda k: len(k.bound()) == 3, 60):
            record["entropy"] = len(kernel.read_entropy(0, 256))
            with kernel.locked():
                i2c = kernel.client(1)
                i2c.write_i2c_block_data(0x50, 0, list(b"eeprom"))
                record["eeprom"] = bytes(i2c.read_i2c_block_data(0x50, 0, 6)).decode()
                con = kernel.client(2)
                con.write(b"echo me\n")
                record["console"] = con.readline(timeout=5).decode()
            if opts.get("poweroff"):
                kernel.poweroff()
    except BaseException as e:
        record["error"] = repr(e)
    for sig in opts["signals"]:
        os.kill(os.getpid(), getattr(signal, sig))
        kernel.wait_until(lambda k: False, opts.get("between", 0))

if opts["signals"]:
    threading.Thread(target=drive, daemon=True).start()
try:
    rc = main(["serve", "--region", opts.get("uri", "vmsg-lb:#base=0x70000000"),
               "--devices", "rng,i2c:sim,console:echo"] + opts.get("args", []))
finally:
    record.update(ioctls=kernel.ioctls, left=sorted(kernel.devices), violations=kernel.violations,
                  strays=kernel.stats["strays"], transfers=kernel.stats["transfers"],
                  notes=kernel.notes)
    print("KERNEL " + json.dumps(record), file=sys.stderr, flush=True)
    lb.open_nodes = real_open_nodes
    kernel.close()
sys.exit(rc)
"""


def _serve(opts: dict, timeout: float = 120) -> tuple[int, str, str, dict]:
    p = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(opts)], capture_output=True,
                       text=True, timeout=timeout)
    line = next((ln for ln in p.stderr.splitlines() if ln.startswith("KERNEL ")), None)
    assert line is not None, p.stderr
    return p.returncode, p.stdout, p.stderr, json.loads(line[len("KERNEL "):])


ADDED = [["ADD", 0], ["ADD", 1], ["ADD", 2]]
REMOVED = [["REMOVE", 2], ["REMOVE", 1], ["REMOVE", 0]]


def _clean(k: dict) -> None:
    assert k["violations"] == [] and k["strays"] == 0 and k["notes"] == []


def test_serve_devices_to_the_kernel_then_sigterm_removes_them():
    rc, out, err, k = _serve({"signals": ["SIGTERM"], "poweroff": True})
    assert rc == 0, err
    assert (k["entropy"], k["eeprom"], k["console"]) == (256, "eeprom", "echo me\n")
    assert k["ioctls"] == ADDED + REMOVED and k["left"] == []
    _clean(k)
    assert "base 0x70000000 (from base= option)" in out
    assert "dev_id 2: console (virtio id 3) added" in out and "3 device(s) removed" in out


def test_serve_json_prints_one_object_and_sigint_is_interrupted():
    rc, out, err, k = _serve({"signals": ["SIGINT"], "args": ["--json"]})
    assert rc == 130 and "interrupted" in err
    info = json.loads(out)
    assert [d["dev_id"] for d in info["devices"]] == [0, 1, 2]
    assert (info["base"], info["base_source"]) == (0x70000000, "base= option")
    assert k["ioctls"] == ADDED + REMOVED
    _clean(k)


def test_serve_says_when_remove_is_stuck_and_a_second_signal_quits():
    rc, out, err, k = _serve({"signals": ["SIGTERM", "SIGTERM"], "between": 1.5, "remove_timeout": 0.5,
                              "kernel": {"remove_deadlocks": True}})
    assert rc == 1
    assert "REMOVE of dev_id 2 has not returned after 0.5 s" in err and "deadlock" in err
    assert "still on the loopback bus" in err
    assert k["ioctls"] == ADDED + [["REMOVE", 2]] and k["left"] == [0, 1, 2]
    assert k["entropy"] == 256
    _clean(k)


@pytest.mark.parametrize("opts,why", [
    ({"busy": True}, "already open in fake opener"),
    ({"kernel": {"deny": True}}, "root-only"),
    ({"uri": "vmsg-lb:/dev/virtio-msg-lb#msg=/dev/virtio-msg-3&base=0"}, "cannot open the"),
])
def test_serve_refuses_to_add_when_it_cannot_serve(opts, why):
    rc, out, err, k = _serve({"signals": [], **opts})
    assert rc == 1 and why in err and "nothing was added" in err
    assert k["ioctls"] == [] and k["transfers"] == 0


def test_serve_refuses_without_a_base(tmp_path, monkeypatch):
    (tmp_path / "proc").mkdir()
    monkeypatch.setenv("VMSGAMP_PROC_ROOT", str(tmp_path / "proc"))
    rc, out, err, k = _serve({"signals": [], "uri": "vmsg-lb:"})
    assert rc == 1 and "base=ADDR" in err and k["ioctls"] == []


def test_serve_rejects_amp_only_options(capsys):
    assert main(["serve", "--region", "vmsg-lb:#base=0", "--devices", "rng", "--memory", "/x"]) == 1
    assert "--memory does not apply to vmsg-lb:" in capsys.readouterr().err


def test_doctor_reports_nodes_base_and_region(tmp_path, monkeypatch, capsys):
    import vmsgamp.carriers.vmsg_lb as lb

    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("virtio-msg-lb", "virtio-msg-0"):
        (dev / name).write_bytes(b"")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "iomem").write_text("70000000-703fffff : virtio-msg-lb\n")
    sysfs = tmp_path / "sys" / "module" / "virtio_msg_lb"
    sysfs.mkdir(parents=True)
    monkeypatch.setenv("VMSGAMP_DEV_ROOT", str(dev))
    monkeypatch.setenv("VMSGAMP_PROC_ROOT", str(proc))
    monkeypatch.setenv("VMSGAMP_SYSFS_ROOT", str(tmp_path / "sys"))
    with FakeUserApiKernel(base=0x70000000) as k:
        monkeypatch.setattr(lb, "open_nodes", k.open_nodes)
        assert main(["doctor", "vmsg-lb:", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        checks = {c["check"]: c for c in report["checks"]}
        assert checks["modules"]["why"] == "loaded: virtio_msg_lb"
        assert checks["control node"]["status"] == checks["message node"]["status"] == "ok"
        assert checks["base"]["why"] == f"0x70000000, 0x400000 bytes from {proc}/iomem (virtio-msg-lb)"
        assert checks["region"]["status"] == "ok" and "ACCESS_PLATFORM" in checks["region"]["why"]
        assert "region size" not in checks
        assert k.ioctls == [] and k.stats["transfers"] == 0       # doctor changes nothing

        (proc / "iomem").write_text("70000000-701fffff : virtio-msg-lb\n")
        assert main(["doctor", "vmsg-lb:"]) == 1
        out = capsys.readouterr()
        assert "region size" in out.out and "says 0x200000 bytes" in out.out

    os.unlink(dev / "virtio-msg-0")
    (proc / "iomem").unlink()
    assert main(["doctor", "vmsg-lb:"]) == 1
    out = capsys.readouterr().out
    assert "missing  message node" in out and "base=ADDR" in out and "not attempted" in out
