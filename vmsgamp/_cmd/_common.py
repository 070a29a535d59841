"""Options and helpers shared by the commands that open an AMP endpoint."""
from __future__ import annotations

import argparse
import os
from typing import Any

from vmsgamp._cmd._args import add_command, int_auto, nonneg_int, positive_float, positive_int, wait_policy
from vmsgamp._cmd._output import add_json_arg, emit
from vmsgamp._core.fifo import PLACEMENTS, MsgFifo, Role
from vmsgamp.bus import AmpBus
from vmsgamp.carriers import Carrier, open_carrier
from vmsgamp.cli import CliError
from vmsgamp.errors import HandshakeTimeout

__all__ = ["FIFO_WINDOW", "add_command", "add_endpoint_args", "add_json_arg", "driver_memory_start",
           "emit", "hexfmt", "int_auto", "is_tty", "open_endpoint", "start_driver_bus"]

FIFO_WINDOW = 8192


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", required=True, metavar="URI",
                   help="shared memory: shm:NAME, ivshmem:SOCKET, file:PATH, fd:N, uio:, pci:, "
                        "vfio:, a bare path (see the README's region table)")
    p.add_argument("--layout", choices=["b", "a"], default="b",
                   help="FIFO layout: b = vmamp_shmem, a = spsc_queue")
    p.add_argument("--profile", choices=["g2", "g1"], default="g2",
                   help="message header: g2 = 8 bytes with token, g1 = 6 bytes")
    p.add_argument("--offset", type=nonneg_int, default=None,
                   help="where the AMP layout starts in the region (default: the URI's offset=, else 0)")
    p.add_argument("--window", type=positive_int, default=None,
                   help=f"bytes of the region the FIFOs may use (default: {FIFO_WINDOW})")
    p.add_argument("--placement", choices=["0/4k", "4k/8k"], default="0/4k",
                   help="layout a only: where the two 4 KiB queues sit")
    p.add_argument("--max-msg-size", type=positive_int, default=64, metavar="BYTES",
                   help="largest message sent (48 towards QEMU-style peers)")
    p.add_argument("--timeout", type=positive_float, default=10.0, metavar="S",
                   help="seconds to wait for the peer")
    add_json_arg(p)


def open_endpoint(args: argparse.Namespace, role: Role, **carrier_opts: Any) -> tuple[Carrier, MsgFifo]:
    """Open the carrier named by --region and build (not start) the FIFO."""
    try:
        carrier = open_carrier(args.region, **carrier_opts)
    except FileNotFoundError as e:
        raise CliError(f"{args.region}: {e.strerror or e}") from None
    except PermissionError as e:
        raise CliError(f"{args.region}: permission denied ({e})") from None
    offset = carrier.offset if args.offset is None else args.offset
    need = offset + layout_window(args)
    if carrier.region.size < need:
        size = carrier.region.size
        carrier.close()
        raise CliError(f"{args.region}: region too small: {size} bytes ({size:#x}), layout "
                       f"{args.layout.upper()} needs {need} ({need:#x})"
                       + (f" from offset {offset:#x}" if offset else ""))
    try:
        fifo = MsgFifo(carrier.region, role=role, layout=args.layout, offset=offset,
                       window=args.window, doorbell=carrier.doorbell, header=args.profile,
                       placement=args.placement)
    except (ValueError, IndexError) as e:
        carrier.close()
        raise CliError(f"{args.region}: {e}") from None
    return carrier, fifo


def layout_window(args: argparse.Namespace) -> int:
    """Bytes the FIFO layout occupies from its offset (``--window``, else
    the layout's default)."""
    if args.window is not None:
        return int(args.window)
    if args.layout == "a":
        return max(PLACEMENTS[args.placement]) + 4096
    return FIFO_WINDOW


def start_driver_bus(args: argparse.Namespace, carrier: Carrier, fifo: MsgFifo) -> AmpBus:
    from vmsgamp.protocol import DriverConnection

    bus = AmpBus(fifo, DriverConnection(profile=args.profile, max_msg_size=args.max_msg_size),
                 wait=wait_policy(args))
    bus.watch_carrier(carrier)      # ivshmem: a device side that dies is noticed at once
    try:
        bus.start(args.timeout)
    except HandshakeTimeout as e:
        fifo.close()
        carrier.close()
        raise CliError(f"{args.region}: no device side answered within {args.timeout} s "
                       f"({e}); is `vmsgamp serve` running on it?") from None
    except BaseException:             # Ctrl-C while waiting: leave nothing open
        fifo.close()
        carrier.close()
        raise
    return bus


def driver_memory_start(fifo: MsgFifo) -> int:
    """First byte after the FIFO window, page aligned: driver rings go there."""
    end = fifo.offset + fifo.window
    return (end + 4095) & ~4095


def hexfmt(v: int) -> str:
    return f"{v:#x}"


def is_tty() -> bool:
    return os.isatty(1)
