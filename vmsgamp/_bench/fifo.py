"""``vmsgamp bench fifo``: MsgFifo between two processes pinned to two CPUs.

Measures one-way throughput of 64-byte messages (per-message and burst
APIs, busy-poll receiver) and round-trip latency in three waiting modes:
busy-poll (spin forever), spin-then-block (spin 50 us, then sleep on an
eventfd doorbell) and pure blocking (sleep at once).  Every number comes
from a real two-process run; ``--runs N`` reports medians.
"""
from __future__ import annotations

import argparse
from typing import Any

from vmsgamp._bench import harness
from vmsgamp._core.doorbell import EventfdDoorbell, PollingDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region

MSG_SIZE = 64
BURST = 32


def _msg(seq: int = 0) -> bytes:
    # A valid G2 header (msg_id 0x80 = implementation-defined, msg_size 64).
    return bytes([0, 0x80, 0, 0, 0, 0, MSG_SIZE, 0]) + seq.to_bytes(8, "little") + bytes(48)


def _run(profile: str, cpus, parent_work, child_work, *, blocking=False, spin_us=1e9,
         timeout=120.0) -> tuple[dict, dict]:
    """Device FIFO in this process, driver FIFO in a forked child; both
    exchange one hello so each side is running before anything is timed."""
    region = Region.memfd(16384)
    da, db = EventfdDoorbell.pair() if blocking else (PollingDoorbell(), PollingDoorbell())

    def side(role, doorbell, work, hello_first):
        fifo = MsgFifo(region, role=role, layout=profile, doorbell=doorbell, spin_us=spin_us)
        fifo.start(10, reset=(profile == "a" and role == "device"))
        if hello_first:
            fifo.send(_msg(), timeout=10)
        fifo.recv(bytearray(MSG_SIZE), timeout=10)
        if not hello_first:
            fifo.send(_msg(), timeout=10)
        out = work(fifo) or {}
        out.update(rings=fifo.rings, sleeps=fifo.sleeps)
        fifo.close()
        return out

    def child(ready):
        ready()
        return side("driver", db, child_work, False)

    try:
        return harness.run_pair(lambda: side("device", da, parent_work, True), child, cpus,
                                timeout=timeout)
    finally:
        region.close()
        da.close()
        db.close()


def _throughput(profile: str, msgs: int, cpus, burst: bool) -> float:
    def produce(fifo):
        t0 = harness.now_ns()
        if burst:
            block = _msg() * BURST
            sb = fifo.send_burst
            left = msgs
            while left >= BURST:
                left -= sb(block, MSG_SIZE)
            while left:
                left -= sb(_msg() * left, MSG_SIZE)
        else:
            m = _msg()
            send = fifo.try_send
            for _ in range(msgs):
                while not send(m):
                    pass
        return {"start_ns": t0}

    def consume(fifo):
        got = 0
        if burst:
            buf = bytearray(MSG_SIZE * 64)
            rb = fifo.recv_burst
            while got < msgs:
                got += rb(buf)
        else:
            buf = bytearray(MSG_SIZE)
            recv = fifo.try_recv
            while got < msgs:
                if recv(buf):
                    got += 1
        return {"end_ns": harness.now_ns(), "got": got}

    p, c = _run(profile, cpus, produce, consume)
    if c["got"] != msgs:
        raise harness.BenchError(f"consumer got {c['got']} of {msgs} messages")
    return msgs / ((c["end_ns"] - p["start_ns"]) / 1e9)


