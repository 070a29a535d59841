"""``vmsgamp bench devices``: the AMP bus and its devices, end to end.

The device models (virtio-rng, virtio-console with an echo backend,
virtio-blk on a file in /dev/shm) run in a forked process, the driver here,
joined by a memfd region with eventfd doorbells (as ``ivshmem:``) or none
(``--doorbell polling``, as ``shm:``); every loop waits with the default
(adaptive) wait policy, as ``vmsgamp serve`` does.  Each run measures, split
and packed rings alike: bus PING round trips, over both doorbell kinds (the
other kind on a second, rng-only bus); a 64-byte rng request round trip
(driver add -> EVENT_AVAIL -> device -> EVENT_USED -> driver); console
one-byte echo round trips; rng throughput (``--request`` bytes,
``--in-flight`` queued; ``--rng-source zero`` by default so the device path
is measured, not the entropy source); blk 64 KiB sequential reads (MB/s,
and as a fraction of a same-run memcpy of the same file pages in the same
block size) and 4 KiB random reads (IOPS), 32 in flight.  The MsgFifo's own
busy-poll round trip (``vmsgamp bench fifo``) is measured in the same run,
before and after the bus figures (interleaved, so a load change shows), as
the floor they are read against.
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vmsgamp._bench import harness
from vmsgamp._bench.verdict import check, format_lines

Result = dict[str, Any]

# Targets (issue 14).
PING_RTT_LIMIT_US = 5.0
CONSOLE_RTT_LIMIT_US = 20.0
RNG_REQUEST_RTT_LIMIT_US = 8.0
_CARRIER = {"eventfd": "ivshmem", "polling": "shm"}   # the carrier each doorbell kind stands for

BLK_SEQ_BYTES = 64 * 1024
BLK_RAND_BYTES = 4096
BLK_IN_FLIGHT = 32
RNG_RTT_BYTES = 64
SECTOR = 512


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=2.0, help="seconds per throughput measurement")
    p.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    p.add_argument("--request", type=int, default=4096, help="rng request size in bytes")
    p.add_argument("--in-flight", type=int, default=32, help="rng requests queued at once")
    p.add_argument("--rng-source", default="zero",
                   help="rng device source: zero (default), pattern, urandom, or a file")
    p.add_argument("--pings", type=int, default=2000, help="bus PINGs timed per run")
    p.add_argument("--round-trips", type=int, default=2000,
                   help="rng-request and console-echo round trips timed per ring and run")
    p.add_argument("--blk-mb", type=int, default=64, help="size of the /dev/shm disk image in MiB")
    p.add_argument("--layout", choices=["b", "a"], default="b", help="FIFO layout: b = vmamp_shmem, a = spsc_queue")
    p.add_argument("--doorbell", choices=["eventfd", "polling"], default="eventfd",
                   help="eventfd (as ivshmem:, default) or polling (as shm:, no interrupt)")
    p.add_argument("--no-fifo", action="store_true", help="skip the same-run MsgFifo busy-poll round trip")
    p.add_argument("--plot", metavar="FILE.png", help="draw latencies and throughputs (needs matplotlib)")


# ---- the disk image ------------------------------------------------------------------


@contextmanager
def shm_image(size_mb: int) -> Iterator[str]:
    """A disk image in /dev/shm (RAM), filled with a position-dependent
    pattern so a misplaced read shows; removed afterwards."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="vmsgamp-bench-blk-", suffix=".img", dir=base)
    try:
        block = bytes(range(256)) * (1 << 12)  # 1 MiB
        with os.fdopen(fd, "wb") as f:
            for i in range(max(1, size_mb)):
                f.write(bytes([i & 0xFF]) + block[1:])
        yield path
    finally:
        os.unlink(path)


