#!/usr/bin/env python3
"""Protocol codec and state machines: this tree against another git revision.

Runs the ``vmsgamp bench codec`` suite (``vmsgamp._bench.codec.run_suite``)
on this tree's ``vmsgamp.protocol`` and on the ``vmsgamp/protocol`` package
of ``--against REV`` (extracted with ``git archive`` and imported under a
private name), interleaved -- this tree, the other, the other, this tree,
... -- so a noisy machine slows both alike.  The table shows per-figure
medians and the median of the per-run ratios (before / after: above 1
means this tree is faster).

    python bench/compare_codec.py --against main
    python bench/compare_codec.py --against bfada3b --runs 7 --json out.json
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

try:
    from vmsgamp._bench import codec
except ImportError:  # run from a checkout without installing: use the tree
    sys.path.insert(0, str(ROOT))
    from vmsgamp._bench import codec


def load_protocol_at(rev: str, into: Path) -> ModuleType:
    """``vmsgamp/protocol`` as it was at git revision ``rev``, imported as a
    separate package (its absolute imports, e.g. vmsgamp.errors, resolve to
    this tree)."""
    try:
        blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "vmsgamp/protocol"],
                              check=True, capture_output=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"compare_codec: git archive {rev} failed: {e.stderr.decode().strip()}") from None
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    pkg_dir = into / "vmsgamp" / "protocol"
    name = f"_vmsgamp_protocol_{abs(hash(rev)):x}"
    spec = importlib.util.spec_from_file_location(name, pkg_dir / "__init__.py",
                                                  submodule_search_locations=[str(pkg_dir)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def compare(before: ModuleType, after: ModuleType, runs: int, iters: int, repeat: int,
            log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    raw: list[dict[str, dict[str, float]]] = []
    for i in range(runs):
        order = [("before", before), ("after", after)]
        if i % 2:
            order.reverse()  # neither side always runs first
        this: dict[str, dict[str, float]] = {}
        for label, mod in order:
            this[label] = codec.run_suite(mod, iters=iters, repeat=repeat)
        raw.append(this)
        log(f"run {i + 1}/{runs} done")
    keys = [k for k in raw[0]["after"] if k in raw[0]["before"] and k.endswith("_ns")]
    table = {}
    for k in keys:
        b = statistics.median(r["before"][k] for r in raw)
        a = statistics.median(r["after"][k] for r in raw)
        ratio = statistics.median(r["before"][k] / r["after"][k] for r in raw if r["after"][k] > 0)
        table[k] = {"before_ns": b, "after_ns": a, "speedup": ratio}
    return {"runs": runs, "iters": iters, "repeat": repeat, "table": table, "raw": raw}


def format_report(rev: str, report: dict[str, Any]) -> str:
    lines = [f"protocol layer, ns per operation: {rev} (before) vs this tree (after); "
             f"medians of {report['runs']} interleaved runs, speedup = median of per-run ratios",
             "",
             "| operation | before (ns) | after (ns) | speedup |",
             "|---|---:|---:|---:|"]
    for k, row in report["table"].items():
        lines.append(f"| {k[:-3]} | {row['before_ns']:,.0f} | {row['after_ns']:,.0f} | "
                     f"{row['speedup']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, metavar="REV", help="git revision to compare with")
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs (default 5)")
    parser.add_argument("--iters", type=int, default=5_000, help="loop iterations per timing")
    parser.add_argument("--repeat", type=int, default=15, help="timings per figure (fastest counts)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers to PATH")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.iters < 1 or args.repeat < 1:
        parser.error("--runs, --iters and --repeat must be at least 1")
    import vmsgamp.protocol as after

    with tempfile.TemporaryDirectory(prefix="vmsgamp-codec-") as tmp:
        before = load_protocol_at(args.against, Path(tmp))
        report = compare(before, after, args.runs, args.iters, args.repeat)
    print(format_report(args.against, report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
