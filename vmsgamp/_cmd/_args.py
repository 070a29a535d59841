"""Argument types shared by the commands: each refuses a bad value with one
line naming what was wrong (argparse turns it into a usage error, exit 2)."""
from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmsgamp.bus._wait import WaitPolicy


def int_auto(text: str) -> int:
    """Integers in any base Python accepts: 4096, 0x1000, 0o10."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def positive_float(text: str) -> float:
    """Seconds and the like: > 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


def nonneg_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


def positive_int(text: str) -> int:
    value = int_auto(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def nonneg_int(text: str) -> int:
    value = int_auto(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


def size(text: str) -> int:
    """A byte count with an optional K/M/G suffix (4M, 64K, 0x100000)."""
    from vmsgamp.carriers._registry import parse_size

    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, not {text}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; every option's default shown (except
    flags and options without one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or action.default in (None, False, argparse.SUPPRESS)
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
                or action.option_strings == []):
            return text
        return text + " (default: %(default)s)"


def add_command(sub: argparse._SubParsersAction, name: str, *, help: str,
                description: str | None = None, **kw: object) -> argparse.ArgumentParser:
    """A subcommand parser with the house help format: ``help`` is the one
    line in ``vmsgamp --help``, ``description`` the paragraph of
    ``vmsgamp NAME --help`` (``help`` again when omitted)."""
    return sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".",
                          formatter_class=HelpFormatter, **kw)


def int_range(low: int, high: int):  # type: ignore[no-untyped-def]
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        value = int_auto(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, not {text}")
        return value

    parse.__name__ = f"integer {low}..{high}"
    return parse


def add_wait_args(p: argparse.ArgumentParser) -> None:
    """--spin-us, --idle-backoff-ms, --busy-poll: how the bus loops wait
    (vmsgamp.bus.WaitPolicy)."""
    from vmsgamp.bus._wait import DEFAULT_IDLE_BACKOFF_MS, DEFAULT_SPIN_US

    p.add_argument("--spin-us", type=nonneg_float, default=DEFAULT_SPIN_US, metavar="US",
                   help="after traffic, spin this many microseconds watching the FIFO and queues "
                        "before blocking on the doorbell (0: block at once)")
    p.add_argument("--idle-backoff-ms", type=positive_float, default=DEFAULT_IDLE_BACKOFF_MS, metavar="MS",
                   help="carriers without a doorbell (shm:, file:, polled pci:): longest sleep "
                        "between looks at the FIFO when idle")
    p.add_argument("--busy-poll", action="store_true",
                   help="never sleep: spin on the FIFO and queues all the time (benchmarks; "
                        "costs one CPU per loop)")


def wait_policy(args: argparse.Namespace) -> WaitPolicy:
    """The WaitPolicy the wait options name (defaults for a command without them)."""
    from vmsgamp.bus._wait import policy_from

    return policy_from(getattr(args, "spin_us", None), getattr(args, "idle_backoff_ms", None),
                       bool(getattr(args, "busy_poll", False)))


def wait_argv(args: argparse.Namespace) -> list[str]:
    """The wait options again, for a child command."""
    pol = wait_policy(args)
    out = ["--spin-us", repr(pol.spin_us), "--idle-backoff-ms", repr(pol.idle_backoff_ms)]
    return out + (["--busy-poll"] if pol.busy_poll else [])
