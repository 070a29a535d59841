"""What the vhost-user back-end's spin buys: request round trips one at a time,
kicks on every request (``--spin-us 0``) against the spinning back-end
(default policy, and ``--busy-poll``), and the CPU an idle back-end uses.

    python bench/vhost_user_wait.py [--requests N] [--rounds R] [--idle S] [--json]

The back-end is ``vmsgamp vhost-user --device rng:source=zero`` in its own
process; the front-end here is ``FakeFrontend`` (QEMU 7.2's messages, guest
RAM in a memfd, kick and call eventfds) acting as a guest with one request
in flight: post a 64-byte read, kick only if the ring asks for it, wait for
the used-buffer interrupt (the call eventfd, as a guest's interrupt handler
would) and post the next.  Policies alternate round by round so a busy
machine hurts each alike; medians of the rounds' p50s are reported with the
kicks the front-end had to send per request.

Idle: the back-end served one request, then nothing for ``--idle`` seconds;
its user+system CPU time over that span (``/proc/PID/stat``) is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from vmsgamp._cmd._process import start_child, stop_child
from vmsgamp.testing.vhost_user_frontend import QEMU_RNG_PACKED, QEMU_RNG_SPLIT, FakeFrontend

POLICIES = {"kick (spin 0)": ["--spin-us", "0"], "spin 100 us": [], "busy poll": ["--busy-poll"]}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


class Backend:
    def __init__(self, path: str, extra: list[str]) -> None:
        self.proc = start_child(["vhost-user", "--socket", path, "--device", "rng:source=zero", "--json",
                                 *extra], stdout=subprocess.PIPE)
        if not (self.proc.stdout.readline() or "").startswith("{"):
            stop_child(self.proc)
            raise RuntimeError("vmsgamp vhost-user did not start")

    def close(self) -> None:
        stop_child(self.proc)


def request(fe: FakeFrontend) -> bool:
    """One request, round trip; True if the front-end had to kick."""
    drv = fe.driver(0)
    assert drv.add_chain([], [64])
    kicked = fe.kick(0)
    fe.wait_used(0)
    return kicked


def measure(fe: FakeFrontend, n: int) -> tuple[float, float, float]:
    """(p50 µs, p99 µs, kicks per request) over ``n`` requests."""
    times = []
    kicks = 0
    for _ in range(n):
        t0 = time.perf_counter()
        kicks += request(fe)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6, kicks / n


class Session:
    """A back-end process with one front-end and its ring set up."""

    def __init__(self, path: str, fmt: str, extra: list[str]) -> None:
        self.be = Backend(path, extra)
        try:
            self.fe = FakeFrontend(path)
            self.fe.realize()
            self.fe.start(fmt=fmt, size=64, features=QEMU_RNG_PACKED if fmt == "packed" else QEMU_RNG_SPLIT)
        except BaseException:
            self.be.close()
            raise

    def close(self) -> None:
        self.fe.close()
        self.be.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per round and policy")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--formats", default="split,packed")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="vmsgamp-vu-wait-")
    keys = [(fmt, name) for fmt in args.formats.split(",") for name in POLICIES]
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {k: [] for k in keys}
    # One back-end at a time (a busy-polling one takes a CPU of this 2-core
    # class of machine), policies alternating within each round.
    for r in range(args.rounds):
        for fmt, name in keys:
            s = Session(os.path.join(work, f"{r}-{fmt}-{len(name)}.sock"), fmt, POLICIES[name])
            try:
                measure(s.fe, 100)   # warm-up
                results[fmt, name].append(measure(s.fe, args.requests))
            finally:
                s.close()
    out: dict[str, dict[str, float]] = {}
    for (fmt, name), rs in results.items():
        out[f"{fmt} / {name}"] = {"p50_us": statistics.median(x[0] for x in rs),
                                  "p99_us": statistics.median(x[1] for x in rs),
                                  "kicks_per_request": statistics.median(x[2] for x in rs)}
    if args.idle > 0:
        # Idle after traffic: each non-busy back-end served a request, then
        # nothing; all are measured over the same span.
        idle = [(k, Session(os.path.join(work, f"idle-{i}.sock"), k[0], POLICIES[k[1]]))
                for i, k in enumerate(keys) if k[1] != "busy poll"]
        try:
            for _, s in idle:
                request(s.fe)
            c0 = [_cpu_seconds(s.be.proc.pid) for _, s in idle]
            time.sleep(args.idle)
            for ((fmt, name), s), c in zip(idle, c0):
                out[f"{fmt} / {name}"]["idle_cpu_percent"] = 100 * (_cpu_seconds(s.be.proc.pid) - c) / args.idle
        finally:
            for _, s in idle:
                s.close()
    os.rmdir(work) if not os.listdir(work) else None
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{'ring / policy':28} {'p50 µs':>8} {'p99 µs':>8} {'kicks/req':>10} {'idle CPU %':>11}")
    for k, v in out.items():
        idle_s = f"{v['idle_cpu_percent']:.2f}" if "idle_cpu_percent" in v else "-"
        print(f"{k:28} {v['p50_us']:8.1f} {v['p99_us']:8.1f} {v['kicks_per_request']:10.2f} {idle_s:>11}")


if __name__ == "__main__":
    main()