def memcpy_mb_per_s(path: str, block: int, total: int, slots: int = BLK_IN_FLIGHT) -> float:
    """Copy ``total`` bytes of the file's pages in ``block``-byte pieces into
    ``slots`` rotating buffers, as the blk reads do (page cache -> buffer)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        src = memoryview(mm)
        dst = memoryview(bytearray(block * slots))
        nblocks = len(mm) // block
        n = max(1, total // block)
        try:
            for i in range(min(n, nblocks)):  # fault everything in first
                dst[:block] = src[i * block:(i + 1) * block]
            t0 = time.perf_counter()
            for i in range(n):
                off = (i % nblocks) * block
                d = (i % slots) * block
                dst[d:d + block] = src[off:off + block]
            secs = time.perf_counter() - t0
        finally:
            src.release()
    return n * block / secs / 1e6


# ---- driver-side measurements ------------------------------------------------------------


def rng_request_rtt(drv: Any, dev_num: int, *, packed: bool, rounds: int, size: int = RNG_RTT_BYTES,
                    warmup: int = 50) -> Result:
    """One ``size``-byte request at a time: add, kick (EVENT_AVAIL), wait for
    the used buffer (EVENT_USED pumps the bus), collect."""
    dev = drv.open(dev_num, packed=packed)
    try:
        q = dev.queues[0]
        addr, _view = dev.alloc(size)
        samples = []
        clock = time.perf_counter_ns
        for i in range(warmup + rounds):
            t0 = clock()
            q.add([], [(addr, size)], 0)
            dev.notify(0)
            while (used := q.get_used()) is None:
                if not dev.wait_used(0, 5):
                    raise TimeoutError(f"rng device {dev_num}: request {i} not completed within 5 s")
            t1 = clock()
            if used[1] != size:
                raise RuntimeError(f"rng device {dev_num}: used length {used[1]}, asked {size}")
            if i >= warmup:
                samples.append(t1 - t0)
        _view.release()
        return {"samples_ns": samples, **harness.percentiles(samples)}
    finally:
        dev.close()


def blk_reads(drv: Any, dev_num: int, *, packed: bool, nbytes: int, duration: float, sequential: bool,
              seed: int = 1) -> Result:
    from vmsgamp.devices.blk_client import BlkClient, time_reads

    blk = BlkClient.open(drv, dev_num, packed=packed, buffer_size=max(nbytes, 4096),
                         max_in_flight=BLK_IN_FLIGHT)
    try:
        if blk.max_in_flight < BLK_IN_FLIGHT:
            raise RuntimeError(f"only {blk.max_in_flight} blk requests fit the queue, need {BLK_IN_FLIGHT}")
        step = nbytes // SECTOR
        slots = blk.capacity // step
        # The first block is checked against the image's pattern: a fast but
        # wrong path must not pass.
        first = blk.read(0, nbytes)
        if first[1:256] != bytes(range(1, 256)):
            raise RuntimeError("blk: block 0 does not hold the image's pattern")
        if sequential:
            offsets: Iterator[int] = (step * (i % slots) for i in range(1 << 62))
        else:
            rnd = random.Random(seed)
            offsets = (step * rnd.randrange(slots) for _ in range(1 << 62))
        r = time_reads(blk, offsets, nbytes, duration)
        if r["errors"]:
            raise RuntimeError(f"blk: {r['errors']} of {r['requests']} reads failed")
        return {"mb_per_s": r["bytes"] / r["seconds"] / 1e6, "iops": r["requests"] / r["seconds"], **r}
    finally:
        blk.close()


def fifo_busy_rtt(layout: str, iters: int) -> Result:
    """The MsgFifo's busy-poll round trip between two pinned processes."""
    from vmsgamp._bench import fifo

    return fifo.rtt(layout, iters, harness.pick_cpus(), blocking=False, spin_us=1e9)


# ---- one run ---------------------------------------------------------------------------------


