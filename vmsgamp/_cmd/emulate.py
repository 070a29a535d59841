"""``vmsgamp emulate``: an AMP system on one machine.

Starts a QEMU-compatible ivshmem server, a device-side process (``vmsgamp
serve`` on ``ivshmem:SOCKET``) and runs the driver side here: enumerates,
exercises every device and reports what happened and the measured rates.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from typing import Any

from vmsgamp._cmd._args import add_command, add_wait_args, positive_float, wait_argv, wait_policy
from vmsgamp._cmd._output import add_json_arg, emit
from vmsgamp._cmd._process import start_child, stop_child
from vmsgamp.cli import CliError, cleanup_shield

DEFAULT_DEVICES = "rng,console:echo,i2c:sim,gpio:lines=8;loopback=0:1"


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "emulate",
                    help="run a whole AMP system on this machine and exercise every device",
                    description="Start an ivshmem server, a device process (`vmsgamp serve` with "
                                "the device models) and run the driver side here: enumerate, "
                                "exercise every device, ping the bus and report rates.  Everything "
                                "it started is stopped and removed on exit, Ctrl-C included.")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help=f"device list as for serve (default: {DEFAULT_DEVICES}, minus types not built)")
    p.add_argument("--duration", type=positive_float, default=0.5, metavar="S",
                   help="seconds per throughput test")
    p.add_argument("--layout", choices=["b", "a"], default="b",
                   help="FIFO layout: b = vmamp_shmem, a = spsc_queue")
    p.add_argument("--packed", choices=["auto", "on", "off"], default="auto",
                   help="virtqueue format (auto: packed when the device offers it)")
    p.add_argument("--trace", metavar="FILE.pcapng", default=None,
                   help="capture both ends: the driver end to FILE.pcapng, the device end to "
                        "FILE.device.pcapng")
    p.add_argument("--coprocessor", choices=["m4"], default=None,
                   help="serve the devices from the C kit's firmware on an emulated Cortex-M4 "
                        "(QEMU mps2-an386) instead of a vmsgamp process")
    p.add_argument("--m4-doorbell", choices=["uart", "poll"], default="uart",
                   help="with --coprocessor m4: ring through the M4's UART, or poll")
    add_wait_args(p)
    add_json_arg(p, "the report")
    p.set_defaults(func=run)


def device_trace_path(path: str) -> str:
    """Where the device end's capture goes next to the driver end's."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.device{ext or '.pcapng'}"


def _default_devices() -> str:
    from vmsgamp.devices._base import device_types

    known = device_types()
    return ",".join(item for item in DEFAULT_DEVICES.split(",") if item.split(":")[0] in known)


