"""What every command prints: one JSON object with ``--json``, text otherwise.

``emit`` is the only way a command writes its result; with ``--json`` it
prints one object and remembers that it did, so that ``cli.main`` prints
``{"error": ...}`` on a failure only when nothing was printed yet: stdout
always holds exactly one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

_printed = False


def reset() -> None:
    global _printed
    _printed = False


def printed() -> bool:
    """A JSON object has been printed by this command run."""
    return _printed


def add_json_arg(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as one JSON object on stdout (also on failure: {{\"error\": ...}})")


def print_json(obj: dict[str, Any]) -> None:
    global _printed
    if _printed:
        raise RuntimeError("a command printed a second JSON object")   # a bug, not user input
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
    _printed = True


def emit(args: argparse.Namespace, obj: dict[str, Any], human: str) -> None:
    """``obj`` as JSON with ``--json``, else ``human``."""
    if getattr(args, "json", False):
        print_json(obj)
    else:
        sys.stdout.write(human + "\n")
        sys.stdout.flush()