def _rtt(profile: str, iters: int, cpus, *, blocking: bool, spin_us: float) -> dict[str, Any]:
    warm = min(1000, iters // 10 + 1)

    def ping(fifo):
        m = _msg()
        buf = bytearray(MSG_SIZE)
        send, recv, clock = fifo.try_send, fifo.recv, harness.now_ns
        samples = [0] * iters
        for _ in range(warm):
            send(m)
            recv(buf, 10)
        r0, s0 = fifo.rings, fifo.sleeps
        for i in range(iters):
            t0 = clock()
            send(m)
            recv(buf, 10)
            samples[i] = clock() - t0
        return {"samples": samples, "timed_rings": fifo.rings - r0, "timed_sleeps": fifo.sleeps - s0}

    def echo(fifo):
        buf = bytearray(MSG_SIZE)
        send, recv = fifo.try_send, fifo.recv
        for _ in range(warm + iters):
            n = recv(buf, 10)
            send(bytes(buf[:n]))
        return {}

    p, c = _run(profile, cpus, ping, echo, blocking=blocking, spin_us=spin_us)
    out = harness.percentiles(p["samples"])
    out["syscalls"] = p["timed_rings"] + p["timed_sleeps"]
    return out


def run_suite(profile: str = "b", msgs: int = 2_000_000, rtt_iters: int = 20_000,
              cpus: tuple[int, int] | None = None, block_iters: int | None = None) -> dict[str, Any]:
    """One run of every measurement; the keys of ``vmsgamp bench fifo --json``."""
    cpu_pair = harness.pick_cpus(cpus)
    block_iters = block_iters or max(200, rtt_iters // 10)
    busy = _rtt(profile, rtt_iters, cpu_pair, blocking=False, spin_us=1e9)
    spin = _rtt(profile, rtt_iters, cpu_pair, blocking=True, spin_us=50)
    block = _rtt(profile, block_iters, cpu_pair, blocking=True, spin_us=0)
    return {
        "profile": profile,
        "msg_size": MSG_SIZE,
        "burst": BURST,
        "cpus": list(cpu_pair),
        "msgs": msgs,
        "send_msgs_per_s": _throughput(profile, msgs, cpu_pair, burst=False),
        "burst_msgs_per_s": _throughput(profile, msgs, cpu_pair, burst=True),
        "rtt_busy_p50_us": busy["p50_us"],
        "rtt_busy_p99_us": busy["p99_us"],
        "rtt_busy_p999_us": busy["p999_us"],
        "rtt_spin_p50_us": spin["p50_us"],
        "rtt_spin_p99_us": spin["p99_us"],
        "rtt_spin_wakeup_syscalls": spin["syscalls"],
        "rtt_block_p50_us": block["p50_us"],
        "rtt_block_p99_us": block["p99_us"],
        "rtt_iters": rtt_iters,
        "rtt_block_iters": block_iters,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", dest="profile", choices=["b", "a"], default="b",
                   help="FIFO layout: b = vmamp_shmem (default), a = spsc_queue")
    p.add_argument("--msgs", type=int, default=2_000_000, help="messages per throughput run")
    p.add_argument("--iters", type=int, default=20_000, help="round trips per latency run")
    p.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    p.add_argument("--cpus", type=lambda s: tuple(int(x) for x in s.split(",")),
                   help="two CPUs, e.g. 0,1 (default: the first two allowed)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs = [run_suite(args.profile, args.msgs, args.iters, args.cpus) for _ in range(max(1, args.runs))]
    if len(runs) == 1:
        return runs[0]
    med = harness.median_dicts(runs)
    out = dict(runs[0])
    out.update({k: v for k, v in med.items() if k in out and isinstance(out[k], float)})
    out["runs"] = len(runs)
    return out


def format_human(r: dict[str, Any]) -> str:
    lines = [
        f"MsgFifo layout {r['profile'].upper()}, {r['msg_size']}-byte messages, CPUs {r['cpus'][0]} and "
        f"{r['cpus'][1]}" + (f", median of {r['runs']} runs" if r.get("runs") else ""),
        f"  one-way, per message   {r['send_msgs_per_s'] / 1e6:8.2f} M msgs/s",
        f"  one-way, bursts of {r['burst']:<3} {r['burst_msgs_per_s'] / 1e6:8.2f} M msgs/s",
        f"  round trip, busy-poll  p50 {r['rtt_busy_p50_us']:7.2f} us   p99 {r['rtt_busy_p99_us']:7.2f} us"
        f"   p99.9 {r['rtt_busy_p999_us']:7.2f} us",
        f"  round trip, spin+block p50 {r['rtt_spin_p50_us']:7.2f} us   p99 {r['rtt_spin_p99_us']:7.2f} us"
        f"   ({r['rtt_spin_wakeup_syscalls']} wake-up syscalls)",
        f"  round trip, blocking   p50 {r['rtt_block_p50_us']:7.2f} us   p99 {r['rtt_block_p99_us']:7.2f} us",
    ]
    return "\n".join(lines)
