"""vmsgamp command line.

Each subcommand lives in its own module under ``vmsgamp/_cmd/`` exposing
``register(subparsers)``; the module list below is the only shared piece.

Conventions every command follows (``vmsgamp --help`` says them too):

* ``--json``: stdout holds exactly one JSON object, also on failure
  (``{"error": "..."}``); the one-line error still goes to stderr.
* Errors: one line on stderr, ``vmsgamp COMMAND: error: ...``, exit 1.
  Usage errors (argparse): exit 2.
* Ctrl-C (SIGINT): one line ``vmsgamp COMMAND: interrupted``, exit 130.
* SIGTERM: exit 143, or 0 for the commands whose normal end is being
  stopped (``serve``, ``ivshmem-server``, ``vhost-user``: they set
  ``sigterm_exit=0``).  Either way every child process, temporary
  directory, socket and ``unlink=1`` object is removed first.
* A closed stdout (``vmsgamp ... | head -1``): no message, exit 141.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

COMMAND_MODULES = [
    "vmsgamp._cmd.serve",
    "vmsgamp._cmd.devices",
    "vmsgamp._cmd.console",
    "vmsgamp._cmd.emulate",
    "vmsgamp._cmd.bench",
    "vmsgamp._cmd.decode",
    "vmsgamp._cmd.dump",
    "vmsgamp._cmd.ivshmem_server",
    "vmsgamp._cmd.vhost_user",
    "vmsgamp._cmd.doctor",
    "vmsgamp._cmd.trace",
]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT
EXIT_TERMINATED = 143    # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE

EPILOG = """\
exit codes: 0 ok, 1 error (one line on stderr), 2 usage error, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM; 0 for serve, ivshmem-server and vhost-user,
whose normal end that is).  With --json, stdout holds exactly one JSON object,
also on failure ({"error": ...}).
"""


class CliError(Exception):
    """A clear one-line error for the user (exit code 1)."""


class UsageError(CliError):
    """A usage mistake argparse cannot see, e.g. two options that exclude
    each other (exit code 2, like argparse's own)."""


class Terminated(BaseException):
    """SIGTERM arrived (raised in the main thread, like KeyboardInterrupt,
    so every ``finally`` and ``with`` on the way out runs)."""


# ---- signals -------------------------------------------------------------------------------

_shield_depth = 0
_pending: list[int] = []
_stoppers: list[Callable[[], None]] = []


def _on_signal(signum: int, frame: Any) -> None:
    if _shield_depth:
        _pending.append(signum)      # delivered when the cleanup is done
        return
    if _stoppers:
        _pending.append(signum)      # delivered when the loop has stopped
        _stoppers[-1]()
        return
    _raise_for(signum)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated


@contextmanager
def cleanup_shield() -> Iterator[None]:
    """Run a cleanup block to its end even if Ctrl-C or SIGTERM arrives
    meanwhile; the signal takes effect when the block is left.  (A block
    mask would not do: a signal may be delivered to another thread, and
    Python then runs the handler in the main thread anyway.)"""
    global _shield_depth
    _shield_depth += 1
    try:
        yield
    finally:
        _shield_depth -= 1
        if not _shield_depth and _pending:
            signum = _pending[0]
            _pending.clear()
            _raise_for(signum)


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """For a serving loop: within the block Ctrl-C and SIGTERM call
    ``stop()`` (the loop ends at a clean point) instead of raising wherever
    the code happens to be; the signal takes effect when the block is left
    (KeyboardInterrupt or Terminated, as everywhere else)."""
    _stoppers.append(stop)
    try:
        yield
    finally:
        _stoppers.pop()
        if not _stoppers and not _shield_depth and _pending:
            signum = _pending[0]
            _pending.clear()
            _raise_for(signum)


@contextmanager
def _signal_handlers() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield                        # only the main thread may install handlers
        return
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _pending.clear()
        _stoppers.clear()


# ---- parser ----------------------------------------------------------------------------------

def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vmsgamp")
    except Exception:
        from vmsgamp import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmsgamp",
        description="A Linux process as a virtio-msg-amp endpoint: serve device models on the "
                    "device side of an AMP bus, drive them from the driver side, and inspect, "
                    "emulate and measure the bus.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vmsgamp {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging on stderr (-vv: debug)")
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


# ---- running ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from vmsgamp._cmd import _output

    _output.reset()
    args = argparse.Namespace(command=_guess_command(argv), json=False)
    # Handlers first: building the parser imports every command module, and
    # a Ctrl-C meanwhile is one line too.
    with _signal_handlers():
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            if not getattr(args, "func", None):
                parser.print_help()
                return EXIT_USAGE
            if args.verbose:
                import logging

                logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO)
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            return _fail(args, "interrupted", EXIT_INTERRUPTED, prefix="")
        except Terminated:
            code = getattr(args, "sigterm_exit", EXIT_TERMINATED)
            if code:
                return _fail(args, "terminated", code, prefix="")
            return 0
        except BrokenPipeError:
            return _broken_pipe()
        except UsageError as e:
            return _fail(args, str(e), EXIT_USAGE)
        except CliError as e:
            return _fail(args, str(e), EXIT_ERROR)
        except (OSError, ValueError, TimeoutError) as e:
            return _fail(args, _one_line(e), EXIT_ERROR)
        except Exception as e:
            from vmsgamp.errors import VmsgampError

            if isinstance(e, VmsgampError):
                return _fail(args, _one_line(e), EXIT_ERROR)
            raise


def _guess_command(argv: list[str] | None) -> str | None:
    """The subcommand's name before argparse has run (for a Ctrl-C then)."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    return words[0] if words else None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, OSError) and e.strerror and not str(e).startswith("["):
        text = str(e)
    elif isinstance(e, OSError) and e.strerror:
        text = e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def _fail(args: argparse.Namespace, message: str, code: int, *, prefix: str = "error: ") -> int:
    from vmsgamp._cmd import _output

    try:
        if getattr(args, "json", False) and not _output.printed():
            _output.print_json({"error": message, "command": args.command, "exit_code": code})
        name = f"vmsgamp {args.command}" if args.command else "vmsgamp"
        print(f"{name}: {prefix}{message}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        return _broken_pipe()
    return code


def _broken_pipe() -> int:
    # The reader went away (``| head -1``): say nothing, and keep the
    # interpreter from complaining when it flushes stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
