"""What every command prints: one JSON object with ``--json``, text otherwise.

The contract: with ``--json`` stdout holds exactly one JSON object and
nothing else, on success and on failure alike (``{"error", "command",
"exit_code"}``, with the same exit code as without ``--json``; usage errors,
exit 2, included).  ``emit`` is the only way a command writes its result:
it prints one object and remembers that it did, so that ``cli.main`` prints
the error object on a failure only when nothing was printed yet.

The one exception is a streaming command (``vmsgamp trace``): it prints JSON
Lines, one object per record as it happens, because its output has no end a
reader could wait for.  Its ``--json`` help, ``vmsgamp --help`` and the
README say so; an error then is one more line, the error object.
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


def wants_json(argv: list[str]) -> bool:
    """``--json`` is on the command line (looked at before argparse has run,
    so that its own usage errors are JSON too)."""
    for word in argv:
        if word == "--":
            return False
        if word == "--json":
            return True
    return False


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
    """``obj`` as JSON with ``--json``, else ``human``.  A result that holds
    an ``"error"`` (decode, doctor, emulate: the report, then a CliError)
    gets the ``"exit_code"`` that follows, like the error object."""
    if getattr(args, "json", False):
        if "error" in obj:
            obj = {"exit_code": 1, **obj}
        print_json(obj)
    else:
        sys.stdout.write(human + "\n")
        sys.stdout.flush()


def emit_error(args: argparse.Namespace, message: str, code: int) -> None:
    """With ``--json``: the error object, unless the command already printed
    its one object (which then says what went wrong, or the error is only on
    stderr for a long-running command that had announced itself)."""
    if getattr(args, "json", False) and not _printed:
        print_json({"error": message, "command": getattr(args, "command", None), "exit_code": code})
