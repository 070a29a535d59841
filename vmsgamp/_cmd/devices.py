"""``vmsgamp devices`` and ``vmsgamp ping``: the driver side's view of a bus."""
from __future__ import annotations

import argparse

from vmsgamp._cmd._args import add_wait_args, positive_int
from vmsgamp._cmd._common import (
    add_command, add_endpoint_args, driver_memory_start, emit, open_endpoint, start_driver_bus,
)
from vmsgamp._cmd.trace import add_trace_arg, close_tracer, open_tracer, trace_line
from vmsgamp._core.addrspace import RegionAllocator
from vmsgamp.bus import AmpBus, AmpDriver
from vmsgamp.carriers import Carrier
from vmsgamp.devices._features import feature_names


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "devices", help="enumerate the devices on a bus (driver side)",
                    description="Join the bus as the driver, enumerate the devices and show each "
                                "one's id, vendor, config size, queues and feature bits by name; "
                                "then leave (SHUTDOWN).")
    add_endpoint_args(p)
    add_trace_arg(p)
    p.set_defaults(func=run_devices)
    p = add_command(sub, "ping", help="bus PING round trips (driver side)",
                    description="Join the bus as the driver and time PING round trips to the "
                                "device side.")
    add_endpoint_args(p)
    p.add_argument("-n", "--count", type=positive_int, default=10, help="number of pings")
    add_wait_args(p)
    add_trace_arg(p)
    p.set_defaults(func=run_ping)


def open_driver(args: argparse.Namespace) -> tuple[Carrier, AmpBus, AmpDriver]:
    """Open --region as the driver side: carrier, started bus, AmpDriver
    (close the bus, then the carrier)."""
    carrier, fifo = open_endpoint(args, "driver")
    bus = start_driver_bus(args, carrier, fifo)
    alloc = RegionAllocator(carrier.region, min(driver_memory_start(fifo), carrier.region.size))
    return carrier, bus, AmpDriver(bus, alloc, timeout=args.timeout)


def _driver(args: argparse.Namespace):
    """open_driver() with --trace attached: (carrier, bus, driver, tracer)."""
    tracer = open_tracer(args.trace)
    try:
        carrier, bus, drv = open_driver(args)
    except BaseException:
        close_tracer(tracer)
        raise
    if tracer is not None:
        bus.attach_tracer(tracer, args.region)
    return carrier, bus, drv, tracer


def _with_trace(obj: dict, lines: list[str], summary: dict | None) -> None:
    if summary:
        obj["trace"] = summary
        lines.append(trace_line(summary))


def run_devices(args: argparse.Namespace) -> int:
    carrier, bus, drv, tracer = _driver(args)
    try:
        infos = [drv.info(n) for n in drv.enumerate()]
    finally:
        traced = close_tracer(tracer, bus)
        bus.close()
        carrier.close()
    rows = [i.as_dict() | {"feature_names": feature_names(i.features, i.device_id)} for i in infos]
    lines = [f"{len(rows)} device(s) on {args.region}"]
    if rows:
        lines.append(f"{'num':>3}  {'id':>3}  {'name':8} {'vendor':>10}  {'cfg':>4}  queues(max)  features")
        for r in rows:
            lines.append(f"{r['dev_num']:>3}  {r['device_id']:>3}  {r['name']:8} {r['vendor_id']:#010x}  "
                         f"{r['config_size']:>4}  {','.join(map(str, r['queue_max_sizes'])) or '-':11}  "
                         f"{r['features']:#x} {' '.join(r['feature_names'])}")
    obj = {"region": args.region, "devices": rows}
    _with_trace(obj, lines, traced)
    emit(args, obj, "\n".join(lines))
    return 0


def run_ping(args: argparse.Namespace) -> int:
    carrier, bus, drv, tracer = _driver(args)
    try:
        stats = drv.ping(args.count)
    finally:
        traced = close_tracer(tracer, bus)
        bus.close()
        carrier.close()
    obj = {"region": args.region, **stats}
    lines = [f"{stats['count']} pings to {args.region}: p50 {stats['p50_us']:.1f} us, "
             f"p99 {stats['p99_us']:.1f} us, min {stats['min_us']:.1f} us, max {stats['max_us']:.1f} us"]
    _with_trace(obj, lines, traced)
    emit(args, obj, "\n".join(lines))
    return 0
