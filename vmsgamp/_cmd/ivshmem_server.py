"""``vmsgamp ivshmem-server SOCKET``: a QEMU-compatible ivshmem server.

Runs until Ctrl-C (or SIGTERM), which exits 0.  With ``--json`` the start-up
information is one JSON object on stdout; otherwise one line, followed by a
line per peer connecting or leaving.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from vmsgamp.carriers._registry import parse_size


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ivshmem-server",
        help="run a QEMU-compatible ivshmem server (laptop emulation)",
        description="Create shared memory (memfd) and per-peer eventfds and hand them out on "
                    "a UNIX socket with QEMU's ivshmem protocol.  Peers join with "
                    "--region ivshmem:SOCKET, or QEMU with "
                    "-chardev socket,path=SOCKET,id=ivs -device ivshmem-doorbell,chardev=ivs,vectors=N.")
    p.add_argument("socket", metavar="SOCKET", help="UNIX socket path to listen on")
    p.add_argument("--size", default="4M", type=_size_arg,
                   help="shared-memory size, e.g. 4M, 64K, 0x100000 (default 4M, as QEMU's)")
    p.add_argument("--vectors", default=1, type=int,
                   help="interrupt vectors (eventfds) per peer, 1..64 (default 1)")
    p.add_argument("--json", action="store_true", help="print the start-up info as one JSON object")
    p.set_defaults(func=run)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from vmsgamp.carriers.ivshmem import IvshmemServer
    from vmsgamp.cli import CliError

    def on_event(kind: str, peer_id: int) -> None:
        if not args.json:
            print(f"peer {peer_id} {kind}", flush=True)

    try:
        server = IvshmemServer(args.socket, args.size, args.vectors, on_event=on_event)
    except OSError as e:
        # The message already names the path and the cause; drop "[Errno N]".
        raise CliError(e.strerror or str(e)) from None
    try:
        if args.size & (args.size - 1):
            print(f"vmsgamp ivshmem-server: warning: size {args.size} is not a power of two; "
                  f"QEMU's ivshmem device will refuse it", file=sys.stderr)
        if args.json:
            print(json.dumps({"socket": server.socket_path, "size": server.size,
                              "vectors": server.vectors}), flush=True)
        else:
            print(f"ivshmem server listening on {server.socket_path} "
                  f"(size {_human(server.size)}, {server.vectors} vector"
                  f"{'s' if server.vectors != 1 else ''}); Ctrl-C to stop", flush=True)
        # SIGTERM (systemd, kill) is a clean stop too; only the main thread
        # may install handlers (main() can be called from a thread in tests).
        in_main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            return 0
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, old)
    finally:
        server.close()
    return 0


def _human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"
