"""vmsgamp command line.

Each subcommand lives in its own module under ``vmsgamp/_cmd/`` exposing
``register(subparsers)``; the module list below is the only shared piece.

Conventions every command follows (``vmsgamp --help`` says them too):

* ``--json``: stdout holds exactly one JSON object, also on failure
  (``{"error": "...", "exit_code": N}``, usage errors included); the
  one-line error still goes to stderr.  The exception: ``trace`` streams
  JSON Lines (see ``_output``).
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

# Every command: its module (whose ``register(subparsers)`` adds it) and its
# one line in ``vmsgamp --help``.  Only the module of the command being run is
# imported; the others appear as stubs with this line, so ``vmsgamp --help``
# and each command start without loading numpy, the bus or the carriers of
# every other command.  tests/test_cli_json.py checks the lines against the
# modules' own.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("vmsgamp._cmd.serve", "run device models on the device side of an AMP bus"),
    "devices": ("vmsgamp._cmd.devices", "enumerate the devices on a bus (driver side)"),
    "ping": ("vmsgamp._cmd.devices", "bus PING round trips (driver side)"),
    "console": ("vmsgamp._cmd.console", "attach this terminal to a console device (driver side)"),
    "emulate": ("vmsgamp._cmd.emulate", "run a whole AMP system on this machine and exercise every device"),
    "bench": ("vmsgamp._cmd.bench", "measure FIFOs, virtqueues and devices between two processes"),
    "decode": ("vmsgamp._cmd.decode", "decode virtio-msg messages given as hex"),
    "dump": ("vmsgamp._cmd.dump", "read-only view of the layout, queue heads and pending messages"),
    "ivshmem-server": ("vmsgamp._cmd.ivshmem_server", "run a QEMU-compatible ivshmem server (laptop emulation)"),
    "vhost-user": ("vmsgamp._cmd.vhost_user",
                   "serve a device model to QEMU over vhost-user (vhost-user-rng/blk-pci)"),
    "doctor": ("vmsgamp._cmd.doctor", "check UIO/PCI/VFIO devices, permissions and what a URI needs"),
    "trace": ("vmsgamp._cmd.trace",
              "watch a live bus read-only (tcpdump for virtio-msg), or write it to pcapng"),
}
COMMAND_MODULES = list(dict.fromkeys(mod for mod, _ in COMMANDS.values()))

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT
EXIT_TERMINATED = 143    # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE

EPILOG = """\
exit codes: 0 ok, 1 error (one line on stderr), 2 usage error, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM; 0 for serve, ivshmem-server and vhost-user,
whose normal end that is).  With --json, stdout holds exactly one JSON object,
also on failure ({"error": ..., "exit_code": N}, usage errors included); the
one exception is `trace`, which streams JSON Lines (one object per record).
"""


class CliError(Exception):
    """A clear one-line error for the user (exit code 1)."""


class UsageError(CliError):
    """A usage mistake argparse cannot see, e.g. two options that exclude
    each other (exit code 2, like argparse's own)."""


class _ArgumentError(Exception):
    """argparse refused the command line (its usage is already on stderr)."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised instead of exiting, so that ``main``
    reports them like every other error: one line, exit 2, and the error
    object on stdout with ``--json``.  Subparsers inherit the class."""

    def error(self, message: str) -> Any:   # argparse declares NoReturn
        self.print_usage(sys.stderr)
        raise _ArgumentError(self.prog, message)


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


class _VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when asked
    (importlib.metadata costs ~30 ms at every start otherwise)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str = "show program's version number and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser._print_message(f"vmsgamp {_version()}\n", sys.stdout)
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``command`` given) one whose other commands are
    stubs that only list themselves in ``vmsgamp --help``."""
    parser = _Parser(
        prog="vmsgamp",
        description="A Linux process as a virtio-msg-amp endpoint: serve device models on the "
                    "device side of an AMP bus, drive them from the driver side, and inspect, "
                    "emulate and measure the bus.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging on stderr (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = COMMANDS[command][0] if command in COMMANDS else None
    for module in COMMAND_MODULES:
        if command is None or module == wanted:
            importlib.import_module(module).register(sub)
            continue
        for name, (mod, help_line) in COMMANDS.items():
            if mod == module:
                sub.add_parser(name, help=help_line, add_help=False)
    return parser


# ---- running ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from vmsgamp._cmd import _output

    _output.reset()
    words = sys.argv[1:] if argv is None else list(argv)
    guessed = _guess_command(words)
    args = argparse.Namespace(command=guessed, json=_output.wants_json(words))
    # Handlers first: building the parser imports the command's module, and
    # a Ctrl-C meanwhile is one line too.
    with _signal_handlers():
        try:
            parser = build_parser(guessed if guessed in COMMANDS else "")
            args = parser.parse_args(words)
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
        except _ArgumentError as e:
            return _fail(args, e.message, EXIT_USAGE, name=e.prog)
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
            # A bug: the traceback on stderr and exit 1 as always, and with
            # --json still the one object a script waits for.
            _output.emit_error(args, f"internal error: {type(e).__name__}: {_one_line(e)}", EXIT_ERROR)
            raise


def _guess_command(argv: list[str] | None) -> str | None:
    """The subcommand's name before argparse has run (the top-level options
    take no value, so it is the first word that is not an option)."""
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


def _fail(args: argparse.Namespace, message: str, code: int, *, prefix: str = "error: ",
          name: str | None = None) -> int:
    from vmsgamp._cmd import _output

    try:
        _output.emit_error(args, message, code)
        if name is None:
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
