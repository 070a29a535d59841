"""``vmsgamp bench NAME``: benchmarks.  Each lives in ``vmsgamp/_bench/NAME.py``
with ``add_arguments(parser)``, ``run(args) -> dict`` and ``format_human(dict)``;
the dict's ``verdicts`` (if any) become one ``verdict PASS|MISS|n/a|info`` line
per target in the human output.  A benchmark that cannot run (one CPU, no
compiler, no matplotlib for ``--plot``) exits 1 with one line."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

BENCHMARKS = {
    "fifo": "vmsgamp._bench.fifo",
    "virtqueue": "vmsgamp._bench.virtqueue",
    "devices": "vmsgamp._bench.devices",
    "vhost-user": "vmsgamp._bench.vhost_user",
    "codec": "vmsgamp._bench.codec",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure FIFOs, virtqueues and devices between two processes")
    bsub = p.add_subparsers(dest="bench", metavar="NAME")
    for name, modname in BENCHMARKS.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError as e:
            if e.name == modname:
                continue  # not built yet
            raise
        bp = bsub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        bp.add_argument("--json", action="store_true", help="print one JSON object")
        mod.add_arguments(bp)
        bp.set_defaults(func=_runner(mod))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _runner(mod):
    def run(args: argparse.Namespace) -> int:
        from vmsgamp._bench.harness import BenchError

        try:
            if getattr(args, "plot", None):
                from vmsgamp._bench import plot

                plot._pyplot()  # fail before a long run, not after it
            result = mod.run(args)
        except BenchError as e:
            print(f"vmsgamp bench {args.bench}: error: {e}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print(mod.format_human(result))
        return 0

    return run
