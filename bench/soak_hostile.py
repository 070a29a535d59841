#!/usr/bin/env python3
"""Hostile-peer soak, as long as you like (the test suite runs 3 s).

A device side (rng + i2c) and a driver side run over one region while a
third process writes random and adversarial values into every shared field;
then it stops, and the driver must recover with correct data.  Prints the
figures: writes per target, sessions ended and restarted, FIFO breaks,
overwrites noticed, malformed messages, broken queues, driver rounds.

    python bench/soak_hostile.py                   # 60 s, seed 1
    python bench/soak_hostile.py --duration 600 --seed 7 --json out.json

Exit code 0: no crash, no hang, recovered; 1 otherwise (the reason printed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from vmsgamp.testing.hostile import SoakFailure, soak
except ImportError:  # run from a checkout without installing: use the tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from vmsgamp.testing.hostile import SoakFailure, soak


def summary(r: dict) -> str:
    a, d, v = r["attacked"], r["device"], r["driver"]
    lines = [f"hostile soak: {r['duration_s']:.0f} s, seed {r['seed']}",
             f"  attacked: {a['total']} writes (" + ", ".join(f"{k} {n}" for k, n in sorted(a.items())
                                                          if k != "total") + ")",
             f"  device side: {d['sessions']} sessions ({d['recoveries']} recoveries), "
             f"{d['fifo_breaks']} FIFO breaks, {d['overwrites']} overwrites noticed, "
             f"{d['rx_malformed']} malformed messages, {d['devices_broken']} broken queues, "
             f"{d['dispatch_errors']} dispatch errors, {d['loop_errors']} loop errors",
             f"  driver side: {v['rounds_ok']} clean rounds under attack, {v['restarts']} restarts, "
             f"errors {v['errors']}, {v['bus']['fifo_breaks']} FIFO breaks; after the attack "
             f"{v['final_rounds_ok']} clean rounds"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of attack (default 60)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = ap.parse_args()
    try:
        report = soak(args.duration, seed=args.seed)
    except SoakFailure as e:
        print(f"soak failed: {e}", file=sys.stderr)
        return 1
    print(summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
