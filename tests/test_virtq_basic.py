"""Virtqueue basics: layout agreement with the spec, the chain API, the mock
driver/device, batch APIs, and long runs across many index wrap-arounds."""
from __future__ import annotations

import struct
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.region import Region
from vmsgamp._core import virtq
from vmsgamp._core.virtq import (
    ChainBatch, PackedQueue, PackedQueueDriver, SplitQueue, SplitQueueDriver,
)
from vmsgamp.testing.virtq_model import need_event as ref_need_event
from vmsgamp.testing.virtq_mock import MockDevice, MockDriver


def test_layout_matches_spec():
    L = virtq.LAYOUT
    assert L["virtq_desc"] == struct.calcsize("<QIHH") == 16
    assert L["pvirtq_desc"] == 16
    assert (L["desc.addr"], L["desc.len"], L["desc.flags"], L["desc.next"]) == (0, 8, 12, 14)
    assert (L["pdesc.addr"], L["pdesc.len"], L["pdesc.id"], L["pdesc.flags"]) == (0, 8, 12, 14)
    assert (L["avail.flags"], L["avail.idx"], L["avail.ring"]) == (0, 2, 4)
    assert (L["used.flags"], L["used.idx"], L["used.ring"], L["used_elem"]) == (0, 2, 4, 8)
    assert (L["event.off_wrap"], L["event.flags"], L["event"]) == (0, 2, 4)
    assert virtq.split_area_sizes(256) == (4096, 6 + 512, 6 + 2048)
    assert virtq.packed_area_sizes(7) == (112, 4, 4)
    assert (virtq.DESC_F_NEXT, virtq.DESC_F_WRITE, virtq.DESC_F_INDIRECT) == (1, 2, 4)
    assert (virtq.DESC_F_AVAIL, virtq.DESC_F_USED) == (0x80, 0x8000)
    assert (virtq.F_INDIRECT_DESC, virtq.F_EVENT_IDX, virtq.F_RING_PACKED) == (28, 29, 34)


@pytest.mark.parametrize("event,new,old", [(0, 1, 0), (5, 5, 0), (4, 5, 0), (0xFFFF, 1, 0xFFFE),
                                           (0, 0, 0), (7, 3, 0xFFF0), (2, 2, 2), (0x8000, 0, 0x7FFF)])
def test_need_event_matches_reference(event, new, old):
    assert virtq.need_event(event, new, old) == ref_need_event(event, new, old)


def test_need_event_exhaustive_small():
    for ev in range(0, 65536, 4099):
        for new in range(0, 65536, 3001):
            for d in (0, 1, 2, 100, 65535):
                old = (new - d) & 0xFFFF
                assert virtq.need_event(ev, new, old) == ref_need_event(ev, new, old)


def _packed_rule(ev_off, ev_wrap, flags, event_idx, new_off, wrap, moved, q):
    """The packed event-suppression rule in absolute descriptor counts:
    our lap is 2 (wrap bit = lap parity), the peer's offset lies in our lap
    or the one before, and we just published positions [new - moved, new)."""
    if flags == virtq.EVENT_F_DISABLE:
        return False
    if flags != virtq.EVENT_F_DESC or not event_idx or moved >= q:
        return True
    new = 2 * q + new_off
    event = (2 if ev_wrap == wrap else 1) * q + ev_off
    return new - moved <= event < new


@settings(max_examples=3000, deadline=None)
@given(data=st.data(), q=st.sampled_from([1, 2, 3, 5, 8, 256, 32768]))
def test_packed_need_notify_matches_absolute_positions(data, q):
    """Device needs_notification and driver kick_prepare share this rule."""
    new_off = data.draw(st.integers(0, q - 1))
    moved = data.draw(st.integers(0, q + 1))
    ev_off = data.draw(st.integers(0, q - 1))
    ev_wrap, wrap, event_idx = (data.draw(st.booleans()) for _ in range(3))
    flags = data.draw(st.sampled_from([virtq.EVENT_F_ENABLE, virtq.EVENT_F_DISABLE,
                                       virtq.EVENT_F_DESC, 3]))
    ev = (flags << 16) | (ev_wrap << 15) | ev_off
    assert virtq.packed_need_notify(ev, event_idx, new_off, wrap, moved, q) == \
        _packed_rule(ev_off, ev_wrap, flags, event_idx, new_off, wrap, moved, q)


