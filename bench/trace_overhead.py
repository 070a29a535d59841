"""What message tracing costs: the numbers `vmsgamp bench devices` measures and
the bus PING round trip, with and without a Tracer on both ends, plus the
per-message cost of the hot path and of the writer.

    python bench/trace_overhead.py [--duration S] [--rounds N] [--ping-pairs N] [--control] [--json]

One device process and one driver process (as `vmsgamp bench devices`: the
models forked, the driver here, eventfd doorbells) for the whole run; tracing
is switched on and off at run time on both ends (the device end through a
control pipe) between measurements, alternating, and medians are reported, so
a busy machine hurts both modes alike; every "added" figure is the median of
per-pair differences.  Both modes run with the same threads
and fds: both tracers (and their writer threads) and the device's control
pipe exist throughout; "off" only detaches them.

The bus PING round trip jumps between levels for seconds at a time on a
shared VM (7.5 us and 12 us with no tracing at all), so one PING sample per
mode taken seconds apart compares phases, not modes.  PING is therefore
measured in its own phase: ``--ping-pairs`` back-to-back off/on pairs of
``--ping-seconds`` each (several writer flushes per sample), the order
alternating, and the added time is the median of the per-pair differences.
``--control`` never attaches a tracer ("on" is "off" again): what it reports
is the noise floor of the method.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import tempfile
import time

from vmsgamp.devices.console import ConsoleDevice, EchoBackend
from vmsgamp.bus.exercise import console, rng
from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import PingRequest, encode
from vmsgamp.testing.amp import amp_pair
from vmsgamp.trace import Tracer


def _device_switch(ctl_r: int, ack_w: int, path: str):
    """server_hook for the device process: b"1" on the pipe attaches a
    tracer to its bus, b"0" detaches it; each is acknowledged."""
    def hook(server) -> None:
        tracer = Tracer(path)

        def toggle() -> None:
            cmd = os.read(ctl_r, 1)
            if cmd == b"1":
                server.bus.attach_tracer(tracer, "memfd:bench")
            else:
                server.bus.detach_tracer()
                tracer.flush()
            os.write(ack_w, b"k")

        server.add_fd(ctl_r, toggle)
    return hook


def _measure(drv, duration: float) -> dict[str, float]:
    counters = drv.bus.conn.counters
    m0, cpu0 = counters.tx_messages + counters.rx_messages, time.process_time()
    out = {"rng_mb_per_s": rng(drv, 0, duration=duration, request=4096, in_flight=32, packed=True)["mb_per_s"]}
    out["console_rtt_p50_us"] = console(drv, 1, duration=duration, rounds=1_000_000, packed=True)["rtt_p50_us"]
    msgs = counters.tx_messages + counters.rx_messages - m0
    out["driver_cpu_us_per_message"] = (time.process_time() - cpu0) / msgs * 1e6
    return out


def _ping(drv, seconds: float, generic: bool = False) -> dict[str, float]:
    """PING round trips for ``seconds``: p50, p99 and mean in microseconds.
    As `vmsgamp ping` sends them (``AmpDriver.ping_once``), or with
    ``generic`` through ``AmpDriver.request`` (message objects and events:
    what any other request pays)."""
    rtts = []
    clock = time.perf_counter
    end = clock() + seconds
    i = 0
    while True:
        t0 = clock()
        if generic:
            drv.request(PingRequest(data=0x5A000000 | (i & 0xFFFFFF)))
        else:
            drv.ping_once(0x5A000000 | (i & 0xFFFFFF))
        t1 = clock()
        rtts.append((t1 - t0) * 1e6)
        i += 1
        if t1 >= end:
            break
    rtts.sort()
    return {"p50_us": rtts[len(rtts) // 2], "p99_us": rtts[int(len(rtts) * 0.99)],
            "mean_us": statistics.fmean(rtts)}


def _runs(duration: float, rounds: int, ping_pairs: int, ping_seconds: float, control: bool, generic: bool,
          tmp: str) -> tuple[dict[str, list[dict[str, float]]], dict[str, list[dict[str, float]]]]:
    ctl_r, ctl_w = os.pipe()
    ack_r, ack_w = os.pipe()
    hook = _device_switch(ctl_r, ack_w, os.path.join(tmp, "device.pcapng"))
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    pings: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with Tracer(os.path.join(tmp, "driver.pcapng")) as tracer:
        # Every measurement opens both devices again (rings are never freed): room for many.
        with amp_pair(lambda: [RngDevice(), ConsoleDevice(EchoBackend())], server_hook=hook,
                      region_size=64 << 20) as drv:
            def switch(mode: str) -> None:
                on = mode == "on" and not control
                os.write(ctl_w, b"1" if on else b"0")
                if not select.select([ack_r], [], [], 10)[0]:
                    raise RuntimeError("the device process did not switch tracing")
                os.read(ack_r, 1)
                if on:
                    drv.bus.attach_tracer(tracer, "memfd:bench")
                else:
                    drv.bus.detach_tracer()
                    tracer.flush()   # what "on" recorded is written now, not during "off"

            drv.ping(2000)           # warm up
            for i in range(ping_pairs):
                for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                    switch(mode)
                    pings[mode].append(_ping(drv, ping_seconds, generic))
            for _ in range(rounds):
                for mode in ("off", "on"):
                    switch(mode)
                    runs[mode].append(_measure(drv, duration))
            switch("off")
    for fd in (ctl_r, ctl_w, ack_r, ack_w):
        os.close(fd)
    return runs, pings


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
    ap.add_argument("--rounds", type=int, default=3, help="off/on pairs of rng/console (medians reported)")
    ap.add_argument("--ping-pairs", type=int, default=12, help="off/on pairs of PING samples")
    ap.add_argument("--ping-seconds", type=float, default=0.3, help="seconds per PING sample")
    ap.add_argument("--control", action="store_true",
                    help="never attach a tracer: the method's noise floor (everything should read ~0)")
    ap.add_argument("--generic", action="store_true",
                    help="PING through AmpDriver.request (as any request) instead of `vmsgamp ping`'s fast path")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs, pings = _runs(args.duration, args.rounds, args.ping_pairs, args.ping_seconds, args.control,
                                   args.generic, tmp)
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    for mode, ps in pings.items():
        for k in ("p50_us", "p99_us", "mean_us"):
            med[mode]["ping_" + k] = statistics.median(p[k] for p in ps)

    def added(k: str, samples: dict[str, list[dict[str, float]]] = pings) -> float:
        """Median over the off/on pairs of (on - off): each pair ran back to back."""
        return statistics.median(on[k] - off[k] for off, on in zip(samples["off"], samples["on"]))

    hot = _hot_path_ns()
    off, on = med["off"], med["on"]
    result = {
        "off": off, "on": on, **hot,
        "rng_throughput_change_pct": statistics.median(
            100 * (b["rng_mb_per_s"] / a["rng_mb_per_s"] - 1) for a, b in zip(runs["off"], runs["on"])),
        "console_rtt_added_us": added("console_rtt_p50_us", runs),
        "ping_rtt_added_us": added("p50_us"),
        "ping_mean_added_us": added("mean_us"),
        "ping_p99_added_us": added("p99_us"),
        "driver_cpu_added_us_per_message": added("driver_cpu_us_per_message", runs),
        "rounds": args.rounds, "duration_s": args.duration, "ping_pairs": args.ping_pairs,
        "ping_seconds": args.ping_seconds, "control": args.control,
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return
    what = "CONTROL: no tracer ever attached" if args.control else "both ends traced"
    print(f"tracing overhead (two processes, {what}; medians of {args.rounds} rng/console off/on pairs, "
          f"{args.ping_pairs} PING pairs of {args.ping_seconds} s)")
    print(f"  virtio-rng packed: {off['rng_mb_per_s']:.0f} -> {on['rng_mb_per_s']:.0f} MB/s "
          f"(paired: {result['rng_throughput_change_pct']:+.1f}%)")
    print(f"  console echo p50:  {off['console_rtt_p50_us']:.1f} -> {on['console_rtt_p50_us']:.1f} us "
          f"(paired: {result['console_rtt_added_us']:+.1f} us; 4 messages per round trip, 2 per end)")
    print(f"  bus PING p50:      {off['ping_p50_us']:.1f} -> {on['ping_p50_us']:.1f} us "
          f"(paired: {result['ping_rtt_added_us']:+.2f} us; 2 messages per end)")
    print(f"  bus PING mean:     {off['ping_mean_us']:.1f} -> {on['ping_mean_us']:.1f} us "
          f"(paired: {result['ping_mean_added_us']:+.2f} us), p99 {off['ping_p99_us']:.0f} -> "
          f"{on['ping_p99_us']:.0f} us (paired: {result['ping_p99_added_us']:+.1f} us)")
    print(f"  driver process CPU per bus message (its spin included): {off['driver_cpu_us_per_message']:.2f} -> "
          f"{on['driver_cpu_us_per_message']:.2f} us (paired: {result['driver_cpu_added_us_per_message']:+.2f} us)")
    print(f"  per message, best (median) of 200 batches: bus thread {hot['tap_ns_per_message']:.0f} "
          f"({hot['tap_ns_median']:.0f}) ns, writer thread {hot['writer_ns_per_message']:.0f} "
          f"({hot['writer_ns_median']:.0f}) ns")


if __name__ == "__main__":
    main()
