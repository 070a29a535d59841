"""Options and helpers shared by the commands that open an AMP endpoint."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from vmsgamp._core.fifo import MsgFifo, Role
from vmsgamp.bus import AmpBus
from vmsgamp.carriers import Carrier, open_carrier
from vmsgamp.cli import CliError
from vmsgamp.errors import HandshakeTimeout

FIFO_WINDOW = 8192


def int_auto(text: str) -> int:
    """Integers in any base Python accepts: 4096, 0x1000, 0o10."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", required=True, metavar="URI",
                   help="shared memory: shm:NAME, ivshmem:SOCKET, file:PATH, fd:N, a path ...")
    p.add_argument("--layout", choices=["b", "a"], default="b",
                   help="FIFO layout: b = vmamp_shmem (default), a = spsc_queue")
    p.add_argument("--profile", choices=["g2", "g1"], default="g2",
                   help="message header: g2 = 8 bytes with token (default), g1 = 6 bytes")
    p.add_argument("--offset", type=int_auto, default=None,
                   help="where the AMP layout starts in the region (default 0, or the URI's offset)")
    p.add_argument("--window", type=int_auto, default=None, help="FIFO window size (default 8192)")
    p.add_argument("--placement", choices=["0/4k", "4k/8k"], default="0/4k",
                   help="layout a only: where the two 4 KiB queues sit")
    p.add_argument("--max-msg-size", type=int, default=64,
                   help="largest message sent (48 towards QEMU-style peers; default 64)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the peer")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def open_endpoint(args: argparse.Namespace, role: Role, **carrier_opts: Any) -> tuple[Carrier, MsgFifo]:
    """Open the carrier named by --region and build (not start) the FIFO."""
    try:
        carrier = open_carrier(args.region, **carrier_opts)
    except FileNotFoundError as e:
        raise CliError(f"{args.region}: {e.strerror or e}") from None
    except PermissionError as e:
        raise CliError(f"{args.region}: permission denied ({e})") from None
    try:
        offset = carrier.offset if args.offset is None else args.offset
        fifo = MsgFifo(carrier.region, role=role, layout=args.layout, offset=offset,
                       window=args.window, doorbell=carrier.doorbell, header=args.profile,
                       placement=args.placement)
    except (ValueError, IndexError) as e:
        carrier.close()
        raise CliError(f"{args.region}: {e}") from None
    return carrier, fifo


def start_driver_bus(args: argparse.Namespace, carrier: Carrier, fifo: MsgFifo) -> AmpBus:
    from vmsgamp.protocol import DriverConnection

    bus = AmpBus(fifo, DriverConnection(profile=args.profile, max_msg_size=args.max_msg_size))
    bus.watch_carrier(carrier)      # ivshmem: a device side that dies is noticed at once
    try:
        bus.start(args.timeout)
    except HandshakeTimeout as e:
        fifo.close()
        carrier.close()
        raise CliError(f"{args.region}: no device side answered within {args.timeout} s "
                       f"({e}); is `vmsgamp serve` running on it?") from None
    return bus


def driver_memory_start(fifo: MsgFifo) -> int:
    """First byte after the FIFO window, page aligned: driver rings go there."""
    end = fifo.offset + fifo.window
    return (end + 4095) & ~4095


def emit(args: argparse.Namespace, obj: dict[str, Any], human: str) -> None:
    if args.json:
        print(json.dumps(obj, sort_keys=True))
    else:
        print(human)
    sys.stdout.flush()


def hexfmt(v: int) -> str:
    return f"{v:#x}"


def is_tty() -> bool:
    return os.isatty(1)
