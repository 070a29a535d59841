"""``vmsgamp bench devices``: virtio-rng MB/s (4 KiB requests) and console echo
round-trip latency, end to end through the AMP bus between two processes
(the device models in a forked process, the driver here; eventfd doorbells)."""
from __future__ import annotations

import argparse
from typing import Any

from vmsgamp._bench import harness


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    p.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    p.add_argument("--request", type=int, default=4096, help="rng request size in bytes")
    p.add_argument("--in-flight", type=int, default=32, help="rng requests queued at once")
    p.add_argument("--layout", choices=["b", "a"], default="b", help="FIFO layout: b = vmamp_shmem, a = spsc_queue")


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    from vmsgamp.devices.console import ConsoleDevice, EchoBackend
    from vmsgamp.devices.exercise import console, rng
    from vmsgamp.devices.rng import RngDevice
    from vmsgamp.testing.amp import amp_pair

    out: dict[str, Any] = {}
    with amp_pair(lambda: [RngDevice(), ConsoleDevice(EchoBackend())], layout=args.layout) as drv:
        for packed in (False, True):
            ring = "packed" if packed else "split"
            r = rng(drv, 0, duration=args.duration, request=args.request,
                    in_flight=args.in_flight, packed=packed)
            out[f"rng_{ring}_mb_per_s"] = r["mb_per_s"]
            c = console(drv, 1, duration=args.duration, rounds=1_000_000, packed=packed)
            out[f"console_{ring}_rtt_p50_us"] = c["rtt_p50_us"]
            out[f"console_{ring}_rtt_p99_us"] = c["rtt_p99_us"]
            out[f"console_{ring}_round_trips"] = c["round_trips"]
    out["rng_mb_per_s"] = max(out["rng_split_mb_per_s"], out["rng_packed_mb_per_s"])
    out["console_rtt_p50_us"] = min(out["console_split_rtt_p50_us"], out["console_packed_rtt_p50_us"])
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs = [run_once(args) for _ in range(max(1, args.runs))]
    out: dict[str, Any] = dict(harness.median_dicts(runs)) if len(runs) > 1 else dict(runs[0])
    out.update(request_bytes=args.request, in_flight=args.in_flight, layout=args.layout,
               duration_s=args.duration, runs=len(runs))
    return out


def format_human(r: dict[str, Any]) -> str:
    return "\n".join([
        f"devices over the AMP bus (layout {r['layout'].upper()}, two processes"
        + (f", median of {r['runs']} runs" if r['runs'] > 1 else "") + ")",
        f"  virtio-rng, {r['request_bytes']} B requests x {r['in_flight']} in flight: "
        f"split {r['rng_split_mb_per_s']:.0f} MB/s, packed {r['rng_packed_mb_per_s']:.0f} MB/s",
        f"  virtio-console echo round trip: split p50 {r['console_split_rtt_p50_us']:.0f} us "
        f"(p99 {r['console_split_rtt_p99_us']:.0f}), packed p50 {r['console_packed_rtt_p50_us']:.0f} us "
        f"(p99 {r['console_packed_rtt_p99_us']:.0f})",
    ])
