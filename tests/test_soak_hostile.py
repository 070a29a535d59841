"""Issue: a soak with a hostile peer process writing random and adversarial
values into every shared field while real endpoints (device side serving
rng and i2c, driver side using both) run.  The endpoints must not crash,
hang or touch memory outside their mappings, and must recover once the peer
behaves again.  Three seconds here; ``bench/soak_hostile.py`` runs longer."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from vmsgamp.testing.hostile import soak


def test_endpoints_survive_and_recover_from_a_hostile_peer():
    report = soak(3.0, seed=1)
    spec = importlib.util.spec_from_file_location(
        "soak_hostile", Path(__file__).resolve().parents[1] / "bench" / "soak_hostile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = bench.summary(report)
    print(figures)                          # shown with -s, and below on a failure
    attacked, dev, drv = report["attacked"], report["device"], report["driver"]
    # Few writes on a loaded machine, but every kind of target was hit.
    assert attacked["total"] > 200 and len(attacked) == 5, figures
    # The attack was felt on both sides, and both recovered from it.
    assert dev["fifo_breaks"] + dev["overwrites"] + dev["rx_malformed"] > 0, figures
    assert dev["recoveries"] >= 1 and drv["restarts"] >= 1, figures
    assert dev["loop_errors"] == 0 and dev["dispatch_errors"] == 0, figures
    assert drv["final_rounds_ok"] == 3 and drv["unexpected"] == [], figures
