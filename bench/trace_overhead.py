"""What message tracing costs: the numbers `vmsgamp bench devices` measures and
the bus PING round trip, with and without a Tracer on both ends, plus the
per-message cost of the hot path and of the writer.

    python bench/trace_overhead.py [--duration S] [--rounds N] [--json]

One device process and one driver process (as `vmsgamp bench devices`: the
models forked, the driver here, eventfd doorbells) for the whole run; tracing
is switched on and off at run time on both ends (the device end through a
control pipe) between measurements, alternating, and medians are reported, so
a busy machine hurts both modes alike.
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


def _measure(drv, duration: float, pings: int) -> dict[str, float]:
    counters = drv.bus.conn.counters
    m0, cpu0 = counters.tx_messages + counters.rx_messages, time.process_time()
    out = {"ping_p50_us": drv.ping(pings)["p50_us"]}
    out["rng_mb_per_s"] = rng(drv, 0, duration=duration, request=4096, in_flight=32, packed=True)["mb_per_s"]
    out["console_rtt_p50_us"] = console(drv, 1, duration=duration, rounds=1_000_000, packed=True)["rtt_p50_us"]
    msgs = counters.tx_messages + counters.rx_messages - m0
    out["driver_cpu_us_per_message"] = (time.process_time() - cpu0) / msgs * 1e6
    return out


def _runs(duration: float, pings: int, rounds: int, tmp: str) -> dict[str, list[dict[str, float]]]:
    ctl_r, ctl_w = os.pipe()
    ack_r, ack_w = os.pipe()
    hook = _device_switch(ctl_r, ack_w, os.path.join(tmp, "device.pcapng"))
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with Tracer(os.path.join(tmp, "driver.pcapng")) as tracer:
        # Every measurement opens both devices again (rings are never freed): room for many.
        with amp_pair(lambda: [RngDevice(), ConsoleDevice(EchoBackend())], server_hook=hook,
                      region_size=64 << 20) as drv:
            for _ in range(rounds):
                for mode in ("off", "on"):
                    os.write(ctl_w, b"1" if mode == "on" else b"0")
                    if not select.select([ack_r], [], [], 10)[0]:
                        raise RuntimeError("the device process did not switch tracing")
                    os.read(ack_r, 1)
                    if mode == "on":
                        drv.bus.attach_tracer(tracer, "memfd:bench")
                    else:
                        drv.bus.detach_tracer()
                    runs[mode].append(_measure(drv, duration, pings))
                    tracer.flush()
            drv.bus.detach_tracer()
    for fd in (ctl_r, ctl_w, ack_r, ack_w):
        os.close(fd)
    return runs


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
    with tempfile.TemporaryDirectory() as tmp:
        runs = _runs(args.duration, args.pings, args.rounds, tmp)
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    hot = _hot_path_ns()
    off, on = med["off"], med["on"]
    result = {
        "off": off, "on": on, **hot,
        "rng_throughput_change_pct": 100 * (on["rng_mb_per_s"] / off["rng_mb_per_s"] - 1),
        "console_rtt_added_us": on["console_rtt_p50_us"] - off["console_rtt_p50_us"],
        "ping_rtt_added_us": on["ping_p50_us"] - off["ping_p50_us"],
        "driver_cpu_added_us_per_message": on["driver_cpu_us_per_message"] - off["driver_cpu_us_per_message"],
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
    print(f"  driver process CPU per bus message: {off['driver_cpu_us_per_message']:.2f} -> "
          f"{on['driver_cpu_us_per_message']:.2f} us ({result['driver_cpu_added_us_per_message']:+.2f} us)")
    print(f"  per message, best (median) of 200 batches: bus thread {hot['tap_ns_per_message']:.0f} "
          f"({hot['tap_ns_median']:.0f}) ns, writer thread {hot['writer_ns_per_message']:.0f} "
          f"({hot['writer_ns_median']:.0f}) ns")


if __name__ == "__main__":
    main()