def run_once(args: argparse.Namespace, image: str) -> Result:
    from vmsgamp.devices.blk import BlkDevice
    from vmsgamp.devices.console import ConsoleDevice, EchoBackend
    from vmsgamp.bus.exercise import console, rng
    from vmsgamp.devices.rng import RngDevice
    from vmsgamp.testing.amp import amp_pair

    out: Result = {}
    samples: dict[str, list[float]] = {}
    if not args.no_fifo:
        try:
            f = fifo_busy_rtt(args.layout, max(2000, args.round_trips * 5))
            out["fifo_busy_rtt_p50_us"] = f["p50_us"]
            out["fifo_busy_rtt_p99_us"] = f["p99_us"]
        except harness.BenchError as e:  # one CPU: no two-process FIFO figure
            out["fifo_error"] = str(e)
    other = "polling" if args.doorbell == "eventfd" else "eventfd"
    with amp_pair(lambda: [RngDevice("zero")], layout=args.layout, doorbell=other) as drv:
        ping = drv.ping(args.pings)
        out[f"ping_{_CARRIER[other]}_rtt_p50_us"] = ping["p50_us"]
        out[f"ping_{_CARRIER[other]}_rtt_p99_us"] = ping["p99_us"]
    source = None if args.rng_source == "urandom" else args.rng_source

    def factory() -> list[Any]:
        return [RngDevice(source), ConsoleDevice(EchoBackend()), BlkDevice(image, readonly=True)]

    # The driver allocator never frees: room for every queue and buffer of the run.
    with amp_pair(factory, layout=args.layout, doorbell=args.doorbell, region_size=64 << 20) as drv:
        ping = drv.ping(args.pings)
        out["ping_rtt_p50_us"] = out[f"ping_{_CARRIER[args.doorbell]}_rtt_p50_us"] = ping["p50_us"]
        out["ping_rtt_p99_us"] = out[f"ping_{_CARRIER[args.doorbell]}_rtt_p99_us"] = ping["p99_us"]
        for packed in (False, True):
            ring = "packed" if packed else "split"
            r = rng(drv, 0, duration=args.duration, request=args.request, in_flight=args.in_flight,
                    packed=packed)
            out[f"rng_{ring}_mb_per_s"] = r["mb_per_s"]
            q = rng_request_rtt(drv, 0, packed=packed, rounds=args.round_trips)
            out[f"rng_request_{ring}_rtt_p50_us"] = q["p50_us"]
            out[f"rng_request_{ring}_rtt_p99_us"] = q["p99_us"]
            samples[f"rng request ({ring})"] = [s / 1000 for s in q["samples_ns"]]
            c = console(drv, 1, duration=args.duration, rounds=args.round_trips, packed=packed)
            out[f"console_{ring}_rtt_p50_us"] = c["rtt_p50_us"]
            out[f"console_{ring}_rtt_p99_us"] = c["rtt_p99_us"]
            out[f"console_{ring}_round_trips"] = c["round_trips"]
            s = blk_reads(drv, 2, packed=packed, nbytes=BLK_SEQ_BYTES, duration=args.duration, sequential=True)
            out[f"blk_seq_{ring}_mb_per_s"] = s["mb_per_s"]
            out[f"blk_seq_{ring}_bytes"] = s["bytes"]
            b = blk_reads(drv, 2, packed=packed, nbytes=BLK_RAND_BYTES, duration=args.duration, sequential=False)
            out[f"blk_rand_{ring}_iops"] = b["iops"]
    if "fifo_busy_rtt_p50_us" in out:   # the floor again, after the bus figures
        f = fifo_busy_rtt(args.layout, max(2000, args.round_trips * 5))
        out["fifo_busy_rtt_after_p50_us"] = f["p50_us"]
    # memcpy of as many bytes as the faster sequential run read, same file, same block size
    total = max(out["blk_seq_split_bytes"], out["blk_seq_packed_bytes"])
    out["memcpy_mb_per_s"] = memcpy_mb_per_s(image, BLK_SEQ_BYTES, total)
    out["rng_mb_per_s"] = max(out["rng_split_mb_per_s"], out["rng_packed_mb_per_s"])
    out["console_rtt_p50_us"] = min(out["console_split_rtt_p50_us"], out["console_packed_rtt_p50_us"])
    out["rng_request_rtt_p50_us"] = min(out["rng_request_split_rtt_p50_us"],
                                        out["rng_request_packed_rtt_p50_us"])
    out["blk_seq_mb_per_s"] = max(out["blk_seq_split_mb_per_s"], out["blk_seq_packed_mb_per_s"])
    out["blk_seq_vs_memcpy"] = out["blk_seq_mb_per_s"] / out["memcpy_mb_per_s"]
    out["blk_rand_iops"] = max(out["blk_rand_split_iops"], out["blk_rand_packed_iops"])
    out["_samples"] = samples
    return out


def run(args: argparse.Namespace) -> Result:
    with shm_image(args.blk_mb) as image:
        runs = [run_once(args, image) for _ in range(max(1, args.runs))]
    samples = runs[-1].pop("_samples")
    for r in runs[:-1]:
        r.pop("_samples")
    out: Result = dict(harness.median_dicts(runs)) if len(runs) > 1 else dict(runs[0])
    out.update(request_bytes=args.request, in_flight=args.in_flight, layout=args.layout,
               doorbell=args.doorbell, rng_source=args.rng_source, duration_s=args.duration,
               runs=len(runs), blk_seq_bytes=BLK_SEQ_BYTES, blk_rand_bytes=BLK_RAND_BYTES,
               blk_in_flight=BLK_IN_FLIGHT)
    if "fifo_error" in runs[0]:
        out["fifo_error"] = runs[0]["fifo_error"]
    out["verdicts"] = verdicts(out)
    if getattr(args, "plot", None):
        from vmsgamp._bench import plot

        plot.devices(out, samples, args.plot)
        out["plot"] = args.plot
    return out


