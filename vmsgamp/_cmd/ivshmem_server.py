"""``vmsgamp ivshmem-server SOCKET``: a QEMU-compatible ivshmem server.

Runs until stopped: SIGTERM is the normal stop (exit 0), Ctrl-C exits 130;
the socket is removed either way.  With ``--json`` the start-up information
is one JSON object on stdout; otherwise one line, followed by a line per
peer connecting or leaving.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from vmsgamp._cmd._args import add_command, int_range, size
from vmsgamp._cmd._output import add_json_arg, emit


def register(subparsers: Any) -> None:
    p = add_command(
        subparsers, "ivshmem-server",
        help="run a QEMU-compatible ivshmem server (laptop emulation)",
        description="Create shared memory (memfd) and per-peer eventfds and hand them out on "
                    "a UNIX socket with QEMU's ivshmem protocol.  Peers join with "
                    "--region ivshmem:SOCKET, or QEMU with "
                    "-chardev socket,path=SOCKET,id=ivs -device ivshmem-doorbell,chardev=ivs,vectors=N.  "
                    "SIGTERM is the normal stop (exit 0); Ctrl-C exits 130; the socket is removed.")
    p.add_argument("socket", metavar="SOCKET", help="UNIX socket path to listen on")
    p.add_argument("--size", default="4M", type=size,
                   help="shared-memory size, e.g. 4M, 64K, 0x100000 (QEMU's default is 4M too)")
    p.add_argument("--vectors", default=1, type=int_range(1, 64), metavar="N",
                   help="interrupt vectors (eventfds) per peer, 1..64")
    add_json_arg(p, "the start-up information")
    p.set_defaults(func=run, sigterm_exit=0)


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
        emit(args, {"socket": server.socket_path, "size": server.size, "vectors": server.vectors},
             f"ivshmem server listening on {server.socket_path} "
             f"(size {_human(server.size)}, {server.vectors} vector"
             f"{'s' if server.vectors != 1 else ''}); Ctrl-C to stop")
        server.serve_forever()
    finally:
        server.close()
    return 0


def _human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"
