"""``vmsgamp serve``: the device side of a virtio-msg-amp bus."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from vmsgamp._cmd import _serve_vmsg_lb
from vmsgamp._cmd._args import add_wait_args, positive_float, wait_policy
from vmsgamp._cmd._common import add_command, add_endpoint_args, emit, int_auto, open_endpoint
from vmsgamp._cmd.trace import add_trace_arg, close_tracer, open_tracer, trace_line
from vmsgamp._core.addrspace import AddressSpace
from vmsgamp._core.region import Region
from vmsgamp.bus import AmpBus, DeviceServer
from vmsgamp.cli import CliError, stop_on_signals
from vmsgamp.devices._base import device_path_keys, device_types, offered_features, parse_device_list
from vmsgamp.devices._features import feature_names
from vmsgamp.protocol import DeviceConnection

log = logging.getLogger("vmsgamp.serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "serve", help="run device models on the device side of an AMP bus",
                    description="Serve virtio device models over a virtio-msg-amp bus until "
                                "stopped: SIGTERM is the normal stop (exit 0), Ctrl-C exits 130; "
                                "either way the devices are closed and an unlink=1 object is "
                                "removed.  Device items: TYPE[:key=value[;key=value]], a bare "
                                "word is a flag (console:pty), a bare path the device's path "
                                "option (" + ", ".join(f"{t}:PATH = {t}:{k}=PATH" for t, k in
                                                        device_path_keys().items()) + ").")
    add_endpoint_args(p)
    p.add_argument("--devices", default="rng", metavar="LIST",
                   help="comma-separated device items, device numbers in order (e.g. "
                        "rng:source=/dev/urandom,console:pty,i2c:sim,gpio:lines=8); types: "
                        + "; ".join(f"{t} ({', '.join(keys)})" for t, keys in device_types().items()))
    p.add_argument("--memory", action="append", default=[], metavar="FILE[@BUS_ADDR]",
                   help="map FILE (e.g. a QEMU guest's RAM, memory-backend-file share=on) at "
                        "BUS_ADDR (default 0) for virtqueue addresses; repeatable; replaces the "
                        "default (the shared region at bus address 0)")
    p.add_argument("--region-at", type=int_auto, default=None, metavar="BUS_ADDR",
                   help="with --memory: also map the shared region at this bus address")
    p.add_argument("--no-packed", action="store_true", help="do not offer VIRTIO_F_RING_PACKED")
    p.add_argument("--keepalive", type=positive_float, default=None, metavar="S",
                   help="ping the driver every S seconds; 3 misses = peer dead")
    add_wait_args(p)
    add_trace_arg(p)
    p.add_argument("--takeover", action="store_true",
                   help="serve the window even though another device side seems to be on it "
                        "(one that shows no sign of life but cannot be proven dead, e.g. "
                        "crashed firmware); never overrides a live process's lock")
    p.set_defaults(func=run, sigterm_exit=0)


def _parse_memory(spec: str) -> tuple[str, int]:
    path, at, addr = spec.rpartition("@") if "@" in spec else (spec, "", "0")
    try:
        return path, int(addr, 0)
    except ValueError:
        raise CliError(f"--memory {spec!r}: bus address {addr!r} is not an integer") from None


def build_address_space(args: argparse.Namespace, shared: Region) -> tuple[AddressSpace, list[Region]]:
    if not args.memory:
        if args.region_at is not None:
            return AddressSpace([(args.region_at, shared, 0, shared.size)]), []
        return AddressSpace([(0, shared, 0, shared.size)]), []
    aspace = AddressSpace()
    opened: list[Region] = []
    from vmsgamp.carriers import open_region

    try:
        for spec in args.memory:
            path, bus = _parse_memory(spec)
            r = open_region(path)
            opened.append(r)
            aspace.add_window(bus, r, 0, r.size)
        if args.region_at is not None:
            aspace.add_window(args.region_at, shared, 0, shared.size)
    except (ValueError, OSError) as e:
        for r in opened:
            r.close()
        raise CliError(f"--memory: {e}") from None
    return aspace, opened


def run(args: argparse.Namespace) -> int:
    devices = parse_device_list(args.devices)     # errors name the device and option
    if not devices:
        raise CliError("--devices is empty: name at least one device")
    if _serve_vmsg_lb.is_vmsg_lb(args.region):   # the kernel's own drivers: no FIFO, no AMP bus
        return _serve_vmsg_lb.run(args, devices)
    opts = {"wait_peer": 0} if args.region.startswith("ivshmem:") else {}
    try:
        carrier, fifo = open_endpoint(args, "device", **opts)
    except BaseException:
        for d in devices:
            d.close()
        raise
    extra: list[Region] = []
    server = None
    bus = tracer = None
    try:
        aspace, extra = build_address_space(args, carrier.region)
        tracer = open_tracer(args.trace)
        bus = AmpBus(fifo, DeviceConnection(profile=args.profile, max_msg_size=args.max_msg_size),
                     tracer=tracer, trace_name=args.region, wait=wait_policy(args))
        server = DeviceServer(bus, aspace, devices, offer_packed=not args.no_packed,
                              handshake_timeout=0.25, takeover=args.takeover)
        # ivshmem: the server's notices keep the doorbell on the current driver
        # and end the session at once when that driver's process dies.
        bus.watch_carrier(carrier)
        info = {
            "region": args.region, "layout": args.layout, "profile": args.profile,
            "offset": fifo.offset, "window": fifo.window,
            "windows": [{"bus_addr": w[0], "length": w[1]} for w in _windows(aspace)],
            "devices": [dict(dev_num=n, **d.describe(),
                             features=feature_names(offered_features(d, packed=not args.no_packed),
                                                    d.device_id))
                        for n, d in server.devices.items()],
        }
        lines = [f"vmsgamp serve: {args.region} (layout {args.layout.upper()}, {args.profile}), "
                 f"waiting for a driver; SIGTERM or Ctrl-C stops"]
        for d in info["devices"]:
            extras = "; ".join(f"{k} {_text(v)}" for k, v in d.items()
                               if k not in ("dev_num", "name", "device_id", "features", "stats"))
            lines.append(f"  device {d['dev_num']}: {d['name']} (virtio id {d['device_id']})"
                         + (f"  {extras}" if extras else ""))
        emit(args, info, "\n".join(lines))
        if args.keepalive:
            bus.keepalive(args.keepalive)
        with stop_on_signals(server.stop):     # the loop ends cleanly, then the signal counts
            server.serve_forever()
        return 0
    finally:
        if server is not None:
            server.close()
        else:
            for d in devices:
                d.close()
        if tracer is not None:
            print(f"vmsgamp serve: {trace_line(close_tracer(tracer, bus))}", file=sys.stderr)
        fifo.close()
        carrier.close()
        for r in extra:
            r.close()


def _windows(aspace: AddressSpace) -> list[tuple[int, int]]:
    return [(bus, length) for bus, _region, _off, length in aspace.windows]


def _text(value: Any) -> str:
    """A describe() value for the banner: no Python reprs."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) or "none"
    return str(value)
