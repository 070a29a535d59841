"""What message tracing costs: the numbers `vmsgamp bench devices` measures and
the bus PING round trip, with and without a Tracer on both ends, plus the
per-message cost of the hot path and of the writer.

    python bench/trace_overhead.py [--duration S] [--rounds N] [--json]

Runs alternate (off, on, off, on, ...) and report medians, so a busy machine
hurts both sides alike.  Two processes as in `vmsgamp bench devices`: the
device models in a forked process, the driver here, eventfd doorbells.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from vmsgamp.devices.console import ConsoleDevice, EchoBackend
from vmsgamp.devices.exercise import console, rng
from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import PingRequest, encode
from vmsgamp.testing.amp import amp_pair
from vmsgamp.trace import Tracer


def _one_run(traced: bool, duration: float, pings: int, tmp: str, tag: str) -> dict[str, float]:
    tracers: list[Tracer] = []

    def hook(server) -> None:
        if traced:   # runs in the device process (which ends with os._exit: no final flush)
            t = Tracer(os.path.join(tmp, f"{tag}-device.pcapng"))
            server.bus.attach_tracer(t, "memfd:bench")

    out: dict[str, float] = {}
    with amp_pair(lambda: [RngDevice(), ConsoleDevice(EchoBackend())], server_hook=hook) as drv:
        if traced:
            t = Tracer(os.path.join(tmp, f"{tag}-driver.pcapng"))
            tracers.append(t)
            drv.bus.attach_tracer(t, "memfd:bench")
        out["ping_p50_us"] = drv.ping(pings)["p50_us"]
        r = rng(drv, 0, duration=duration, request=4096, in_flight=32, packed=True)
        out["rng_mb_per_s"] = r["mb_per_s"]
        c = console(drv, 1, duration=duration, rounds=1_000_000, packed=True)
        out["console_rtt_p50_us"] = c["rtt_p50_us"]
        msgs = drv.bus.conn.counters.tx_messages + drv.bus.conn.counters.rx_messages
        out["driver_messages"] = float(msgs)
    for t in tracers:
        t.close()
        out["traced_messages"] = float(t.written)
    return out


def _hot_path_ns(batches: int = 200, batch: int = 1000) -> dict[str, float]:
    """The bus thread's cost per message (tap.tx) and the writer's, in batches
    as the writer thread sees them; best of the batches (a busy machine only
    ever adds time)."""
    msg = encode(PingRequest(token=1, data=1))
    tap_ns, writer_ns = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tr = Tracer(os.path.join(tmp, "hot.pcapng"), background=False)
        tx = tr.tap("memfd:hot", role="driver").tx
        for _ in range(batches):
            t0 = time.perf_counter_ns()
            for _ in range(batch):
                tx(msg)
            t1 = time.perf_counter_ns()
            tr.flush()
            t2 = time.perf_counter_ns()
            tap_ns.append((t1 - t0) / batch)
            writer_ns.append((t2 - t1) / batch)
        tr.close()
    return {"tap_ns_per_message": min(tap_ns), "writer_ns_per_message": min(writer_ns),
            "tap_ns_median": statistics.median(tap_ns), "writer_ns_median": statistics.median(writer_ns)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per rng/console measurement")
    ap.add_argument("--rounds", type=int, default=3, help="off/on pairs (medians reported)")
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for mode in ("off", "on"):
                runs[mode].append(_one_run(mode == "on", args.duration, args.pings, tmp, f"{mode}{i}"))
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    hot = _hot_path_ns()
    off, on = med["off"], med["on"]
    result = {
        "off": off, "on": on, **hot,
        "rng_throughput_change_pct": 100 * (on["rng_mb_per_s"] / off["rng_mb_per_s"] - 1),
        "console_rtt_added_us": on["console_rtt_p50_us"] - off["console_rtt_p50_us"],
        "ping_rtt_added_us": on["ping_p50_us"] - off["ping_p50_us"],
        "rounds": args.rounds, "duration_s": args.duration,
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return
    print(f"tracing overhead (two processes, both ends traced, medians of {args.rounds} off/on pairs)")
    print(f"  virtio-rng packed: {off['rng_mb_per_s']:.0f} -> {on['rng_mb_per_s']:.0f} MB/s "
          f"({result['rng_throughput_change_pct']:+.1f}%)")
    print(f"  console echo p50:  {off['console_rtt_p50_us']:.1f} -> {on['console_rtt_p50_us']:.1f} us "
          f"({result['console_rtt_added_us']:+.1f} us; 4 messages per round trip, 2 per end)")
    print(f"  bus PING p50:      {off['ping_p50_us']:.1f} -> {on['ping_p50_us']:.1f} us "
          f"({result['ping_rtt_added_us']:+.1f} us; 2 messages per end)")
    print(f"  per message, best (median) of 200 batches: bus thread {hot['tap_ns_per_message']:.0f} "
          f"({hot['tap_ns_median']:.0f}) ns, writer thread {hot['writer_ns_per_message']:.0f} "
          f"({hot['writer_ns_median']:.0f}) ns")


if __name__ == "__main__":
    main()
