"""``vmsgamp bench fifo``: MsgFifo between two processes pinned to two CPUs.

Measures one-way throughput of 64-byte messages (per-message and burst
APIs, busy-poll receiver) and round-trip latency in three waiting modes:
busy-poll (spin forever), spin-then-block (spin 50 us, then sleep on an
eventfd doorbell) and pure blocking (sleep at once).  Every number comes
from a real two-process run; ``--runs N`` reports medians.

The work per message is the C reference's (``bench/c/spsc_ref.c``): the
sender writes a sequence number into every message (bytes 8..15, after a
valid G2 header), the receiver checks every one and the run fails on any
mismatch; bursts are at most 32 messages per call on both sides (one
vector operation per burst stamps or checks its numbers: _produce_bursts);
the echo side of a round trip sends back the bytes it received.

The Python call floor is measured in the same run: an empty method call on
a compiled object (``PollingDoorbell.ring``), in the same loop shape as the
per-message sends; for information also the floor of try_send's own call
shape (a one-argument METH_O call, ``callable(buf)``).  When the C reference can be built (a checkout with
gcc), its per-message send runs too and the per-message cost is reported
as floor + C + overhead, against the target "per-message API <= 1.3 x
(floor + C per-message cost)".
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from vmsgamp._bench import harness
from vmsgamp._bench.verdict import check, format_lines
from vmsgamp._core.doorbell import EventfdDoorbell, PollingDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region

MSG_SIZE = 64
BURST = 32  # per call on both sides, as the C reference
SEQ_WORD = 1  # the sequence number is 64-bit word 1 (bytes 8..15)
CALL_FLOOR_FACTOR = 1.3

Result = dict[str, Any]


def _msg() -> bytearray:
    # A valid G2 header (msg_id 0x80 = implementation-defined, msg_size 64).
    return bytearray([0, 0x80, 0, 0, 0, 0, MSG_SIZE, 0]) + bytes(MSG_SIZE - 8)


def _words(buf: bytearray) -> memoryview:
    """64-bit words of ``buf``: ``w[SEQ_WORD] = seq`` is one C-level store."""
    return memoryview(buf).cast("Q")


class SeqError(harness.BenchError):
    """A message arrived with the wrong sequence number."""


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
            fifo.send(bytes(_msg()), timeout=10)
        fifo.recv(bytearray(MSG_SIZE), timeout=10)
        if not hello_first:
            fifo.send(bytes(_msg()), timeout=10)
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


# ---- bursts: the sequence numbers, one vector operation per burst on each side -------------
#
# C stamps message i of a burst with seq + i before each send_burst call and
# checks every received number against a running counter.  Python's closest
# equivalent of that compiled inner loop is one vector operation per burst:
# the sender adds the number the previous call sent to every stamp in its
# block in place (so message i carries seq + i, as C restamps it), and the
# receiver compares the received numbers with an expected column in one
# C-level comparison of two strided views, then advances the expected column
# by the count received.  Every message is still written and checked.
#
# One numpy call per burst and side is the least Python can do here (numpy
# has a fixed cost of about half a microsecond per call, whatever its size),
# so everything else is made once: the uint64 step for every possible count,
# the views for every short burst.


def _seq_column(buf: bytearray) -> np.ndarray:
    """The sequence-number word of every message in ``buf``, writable in place."""
    return np.frombuffer(buf, dtype=np.uint64)[SEQ_WORD::MSG_SIZE // 8]


_STEPS = [np.uint64(k) for k in range(BURST + 1)]


def _produce_bursts(fifo, msgs: int) -> None:
    block = bytearray(_msg() * BURST)
    stamps = _seq_column(block)
    short = [memoryview(block)[:k * MSG_SIZE] for k in range(BURST)]  # the tail, < one burst
    send_burst, add, steps = fifo.send_burst, np.add, _STEPS
    stamps[:] = np.arange(BURST, dtype=np.uint64)  # message i of the first burst: i
    seq = n = 0
    while seq < msgs:
        if n:
            add(stamps, steps[n], stamps)  # the first unsent message now carries seq
        left = msgs - seq
        n = send_burst(block if left >= BURST else short[left], MSG_SIZE)
        seq += n


def _consume_bursts(fifo, msgs: int) -> tuple[int, int]:
    buf = bytearray(MSG_SIZE * BURST)
    expect = bytearray(MSG_SIZE * BURST)
    want = _seq_column(expect)
    want[:] = np.arange(BURST, dtype=np.uint64)  # expected: got + i for message i
    # 64-bit words, so != compares the numbers in C (same native format both sides).
    got_col = memoryview(buf).cast("Q")[SEQ_WORD::MSG_SIZE // 8]
    want_col = memoryview(expect).cast("Q")[SEQ_WORD::MSG_SIZE // 8]
    pairs = [(got_col[:k], want_col[:k]) for k in range(BURST + 1)]
    recv_burst, add, steps = fifo.recv_burst, np.add, _STEPS
    got = errors = 0
    while got < msgs:
        n = recv_burst(buf, BURST)
        if n:
            g, e = pairs[n]
            if g != e:
                errors += sum(a != b for a, b in zip(g, e))
            add(want, steps[n], want)
            got += n
    return got, errors


def _throughput(profile: str, msgs: int, cpus, burst: bool) -> float:
    def produce(fifo):
        t0 = harness.now_ns()
        if burst:
            _produce_bursts(fifo, msgs)
        else:
            m = _msg()
            w = _words(m)
            send, k = fifo.try_send, SEQ_WORD  # locals: no global lookup per message
            seq = 0
            while seq < msgs:
                w[k] = seq
                if send(m):
                    seq += 1
        return {"start_ns": t0}

    def consume(fifo):
        got = errors = 0
        if burst:
            got, errors = _consume_bursts(fifo, msgs)
        else:
            buf = bytearray(MSG_SIZE)
            w = _words(buf)
            recv, k = fifo.try_recv, SEQ_WORD
            while got < msgs:
                if recv(buf):
                    if w[k] != got:
                        errors += 1
                    got += 1
        return {"end_ns": harness.now_ns(), "got": got, "errors": errors}

    p, c = _run(profile, cpus, produce, consume)
    if c["got"] != msgs:
        raise harness.BenchError(f"consumer got {c['got']} of {msgs} messages")
    if c["errors"]:
        raise SeqError(f"{c['errors']} of {msgs} messages had the wrong sequence number")
    return msgs / ((c["end_ns"] - p["start_ns"]) / 1e9)


def rtt(profile: str, iters: int, cpus, *, blocking: bool, spin_us: float, keep_samples: bool = False) -> Result:
    """Round trips: the parent sends message i (sequence number i), the
    child echoes the bytes it got, the parent checks the reply is i.
    ``keep_samples`` adds every round trip as ``samples_us``."""
    warm = min(1000, iters // 10 + 1)

    def ping(fifo):
        m, reply = _msg(), bytearray(MSG_SIZE)
        w, rw = _words(m), _words(reply)
        send, recv, clock = fifo.try_send, fifo.recv, harness.now_ns
        samples = [0] * iters
        errors = 0
        for i in range(warm):
            w[SEQ_WORD] = i
            send(m)
            recv(reply, 10)
            errors += rw[SEQ_WORD] != i
        r0, s0 = fifo.rings, fifo.sleeps
        for i in range(iters):
            t0 = clock()
            w[SEQ_WORD] = i
            send(m)
            recv(reply, 10)
            samples[i] = clock() - t0
            errors += rw[SEQ_WORD] != i
        return {"samples": samples, "timed_rings": fifo.rings - r0, "timed_sleeps": fifo.sleeps - s0,
                "errors": errors}

    def echo(fifo):
        buf = bytearray(MSG_SIZE)
        send, recv = fifo.try_send, fifo.recv
        for _ in range(warm + iters):
            n = recv(buf, 10)
            send(buf if n == MSG_SIZE else memoryview(buf)[:n])
        return {}

    p, c = _run(profile, cpus, ping, echo, blocking=blocking, spin_us=spin_us)
    if p["errors"]:
        raise SeqError(f"{p['errors']} replies carried the wrong sequence number")
    out = harness.percentiles(p["samples"])
    out["syscalls"] = p["timed_rings"] + p["timed_sleeps"]
    if keep_samples:
        out["samples_us"] = [x / 1000 for x in p["samples"]]
    return out


# ---- the Python call floor and the C reference --------------------------------------------


def call_floor_ns(n: int = 200_000, repeat: int = 7, *, one_arg: bool = False) -> float:
    """ns per iteration of ``while i < n: f(); i += 1`` with ``f`` an empty
    method on a compiled object: the per-message send loop minus the work.

    ``one_arg``: the same loop around ``callable(buf)`` instead, CPython's
    cheapest call shape (a one-argument METH_O builtin, called without an
    argument array) with next to nothing inside.  try_send and try_recv are
    METH_O calls too, so this is the floor of their call itself; the default
    (a Cython method with keyword parsing) is the floor the targets use."""
    ring = PollingDoorbell().ring  # Cython: def ring(self): pass
    buf = bytearray(MSG_SIZE)
    empty_o = callable  # METH_O: one pointer test, returns False

    def loop(count: int) -> None:
        i = 0
        while i < count:
            ring()
            i += 1

    def loop_o(count: int) -> None:
        i = 0
        while i < count:
            empty_o(buf)
            i += 1

    run = loop_o if one_arg else loop
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        run(n)
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def c_reference() -> Path | None:
    """The C reference's source in this checkout, or None (installed package)."""
    src = Path(__file__).resolve().parents[2] / "bench" / "c" / "spsc_ref.c"
    return src if src.is_file() else None