def test_public_surface():
    """Every name code outside the engine imports from vmsgamp._core.virtq,
    and every compiled module of the engine with its .pxd and .pyi."""
    names = {"ChainBatch", "DescriptorChain", "PackedQueue", "PackedQueueDriver", "QueueBrokenError",
             "QueueState", "SplitQueue", "SplitQueueDriver", "packed_area_sizes", "split_area_sizes",
             "need_event", "LAYOUT", "MAX_SIZE", "SPLIT", "PACKED", "DESC_F_NEXT", "DESC_F_WRITE",
             "DESC_F_INDIRECT", "DESC_F_AVAIL", "DESC_F_USED", "F_INDIRECT_DESC", "F_EVENT_IDX",
             "F_RING_PACKED", "AVAIL_F_NO_INTERRUPT", "USED_F_NO_NOTIFY", "EVENT_F_ENABLE",
             "EVENT_F_DISABLE", "EVENT_F_DESC"}
    assert names <= set(virtq.__all__)
    assert all(hasattr(virtq, n) for n in virtq.__all__)
    pkg = Path(virtq.__file__).parent
    for pyx in pkg.glob("*.pyx"):
        assert pyx.with_suffix(".pxd").exists() and pyx.with_suffix(".pyi").exists(), pyx.name
        assert len(pyx.read_text().splitlines()) <= 700, f"{pyx.name}: split it"


@pytest.mark.parametrize("fmt", ["split", "packed"])
@pytest.mark.parametrize("indirect", [False, True])
def test_chain_views_and_scatter(fmt, indirect):
    m = MockDriver(Region.memfd(1 << 18), fmt, size=8, indirect=indirect, buf_size=64)
    q = m.device_queue()
    assert m.add_chain([b"hello ", b"world"], [3, 5, 8], token="tok")
    c = q.pop()
    assert len(c) == 5 and c.readable_count == 2
    assert [bytes(v) for v in c.readable] == [b"hello ", b"world"]
    assert [len(v) for v in c.writable] == [3, 5, 8]
    assert c.readable_len == 11 and c.writable_len == 16
    assert c.read() == b"hello world"
    assert c.write(b"ABCDEFGHIJ") == 10
    assert c.write(b"xy", offset=10) == 2
    with pytest.raises(ValueError):
        c.write(b"12345", offset=12)
    c.writable[2][5] = ord("!")                # zero-copy write through a view
    q.add_used(c.head, 13)
    assert q.needs_notification() is True
    tok, ln, data = m.get_used()
    assert (tok, ln, data) == ("tok", 13, b"ABCDEFGHIJxy\x00")
    assert q.pop() is None


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_driver_against_mock_device(fmt):
    r = Region.memfd(1 << 18)
    al = RegionAllocator(r)
    cls = SplitQueueDriver if fmt == "split" else PackedQueueDriver
    d = cls.create(al, 4, event_idx=True, indirect=True, indirect_max=3)
    dev = MockDevice.for_driver(d)
    bufs = [al.alloc(32) for _ in range(16)]
    for i in range(50):
        d.aspace.write(bufs[0], bytes([i]) * 8)
        assert d.add([(bufs[0], 8), (bufs[1], 4)], [(bufs[2], 16)], token=("obj", i))
        assert dev.echo_all() == 1
        tok, ln = d.get_used()
        assert tok == ("obj", i) and ln == 12
        assert d.aspace.read(bufs[2], 12) == bytes([i]) * 8 + d.aspace.read(bufs[1], 4)
    # fill: indirect chains take one descriptor each
    for i in range(4):
        assert d.add([(bufs[0], 1), (bufs[1], 1)], [], i)
    assert d.num_free == 0
    assert not d.add([(bufs[0], 1)], [], 99)
    assert dev.echo_all() == 4
    assert [d.get_used()[0] for _ in range(4)] == [0, 1, 2, 3]
    assert d.get_used() is None


