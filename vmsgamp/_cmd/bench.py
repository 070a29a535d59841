"""``vmsgamp bench NAME``: benchmarks.  Each lives in ``vmsgamp/_bench/NAME.py``
with ``add_arguments(parser)``, ``run(args) -> dict`` and ``format_human(dict)``."""
from __future__ import annotations

import argparse
import importlib
import json

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
        result = mod.run(args)
        if args.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print(mod.format_human(result))
        return 0

    return run