def c_send_msgs_per_s(msgs: int, cpus: tuple[int, int]) -> float | None:
    """The C reference's per-message one-way rate, or None when it cannot be
    built here (no checkout, no gcc)."""
    src = c_reference()
    if src is None or shutil.which("gcc") is None:
        return None
    binary = harness.compile_c(src)
    cmd = [str(binary), "send", "-n", str(msgs), "-a", str(cpus[0]), "-b", str(cpus[1]), "-t", "120"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=130)
    if proc.returncode != 0:
        raise harness.BenchError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return float(json.loads(proc.stdout)["msgs_per_s"])


def per_message_breakdown(send_msgs_per_s: float, floor_ns: float, c_msgs_per_s: float | None) -> Result:
    """Per-message cost as floor + C + overhead (ns)."""
    per_msg = 1e9 / send_msgs_per_s
    out: Result = {"per_msg_ns": per_msg, "call_floor_ns": floor_ns}
    if c_msgs_per_s:
        c_ns = 1e9 / c_msgs_per_s
        out.update(c_per_msg_ns=c_ns, overhead_ns=per_msg - floor_ns - c_ns,
                   per_msg_vs_floor_plus_c=per_msg / (floor_ns + c_ns))
    return out


# ---- the suite ---------------------------------------------------------------------------------


