#!/usr/bin/env python3
"""Compare vmsgamp's virtqueues with the plain C reference (issue 3 targets).

Compiles ``bench/c/virtq_ref.c`` (gcc, into ``bench/out/``) and runs it
interleaved with ``vmsgamp bench virtqueue`` -- C, vmsgamp, C, vmsgamp, ...
-- because this VM is noisy and bimodal.  The table shows medians over
``--runs`` runs (default 5); the ratio columns are medians of the per-run
ratios (each vmsgamp run against the C run just before it).

    python bench/compare_virtqueue.py              # 5 runs, table + targets
    python bench/compare_virtqueue.py --quick      # smoke run, tiny counts
    python bench/compare_virtqueue.py --json out.json

Targets: per-call >= 5 M chains/s and >= 0.25x C; batched >= 20 M chains/s
and >= 0.4x C (batch of 32); round trip p50 <= 0.8 us; 64 KiB zero-copy
>= 50% of the same-run memcpy.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "c" / "virtq_ref.c"
CSRC = HERE.parent / "csrc"

try:
    from vmsgamp._bench import harness, virtqueue
except ImportError:  # run from a checkout without installing: use the tree
    sys.path.insert(0, str(HERE.parent))
    from vmsgamp._bench import harness, virtqueue

Result = dict[str, Any]

# metric, label, unit, absolute target (None: none), kind ("ge" / "le"), min ratio to C
ROWS = [
    ("split_chains_per_s", "split per-call 64 B", "M/s", 5e6, "ge", 0.25),
    ("packed_chains_per_s", "packed per-call 64 B", "M/s", 5e6, "ge", 0.25),
    ("split_batch_chains_per_s", "split batch 32 x 64 B", "M/s", 20e6, "ge", 0.4),
    ("packed_batch_chains_per_s", "packed batch 32 x 64 B", "M/s", 20e6, "ge", 0.4),
    ("split_rtt_p50_us", "split round trip p50", "us", 0.8, "le", None),
    ("packed_rtt_p50_us", "packed round trip p50", "us", 0.8, "le", None),
]


def build() -> Path:
    return harness.compile_c(C_SOURCE, out_dir=HERE / "out",
                             cflags=(*harness.DEFAULT_CFLAGS, f"-I{CSRC}"))


def run_c(binary: Path, cpus: tuple[int, int], chains: int, rtt: int) -> Result:
    cmd = [str(binary), "-n", str(chains), "-r", str(rtt), "-a", str(cpus[0]), "-b", str(cpus[1])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise harness.BenchError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def run_vmsgamp(cpus: tuple[int, int], quick: bool) -> Result:
    p = argparse.ArgumentParser()
    virtqueue.add_arguments(p)
    argv = ["--cpus", f"{cpus[0]},{cpus[1]}", "--only", "percall,batch,rtt,big"]
    if quick:
        argv.append("--quick")
    return virtqueue.run_once(p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpus", type=lambda s: tuple(int(c) for c in s.split(",")), default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write raw numbers here")
    a = ap.parse_args(argv)
    cpus = harness.pick_cpus(a.cpus)
    binary = build()
    chains, rtt = (200_000, 5_000) if a.quick else (20_000_000, 200_000)
    c_runs: list[Result] = []
    v_runs: list[Result] = []
    for i in range(a.runs):
        c_runs.append(run_c(binary, cpus, chains, rtt))
        v_runs.append(run_vmsgamp(cpus, a.quick))
        print(f"run {i + 1}/{a.runs} done", file=sys.stderr)
    c_med = harness.median_dicts(c_runs)
    v_med = harness.median_dicts(v_runs)
    lines = [f"virtqueue: vmsgamp vs C reference, medians of {a.runs} interleaved runs, CPUs {list(cpus)}",
             f"{'metric':<26}{'vmsgamp':>12}{'C ref':>12}{'ratio':>9}   {'target':<30}verdict"]
    all_ok = True
    for key, label, unit, target, kind, min_ratio in ROWS:
        v, c = v_med.get(key), c_med.get(key)
        scale = 1e6 if unit == "M/s" else 1.0
        ratio = harness.median([vr[key] / cr[key] for vr, cr in zip(v_runs, c_runs)
                                if key in vr and cr.get(key)])
        if kind == "ge":
            ok = v is not None and v >= target and (min_ratio is None or (ratio or 0) >= min_ratio)
            tgt = f">= {target / scale:g} {unit}" + (f", >= {min_ratio}x C" if min_ratio else "")
        else:
            ok = v is not None and v <= target
            tgt = f"<= {target:g} {unit}"
        all_ok &= ok
        vs = f"{v / scale:12.2f}" if v is not None else f"{'-':>12}"
        cs = f"{c / scale:12.2f}" if c else f"{'-':>12}"
        rs = f"{ratio:9.2f}" if ratio else f"{'-':>9}"
        lines.append(f"{label:<26}{vs}{cs}{rs}   {tgt:<30}{'PASS' if ok else 'MISS'}")
    zc, mc = v_med.get("zero_copy_64k_gbps"), v_med.get("memcpy_64k_gbps")
    if zc and mc:
        zratio = harness.median([r["zero_copy_64k_gbps"] / r["memcpy_64k_gbps"] for r in v_runs])
        ok = zratio >= 0.5
        all_ok &= ok
        lines.append(f"{'64 KiB zero-copy GB/s':<26}{zc:12.2f}{mc:12.2f}{zratio:9.2f}   "
                     f"{'>= 0.5x same-run memcpy':<30}{'PASS' if ok else 'MISS'}")
        lines.append("  (the C ref column of this row is vmsgamp's same-run memcpy)")
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps({"c": c_runs, "vmsgamp": v_runs, "c_median": c_med,
                                      "vmsgamp_median": v_med}, indent=1))
    return 0 if all_ok else 1



if __name__ == "__main__":
    sys.exit(main())
