#!/usr/bin/env python3
"""vmsgamp's driver against the device kit's firmware on an emulated
Cortex-M4 (QEMU mps2-an386, TCG): polling versus the UART doorbell.

Issue 15, item 7.  For each doorbell mode, in the same run:

* PING round trip, hot: back-to-back pings (the firmware is still spinning
  after the previous message, no interrupt involved);
* PING round trip, cold: pings 10 ms apart (the firmware sleeps in WFI; with
  polling it looks again on its 1 ms tick, with the UART doorbell the host's
  byte wakes it at once and its byte back wakes the host);
* virtio-rng throughput: 4 KiB requests, 32 in flight (the emulate exercise).

The modes run interleaved (poll, uart, poll, uart, ...) over ``--runs``
machines and the table shows medians.  All numbers are timings of a CPU
emulated by TCG on this host: they compare the two doorbells with each
other, not with a real M4.

    python bench/m4_firmware.py                  # 3 runs each
    python bench/m4_firmware.py --quick          # one short run each
    python bench/m4_firmware.py --json out.json  # also write raw numbers
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
try:
    import vmsgamp  # noqa: F401
except ImportError:  # run from a checkout without installing: use the tree
    sys.path.insert(0, str(HERE.parent))

from vmsgamp._core.addrspace import RegionAllocator  # noqa: E402
from vmsgamp._core.fifo import MsgFifo  # noqa: E402
from vmsgamp.bus import AmpBus, AmpDriver  # noqa: E402
from vmsgamp.carriers import open_carrier  # noqa: E402
from vmsgamp.coproc.build import build_firmware, missing_tools  # noqa: E402
from vmsgamp.coproc.m4 import DRIVER_MEMORY_OFFSET, M4Machine  # noqa: E402
from vmsgamp.bus.exercise import EXERCISES  # noqa: E402
from vmsgamp.protocol import DriverConnection  # noqa: E402


def _percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_us": s[len(s) // 2], "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))], "count": len(s)}


def measure(firmware: Path, doorbell: str, *, hot: int, cold: int, duration: float) -> dict[str, Any]:
    with M4Machine(firmware, doorbell=doorbell) as m4:
        carrier = open_carrier(m4.uri, timeout=10)
        fifo = MsgFifo(carrier.region, role="driver", offset=carrier.offset, doorbell=carrier.doorbell)
        bus = AmpBus(fifo, DriverConnection())
        try:
            bus.start(10)
            drv = AmpDriver(bus, RegionAllocator(carrier.region, DRIVER_MEMORY_OFFSET), timeout=5)
            drv.enumerate()
            drv.ping(20)   # warm up
            hot_stats = drv.ping(hot)
            cold_samples = []
            for _ in range(cold):
                time.sleep(0.01)
                cold_samples.append(drv.ping(1)["min_us"])
            rng = EXERCISES[4](drv, 0, duration=duration, packed=False)
            fifo_stats = bus.stats()["fifo"]
            drv.close()
        finally:
            bus.close()
            carrier.close()
    return {"doorbell": doorbell, "ping_hot": {"p50_us": hot_stats["p50_us"], "p99_us": hot_stats["p99_us"],
                                               "count": hot_stats["count"]},
            "ping_cold": _percentiles(cold_samples), "rng_mb_per_s": rng["mb_per_s"],
            "host_rings": fifo_stats["rings"], "host_sleeps": fifo_stats["sleeps"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one short run per mode")
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = ap.parse_args()
    missing = missing_tools("arm-none-eabi-gcc", "qemu-system-arm")
    if missing:
        print(f"m4_firmware: needs arm-none-eabi-gcc and qemu-system-arm: apt-get install {' '.join(missing)}",
              file=sys.stderr)
        return 1
    fw = build_firmware()
    runs = 1 if args.quick else args.runs
    counts = dict(hot=50, cold=10, duration=0.2) if args.quick else dict(hot=1000, cold=100, duration=1.0)
    results: dict[str, list[dict[str, Any]]] = {"poll": [], "uart": []}
    for _ in range(runs):
        for mode in ("poll", "uart"):
            results[mode].append(measure(fw.path, mode, **counts))

    def med(mode: str, *keys: str) -> float:
        vals = []
        for r in results[mode]:
            v: Any = r
            for k in keys:
                v = v[k]
            vals.append(v)
        return statistics.median(vals)

    print(f"Cortex-M4 firmware ({fw.text} text, {fw.data} data, {fw.bss} bss bytes) on QEMU mps2-an386, "
          f"TCG timings; medians of {runs} run(s)")
    print(f"{'doorbell':10} {'ping hot p50/p99 (us)':>24} {'ping cold p50/p99 (us)':>24} {'rng MB/s':>9} "
          f"{'host rings':>11}")
    for mode in ("poll", "uart"):
        print(f"{mode:10} {med(mode, 'ping_hot', 'p50_us'):>11.1f} / {med(mode, 'ping_hot', 'p99_us'):<10.1f}"
              f" {med(mode, 'ping_cold', 'p50_us'):>11.1f} / {med(mode, 'ping_cold', 'p99_us'):<10.1f}"
              f" {med(mode, 'rng_mb_per_s'):>9.1f} {med(mode, 'host_rings'):>11.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"firmware": fw.as_dict(), "runs": results}, indent=1,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