def verdicts(r: Result) -> list[Result]:
    return [
        check(f"bus PING round trip p50 <= {PING_RTT_LIMIT_US:g} us (shm: polling, default wait)",
              r.get("ping_shm_rtt_p50_us"), PING_RTT_LIMIT_US, unit="us"),
        check(f"bus PING round trip p50 <= {PING_RTT_LIMIT_US:g} us (ivshmem: eventfd doorbells, default wait)",
              r.get("ping_ivshmem_rtt_p50_us"), PING_RTT_LIMIT_US, unit="us"),
        check(f"console echo round trip p50 <= {CONSOLE_RTT_LIMIT_US:g} us", r.get("console_rtt_p50_us"),
              CONSOLE_RTT_LIMIT_US, unit="us"),
        check(f"64-byte rng request round trip p50 <= {RNG_REQUEST_RTT_LIMIT_US:g} us",
              r.get("rng_request_rtt_p50_us"), RNG_REQUEST_RTT_LIMIT_US, unit="us"),
        check("rng throughput (no target; the device path with a free source)", r.get("rng_mb_per_s"),
              None, unit="MB/s"),
        check("blk 64 KiB sequential reads, 32 in flight (no target)", r.get("blk_seq_mb_per_s"), None,
              unit="MB/s", detail=f"{r['blk_seq_vs_memcpy']:.2f}x a same-run memcpy"
              if r.get("blk_seq_vs_memcpy") else ""),
        check("blk 4 KiB random reads, 32 in flight (no target)", r.get("blk_rand_iops"), None, unit="IOPS"),
        check("MsgFifo busy-poll round trip p50, same run (the floor; no target here)",
              r.get("fifo_busy_rtt_p50_us"), None, unit="us",
              detail=f"{r['fifo_busy_rtt_after_p50_us']:.2f} us after the bus figures"
              if r.get("fifo_busy_rtt_after_p50_us") is not None else ""),
    ]


def format_human(r: Result) -> str:
    lines = [
        f"devices over the AMP bus (layout {r['layout'].upper()}, {r['doorbell']} doorbells, two processes"
        + (f", median of {r['runs']} runs" if r["runs"] > 1 else "") + ")",
        f"  bus PING round trip: shm: (polling) p50 {r['ping_shm_rtt_p50_us']:.1f} us "
        f"(p99 {r['ping_shm_rtt_p99_us']:.1f}), ivshmem: (eventfd) p50 {r['ping_ivshmem_rtt_p50_us']:.1f} us "
        f"(p99 {r['ping_ivshmem_rtt_p99_us']:.1f})",
        f"  64-byte rng request round trip: split p50 {r['rng_request_split_rtt_p50_us']:.1f} us, "
        f"packed p50 {r['rng_request_packed_rtt_p50_us']:.1f} us",
        f"  virtio-console echo round trip: split p50 {r['console_split_rtt_p50_us']:.1f} us "
        f"(p99 {r['console_split_rtt_p99_us']:.0f}), packed p50 {r['console_packed_rtt_p50_us']:.1f} us "
        f"(p99 {r['console_packed_rtt_p99_us']:.0f})",
        f"  virtio-rng ({r['rng_source']} source), {r['request_bytes']} B requests x {r['in_flight']} in flight: "
        f"split {r['rng_split_mb_per_s']:.0f} MB/s, packed {r['rng_packed_mb_per_s']:.0f} MB/s",
        f"  virtio-blk (/dev/shm image), 64 KiB sequential reads x 32: split {r['blk_seq_split_mb_per_s']:.0f} MB/s, "
        f"packed {r['blk_seq_packed_mb_per_s']:.0f} MB/s; same-run memcpy {r['memcpy_mb_per_s']:.0f} MB/s "
        f"({r['blk_seq_vs_memcpy']:.2f}x)",
        f"  virtio-blk 4 KiB random reads x 32: split {r['blk_rand_split_iops']:,.0f} IOPS, "
        f"packed {r['blk_rand_packed_iops']:,.0f} IOPS",
    ]
    if "fifo_busy_rtt_p50_us" in r:
        lines.append(f"  MsgFifo busy-poll round trip (same run): p50 {r['fifo_busy_rtt_p50_us']:.2f} us")
    elif r.get("fifo_error"):
        lines.append(f"  MsgFifo busy-poll round trip not measured: {r['fifo_error']}")
    lines += format_lines(r["verdicts"])
    if r.get("plot"):
        lines.append(f"plot written to {r['plot']}")
    return "\n".join(lines)
