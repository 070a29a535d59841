"""`vmsgamp trace`, `--trace` on the endpoint commands and `decode --pcap`, as
a user runs them: separate processes over one shared-memory object."""
from __future__ import annotations

import functools
import json
import os
import signal
import time
import uuid

import pytest
from cli_support import run_vmsgamp, spawn

from vmsgamp.trace import DIR_INBOUND, DIR_OUTBOUND, read_capture


vm = functools.partial(run_vmsgamp, timeout=120, check=True)


def _stop(p, sig=signal.SIGTERM):
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    return p.returncode, out, err


def _wait_for_line(p, needle, timeout=20):
    """Read p's stderr until a line containing needle (the observer's notices)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"never saw {needle!r}; stderr so far: {''.join(seen)}")


def _dirs(path):
    _ifaces, packets = read_capture(path)
    return ([p.data for p in packets if p.direction == DIR_OUTBOUND],
            [p.data for p in packets if p.direction == DIR_INBOUND])


@pytest.fixture
def shm_name():
    name = f"vmsgamp-trace-{uuid.uuid4().hex[:8]}"
    yield name
    if os.path.exists(f"/dev/shm/{name}"):
        os.unlink(f"/dev/shm/{name}")


def test_dissector_path():
    path = vm("trace", "--dissector-path").stdout.strip()
    assert os.path.isabs(path) and path.endswith("vmsg.lua") and os.path.isfile(path)
    assert 'Proto("vmsg"' in open(path).read()
    assert json.loads(vm("trace", "--dissector-path", "--json").stdout) == {"dissector_path": path}


@pytest.mark.parametrize("args", [["trace"], ["trace", "--region", "shm:x", "-c", "0"],
                                  ["decode"], ["decode", "00", "--pcap", "x.pcapng"]])
def test_usage_errors(args):
    p = vm(*args, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr


def test_decode_pcap_errors(tmp_path):
    p = vm("decode", "--pcap", str(tmp_path / "missing.pcapng"), check=False)
    assert p.returncode == 1 and "no such file" in p.stderr
    bad = tmp_path / "bad.pcapng"
    bad.write_bytes(b"not a capture at all")
    p = vm("decode", "--pcap", str(bad), check=False)
    assert p.returncode == 1 and "not a pcapng or pcap file" in p.stderr and p.stderr.count("\n") == 1


def test_two_endpoints_and_a_passive_observer_see_the_same_messages(tmp_path, shm_name):
    """serve --trace, devices --trace and ping --trace (two driver sessions in
    a row) and a passive `vmsgamp trace -w` started before any driver: the
    captures hold exactly what each endpoint counted, the device's capture
    holds the drivers' messages in order, and the observer saw all of them
    (or says how many it missed)."""
    dev_cap, pas_cap = tmp_path / "serve.pcapng", tmp_path / "passive.pcapng"
    drv_caps = [tmp_path / "devices.pcapng", tmp_path / "ping.pcapng"]
    serve = spawn("serve", "--region", f"shm:{shm_name}#create=1&size=1M", "--devices", "rng,console:echo",
                  "--json", "--trace", str(dev_cap))
    trace = None
    try:
        assert json.loads(serve.stdout.readline())["devices"]
        trace = spawn("trace", "--region", f"shm:{shm_name}", "-w", str(pas_cap), "--print")
        _wait_for_line(trace, "waiting for both sides to reach RUN")
        out = json.loads(vm("devices", "--region", f"shm:{shm_name}", "--trace", str(drv_caps[0]),
                            "--json").stdout)
        ping = json.loads(vm("ping", "--region", f"shm:{shm_name}", "-n", "50", "--trace", str(drv_caps[1]),
                             "--json").stdout)
        assert len(out["devices"]) == 2 and ping["count"] == 50
        rc, printed, err = _stop(trace)
        assert rc == 0, err
        trace = None
    finally:
        if trace is not None:
            _stop(trace)
        rc, _out, serve_err = _stop(serve)
    assert rc == 0, serve_err
    # Each driver's capture against its own counters.
    drv_out, drv_in = [], []
    for cap, report in zip(drv_caps, (out, ping)):
        o, i = _dirs(cap)
        c = report["trace"]["bus_counters"]
        assert (len(o), len(i)) == (c["tx_messages"], c["rx_messages"] + c["rx_malformed"])
        assert report["trace"]["messages"] == len(o) + len(i)
        drv_out += o
        drv_in += i
    assert len(drv_out) == len(drv_in) > 50
    # The device's capture: what it said it counted, and the drivers' messages in order.
    line = [ln for ln in serve_err.splitlines() if "vmsgamp serve: trace" in ln]
    assert len(line) == 1, serve_err
    dev_out, dev_in = _dirs(dev_cap)
    assert (f"{len(dev_out) + len(dev_in)} messages ({len(dev_out)} driver->device, "
            f"{len(dev_in)} device->driver); bus counted {len(dev_in)} sent, {len(dev_out)} received, "
            f"0 malformed") in line[0]
    assert (dev_out, dev_in) == (drv_out, drv_in)
    # The passive observer: the same messages, or exactly as many fewer as it reported missed.
    pas_out, pas_in = _dirs(pas_cap)
    summary = err.strip().splitlines()[-1]
    assert summary.startswith(f"vmsgamp trace: {len(pas_out) + len(pas_in)} messages, ")
    missed = int(summary.split(", ")[1].split()[-2])
    _account(len(pas_out) + len(pas_in), missed, "at least" in summary, len(drv_out) + len(drv_in))
    if missed == 0:
        assert (pas_out, pas_in) == (drv_out, drv_in)
    else:
        for got, want in ((pas_out, drv_out), (pas_in, drv_in)):
            it = iter(want)
            assert all(m in it for m in got)          # a subsequence: nothing invented
    # Two sessions: each one followed ("bus up") or, on a busy machine, gone by
    # between two looks and reported as such (one look, one timestamp, up to
    # one record per direction; each session here is shorter than the ring).
    unseen = len({ln.split()[0] for ln in printed.splitlines() if "a whole session went by" in ln})
    assert sum(ln.count("bus up") for ln in err.splitlines()) + unseen == 2
    # decode --pcap prints the capture exactly as trace printed it live.
    # (The capture holds messages only: what was missed is said live.)
    live = "".join(ln for ln in printed.splitlines(keepends=True) if "*** missed" not in ln)
    assert vm("decode", "--pcap", str(pas_cap)).stdout == live
    out = json.loads(vm("decode", "--pcap", str(pas_cap), "--json").stdout)   # one object
    records = out["messages"]
    assert out["count"] == len(records) == len(pas_out) + len(pas_in) and out["file"] == str(pas_cap)
    assert {r["direction"] for r in records} == {"driver_to_device", "device_to_driver"}
    assert all(r["interface"] == f"shm:{shm_name}" and r["profile"] == "g2" for r in records)


def _account(n_seen: int, missed: int, at_least: bool, total: int) -> None:
    """What a passive observer saw plus what it said it missed is the truth
    (a lower bound when it said "at least")."""
    if at_least:
        assert n_seen + missed <= total
    else:
        assert n_seen + missed == total


def test_json_lines_count_and_ctrl_c(shm_name):
    """10 messages (5 pings); one observer stops after 6 (--json), one runs
    until Ctrl-C.  Under heavy load an observer may fall behind; then it must
    say so, in numbers."""
    serve = spawn("serve", "--region", f"shm:{shm_name}#create=1&size=1M", "--devices", "rng", "--json")
    try:
        json.loads(serve.stdout.readline())
        counted = spawn("trace", "--region", f"shm:{shm_name}", "--json", "-c", "6", "--duration", "30")
        endless = spawn("trace", "--region", f"shm:{shm_name}")
        _wait_for_line(endless, "waiting for both sides to reach RUN")
        first = []                              # --json: notices are records on stdout
        while "waiting for both sides" not in "".join(first):
            first.append(counted.stdout.readline())
            assert first[-1], counted.stderr.read()
        vm("ping", "--region", f"shm:{shm_name}", "-n", "5")
        out, err = counted.communicate(timeout=60)
        assert counted.returncode == 0, err
        records = [json.loads(ln) for ln in "".join(first + [out]).splitlines()]
        assert {r["record"] for r in records[:-1]} <= {"bus", "message", "missed"}
        msgs = [r for r in records if r["record"] == "message"]
        end = records[-1]
        assert end["record"] == "end" and end["messages"] == len(msgs)
        assert end["missed"] == sum(r["count"] for r in records if r["record"] == "missed")
        assert end["reason"] == ("count" if len(msgs) == 6 else "duration")
        assert all(m["name"] == "PING" and m["kind"] == "bus" and m["hex"] for m in msgs)
        if not end["missed"]:
            assert len(msgs) == 6 and [m["response"] for m in msgs] == [False, True] * 3
            assert [m["direction"] for m in msgs] == ["driver_to_device", "device_to_driver"] * 3
        rc, printed, err = _stop(endless, signal.SIGINT)
        assert rc == 130
        last = err.strip().splitlines()[-1]
        lines = printed.splitlines()
        seen = [ln for ln in lines if " PING " in ln]
        assert last == (f"vmsgamp trace: interrupted after {len(seen)} messages, "
                        + last.split(", ", 1)[1])
        missed_text = last.split(", ", 1)[1]
        _account(len(seen), int(missed_text.split()[-2]), "at least" in missed_text, 10)
        assert all("*** missed" in ln for ln in lines if ln not in seen)
    finally:
        _stop(serve)


def test_emulate_traces_both_ends(tmp_path):
    cap = tmp_path / "emu.pcapng"
    report = json.loads(vm("emulate", "--duration", "0.05", "--json", "--trace", str(cap)).stdout)
    drv = report["trace"]["driver"]
    dev = report["trace"]["device"]
    assert drv["file"] == str(cap) and dev["file"] == str(tmp_path / "emu.device.pcapng")
    c = drv["bus_counters"]
    d_out, d_in = _dirs(cap)
    assert (len(d_out), len(d_in)) == (c["tx_messages"], c["rx_messages"] + c["rx_malformed"])
    assert (drv["driver_to_device"], drv["device_to_driver"]) == (len(d_out), len(d_in))
    v_out, v_in = _dirs(dev["file"])
    assert (dev["driver_to_device"], dev["device_to_driver"]) == (len(v_out), len(v_in))
    # The device end received what the driver sent (all of it: the driver's last
    # requests were answered) and sent at least what the driver received.
    assert v_out == d_out
    assert v_in[:len(d_in)] == d_in