def test_queue_full_without_indirect_and_too_long_chain():
    r = Region.memfd(1 << 16)
    d = SplitQueueDriver.create(RegionAllocator(r), 4)
    assert d.add([(0, 1)] * 3, [], 0)
    assert not d.add([(0, 1)] * 2, [], 1)           # one descriptor left
    assert d.add([(0, 1)], [], 1)
    with pytest.raises(ValueError):
        d.add([(0, 1)] * 5, [], 2)                   # longer than the queue
    with pytest.raises(ValueError):
        d.add([], [], 2)


@pytest.mark.parametrize("fmt,size", [("split", 2), ("split", 4), ("split", 256),
                                      ("packed", 3), ("packed", 5), ("packed", 256)])
def test_many_wraparounds_per_call(fmt, size):
    """70,000 round trips of 1-3 segment chains: several u16 index wraps
    (split) and tens of thousands of wrap-counter flips (packed)."""
    r = Region.memfd(1 << 18)
    al = RegionAllocator(r)
    cls = SplitQueueDriver if fmt == "split" else PackedQueueDriver
    d = cls.create(al, size)
    q = (SplitQueue if fmt == "split" else PackedQueue)(d.aspace, size, d.desc_addr, d.driver_addr,
                                                         d.device_addr)
    out, inn = al.alloc(64), al.alloc(64)
    sent = got = 0
    total = 70_000
    pending = []
    while got < total:
        while sent < total:
            nseg = 1 + sent % min(3, size)
            outs = [(out + k, 1 + k) for k in range(max(1, nseg - 1))]
            ins = [(inn, 8)] if nseg > 1 else []
            if not d.add(outs, ins, sent):
                break
            sent += 1
        while (c := q.pop()) is not None:
            pending.append(c)
        # complete in a shuffled but deterministic order
        while pending:
            c = pending.pop(len(pending) // 2)
            q.add_used(c.head, c.writable_len)
        while (u := d.get_used()) is not None:
            got += 1
    assert not d.broken and not q.broken and d.num_free == size
    if fmt == "split":
        assert d.avail_idx == total & 0xFFFF == q.next_avail


@pytest.mark.parametrize("fmt,size,indirect", [("split", 256, False), ("split", 16, True),
                                               ("packed", 256, False), ("packed", 13, True)])
def test_batch_apis_many_wraparounds(fmt, size, indirect):
    r = Region.memfd(1 << 20)
    al = RegionAllocator(r)
    cls = SplitQueueDriver if fmt == "split" else PackedQueueDriver
    d = cls.create(al, size, indirect=indirect, indirect_max=4)
    q = (SplitQueue if fmt == "split" else PackedQueue)(d.aspace, size, d.desc_addr, d.driver_addr,
                                                         d.device_addr, indirect=indirect)
    bufs = al.alloc(4096)
    B = 32
    b = ChainBatch(B, 3 * B)
    nseg = (np.arange(B) % 3 + 1).astype(np.uint16)
    nsegs = int(nseg.sum())
    addr = (bufs + np.arange(nsegs) * 16).astype(np.uint64)
    length = np.full(nsegs, 16, np.uint32)
    writable = np.zeros(nsegs, np.uint8)
    ends = np.cumsum(nseg) - 1
    writable[ends[nseg > 1]] = 1          # last segment of multi-segment chains is writable
    tok_out = np.zeros(B, np.uint64)
    len_out = np.zeros(B, np.uint32)
    sent = got = 0
    total = 150_000
    while got < total:
        k = 0
        if sent < total:
            # burst: the first k chains of the batch fit
            k = d.add_batch(addr, length, writable, np.arange(sent, sent + B, dtype=np.uint64), nseg)
        sent += k
        n = q.pop_batch(b)
        if n:
            segs = np.diff(b.seg_start[:n + 1])
            # the writable count per chain matches what was added
            assert np.all(b.length[:b.nseg] == 16)
            q.add_used_batch(b.heads[:n], (16 * (segs > 1)).astype(np.uint32))
        m = d.get_used_batch(tok_out, len_out)
        assert np.array_equal(tok_out[:m], np.arange(got, got + m, dtype=np.uint64))
        got += m
    assert not d.broken and not q.broken


def test_get_used_batch_stops_at_object_token():
    r = Region.memfd(1 << 16)
    d = SplitQueueDriver.create(RegionAllocator(r), 8)
    q = SplitQueue(d.aspace, 8, d.desc_addr, d.driver_addr, d.device_addr)
    d.add([(0, 1)], [], 1)
    d.add([(0, 1)], [], "obj")
    d.add([(0, 1)], [], 2**70)          # too big for u64: kept as an object
    for _ in range(3):
        c = q.pop()
        q.add_used(c.head, 0)
    t, ln = np.zeros(8, np.uint64), np.zeros(8, np.uint32)
    assert d.get_used_batch(t, ln) == 1 and t[0] == 1
    assert d.get_used_batch(t, ln) == 0
    assert d.get_used() == ("obj", 0)
    assert d.get_used() == (2**70, 0)


def test_add_used_local_errors():
    r = Region.memfd(1 << 16)
    d = SplitQueueDriver.create(RegionAllocator(r), 8)
    q = SplitQueue(d.aspace, 8, d.desc_addr, d.driver_addr, d.device_addr)
    with pytest.raises(Exception):
        q.add_used(0, 0)                 # nothing popped
    with pytest.raises(ValueError):
        q.add_used(8, 0)
    r2 = Region.memfd(1 << 16)
    d2 = PackedQueueDriver.create(RegionAllocator(r2), 8)
    p = PackedQueue(d2.aspace, 8, d2.desc_addr, d2.driver_addr, d2.device_addr)
    with pytest.raises(Exception, match="not in flight"):
        p.add_used(0, 0)


def test_area_validation():
    r = Region.memfd(1 << 16)
    a = AddressSpace.identity(r)
    with pytest.raises(ValueError, match="power of two"):
        SplitQueue(a, 6, 0, 4096, 8192)
    with pytest.raises(ValueError, match="aligned"):
        SplitQueue(a, 8, 8, 4096, 8192)
    with pytest.raises(ValueError, match="aligned"):
        SplitQueue(a, 8, 0, 4096, 8194)
    with pytest.raises(ValueError, match="window"):
        SplitQueue(a, 8, 0, 4096, (1 << 16) - 16)
    with pytest.raises(ValueError, match="outside"):
        PackedQueue(a, 0, 0, 4096, 8192)
    PackedQueue(a, 7, 0, 4096, 8192)


def test_next_offset_wrap():
    r = Region.memfd(1 << 16)
    d = SplitQueueDriver.create(RegionAllocator(r), 4, start_index=0x7FFF)
    assert d.next_offset_wrap == 0x7FFF
    d.add([(0, 1)], [], 0)
    assert d.next_offset_wrap == (1 << 31) | 0
    r2 = Region.memfd(1 << 16)
    p = PackedQueueDriver.create(RegionAllocator(r2), 3)
    assert p.next_offset_wrap == (1 << 31) | 0
    p.add([(0, 1), (0, 1)], [], 0)
    assert p.next_offset_wrap == (1 << 31) | 2
    p.add([(0, 1)], [], 1)
    assert p.next_offset_wrap == 0          # wrapped: counter now 0