def run_suite(profile: str = "b", msgs: int = 2_000_000, rtt_iters: int = 20_000,
              cpus: tuple[int, int] | None = None, block_iters: int | None = None, *,
              c_msgs: int | None = None, samples: bool = False) -> Result:
    """One run of every measurement; the keys of ``vmsgamp bench fifo --json``.
    ``c_msgs``: run the C reference's per-message send with that many
    messages for the floor + C + overhead breakdown (None: skip).
    ``samples``: also return every round trip under ``_samples`` (for --plot)."""
    cpu_pair = harness.pick_cpus(cpus)
    block_iters = block_iters or max(200, rtt_iters // 10)
    busy = rtt(profile, rtt_iters, cpu_pair, blocking=False, spin_us=1e9, keep_samples=samples)
    spin = rtt(profile, rtt_iters, cpu_pair, blocking=True, spin_us=50, keep_samples=samples)
    block = rtt(profile, block_iters, cpu_pair, blocking=True, spin_us=0, keep_samples=samples)
    send_rate = _throughput(profile, msgs, cpu_pair, burst=False)
    with harness.pinned(cpu_pair[0]):
        floor = call_floor_ns()
        floor_o = call_floor_ns(one_arg=True)
    c_rate = c_send_msgs_per_s(c_msgs, cpu_pair) if c_msgs else None
    out = {
        "profile": profile,
        "msg_size": MSG_SIZE,
        "burst": BURST,
        "cpus": list(cpu_pair),
        "msgs": msgs,
        "send_msgs_per_s": send_rate,
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
        "seq_checked": True,
    }
    out.update(per_message_breakdown(send_rate, floor, c_rate))
    out["call_floor_meth_o_ns"] = floor_o  # information: see call_floor_ns
    if c_rate:
        out["c_send_msgs_per_s"] = c_rate
    if samples:
        out["_samples"] = {"busy-poll": busy["samples_us"], "spin-then-block": spin["samples_us"],
                           "blocking (eventfd)": block["samples_us"]}
    return out


def verdicts(r: Result) -> list[Result]:
    """Issue 2's FIFO targets and issue 14's call-floor target."""
    mps = (lambda x: None if x is None else x / 1e6)
    return [
        check("per-message one-way >= 10 M msgs/s", mps(r.get("send_msgs_per_s")), 10, at_least=True,
              unit="M/s"),
        check("burst one-way >= 30 M msgs/s", mps(r.get("burst_msgs_per_s")), 30, at_least=True, unit="M/s"),
        check("busy-poll RTT p50 <= 0.7 us", r.get("rtt_busy_p50_us"), 0.7, unit="us"),
        check("busy-poll RTT p99 <= 1.5 us", r.get("rtt_busy_p99_us"), 1.5, unit="us"),
        check(f"per-message cost <= {CALL_FLOOR_FACTOR}x (call floor + C per-message cost)",
              r.get("per_msg_vs_floor_plus_c"), CALL_FLOOR_FACTOR, unit="x",
              detail=_breakdown_text(r)),
    ]


def _breakdown_text(r: Result) -> str:
    if r.get("c_per_msg_ns") is None:
        return f"{r['per_msg_ns']:.1f} ns per message, call floor {r['call_floor_ns']:.1f} ns; C reference not built"
    text = (f"{r['per_msg_ns']:.1f} ns = floor {r['call_floor_ns']:.1f} + C {r['c_per_msg_ns']:.1f} "
            f"+ overhead {r['overhead_ns']:.1f}")
    if r.get("call_floor_meth_o_ns") is not None:
        text += f" (one-argument METH_O call floor {r['call_floor_meth_o_ns']:.1f})"
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", dest="profile", choices=["b", "a"], default="b",
                   help="FIFO layout: b = vmamp_shmem (default), a = spsc_queue")
    p.add_argument("--msgs", type=int, default=2_000_000, help="messages per throughput run")
    p.add_argument("--iters", type=int, default=20_000, help="round trips per latency run")
    p.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    p.add_argument("--cpus", type=lambda s: tuple(int(x) for x in s.split(",")),
                   help="two CPUs, e.g. 0,1 (default: the first two allowed)")
    p.add_argument("--c-msgs", type=int, default=20_000_000,
                   help="messages for the same-run C per-message reference (0: skip it)")
    p.add_argument("--plot", metavar="FILE.png", help="draw latencies and throughputs (needs matplotlib)")


