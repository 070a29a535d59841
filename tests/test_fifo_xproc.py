"""Two processes, one region: 1,000,000 sequence-numbered messages each way,
busy-poll and blocking, both layouts.  No loss, duplication or reordering."""
import multiprocessing as mp
import os
import threading

import numpy as np
import pytest

from vmsgamp._core.doorbell import EventfdDoorbell, PollingDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region

N = 1_000_000
CHUNK = 256
HDR = np.uint64((0x80 << 8) | (64 << 48))   # msg_id 0x80, msg_size 64


def _chunk(start, count):
    rows = np.zeros((count, 8), dtype="<u8")
    rows[:, 0] = HDR
    rows[:, 1] = np.arange(start, start + count, dtype=np.uint64)
    rows[:, 2] = ~rows[:, 1]
    return rows


def _check(buf, got, expected):
    rows = np.frombuffer(buf, dtype="<u8", count=got * 8).reshape(got, 8)
    seq = rows[:, 1]
    if not (np.array_equal(seq, np.arange(expected, expected + got, dtype=np.uint64))
            and np.all(rows[:, 0] == HDR) and np.all(rows[:, 2] == ~seq)):
        bad = int(np.argmax(seq != np.arange(expected, expected + got, dtype=np.uint64)))
        raise AssertionError(f"expected seq {expected + bad}, got {int(seq[bad])}")


def _busy(fifo):
    sent = recvd = 0
    buf = bytearray(64 * 64)
    while sent < N or recvd < N:
        if sent < N:
            sent += fifo.send_burst(_chunk(sent, min(CHUNK, N - sent)).tobytes(), 64)
        got = fifo.recv_burst(buf)
        if got:
            _check(buf, got, recvd)
            recvd += got
    return sent, recvd


def _blocking(fifo):
    result = {}

    def tx():
        sent = 0
        while sent < N:
            sent += fifo.send_burst(_chunk(sent, min(CHUNK, N - sent)).tobytes(), 64, timeout=30)
        result["sent"] = sent

    t = threading.Thread(target=tx)
    t.start()
    buf = bytearray(64 * 64)
    recvd = 0
    while recvd < N:
        got = fifo.recv_burst(buf, timeout=30)
        assert got, "blocking receive timed out"
        _check(buf, got, recvd)
        recvd += got
    t.join()
    return result["sent"], recvd


def _child(region, db, layout, mode, conn):
    try:
        drv = MsgFifo(region, role="driver", layout=layout, doorbell=db)
        drv.start(10)
        conn.send(("ok", (_busy if mode == "busy" else _blocking)(drv), drv.stats()))
    except BaseException as e:  # report to the parent, never hang it
        conn.send(("error", repr(e), None))
    finally:
        conn.close()
        os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["b", "a"])
@pytest.mark.parametrize("mode", ["busy", "blocking"])
def test_million_each_way(layout, mode):
    region = Region.memfd(16384)
    if mode == "busy":
        da, db = PollingDoorbell(), PollingDoorbell()
    else:
        da, db = EventfdDoorbell.pair()
    dev = MsgFifo(region, role="device", layout=layout, doorbell=da)
    if layout == "a":
        dev.start(reset=True)
    ctx = mp.get_context("fork")
    parent_conn, child_conn = ctx.Pipe()
    p = ctx.Process(target=_child, args=(region, db, layout, mode, child_conn))
    p.start()
    if layout == "b":
        dev.start(10)
    try:
        counts = (_busy if mode == "busy" else _blocking)(dev)
        assert parent_conn.poll(60), "child did not report"
        status, child_counts, child_stats = parent_conn.recv()
        assert status == "ok", child_counts
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert counts == (N, N) and tuple(child_counts) == (N, N)
    if mode == "blocking":
        # Notification suppression: far fewer doorbells than messages.
        assert dev.rings + child_stats["rings"] < N // 10
    dev.close()
    region.close()