def run(args: argparse.Namespace) -> int:
    if args.coprocessor == "m4":
        from vmsgamp.coproc.emulate import run_m4

        return run_m4(args)
    from vmsgamp._core.addrspace import RegionAllocator
    from vmsgamp._core.fifo import MsgFifo
    from vmsgamp.bus import AmpBus, AmpDriver
    from vmsgamp.carriers import open_carrier
    from vmsgamp.carriers.ivshmem import IvshmemServer
    from vmsgamp.bus.exercise import exercise_all
    from vmsgamp.protocol import DriverConnection

    from vmsgamp._cmd.trace import close_tracer, open_tracer

    devices = args.devices or _default_devices()
    packed = {"auto": None, "on": True, "off": False}[args.packed]
    report: dict[str, Any] = {"devices_spec": devices, "layout": args.layout}
    with tempfile.TemporaryDirectory(prefix="vmsgamp-emulate-") as tmp:
        sock = os.path.join(tmp, "ivshmem.sock")
        server = IvshmemServer(sock, 4 << 20)
        child = carrier = fifo = bus = drv = tracer = None
        try:
            server.start_thread()
            tracer = open_tracer(args.trace)
            trace_args = ["--trace", device_trace_path(args.trace)] if args.trace else []
            child = start_child(["serve", "--region", f"ivshmem:{sock}", "--devices", devices,
                                 "--layout", args.layout, "--json", *wait_argv(args), *trace_args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            line = child.stdout.readline() if child.stdout else ""
            if not line:
                _, err = stop_child(child)
                lines = err.strip().splitlines()
                raise CliError(f"device process failed: {lines[-1] if lines else 'no output'}")
            served = json.loads(line)
            if "error" in served:
                stop_child(child)
                raise CliError(f"device process failed: {served['error']}")
            report["device_process"] = {"pid": child.pid, "devices": served["devices"]}
            t0 = time.perf_counter()
            carrier = open_carrier(f"ivshmem:{sock}", timeout=10)
            fifo = MsgFifo(carrier.region, role="driver", layout=args.layout, doorbell=carrier.doorbell)
            bus = AmpBus(fifo, DriverConnection(), tracer=tracer, trace_name=f"ivshmem:{sock}",
                         wait=wait_policy(args))
            bus.watch_carrier(carrier)     # the device process dying ends the session at once
            bus.start(10)
            drv = AmpDriver(bus, RegionAllocator(carrier.region, 16384), timeout=5)
            nums = drv.enumerate()
            infos = [drv.info(n) for n in nums]
            report["connect_ms"] = (time.perf_counter() - t0) * 1e3
            report["devices"] = exercise_all(drv, infos, duration=args.duration, packed=packed)
            report["ping"] = drv.ping(200)
            report["bus"] = bus.stats()
        finally:
            with cleanup_shield():
                if drv is not None:
                    drv.close()
                if tracer is not None:
                    report["trace"] = {"driver": close_tracer(tracer, bus),
                                       "device": {"file": device_trace_path(args.trace)}}
                if bus is not None:
                    bus.close()
                elif fifo is not None:
                    fifo.close()
                if carrier is not None:
                    carrier.close()
                if child is not None:
                    stop_child(child)
                    report["device_process"] = (report.get("device_process", {})
                                                | {"exit_code": child.returncode})
                if args.trace and "trace" in report:
                    report["trace"]["device"] = _capture_counts(device_trace_path(args.trace))
                server.close()
    failed = [d for d in report.get("devices", []) if "error" in d.get("result", {})]
    code = report["device_process"].get("exit_code")
    if failed:
        report["error"] = f"{len(failed)} device(s) failed: " + ", ".join(
            f"[{d['dev_num']}] {d['name']}: {d['result']['error']}" for d in failed)
    elif code not in (0, None):
        report["error"] = f"the device process exited with {code}"
    emit(args, report, _human(report))
    if "error" in report:
        raise CliError(report["error"])
    return 0


def _capture_counts(path: str) -> dict[str, Any]:
    from vmsgamp.trace import DIR_INBOUND, DIR_OUTBOUND, CaptureFormatError, read_capture

    try:
        _ifaces, packets = read_capture(path)
    except (OSError, CaptureFormatError) as e:
        return {"file": path, "error": str(e)}
    return {"file": path, "messages": len(packets),
            "driver_to_device": sum(p.direction == DIR_OUTBOUND for p in packets),
            "device_to_driver": sum(p.direction == DIR_INBOUND for p in packets)}


def _human(r: dict[str, Any]) -> str:
    lines = [f"vmsgamp emulate: device process (pid {r['device_process'].get('pid')}) + driver process "
             f"(pid {os.getpid()}) over an ivshmem server, layout {r['layout'].upper()}",
             f"  enumerated {len(r['devices'])} device(s) in {r['connect_ms']:.1f} ms"]
    for d in r["devices"]:
        res = d["result"]
        head = f"  [{d['dev_num']}] {d['name']:8}"
        if "error" in res:
            lines.append(f"{head} FAILED: {res['error']}")
        elif "skipped" in res:
            lines.append(f"{head} {res['skipped']}")
        else:
            lines.append(f"{head} {res.get('summary') or _summary(d['name'], res)}")
    p = r["ping"]
    lines.append(f"  bus ping: {p['count']} round trips, p50 {p['p50_us']:.1f} us, p99 {p['p99_us']:.1f} us")
    b = r["bus"]
    lines.append(f"  messages: {b['tx_messages']} sent, {b['rx_messages']} received, "
                 f"{b['rx_malformed']} malformed, {b['timeouts']} timeouts; "
                 f"device process exit code {r['device_process'].get('exit_code')}")
    if r.get("trace"):
        from vmsgamp._cmd.trace import trace_line

        lines.append(f"  {trace_line(r['trace']['driver'])}")
        dev = r["trace"]["device"]
        lines.append(f"  {trace_line(dev)}" if "messages" in dev
                     else f"  trace {dev['file']}: {dev.get('error', 'not written')}")
    return "\n".join(lines)


def _summary(name: str, res: dict[str, Any]) -> str:
    if name == "rng":
        return (f"read {res['bytes']} bytes of entropy in {res['requests']} requests "
                f"({res['mb_per_s']:.1f} MB/s, {'packed' if res['packed'] else 'split'} ring), "
                f"first bytes {res['sample'][:16]}")
    return ", ".join(f"{k}={v}" for k, v in res.items())
