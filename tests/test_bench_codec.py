"""Smoke tests for the protocol-layer micro-benchmark and its before/after
runner.  They check the machinery and the shape of the results, never speed."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from vmsgamp._bench import codec
from vmsgamp._bench.verdict import check, format_lines, summary

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_codec_suite_measures_every_hot_message_and_step() -> None:
    r = codec.run_suite(iters=20, repeat=1)
    names = ["ping_req", "ping_resp", "event_avail", "event_used", "get_device_info_resp",
             "get_features_resp", "set_features_req", "set_vqueue_req", "get_devices_resp"]
    for n in names:
        assert r[f"encode_{n}_ns"] > 0 and r[f"decode_{n}_ns"] > 0, n
    for step in ("ping_exchange", "device_ping", "driver_notify", "device_event_avail",
                 "device_notify_used", "driver_event_used", "request_exchange"):
        assert r[f"step_{step}_ns"] > 0, step
    assert r["call_floor_ns"] > 0
    vs = codec.verdicts(r)
    assert [v["target"].split()[0] for v in vs] == ["encode", "decode"]
    assert {v["status"] for v in vs} <= {"PASS", "MISS"}
    text = codec.format_human({**r, "iters": 20, "repeat": 1, "runs": 1, "verdicts": vs})
    assert "ping_req" in text and text.count("verdict ") == 2


def test_compare_codec_loads_another_revision(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    cc = _load("compare_codec")
    before = cc.load_protocol_at("HEAD", tmp_path)
    assert before.__name__ != "vmsgamp.protocol" and hasattr(before, "DriverConnection")
    import vmsgamp.protocol as after

    report = cc.compare(before, after, runs=1, iters=5, repeat=1, log=lambda s: None)
    row = report["table"]["decode_ping_req_ns"]
    assert row["before_ns"] > 0 and row["after_ns"] > 0 and row["speedup"] > 0
    assert "| decode_ping_req |" in cc.format_report("HEAD", report)


def test_verdicts() -> None:
    assert check("x", 4.0, 5.0)["status"] == "PASS"
    assert check("x", 6.0, 5.0)["status"] == "MISS"
    assert check("x", 6.0, 5.0, at_least=True)["status"] == "PASS"
    assert check("x", None, 5.0)["status"] == "n/a"  # not measured is never a pass
    assert check("x", 1.0, None)["status"] == "info"
    lines = format_lines([check("ping <= 5 us", 3.14159, 5.0, unit="us", detail="eventfd")])
    assert lines == ["verdict PASS  ping <= 5 us: measured 3.14 us (eventfd)"]
    assert format_lines([check("t", None, 1.0)]) == ["verdict n/a   t: measured not measured"]
    assert summary([check("a", 1, 2), check("b", 3, 2), check("c", None, 2)]) == \
        {"PASS": 1, "MISS": 1, "n/a": 1, "info": 0}


def test_bus_ping_profiler_runs() -> None:
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_bus_ping.py"), "--count", "30",
                           "--top", "3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "no profiler): p50" in out and "driver process" in out and "device process" in out
    assert out.count("us per PING") == 2
