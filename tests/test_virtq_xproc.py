"""Two processes share one memfd Region: the driver sends 1,000,000 chains of
mixed sizes (header + data out, one echo buffer in) through a virtqueue; the
device checksums the data and echoes header, checksum and data back; the
driver checks order, tokens, lengths, checksums and every echoed byte.
Batch APIs and numpy on both sides; busy-poll (with sched_yield when idle,
so a loaded 2-core machine still makes progress), no sleeps.  Not pinned:
this is a correctness test, the benchmark pins."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import numpy as np
import pytest

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.region import Region
from vmsgamp._core.virtq import (
    ChainBatch, PackedQueue, PackedQueueDriver, SplitQueue, SplitQueueDriver,
)

N = 1_000_000
QSIZE = 256
SLOTS = 256
MAXL = 256
INSZ = 16 + MAXL
BATCH = 64
DEADLINE = 120.0
BUS = 0x2_0000_0000
STOP_OFF = 0          # u32 in the region: set by the driver when done / failing


def _pattern(seqs: np.ndarray) -> np.ndarray:
    j = np.arange(MAXL, dtype=np.uint64)
    return ((seqs[:, None].astype(np.uint64) * 131 + j * 7 + (seqs[:, None] >> 8)) & 0xFF).astype(np.uint8)


def _lengths(seqs: np.ndarray) -> np.ndarray:
    # mixed sizes: mostly small, some full-size, a few single bytes
    h = (seqs.astype(np.uint64) * 0x9E3779B97F4A7C15) >> np.uint64(40)
    small = (h % 64 + 1).astype(np.uint32)
    big = (h % MAXL + 1).astype(np.uint32)
    return np.where(h % 4 == 0, big, np.where(h % 7 == 0, 1, small)).astype(np.uint32)


def _device(fd, fmt, layout, conn):
    qsize = layout["qsize"]
    try:
        region = Region.from_fd(fd, layout["size"], bus_base=BUS)
        aspace = AddressSpace.identity(region)
        cls = SplitQueue if fmt == "split" else PackedQueue
        q = cls(aspace, qsize, layout["desc"], layout["drv"], layout["dev"], indirect=layout["indirect"])
        mem = np.frombuffer(region, np.uint8)
        data2d = mem[layout["data"]:layout["data"] + SLOTS * MAXL].reshape(SLOTS, MAXL)
        in2d = mem[layout["in"]:layout["in"] + SLOTS * INSZ].reshape(SLOTS, INSZ)
        hdr64 = mem[layout["hdr"]:layout["hdr"] + SLOTS * 16].view("<u8").reshape(SLOTS, 2)
        cols = np.arange(MAXL)
        b = ChainBatch(BATCH, 3 * BATCH)
        done = 0
        deadline = time.monotonic() + DEADLINE
        spins = 0
        while done < N:
            n = q.pop_batch(b)
            if n == 0:
                spins += 1
                if spins & 0x3F == 0:
                    # not a sleep: lets a peer that shares this CPU (busy
                    # machine) run instead of us spinning out our slice
                    os.sched_yield()
                if spins & 0xFFF == 0 and (region.load32(STOP_OFF) or time.monotonic() > deadline):
                    raise RuntimeError(f"device stopped after {done} chains")
                continue
            assert b.nseg == 3 * n, "every chain is header + data + echo buffer"
            assert np.array_equal(b.writable[:3 * n].reshape(n, 3), np.tile([0, 0, 1], (n, 1)))
            off = b.offset[:3 * n].reshape(n, 3).astype(np.int64)
            ln = b.length[:3 * n].reshape(n, 3)
            assert np.all(ln[:, 0] == 16)
            L = ln[:, 1]
            hslot = (off[:, 0] - layout["hdr"]) // 16
            dslot = (off[:, 1] - layout["data"]) // MAXL
            islot = (off[:, 2] - layout["in"]) // INSZ
            rows = data2d[dslot]
            mask = cols[None, :] < L[:, None]
            csum = np.where(mask, rows, 0).sum(axis=1, dtype=np.uint64)
            echo = in2d[islot]
            echo[:, :16] = np.stack([hdr64[hslot, 0], csum], axis=1).astype("<u8").view(np.uint8)
            echo[:, 16:] = np.where(mask, rows, echo[:, 16:])
            in2d[islot] = echo
            q.add_used_batch(b.heads[:n], (L + 16).astype(np.uint32))
            done += n
        conn.send(("ok", done))
    except BaseException:
        conn.send(("err", traceback.format_exc()))
    finally:
        conn.close()


def _run(fmt, indirect, qsize=QSIZE):
    size = 8 << 20
    region = Region.memfd(size, bus_base=BUS)
    al = RegionAllocator(region, 64)
    cls = SplitQueueDriver if fmt == "split" else PackedQueueDriver
    drv = cls.create(al, qsize, indirect=indirect, indirect_max=4)
    hdr = al.alloc(SLOTS * 16, 64) - BUS
    data = al.alloc(SLOTS * MAXL, 64) - BUS
    inn = al.alloc(SLOTS * INSZ, 64) - BUS
    layout = dict(size=size, qsize=qsize, desc=drv.desc_addr, drv=drv.driver_addr, dev=drv.device_addr,
                  indirect=indirect, hdr=hdr, data=data, **{"in": inn})
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_device, args=(region.fd, fmt, layout, child))
    p.start()
    child.close()
    try:
        mem = np.frombuffer(region, np.uint8)
        data2d = mem[data:data + SLOTS * MAXL].reshape(SLOTS, MAXL)
        in2d = mem[inn:inn + SLOTS * INSZ].reshape(SLOTS, INSZ)
        hdr64 = mem[hdr:hdr + SLOTS * 16].view("<u8").reshape(SLOTS, 2)
        cols = np.arange(MAXL)
        free = list(range(SLOTS))
        sent = recvd = 0
        addr = np.zeros(3 * BATCH, np.uint64)
        length = np.zeros(3 * BATCH, np.uint32)
        writable = np.tile(np.array([0, 0, 1], np.uint8), BATCH)
        nseg = np.full(BATCH, 3, np.uint16)
        toks = np.zeros(BATCH, np.uint64)
        tok_out = np.zeros(BATCH, np.uint64)
        len_out = np.zeros(BATCH, np.uint32)
        deadline = time.monotonic() + DEADLINE
        spins = 0
        while recvd < N:
            nb = min(len(free), BATCH, N - sent)
            if nb:
                slots = np.array(free[-nb:], np.int64)
                seqs = np.arange(sent, sent + nb, dtype=np.uint64)
                L = _lengths(seqs)
                data2d[slots] = _pattern(seqs)
                hdr64[slots, 0] = seqs
                hdr64[slots, 1] = 0
                a = addr[:3 * nb].reshape(nb, 3)
                a[:, 0] = BUS + hdr + slots * 16
                a[:, 1] = BUS + data + slots * MAXL
                a[:, 2] = BUS + inn + slots * INSZ
                ll = length[:3 * nb].reshape(nb, 3)
                ll[:, 0] = 16
                ll[:, 1] = L
                ll[:, 2] = 16 + L
                toks[:nb] = (seqs << np.uint64(8)) | slots.astype(np.uint64)
                k = drv.add_batch(addr[:3 * nb], length[:3 * nb], writable[:3 * nb], toks[:nb], nseg[:nb])
                if k:
                    del free[len(free) - nb:len(free) - nb + k]
                    sent += k
            n = drv.get_used_batch(tok_out, len_out)
            if n == 0:
                spins += 1
                if spins & 0x3F == 0:
                    os.sched_yield()
                if spins & 0xFFF == 0:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"timeout: {recvd} of {N} chains came back")
                    if parent.poll():
                        raise AssertionError(f"device died: {parent.recv()}")
                continue
            t = tok_out[:n]
            seqs = t >> np.uint64(8)
            slots = (t & np.uint64(0xFF)).astype(np.int64)
            expect = np.arange(recvd, recvd + n, dtype=np.uint64)
            assert np.array_equal(seqs, expect), f"order/loss: got {seqs[:8]} expected {expect[:8]}"
            L = _lengths(seqs)
            assert np.array_equal(len_out[:n], L + 16), "used lengths"
            pat = _pattern(seqs)
            mask = cols[None, :] < L[:, None]
            csum = np.where(mask, pat, 0).sum(axis=1, dtype=np.uint64)
            echo = in2d[slots]
            eh = echo[:, :16].copy().view("<u8")
            assert np.array_equal(eh[:, 0], seqs), "echoed sequence numbers"
            assert np.array_equal(eh[:, 1], csum), "device checksums"
            assert np.all((echo[:, 16:] == pat) | ~mask), "echoed data"
            free.extend(slots.tolist())
            recvd += n
        status = parent.recv()
        assert status == ("ok", N), status
        assert not drv.broken and drv.num_free == qsize
    finally:
        region.store32(STOP_OFF, 1)
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    assert p.exitcode == 0


# Without indirect a chain takes 3 descriptors: a 1024 ring keeps ~256 chains
# in flight (the buffer slots), as the 256 ring with indirect does.  Deep
# queues keep a loaded 2-core machine from crawling.
@pytest.mark.slow
@pytest.mark.parametrize("fmt,indirect,qsize", [("split", False, 1024), ("packed", True, 256)])
def test_million_chains_echo(fmt, indirect, qsize):
    _run(fmt, indirect, qsize)