def run(args: argparse.Namespace) -> Result:
    n = max(1, args.runs)
    plot_to = getattr(args, "plot", None)
    runs = [run_suite(args.profile, args.msgs, args.iters, args.cpus, c_msgs=args.c_msgs or None,
                      samples=bool(plot_to) and i == n - 1) for i in range(n)]
    samples = runs[-1].pop("_samples", None)
    out = dict(runs[0])
    if len(runs) > 1:
        med = harness.median_dicts(runs)
        out.update({k: v for k, v in med.items() if k in out and isinstance(out[k], float)})
        out["runs"] = len(runs)
    out["verdicts"] = verdicts(out)
    if plot_to:
        from vmsgamp._bench import plot

        plot.fifo(out, plot_to, samples)
        out["plot"] = plot_to
    return out


def format_human(r: Result) -> str:
    lines = [
        f"MsgFifo layout {r['profile'].upper()}, {r['msg_size']}-byte messages, CPUs {r['cpus'][0]} and "
        f"{r['cpus'][1]}, sequence number written and checked in every message"
        + (f", median of {r['runs']} runs" if r.get("runs") else ""),
        f"  one-way, per message   {r['send_msgs_per_s'] / 1e6:8.2f} M msgs/s",
        f"  one-way, bursts of {r['burst']:<3} {r['burst_msgs_per_s'] / 1e6:8.2f} M msgs/s",
        f"  round trip, busy-poll  p50 {r['rtt_busy_p50_us']:7.2f} us   p99 {r['rtt_busy_p99_us']:7.2f} us"
        f"   p99.9 {r['rtt_busy_p999_us']:7.2f} us",
        f"  round trip, spin+block p50 {r['rtt_spin_p50_us']:7.2f} us   p99 {r['rtt_spin_p99_us']:7.2f} us"
        f"   ({r['rtt_spin_wakeup_syscalls']} wake-up syscalls)",
        f"  round trip, blocking   p50 {r['rtt_block_p50_us']:7.2f} us   p99 {r['rtt_block_p99_us']:7.2f} us",
        f"  per message: {_breakdown_text(r)}",
    ]
    lines += format_lines(r["verdicts"])
    if r.get("plot"):
        lines.append(f"plot written to {r['plot']}")
    return "\n".join(lines)
