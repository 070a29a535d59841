"""The FIFO benchmark does the C reference's work: every message carries a
sequence number the receiver checks, so a benchmark that lost, duplicated or
reordered messages fails instead of reporting a rate.  Tiny counts; no
assertion on speed."""
from __future__ import annotations

import os

import pytest

from vmsgamp._bench import fifo, harness
from vmsgamp._core.fifo import MsgFifo

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two-process benchmarks need two CPUs")
CPUS = harness.pick_cpus()


@pytest.mark.parametrize("burst", [False, True])
def test_throughput_checks_sequence_numbers(burst: bool) -> None:
    assert fifo._throughput("b", 3000 + 7, CPUS, burst=burst) > 0  # a tail smaller than a burst too


class _Skipping(MsgFifo):
    """Sends message 5 twice in place of message 6 (a lost message)."""

    def try_send(self, buf):
        w = memoryview(buf).cast("Q")
        if w[fifo.SEQ_WORD] == 6 and not getattr(self, "_done", False):
            self._done = True
            w[fifo.SEQ_WORD] = 5
        return super().try_send(buf)

    def send_burst(self, buf, msg_len, timeout=0):
        w = memoryview(buf).cast("Q")
        if len(w) > 9 * 8 and not getattr(self, "_done", False):
            self._done = True
            w[9 * 8 + fifo.SEQ_WORD] = 0  # message 9 of the first burst says 0
        return super().send_burst(buf, msg_len, timeout)


@pytest.mark.parametrize("burst", [False, True])
def test_a_wrong_sequence_number_fails_the_run(monkeypatch, burst: bool) -> None:
    monkeypatch.setattr(fifo, "MsgFifo", _Skipping)
    with pytest.raises(fifo.SeqError, match="wrong sequence number"):
        fifo._throughput("b", 2000, CPUS, burst=burst)


def test_round_trip_checks_the_echo(monkeypatch) -> None:
    assert fifo.rtt("b", 200, CPUS, blocking=False, spin_us=1e9)["p50_us"] > 0
    real_run = fifo._run

    def bad_echo_run(profile, cpus, parent, child, **kw):
        def echo(f):
            buf = bytearray(fifo.MSG_SIZE)
            for i in range(200 + 21):  # iters + warm-up, as rtt() runs them
                n = f.recv(buf, 10)
                if i == 150:
                    buf[8] ^= 1  # one reply comes back altered
                f.try_send(buf[:n])
        return real_run(profile, cpus, parent, echo, **kw)

    monkeypatch.setattr(fifo, "_run", bad_echo_run)
    with pytest.raises(fifo.SeqError, match="1 replies"):
        fifo.rtt("b", 200, CPUS, blocking=False, spin_us=1e9)


def test_call_floor_and_breakdown() -> None:
    floor = fifo.call_floor_ns(n=20_000, repeat=2)
    assert 0 < floor < 10_000
    b = fifo.per_message_breakdown(10e6, 40.0, 50e6)  # 100 ns per message, C 20 ns
    assert b["per_msg_ns"] == pytest.approx(100.0) and b["c_per_msg_ns"] == pytest.approx(20.0)
    assert b["overhead_ns"] == pytest.approx(40.0)
    assert b["per_msg_vs_floor_plus_c"] == pytest.approx(100 / 60)
    assert "c_per_msg_ns" not in fifo.per_message_breakdown(10e6, 40.0, None)
    r = {"send_msgs_per_s": 10e6, "burst_msgs_per_s": 40e6, "rtt_busy_p50_us": 0.5, "rtt_busy_p99_us": 2.0,
         **b}
    statuses = [v["status"] for v in fifo.verdicts(r)]
    assert statuses == ["PASS", "PASS", "PASS", "MISS", "MISS"]
    r2 = {**r, **fifo.per_message_breakdown(10e6, 40.0, None)}
    r2.pop("per_msg_vs_floor_plus_c", None)
    assert fifo.verdicts(r2)[-1]["status"] == "n/a"
