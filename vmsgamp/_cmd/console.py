"""``vmsgamp console``: attach this terminal to a console device (driver side).

What ``screen`` or ``picocom`` do for a serial line, for a virtio-console on
the bus: the terminal goes to raw mode, every key (Ctrl-C included) goes to
the device, what the device sends is shown, and the escape key (Ctrl-],
``--escape``) detaches.  Enter sends CR, as a serial terminal does
(``--enter``); a LF from the device is shown as CR LF, since raw mode turns
off the terminal's own translation.  The terminal is restored on every way
out: the escape key, an error, Ctrl-C from outside, SIGTERM.

Without a terminal on stdin (a pipe), stdin is sent as it is until its end,
then the device's answer is read for ``--linger`` seconds.  With ``--json``
nothing else is written to stdout: one object at the end holds what was sent
and received.
"""
from __future__ import annotations

import argparse
import os
import select
import sys
import termios
import time
import tty
from typing import Any

from vmsgamp._cmd._args import nonneg_float, nonneg_int
from vmsgamp._cmd._common import add_command, add_endpoint_args, emit
from vmsgamp.cli import CliError

VIRTIO_ID_CONSOLE = 3
ENTER = {"cr": b"\r", "lf": b"\n", "crlf": b"\r\n"}


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "console", help="attach this terminal to a console device (driver side)",
                    description=__doc__.split("\n\n", 1)[1].strip() if __doc__ else None)
    add_endpoint_args(p)
    p.add_argument("--dev", type=nonneg_int, default=None, metavar="N",
                   help="device number of the console (default: the first console on the bus)")
    p.add_argument("--port", type=nonneg_int, default=0, metavar="P",
                   help="console port (multiport devices; port 0 is the console port)")
    p.add_argument("--escape", type=_escape_key, default="^]", metavar="^X",
                   help="the key that detaches, as ^LETTER")
    p.add_argument("--enter", choices=sorted(ENTER), default="cr",
                   help="what the Enter key (CR from the terminal) sends")
    p.add_argument("--linger", type=nonneg_float, default=0.5, metavar="S",
                   help="without a terminal: seconds to keep reading after stdin ends")
    p.set_defaults(func=run)


def _escape_key(text: str) -> str:
    t = text.strip()
    if len(t) == 2 and t[0] == "^" and 0x40 <= ord(t[1].upper()) <= 0x5F:
        return "^" + t[1].upper()
    raise argparse.ArgumentTypeError(f"not a control key like ^] or ^X: {text!r}")


def _escape_byte(key: str) -> int:
    return ord(key[1]) - 0x40


def _find_console(drv: Any, dev: int | None) -> int:
    nums = drv.enumerate()
    if dev is not None:
        if dev not in nums:
            raise CliError(f"no device {dev} on the bus (devices: {', '.join(map(str, nums)) or 'none'})")
        info = drv.info(dev)
        if info.device_id != VIRTIO_ID_CONSOLE:
            raise CliError(f"device {dev} is {info.name}, not a console")
        return dev
    for n in nums:
        if drv.info(n).device_id == VIRTIO_ID_CONSOLE:
            return n
    raise CliError("no console device on the bus (serve one with --devices console:pty)")


def run(args: argparse.Namespace) -> int:
    from vmsgamp._cmd.devices import open_driver
    from vmsgamp.devices.console_client import ConsoleClient

    carrier, bus, drv = open_driver(args)
    con = None
    try:
        n = _find_console(drv, args.dev)
        con = ConsoleClient.open(drv, n)
        port = con.port(args.port)
        port.open()
        stats = _attach(args, port, n)
        return _finish(args, n, stats)
    finally:
        if con is not None:
            con.close()
        drv.close()
        bus.close()
        carrier.close()


def _attach(args: argparse.Namespace, port: Any, dev_num: int) -> dict[str, Any]:
    stdin = sys.stdin.fileno()
    interactive = os.isatty(stdin) and not args.json
    out = sys.stdout.buffer
    received = bytearray()
    stats: dict[str, Any] = {"sent": 0, "received": 0, "detached": False}
    esc = _escape_byte(args.escape)
    enter = ENTER[args.enter]
    saved = termios.tcgetattr(stdin) if interactive else None
    if interactive:
        sys.stderr.write(f"vmsgamp console: device {dev_num} port {port.id} on {args.region}; "
                         f"{args.escape} (Ctrl-{args.escape[1]}) detaches\n")
        sys.stderr.flush()
    try:
        if saved is not None:
            tty.setraw(stdin, termios.TCSANOW)
        stdin_open = True
        linger_until: float | None = None
        while True:
            if stdin_open and select.select([stdin], [], [], 0)[0]:
                data = os.read(stdin, 4096)
                if not data:
                    stdin_open = False
                    linger_until = time.monotonic() + args.linger
                else:
                    cut = data.find(bytes([esc]))
                    if cut >= 0:
                        data = data[:cut]
                        stats["detached"] = True
                    if interactive:
                        data = data.replace(b"\r", enter)
                    if data:
                        port.write(data)
                        stats["sent"] += len(data)
                    if stats["detached"]:
                        break
            got = port.read(4096, timeout=0.02)
            if got:
                stats["received"] += len(got)
                if args.json:
                    received += got
                else:
                    out.write(got.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") if interactive else got)
                    out.flush()
            elif port.removed:
                raise CliError(f"console device {dev_num} port {port.id} went away")
            elif linger_until is not None and time.monotonic() >= linger_until:
                break
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
    stats["output"] = received.decode("utf-8", "replace")
    return stats


def _finish(args: argparse.Namespace, dev_num: int, stats: dict[str, Any]) -> int:
    if args.json:
        emit(args, {"region": args.region, "dev_num": dev_num, **stats}, "")
    elif stats["detached"]:
        sys.stderr.write("\nvmsgamp console: detached\n")
    return 0
