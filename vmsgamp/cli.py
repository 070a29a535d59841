"""vmsgamp command line.

Each subcommand lives in its own module under ``vmsgamp/_cmd/`` exposing
``register(subparsers)``; the module list below is the only shared piece.
Conventions: ``--json`` prints one JSON object on stdout; errors print one
line on stderr and exit 1; usage errors exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from vmsgamp.errors import VmsgampError

COMMAND_MODULES = [
    "vmsgamp._cmd.serve",
    "vmsgamp._cmd.devices",
    "vmsgamp._cmd.emulate",
    "vmsgamp._cmd.bench",
    "vmsgamp._cmd.decode",
    "vmsgamp._cmd.dump",
    "vmsgamp._cmd.ivshmem_server",
    "vmsgamp._cmd.vhost_user",
    "vmsgamp._cmd.doctor",
    "vmsgamp._cmd.trace",
]


class CliError(Exception):
    """A clear one-line error for the user (exit code 1)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmsgamp",
        description="A Linux process as a virtio-msg-amp endpoint.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"vmsgamp {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vmsgamp {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, TimeoutError, VmsgampError) as e:
        print(f"vmsgamp {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
