"""``vmsgamp bench NAME``: benchmarks.  Each lives in ``vmsgamp/_bench/NAME.py``
with ``add_arguments(parser)``, ``run(args) -> dict`` and ``format_human(dict)``;
the dict's ``verdicts`` (if any) become one ``verdict PASS|MISS|n/a|info`` line
per target in the human output.  A benchmark that cannot run (one CPU, no
compiler, no matplotlib for ``--plot``) exits 1 with one line."""
from __future__ import annotations

import argparse
import importlib
import logging
from types import ModuleType

from vmsgamp._cmd._args import add_command, positive_float, positive_int
from vmsgamp._cmd._output import add_json_arg, emit
from vmsgamp.cli import CliError

log = logging.getLogger("vmsgamp.bench")

BENCHMARKS = {
    "fifo": "vmsgamp._bench.fifo",
    "virtqueue": "vmsgamp._bench.virtqueue",
    "devices": "vmsgamp._bench.devices",
    "vhost-user": "vmsgamp._bench.vhost_user",
    "codec": "vmsgamp._bench.codec",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "bench", help="measure FIFOs, virtqueues and devices between two processes",
                    description="Benchmarks between two processes pinned to two CPUs (or a QEMU "
                                "guest for vhost-user).  `vmsgamp bench NAME --help` lists each "
                                "one's options.  Ctrl-C stops a run and removes what it started.")
    bsub = p.add_subparsers(dest="bench", metavar="NAME")
    for name, modname in BENCHMARKS.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError as e:
            if e.name == modname:
                continue  # not built yet
            raise
        doc = (mod.__doc__ or "").strip()
        first = doc.split("\n\n")[0].replace("\n", " ")
        # "``vmsgamp bench x``: what it measures." -> "what it measures"
        summary = first.split(": ", 1)[1] if first.startswith("``") and ": " in first else first
        bp = add_command(bsub, name, help=summary.rstrip("."), description=doc.replace("``", "`"))
        add_json_arg(bp)
        mod.add_arguments(bp)
        _refuse_nonpositive(bp)
        bp.set_defaults(func=_runner(mod))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _refuse_nonpositive(p: argparse.ArgumentParser) -> None:
    """Every plain number a benchmark takes (durations, counts, sizes) is a
    positive quantity: refuse 0 and negative values as a usage error."""
    for action in p._actions:
        if action.type is float:
            action.type = positive_float
        elif action.type is int:
            action.type = positive_int


def _runner(mod: ModuleType):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        try:
            if getattr(args, "plot", None):
                from vmsgamp._bench import plot

                plot._pyplot()  # fail before a long run, not after it
            result = mod.run(args)
        except RuntimeError as e:
            # BenchError, GuestError: the first line says what; -v shows the rest.
            text = str(e).strip() or type(e).__name__
            log.info("%s", text)
            first = text.splitlines()[0]
            raise CliError(first + (" (-v shows the details)" if "\n" in text else "")) from None
        emit(args, result, mod.format_human(result))
        return 0

    return run
