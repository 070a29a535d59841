"""Smoke tests for the FIFO comparison runner (bench/compare_fifo.py).

They run the real machinery -- gcc, the C reference in all four modes, every
Python mechanism in two pinned processes -- on tiny counts, and check that
the numbers are there and sane.  They never assert on speed: timing belongs
in bench/, and this machine may be shared.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from vmsgamp._bench import harness

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "bench" / "compare_fifo.py"

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="two-process benchmarks need two CPUs"
)


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare_fifo", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


cf = _load_runner()
TINY = cf.Counts().scaled(0.0005, minimum=50)
CPUS = harness.pick_cpus()


@pytest.fixture(scope="module")
def c_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which(os.environ.get("CC") or "gcc") is None:
        pytest.skip("no C compiler (gcc) on this machine")
    return harness.compile_c(cf.C_SOURCE, out_dir=tmp_path_factory.mktemp("bench-out"))


# ---- harness helpers --------------------------------------------------------


def test_percentiles_nearest_rank() -> None:
    samples = list(range(1000, 0, -1))  # 1..1000 ns, unsorted on purpose
    p = harness.percentiles(samples)
    assert p["p50_us"] == 0.5
    assert p["p99_us"] == 0.99
    assert p["p999_us"] == 0.999
    assert p["min_us"] == 0.001
    assert p["mean_us"] == pytest.approx(0.5005)
    assert harness.percentiles([7000])["p999_us"] == 7.0
    with pytest.raises(ValueError):
        harness.percentiles([])


def test_median_dicts_skips_missing_and_non_numeric() -> None:
    runs = [{"a": 1.0, "b": 10, "name": "x"}, {"a": 3.0}, {"a": 2.0, "b": 30, "flag": True}]
    assert harness.median_dicts(runs) == {"a": 2.0, "b": 20.0}
    medians, raw = harness.median_of_n(iter([{"v": 5}, {"v": 1}, {"v": 3}]).__next__, 3)
    assert medians == {"v": 3} and len(raw) == 3


def test_pick_cpus_rejects_same_cpu() -> None:
    a, b = CPUS
    assert a != b
    with pytest.raises(harness.BenchError):
        harness.pick_cpus((a, a))


def test_run_pair_reports_child_failure() -> None:
    def child(ready: harness.ReadyFn) -> None:
        raise ValueError("boom in child")

    with pytest.raises(harness.BenchError, match="boom in child"):
        harness.run_pair(lambda: None, child, CPUS, timeout=20)
    # The parent's affinity is restored afterwards.
    assert len(os.sched_getaffinity(0)) >= 2


def test_run_pair_pins_both_processes() -> None:
    def child(ready: harness.ReadyFn) -> harness.ResultDict:
        ready()
        return {"affinity": sorted(os.sched_getaffinity(0))}

    parent, child_result = harness.run_pair(
        lambda: {"affinity": sorted(os.sched_getaffinity(0))}, child, CPUS, timeout=20
    )
    assert parent["affinity"] == [CPUS[0]]
    assert child_result["affinity"] == [CPUS[1]]


def test_compile_c_only_when_out_of_date(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    src = tmp_path / "hello.c"
    src.write_text("int main(void) { return 3; }\n")
    out = tmp_path / "out"
    first = harness.compile_c(src, out_dir=out)
    stamp = first.stat().st_mtime_ns
    assert harness.compile_c(src, out_dir=out) == first
    assert first.stat().st_mtime_ns == stamp  # not rebuilt
    assert subprocess.run([str(first)]).returncode == 3
    bad = tmp_path / "bad.c"
    bad.write_text("int main(void) { return }\n")
    with pytest.raises(harness.BenchError, match="compiling bad.c failed"):
        harness.compile_c(bad, out_dir=out)


# ---- the C reference --------------------------------------------------------


@pytest.mark.parametrize("mode", cf.C_MODES)
def test_c_reference_mode(c_binary: Path, mode: str) -> None:
    count = {"send": 20_000, "burst": 20_000, "rtt_busy": 2_000, "eventfd_pingpong": 100}[mode]
    result = cf.run_c_ref(c_binary, mode, count, CPUS, timeout=20)
    assert result["mode"] == mode
    assert result["msg_size"] == 64
    assert result["cpus"] == list(CPUS)
    assert result["errors"] == 0
    if mode in ("send", "burst"):
        assert result["msgs"] == count
        assert result["burst"] == (32 if mode == "burst" else 1)
        assert result["seconds"] > 0 and result["msgs_per_s"] > 0
    else:
        assert result["iters"] == count
        assert 0 < result["min_us"] <= result["p50_us"] <= result["p99_us"] <= result["p999_us"]


def test_c_reference_rejects_one_cpu(c_binary: Path) -> None:
    proc = subprocess.run([str(c_binary), "send", "-n", "10", "-a", "0", "-b", "0"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2
    assert "different CPUs" in proc.stderr


# ---- the comparison ---------------------------------------------------------


def test_comparison_without_vmsgamp(c_binary: Path) -> None:
    report = cf.run_comparison(TINY, 1, CPUS, include_vmsgamp=False,
                               out_dir=c_binary.parent, log=lambda s: None)
    assert report["errors"] == []
    med = report["medians"]
    c = med["c_ref"]
    for key in ("send_msgs_per_s", "burst_msgs_per_s", "rtt_busy_p50_us", "rtt_busy_p99_us",
                "eventfd_p50_us", "eventfd_p99_us"):
        assert c[key] > 0, key
    expected = {m.key for m in cf.PY_MECHANISMS if cf.skip_reason(m) is None}
    assert expected - {"posix_mq"} == {"mp_queue", "mp_pipe", "os_pipe", "seqpacket", "py_ring"}
    for key in expected:
        m = med[key]
        assert m["msgs_per_s"] > 0, key
        assert 0 < m["rtt_p50_us"] <= m["rtt_p99_us"] <= m["rtt_p999_us"], key
    # vmsgamp absent: its targets are n/a, never PASS/MISS on missing data.
    assert {t["status"] for t in report["targets"]} == {"n/a"}
    text = cf.format_report(report)
    assert "| multiprocessing.Queue |" in text and "### Targets" in text
    json.dumps(report)  # --json must be able to write it


def test_cli_quick_json(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    out = tmp_path / "report.json"
    # Runs the script as a user would, from the checkout, without vmsgamp's
    # own FIFO so the test stays small whatever state run_suite is in.
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--quick", "--no-vmsgamp", "--json", str(out),
         "--cpus", f"{CPUS[0]},{CPUS[1]}"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| mechanism |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["runs"] == 1 and report["msg_size"] == 64
    assert report["medians"]["c_ref"]["send_msgs_per_s"] > 0


def test_vmsgamp_suite_contract() -> None:
    run_suite, reason = cf.load_vmsgamp_suite()
    assert run_suite is not None, reason   # vmsgamp._bench.fifo ships with the package
    result = cf.measure_vmsgamp(run_suite, TINY, CPUS)
    for key in ("send_msgs_per_s", "burst_msgs_per_s", "rtt_busy_p50_us", "rtt_busy_p99_us",
                "rtt_block_p50_us", "rtt_block_p99_us", "rtt_spin_p50_us"):
        assert result[key] > 0, key
    assert result["rtt_busy_p50_us"] <= result["rtt_busy_p99_us"]
    assert result["rtt_block_p50_us"] <= result["rtt_block_p99_us"]


# ---- the same work everywhere (issue 14) -------------------------------------------------------


@pytest.mark.parametrize("key", ["os_pipe", "seqpacket", "py_ring", "mp_pipe"])
def test_python_mechanisms_check_sequence_numbers(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    mech = next(m for m in cf.PY_MECHANISMS if m.key == key)
    counts = cf.Counts().scaled(0.0005, minimum=200)
    assert cf.measure_python(mech, counts, CPUS)["msgs_per_s"] > 0
    real = cf._Stamp.__call__

    def skip_seven(self, seq):  # message 7 claims to be 8: one lost, one duplicated
        return real(self, 8 if seq == 7 else seq)

    monkeypatch.setattr(cf._Stamp, "__call__", skip_seven)
    with pytest.raises(harness.BenchError, match="out-of-order"):
        cf.measure_python(mech, counts, CPUS)


def test_breakdown_uses_the_same_runs_c_figure() -> None:
    run = {"vmsgamp": {"send_msgs_per_s": 10e6, "call_floor_ns": 40.0}, "c_ref": {"send_msgs_per_s": 50e6}}
    cf.add_breakdown(run)
    v = run["vmsgamp"]
    assert v["per_msg_ns"] == pytest.approx(100) and v["c_per_msg_ns"] == pytest.approx(20)
    assert v["overhead_ns"] == pytest.approx(40) and v["per_msg_vs_floor_plus_c"] == pytest.approx(100 / 60)
    lone = {"vmsgamp": {"send_msgs_per_s": 10e6, "call_floor_ns": 40.0}}
    cf.add_breakdown(lone)  # no C step this run: nothing invented
    assert "per_msg_ns" not in lone["vmsgamp"]
    targets = cf.evaluate_targets({"vmsgamp": v}, {})
    floor_target = next(t for t in targets if "call floor" in t["text"])
    assert floor_target["status"] == "MISS"
