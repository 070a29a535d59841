"""``vmsgamp bench virtqueue``: split and packed virtqueues between two pinned processes.

The parent process is the driver, a forked child pinned to another CPU is
the device; both busy-poll.  Chains/s through driver add -> device pop ->
device add_used -> driver get_used, per-call and batched (32) APIs,
one-descriptor (64 B or 4 KiB) and two-descriptor (16 B header + 64 B data)
chains; round-trip latency with one chain in flight; and 64 KiB transfers
where the device consumes each buffer through its zero-copy view (one copy
into private memory) against a plain memcpy of the same bytes in the same
process and run.  Buffers are not touched on the chain-rate workloads (as
in bench/c/virtq_ref.c): those measure the rings.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from vmsgamp._bench import harness
from vmsgamp._bench.verdict import check, format_lines
from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.region import Region
from vmsgamp._core.virtq import (
    ChainBatch, PackedQueue, PackedQueueDriver, SplitQueue, SplitQueueDriver,
)

BATCH = 32
BIG = 64 * 1024
NBIG = 16

Result = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chains", type=int, default=1_000_000,
                        help="chains per per-call throughput run (default 1,000,000)")
    parser.add_argument("--batch-chains", type=int, default=4_000_000,
                        help="chains per batched throughput run (default 4,000,000)")
    parser.add_argument("--rtt", type=int, default=50_000, help="round trips timed (default 50,000)")
    parser.add_argument("--big", type=int, default=20_000, help="64 KiB transfers (default 20,000)")
    parser.add_argument("--queue-size", type=int, default=256, help="queue size (default 256)")
    parser.add_argument("--runs", type=int, default=1, help="repeat and report medians (default 1)")
    parser.add_argument("--cpus", type=lambda s: tuple(int(c) for c in s.split(",")), default=None,
                        metavar="A,B", help="the two CPUs (default: first two allowed)")
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke test)")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset: percall,percall2,percall4k,batch,rtt,big")


class _Setup:
    """Region + driver queue built before the fork; the child builds the
    device queue over the same (inherited, MAP_SHARED) memory."""

    def __init__(self, fmt: str, size: int, nbuf: int = 64, bufsize: int = 4096) -> None:
        self.fmt = fmt
        self.size = size
        self.region = Region.memfd(8 << 20, bus_base=0x1_0000_0000)
        al = RegionAllocator(self.region)
        cls = SplitQueueDriver if fmt == "split" else PackedQueueDriver
        self.drv = cls.create(al, size)
        self.bufs = [al.alloc(bufsize, 64) for _ in range(nbuf)]
        self.big = [al.alloc(BIG, 4096) for _ in range(NBIG)]
        self.big_off = [b - self.region.bus_base for b in self.big]

    def device(self):
        cls = SplitQueue if self.fmt == "split" else PackedQueue
        d = self.drv
        return cls(AddressSpace.identity(self.region), self.size, d.desc_addr, d.driver_addr,
                   d.device_addr)

    def close(self) -> None:
        self.drv.aspace.close()
        self.region.close()


def _device_percall(setup: _Setup, n: int):
    def child(ready):
        q = setup.device()
        pop, au = q.pop, q.add_used
        ready()
        done = 0
        while done < n:
            c = pop()
            if c is not None:
                au(c.head, 0)
                done += 1
        return {}
    return child


def _percall(setup: _Setup, n: int, cpus, kind: str) -> float:
    d = setup.drv
    buf, hdr = setup.bufs[0], setup.bufs[1]

    def parent():
        gu = d.get_used
        sent = got = 0
        t0 = time.perf_counter_ns()
        if kind == "2desc":
            add = d.add
            sg = ((hdr, 16), (buf, 64))
            while got < n:
                if sent < n and add(sg, (), sent):
                    sent += 1
                    continue
                while gu() is not None:
                    got += 1
        else:
            add1 = d.add_buf
            ln = 4096 if kind == "4k" else 64
            # publish chains while there is room, collect when full: every
            # chain is still added, published and returned one call at a time
            while got < n:
                if sent < n and add1(buf, ln, False, sent):
                    sent += 1
                    continue
                while gu() is not None:
                    got += 1
        return {"ns": time.perf_counter_ns() - t0}

    res, _ = harness.run_pair(parent, _device_percall(setup, n), cpus)
    return n / (res["ns"] / 1e9)


def _batch(setup: _Setup, n: int, cpus) -> float:
    """Batches of 32 through the ChainBatch fast path (buffers acquired once)."""
    d = setup.drv
    n = (n // BATCH) * BATCH

    def child(ready):
        q = setup.device()
        b = ChainBatch(BATCH, BATCH)
        pop, au = q.pop_batch, q.add_used_batch
        ready()
        done = 0
        while done < n:
            if pop(b):
                au(b)              # used_len stays 0: nothing written
                done += b.count
        return {}

    def parent():
        out = ChainBatch(BATCH, BATCH)
        out.addr[:] = setup.bufs[0]
        out.length[:] = 64
        out.seg_start[:] = np.arange(BATCH + 1)
        out.tokens[:] = np.arange(BATCH)
        back = ChainBatch(BATCH, BATCH)
        add, gu = d.add_batch, d.get_used_batch
        sent = got = 0
        t0 = time.perf_counter_ns()
        while got < n:
            k = 0
            if sent < n:
                out.count = min(BATCH, n - sent)
                k = add(out)
                sent += k
            if k < BATCH:
                got += gu(back)
        return {"ns": time.perf_counter_ns() - t0}

    res, _ = harness.run_pair(parent, child, cpus)
    return n / (res["ns"] / 1e9)


def _rtt(setup: _Setup, n: int, cpus) -> dict[str, float]:
    d = setup.drv
    warm = max(100, n // 10)
    total = n + warm

    def parent():
        add1, gu = d.add_buf, d.get_used
        buf = setup.bufs[0]
        clock = time.perf_counter_ns
        samples = [0] * total
        for i in range(total):
            t0 = clock()
            add1(buf, 64, False, i)
            while gu() is None:
                pass
            samples[i] = clock() - t0
        return harness.percentiles(samples[warm:])

    res, _ = harness.run_pair(parent, _device_percall(setup, total), cpus)
    return res


def _big(setup: _Setup, n: int, cpus) -> dict[str, float]:
    """Driver exposes 64 KiB device-readable buffers (16 of them, filled
    once, reused round robin); the device copies each through its zero-copy
    view into private memory.  The memcpy baseline copies the same 16
    buffers, in the same order, into the same destination in the device
    process right after, without the queue."""
    d = setup.drv
    mem = np.frombuffer(setup.region, np.uint8)
    for i, off in enumerate(setup.big_off):
        mem[off:off + BIG] = i

    def child(ready):
        q = setup.device()
        view = np.frombuffer(setup.region, np.uint8)
        dst = np.empty(BIG, np.uint8)
        b = ChainBatch(NBIG, NBIG)
        zeros = np.zeros(NBIG, np.uint32)
        ready()
        done = 0
        check = 0
        t0 = time.perf_counter_ns()
        while done < n:
            k = q.pop_batch(b)
            for j in range(k):
                off = int(b.offset[j])
                np.copyto(dst, view[off:off + BIG])
                check += int(dst[0])
            if k:
                q.add_used_batch(b.heads, zeros, k)
                done += k
        zc_ns = time.perf_counter_ns() - t0
        # baseline: memcpy of the same bytes (the same 16 shared buffers, in
        # the same order) without the queue
        srcs = [view[off:off + BIG] for off in setup.big_off]
        t0 = time.perf_counter_ns()
        for i in range(n):
            np.copyto(dst, srcs[i % NBIG])
        mc_ns = time.perf_counter_ns() - t0
        return {"zc_ns": zc_ns, "mc_ns": mc_ns, "check": check}

    def parent():
        sent = got = 0
        while got < n:
            if sent < n and d.add_buf(setup.big[sent % NBIG], BIG, False, sent):
                sent += 1
            if d.get_used() is not None:
                got += 1
        return {}

    _, res = harness.run_pair(parent, child, cpus)
    gb = n * BIG / 1e9
    return {"zero_copy_64k_gbps": gb / (res["zc_ns"] / 1e9), "memcpy_64k_gbps": gb / (res["mc_ns"] / 1e9)}


def run_once(args: argparse.Namespace) -> Result:
    q = args.queue_size
    chains, bchains, rtt, big = args.chains, args.batch_chains, args.rtt, args.big
    if args.quick:
        chains, bchains, rtt, big = 20_000, 64_000, 2_000, 500
    only = set(args.only.split(",")) if args.only else None
    cpus = harness.pick_cpus(args.cpus)
    out: Result = {}
    def fresh(fmt: str, fn, *a):
        # every workload gets new rings: the child's device side starts at
        # index 0, so the driver side must too
        s = _Setup(fmt, q)
        try:
            return fn(s, *a)
        finally:
            s.close()

    for fmt in ("split", "packed"):
        if only is None or "percall" in only:
            out[f"{fmt}_chains_per_s"] = fresh(fmt, _percall, chains, cpus, "1desc")
        if only is None or "percall2" in only:
            out[f"{fmt}_2desc_chains_per_s"] = fresh(fmt, _percall, chains, cpus, "2desc")
        if only is None or "percall4k" in only:
            out[f"{fmt}_4k_chains_per_s"] = fresh(fmt, _percall, chains, cpus, "4k")
        if only is None or "batch" in only:
            out[f"{fmt}_batch_chains_per_s"] = fresh(fmt, _batch, bchains, cpus)
        if only is None or "rtt" in only:
            r = fresh(fmt, _rtt, rtt, cpus)
            out[f"{fmt}_rtt_p50_us"] = r["p50_us"]
            out[f"{fmt}_rtt_p99_us"] = r["p99_us"]
        if fmt == "split" and (only is None or "big" in only):
            out.update(fresh(fmt, _big, big, cpus))
    out["queue_size"] = q
    out["batch"] = BATCH
    out["cpus"] = list(cpus)
    return out


def run(args: argparse.Namespace) -> Result:
    runs = [run_once(args) for _ in range(max(1, args.runs))]
    if len(runs) == 1:
        med = runs[0]
    else:
        med = harness.median_dicts(runs)
        med["runs"] = len(runs)
        med["cpus"] = runs[0]["cpus"]
    med["verdicts"] = verdicts(med)
    return med


def verdicts(r: Result) -> list[Result]:
    """The absolute targets (issue 3); the ratios to the C reference need
    bench/compare_virtqueue.py, which builds and runs it in the same run."""
    mps = (lambda x: None if x is None else x / 1e6)
    out = []
    for fmt in ("split", "packed"):
        out.append(check(f"{fmt} per-call >= 5 M chains/s", mps(r.get(f"{fmt}_chains_per_s")), 5,
                         at_least=True, unit="M/s"))
        out.append(check(f"{fmt} batch of {BATCH} >= 20 M chains/s", mps(r.get(f"{fmt}_batch_chains_per_s")),
                         20, at_least=True, unit="M/s"))
        out.append(check(f"{fmt} round trip p50 <= 0.8 us", r.get(f"{fmt}_rtt_p50_us"), 0.8, unit="us"))
    zc, mc = r.get("zero_copy_64k_gbps"), r.get("memcpy_64k_gbps")
    out.append(check("64 KiB zero-copy consume >= 0.5x same-run memcpy", zc / mc if zc and mc else None, 0.5,
                     at_least=True, unit="x"))
    out.append(check("per-call and batch >= 0.25x / 0.4x the C reference (bench/compare_virtqueue.py)",
                     None, None))
    return out


TARGETS = {
    "split_chains_per_s": 5e6, "packed_chains_per_s": 5e6,
    "split_batch_chains_per_s": 20e6, "packed_batch_chains_per_s": 20e6,
}


def format_human(result: Result) -> str:
    lines = [f"virtqueue, queue size {result.get('queue_size')}, CPUs {result.get('cpus')}, "
             f"busy-poll, two processes"]

    def rate(key: str, label: str) -> None:
        if key in result:
            t = TARGETS.get(key)
            tgt = f"   (target >= {t / 1e6:.0f} M/s)" if t else ""
            lines.append(f"  {label:<38} {result[key] / 1e6:8.2f} M chains/s{tgt}")

    for fmt in ("split", "packed"):
        rate(f"{fmt}_chains_per_s", f"{fmt} per-call, 1 x 64 B")
        rate(f"{fmt}_2desc_chains_per_s", f"{fmt} per-call, 16 B hdr + 64 B")
        rate(f"{fmt}_4k_chains_per_s", f"{fmt} per-call, 1 x 4 KiB")
        rate(f"{fmt}_batch_chains_per_s", f"{fmt} batch of {result.get('batch', BATCH)}, 1 x 64 B")
        if f"{fmt}_rtt_p50_us" in result:
            lines.append(f"  {fmt + ' round trip':<38} p50 {result[f'{fmt}_rtt_p50_us']:.2f} us, "
                         f"p99 {result[f'{fmt}_rtt_p99_us']:.2f} us   (target p50 <= 0.8 us)")
    if "zero_copy_64k_gbps" in result:
        zc, mc = result["zero_copy_64k_gbps"], result["memcpy_64k_gbps"]
        lines.append(f"  {'64 KiB zero-copy consume':<38} {zc:8.2f} GB/s = {zc / mc:.0%} of memcpy "
                     f"{mc:.2f} GB/s   (target >= 50%)")
    lines += format_lines(result.get("verdicts") or verdicts(result))
    return "\n".join(lines)
