"""``vmsgamp bench vhost-user``: guest sequential dd MB/s on vhost-user-blk (our back-end) vs QEMU's own virtio-blk-pci.

One QEMU/TCG boot per ring format (split, packed).  Each boot has two disks
with the same ring format: a vhost-user-blk-pci served by ``vmsgamp
vhost-user`` (a separate process) and a plain file-backed virtio-blk-pci
served by QEMU itself.  The guest runs ``dd`` with O_DIRECT, 4 KiB and 64 KiB
requests, write then read, on each disk and times it.  Under TCG the guest
is slow, so the ratio (ours / QEMU's) is the figure that matters.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from vmsgamp._cmd._process import start_child, stop_child

SERIAL_OURS = "vmsgamp-bench"
SERIAL_QEMU = "qemu-bench"

GUEST_SCRIPT = """\
set -e
find_disk() {{
  for d in /sys/block/vd*; do
    if [ "$(cat $d/serial 2>/dev/null)" = "$1" ]; then echo /dev/${{d##*/}}; return; fi
  done
  echo "no disk with serial $1" >&2; exit 4
}}
OURS=$(find_disk {ours})
QEMU=$(find_disk {qemu})
run() {{  # label dev op bs count
  t0=$(date +%s%N)
  if [ $3 = write ]; then
    dd if=/dev/zero of=$2 bs=$4 count=$5 oflag=direct conv=fsync 2>/dev/null
  else
    dd if=$2 of=/dev/null bs=$4 count=$5 iflag=direct 2>/dev/null
  fi
  t1=$(date +%s%N)
  echo RESULT $1 $3 $4 $(($4 * $5)) $((t1 - t0))
}}
for bs in {sizes}; do
  count=$(({total} / bs))
  for op in write read; do
    run vhost_user $OURS $op $bs $count
    run qemu $QEMU $op $bs $count
  done
done
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mb", type=int, default=8, help="MiB moved per dd (default 8; TCG is slow)")
    p.add_argument("--formats", default="split,packed", help="ring formats to measure")
    p.add_argument("--sizes", default="4096,65536", help="request sizes in bytes")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per guest boot")


def _measure(fmt: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from vmsgamp.testing.qemu_guest import QemuGuest

    total = args.mb << 20
    ours_img, qemu_img = work / f"ours-{fmt}.img", work / f"qemu-{fmt}.img"
    for img in (ours_img, qemu_img):
        with open(img, "wb") as f:
            f.truncate(total + (1 << 20))
    sock = work / f"vu-{fmt}.sock"
    log = open(work / f"backend-{fmt}.log", "w")
    # the installed vmsgamp, whatever the current directory (see _cmd/_process.py)
    backend = start_child(["vhost-user", "--socket", str(sock), "--device",
                           f"blk:file={ours_img};serial={SERIAL_OURS}", "--json"],
                          stdout=subprocess.PIPE, stderr=log)
    try:
        if not (backend.stdout.readline() or "").startswith("{"):
            raise RuntimeError(f"vmsgamp vhost-user did not start: {(work / f'backend-{fmt}.log').read_text()}")
        packed = "on" if fmt == "packed" else "off"
        sizes = [int(s) for s in args.sizes.split(",")]
        qemu_args = [
            "-chardev", f"socket,id=vu,path={sock}",
            "-device", f"vhost-user-blk-pci,chardev=vu,num-queues=1,packed={packed}",
            "-drive", f"file={qemu_img},if=none,id=plain,format=raw",
            "-device", f"virtio-blk-pci,drive=plain,serial={SERIAL_QEMU},num-queues=1,packed={packed}",
        ]
        script = GUEST_SCRIPT.format(ours=SERIAL_OURS, qemu=SERIAL_QEMU, total=total,
                                     sizes=" ".join(map(str, sizes)))
        with QemuGuest(qemu_args, memfd=True, workdir=work / f"guest-{fmt}") as g:
            res = g.run(script, timeout=args.timeout)
        if res.rc != 0:
            raise RuntimeError(f"guest benchmark failed ({fmt}):\n{res.describe()}")
    finally:
        stop_child(backend)
        log.close()
    out: dict[str, Any] = {}
    for line in res.output.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[0] == "RESULT":
            _, who, op, bs, nbytes, ns = parts
            mbps = int(nbytes) / 1e6 / max(int(ns) / 1e9, 1e-9)
            out[f"{fmt}_{op}_{int(bs) // 1024}k_{who}_mb_per_s"] = round(mbps, 2)
    for key in [k for k in out if k.endswith("_vhost_user_mb_per_s")]:
        base = key[: -len("_vhost_user_mb_per_s")]
        q = out.get(f"{base}_qemu_mb_per_s")
        if q:
            out[f"{base}_ratio"] = round(out[key] / q, 3)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vmsgamp.testing.qemu_guest import qemu_available

    ok, why = qemu_available()
    if not ok:
        raise RuntimeError(why)
    work = Path(tempfile.mkdtemp(prefix="vmsgamp-bench-vu-"))
    t0 = time.monotonic()
    out: dict[str, Any] = {"mb_per_dd": args.mb, "formats": args.formats.split(","),
                           "sizes": [int(s) for s in args.sizes.split(",")]}
    try:
        for fmt in out["formats"]:
            if fmt not in ("split", "packed"):
                raise ValueError(f"--formats: {fmt!r} is not split or packed")
            out.update(_measure(fmt, args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [v for k, v in out.items() if k.endswith("_ratio")]
    if ratios:
        out["ratio_geomean"] = round(_geomean(ratios), 3)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _geomean(xs: list[float]) -> float:
    import math

    return math.exp(sum(math.log(max(x, 1e-9)) for x in xs) / len(xs))


def format_human(r: dict[str, Any]) -> str:
    lines = [f"vhost-user-blk (vmsgamp) vs virtio-blk-pci (QEMU), guest dd O_DIRECT, "
             f"{r['mb_per_dd']} MiB per run, QEMU/TCG ({r['seconds']} s)"]
    for fmt in r["formats"]:
        for bs in r["sizes"]:
            k = bs // 1024
            for op in ("write", "read"):
                base = f"{fmt}_{op}_{k}k"
                ours, q = r.get(f"{base}_vhost_user_mb_per_s"), r.get(f"{base}_qemu_mb_per_s")
                if ours is None or q is None:
                    continue
                lines.append(f"  {fmt:6} {op:5} {k:3} KiB: vmsgamp {ours:8.2f} MB/s  QEMU {q:8.2f} MB/s  "
                             f"ratio {r.get(f'{base}_ratio', 0):.2f}")
    if "ratio_geomean" in r:
        lines.append(f"  geometric mean ratio: {r['ratio_geomean']:.2f}")
    return "\n".join(lines)
