"""Hostile peers: every corruption is detected, the queue is marked broken
with a readable reason, later calls keep raising, and nothing loops or
touches memory outside the windows."""
from __future__ import annotations


import numpy as np
import pytest

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.region import Region
from vmsgamp._core.virtq import (
    ChainBatch, PackedQueue, PackedQueueDriver, QueueBrokenError, QueueState, SplitQueue,
    SplitQueueDriver,
)
from vmsgamp.testing.virtq_mock import MockDriver

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 0x80, 0x8000
BUS = 0x8000_0000


def split_mock(indirect=True, size=8):
    m = MockDriver(Region.memfd(1 << 16, bus_base=BUS), "split", size=size, indirect=indirect, buf_size=512)
    return m, m.device_queue()


def packed_mock(indirect=True, size=8):
    m = MockDriver(Region.memfd(1 << 16, bus_base=BUS), "packed", size=size, indirect=indirect, buf_size=512)
    return m, m.device_queue()


def publish_split(m, heads):
    for i, h in enumerate(heads):
        m.write_avail(i, h)
    m.set_avail_idx(len(heads))


def broken(q, fragment):
    with pytest.raises(QueueBrokenError) as ei:
        q.pop()
    assert q.broken
    assert fragment in q.broken_reason, q.broken_reason
    assert fragment in str(ei.value)
    # stays broken, still no crash
    with pytest.raises(QueueBrokenError):
        q.pop()
    with pytest.raises(QueueBrokenError):
        q.pop_batch(ChainBatch(4))
    return q.broken_reason


# ---- split, device side ------------------------------------------------------

def test_split_loop():
    m, q = split_mock()
    b = m.buffer()
    m.write_desc(0, b, 16, NEXT, 1)
    m.write_desc(1, b, 16, NEXT, 0)
    publish_split(m, [0])
    broken(q, "longer than the queue")


def test_split_self_loop_in_indirect_table():
    m, q = split_mock()
    b, t = m.buffer(), m.buffer()
    for i in range(4):
        m.write_desc(i, b, 8, NEXT, (i + 1) % 4, table=t)
    m.write_desc(0, t, 64, INDIRECT)
    publish_split(m, [0])
    broken(q, "longer than the queue")


def test_split_indirect_table_longer_than_queue():
    m, q = split_mock(size=4)
    t = m.buffer()
    m.write_desc(0, t, 16 * 5, INDIRECT)
    publish_split(m, [0])
    broken(q, "indirect table of 80 bytes")


@pytest.mark.parametrize("ln", [0, 24])
def test_split_indirect_bad_length(ln):
    m, q = split_mock()
    m.write_desc(0, m.buffer(), ln, INDIRECT)
    publish_split(m, [0])
    broken(q, "not a non-zero multiple of 16")


def test_split_nested_indirect():
    m, q = split_mock()
    t1, t2 = m.buffer(), m.buffer()
    m.write_desc(0, t2, 16, INDIRECT, table=t1)
    m.write_desc(0, m.buffer(), 8, 0, table=t2)
    m.write_desc(0, t1, 16, INDIRECT)
    publish_split(m, [0])
    broken(q, "INDIRECT descriptor inside an indirect table")


def test_split_next_and_indirect():
    m, q = split_mock()
    t = m.buffer()
    m.write_desc(0, m.buffer(), 8, 0, table=t)
    m.write_desc(0, t, 16, INDIRECT | NEXT, 1)
    m.write_desc(1, m.buffer(), 8, 0)
    publish_split(m, [0])
    broken(q, "both NEXT and INDIRECT")


def test_split_indirect_not_negotiated():
    m, q = split_mock(indirect=False)
    t = m.buffer()
    m.write_desc(0, m.buffer(), 8, 0, table=t)
    m.write_desc(0, t, 16, INDIRECT)
    publish_split(m, [0])
    broken(q, "VIRTIO_F_INDIRECT_DESC was not negotiated")


def test_split_indirect_table_outside():
    m, q = split_mock()
    m.write_desc(0, BUS + (1 << 20), 32, INDIRECT)
    publish_split(m, [0])
    broken(q, "indirect table")


def test_split_address_wraps_u64():
    m, q = split_mock()
    m.write_desc(0, 2**64 - 16, 32, 0)
    publish_split(m, [0])
    broken(q, "overflow")


def test_split_writable_lengths_overflow_u32():
    """Two writable buffers, each inside a (sparse) 4 GiB window, whose
    lengths add up past the u32 used.len."""
    r = Region.memfd((1 << 32) + (1 << 16), bus_base=BUS)
    m = MockDriver(r, "split", size=8, nbufs=2, buf_size=64)
    q = m.device_queue()
    m.write_desc(0, BUS, 0x8000_0001, WRITE | NEXT, 1)
    m.write_desc(1, BUS, 0x8000_0001, WRITE, 0)
    publish_split(m, [0])
    broken(q, "overflow")


@pytest.mark.parametrize("addr,ln", [(0, 16), (BUS - 8, 16), (BUS + (1 << 16) - 8, 16),
                                     (BUS + (1 << 16) + 1, 0), (BUS, 1 << 17)])
def test_split_buffer_outside_windows(addr, ln):
    m, q = split_mock()
    m.write_desc(0, addr, ln, 0)
    publish_split(m, [0])
    broken(q, "not inside one window")


def test_split_writable_buffer_in_read_only_window():
    r = Region.memfd(1 << 16, bus_base=BUS)
    m = MockDriver(r, "split", size=8)
    ro = Region.from_fd(r.fd, 4096, readonly=True)
    aspace = AddressSpace([(BUS, r, 0, 1 << 16), (0x1_0000_0000, ro, 0, 4096)])
    q = SplitQueue(aspace, 8, m.desc_addr, m.driver_addr, m.device_addr)
    m.write_desc(0, 0x1_0000_0000, 64, 0, 1)     # readable there: fine
    publish_split(m, [0])
    c = q.pop()
    assert c.read() == r.read(0, 64)
    q.add_used(c.head, 0)
    m.write_desc(1, 0x1_0000_0000, 64, WRITE)
    m.write_avail(1, 1)
    m.set_avail_idx(2)
    broken(q, "read-only window")


def test_split_readable_after_writable():
    m, q = split_mock()
    m.write_desc(0, m.buffer(), 8, WRITE | NEXT, 1)
    m.write_desc(1, m.buffer(), 8, 0)
    publish_split(m, [0])
    broken(q, "device-readable descriptor after a device-writable one")


def test_split_head_out_of_range():
    m, q = split_mock()
    publish_split(m, [8])
    broken(q, "head descriptor index 8")


def test_split_next_out_of_range():
    m, q = split_mock()
    m.write_desc(0, m.buffer(), 8, NEXT, 9)
    publish_split(m, [0])
    broken(q, "descriptor next 9")


@pytest.mark.parametrize("idx", [9, 0x8000, 0xFFFF])
def test_split_avail_index_jump(idx):
    m, q = split_mock()
    m.set_avail_idx(idx)
    broken(q, "avail.idx moved")


def test_split_avail_jump_counts_unreturned_chains():
    """Chains popped but not used still occupy the ring."""
    m, q = split_mock(size=4)
    for i in range(4):
        assert m.add_chain([b"x"])
    for _ in range(4):
        q.pop()
    m.set_avail_idx(5)           # a fifth chain while four are not returned
    broken(q, "avail.idx moved")


def test_split_batch_returns_good_chains_before_corruption():
    m, q = split_mock()
    assert m.add_chain([b"ok"], token=1)
    m.write_desc(7, 0, 16, 0)             # outside every window
    m.write_avail(1, 7)
    m.set_avail_idx(2)
    b = ChainBatch(8)
    assert q.pop_batch(b) == 1 and q.broken
    assert "not inside one window" in q.broken_reason
    with pytest.raises(QueueBrokenError):
        q.pop_batch(b)


def test_mark_broken_from_outside():
    m, q = split_mock()
    q.mark_broken("transport saw garbage")
    with pytest.raises(QueueBrokenError, match="transport saw garbage"):
        q.pop()


# ---- packed, device side -----------------------------------------------------

def packed_desc(m, i, addr, ln, bid, flags, wrap=1):
    m.write_desc(i, addr, ln, flags | (AVAIL if wrap else USED), bid)


def test_packed_contradicting_wrap_bits():
    m, q = packed_mock()
    b = m.buffer()
    m.write_desc(1, b, 8, USED, 0)                  # wrap 0 format inside a wrap-1 chain
    packed_desc(m, 0, b, 8, 0, NEXT)
    broken(q, "contradict wrap counter")


def test_packed_chain_longer_than_queue():
    m, q = packed_mock(size=4)
    b = m.buffer()
    # every descriptor says NEXT, across the wrap too
    for i in range(1, 4):
        packed_desc(m, i, b, 8, 0, NEXT)
    packed_desc(m, 0, b, 8, 0, NEXT)
    with pytest.raises(QueueBrokenError):
        q.pop()
    assert "longer than the queue" in q.broken_reason or "contradict" in q.broken_reason


def test_packed_buffer_id_out_of_range():
    m, q = packed_mock()
    packed_desc(m, 0, m.buffer(), 8, 8, 0)
    broken(q, "buffer id 8")


def test_packed_buffer_id_in_flight_twice():
    m, q = packed_mock()
    b = m.buffer()
    packed_desc(m, 0, b, 8, 3, 0)
    assert q.pop().head == 3
    packed_desc(m, 1, b, 8, 3, 0)
    broken(q, "while still in flight")


def test_packed_more_than_queue_size_available():
    m, q = packed_mock(size=4)
    b = m.buffer()
    packed_desc(m, 1, b, 8, 0, NEXT)
    packed_desc(m, 2, b, 8, 0, 0)
    packed_desc(m, 0, b, 8, 0, NEXT)
    assert q.pop().head == 0                 # 3 descriptors outstanding
    # a 2-descriptor chain at slot 3 wrapping to slot 0, which the device
    # still owns: 5 descriptors for a ring of 4
    packed_desc(m, 0, b, 8, 1, 0, wrap=0)
    packed_desc(m, 3, b, 8, 1, NEXT)
    broken(q, "more than the queue size")


def test_packed_nested_indirect_and_next_indirect():
    m, q = packed_mock()
    t = m.buffer()
    m.write_desc(0, m.buffer(), 16, INDIRECT, table=t)
    packed_desc(m, 0, t, 16, 0, INDIRECT)
    broken(q, "inside an indirect table")
    m, q = packed_mock()
    packed_desc(m, 0, m.buffer(), 16, 0, INDIRECT | NEXT)
    broken(q, "both NEXT and INDIRECT")


def test_packed_indirect_not_negotiated():
    m, q = packed_mock(indirect=False)
    packed_desc(m, 0, m.buffer(), 16, 0, INDIRECT)
    broken(q, "not negotiated")


def test_packed_address_outside():
    m, q = packed_mock()
    packed_desc(m, 0, 0x10, 8, 0, 0)
    broken(q, "not inside one window")


def test_packed_leftover_of_previous_lap_is_not_available():
    """A slot holding last lap's available-format flags is simply 'not yet'."""
    m, q = packed_mock(size=2)
    assert m.add_chain([b"a", b"b"]) and q.pop() is not None
    # slot 1 still holds the wrap-1 available flags of the chain's tail
    q.add_used(0, 0)
    m.get_used()
    assert q.pop() is None and not q.broken


# ---- driver side: a hostile device --------------------------------------------

def driver(fmt, size=4):
    r = Region.memfd(1 << 16, bus_base=BUS)
    al = RegionAllocator(r)
    cls = SplitQueueDriver if fmt == "split" else PackedQueueDriver
    d = cls.create(al, size)
    return d, al, r


def test_split_driver_used_index_jump():
    d, al, r = driver("split")
    b = al.alloc(64)
    assert d.add([(b, 8)], [], "t")
    r.store16(d.device_addr - BUS + 2, 2)
    with pytest.raises(QueueBrokenError, match="used.idx moved"):
        d.get_used()
    assert d.broken


def test_split_driver_used_id_not_in_flight():
    d, al, r = driver("split")
    b = al.alloc(64)
    assert d.add([(b, 8)], [], "t")     # head 0
    off = d.device_addr - BUS
    r.store32(off + 4, 3)
    r.store16(off + 2, 1)
    with pytest.raises(QueueBrokenError, match="used id 3 is not a chain in flight"):
        d.get_used()


def test_split_driver_used_len_too_big():
    d, al, r = driver("split")
    b = al.alloc(64)
    assert d.add([(b, 8)], [(b, 16)], "t")
    off = d.device_addr - BUS
    r.store32(off + 4, 0)
    r.store32(off + 8, 17)
    r.store16(off + 2, 1)
    with pytest.raises(QueueBrokenError, match="used len 17 larger than the 16"):
        d.get_used()


def test_packed_driver_used_with_nothing_in_flight():
    d, al, r = driver("packed")
    r.store16(d.desc_addr - BUS + 14, AVAIL | USED)
    with pytest.raises(QueueBrokenError, match="nothing is in flight"):
        d.get_used()


def test_packed_driver_used_id_and_len():
    d, al, r = driver("packed")
    b = al.alloc(64)
    assert d.add([(b, 8)], [(b, 4)], "t")   # id 0 at slot 0,1
    off = d.desc_addr - BUS
    r.store16(off + 12, 2)
    r.store32(off + 8, 0)
    r.store16(off + 14, AVAIL | USED)
    with pytest.raises(QueueBrokenError, match="used id 2"):
        d.get_used()
    d, al, r = driver("packed")
    assert d.add([(b, 8)], [(b, 4)], "t")
    r.store16(off + 12, 0)
    r.store32(off + 8, 5)
    r.store16(off + 14, AVAIL | USED)
    with pytest.raises(QueueBrokenError, match="used len 5"):
        d.get_used_batch(np.zeros(4, np.uint64), np.zeros(4, np.uint32))


# ---- untrusted state ----------------------------------------------------------

def test_split_state_validation():
    m, q = split_mock()
    s = q.state()
    SplitQueue.from_state(m.aspace, s)
    bad = [
        dict(next_avail=70000), dict(next_used=-1), dict(next_avail=9, next_used=0),
        dict(size=6), dict(size=65536), dict(desc_addr=s.desc_addr + 8),
        dict(desc_addr=BUS + (1 << 16) - 16), dict(format="packed"), dict(signalled_used=1 << 16),
        dict(size="8"), dict(next_avail=1.5), dict(desc_addr=1 << 64), dict(size=True),
        dict(inflight=((0, 1),)), dict(desc_addr=-16),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            SplitQueue.from_state(m.aspace, QueueState(**{**s.__dict__, **kw}))
    # wrapping indices are fine
    SplitQueue.from_state(m.aspace, QueueState(**{**s.__dict__, "next_avail": 3, "next_used": 0xFFFE}))


def test_packed_state_validation():
    m, q = packed_mock()
    s = q.state()
    PackedQueue.from_state(m.aspace, s)
    bad = [
        dict(next_avail=8), dict(next_avail=2, next_used=3), dict(next_avail=3),
        dict(next_avail=3, inflight=((0, 2),)), dict(next_avail=2, inflight=((8, 2),)),
        dict(next_avail=2, inflight=((1, 1), (1, 1))), dict(next_avail=1, inflight=((0, 0), (1, 1))),
        dict(avail_wrap=False, next_avail=4, next_used=2),
        dict(inflight=5), dict(next_avail=2, inflight=((0,),)), dict(next_avail=2, inflight=(("a", 2),)),
        dict(size=0),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            PackedQueue.from_state(m.aspace, QueueState(**{**s.__dict__, **kw}))
    q2 = PackedQueue.from_state(m.aspace, QueueState(**{**s.__dict__, "next_avail": 2,
                                                        "inflight": ((5, 2),)}))
    q2.add_used(5, 0)
    assert q2.state().inflight == ()


# ---- closed address space -----------------------------------------------------

def test_closed_address_space_refuses_work():
    m, q = split_mock()
    assert m.add_chain([b"abc"], [8])
    c = q.pop()
    m.aspace.close()
    with pytest.raises(ValueError, match="closed"):
        q.pop()
    with pytest.raises(ValueError, match="closed"):
        c.read()


# ---- fuzz: random ring contents, Cython device vs the reference device ---------

import hypothesis.strategies as st  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402

from vmsgamp.testing.virtq_model import RefBroken, RefPackedDevice, RefSplitDevice  # noqa: E402

FUZZ_BUF = BUS + 0x8000    # a valid buffer area inside the window


def _desc_strategy(size):
    # mostly plausible descriptors, sometimes wild ones
    valid = st.integers(FUZZ_BUF, FUZZ_BUF + 0x1000)
    addr = st.one_of(valid, valid, valid, valid, st.integers(0, 2**64 - 1), st.just(BUS + (1 << 16) - 8))
    small = st.integers(0, 64)
    ln = st.one_of(small, small, small, st.sampled_from([16, 32, 48, 0xFFFF_FFFF, 0x8000_0000]))
    plain = st.sampled_from([0, NEXT, WRITE, WRITE | NEXT])
    flags = st.one_of(plain, plain, plain, st.integers(0, 7))
    packed_bits = st.sampled_from([AVAIL, AVAIL, AVAIL, USED, AVAIL | USED, 0])
    other = st.one_of(st.integers(0, size - 1), st.integers(0, size - 1), st.integers(0, 0xFFFF))
    return st.tuples(addr, ln, st.tuples(flags, packed_bits).map(lambda t: t[0] | t[1]), other)


def _drain(dev, ref):
    """Pop until empty or broken on both; results must agree exactly."""
    for _ in range(64):
        try:
            r = ref.pop()
            rerr = None
        except RefBroken as e:
            r, rerr = None, e
        try:
            c = dev.pop()
            cerr = None
        except QueueBrokenError as e:
            c, cerr = None, e
        assert (rerr is None) == (cerr is None), (rerr, cerr)
        if cerr is not None:
            assert dev.broken and dev.broken_reason
            event("broken: " + dev.broken_reason.split(" ")[0])
            return
        assert (c is None) == (r is None)
        if c is None:
            event("drained cleanly")
            return
        event("popped a chain")
        assert c.head == r.head
        assert c.segments == [(a, n, False) for a, n in r.readable] + [(a, n, True) for a, n in r.writable]
        dev.add_used(c.head, 0)
        ref.add_used(r.head, 0)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.sampled_from([2, 4, 8]), indirect=st.booleans())
def test_fuzz_split_device(data, size, indirect):
    r = Region.memfd(1 << 16, bus_base=BUS)
    m = MockDriver(r, "split", size=size, indirect=indirect, buf_size=64, nbufs=1)
    dev = m.device_queue()
    ref = RefSplitDevice(m.aspace, size, m.desc_addr, m.driver_addr, m.device_addr, indirect=indirect)
    table = FUZZ_BUF + 0x800     # an indirect table some descriptors may point at
    for i, (a, ln, f, nx) in enumerate(data.draw(st.lists(_desc_strategy(size), min_size=size,
                                                          max_size=size))):
        m.write_desc(i, a, ln, f & 7, nx)
    for i, (a, ln, f, nx) in enumerate(data.draw(st.lists(_desc_strategy(size), max_size=6))):
        m.write_desc(i, a, ln, f & 7, nx, table=table)
    if data.draw(st.booleans()):
        m.write_desc(0, table, 16 * data.draw(st.integers(0, 8)), INDIRECT)
    heads = st.one_of(st.integers(0, size - 1), st.integers(0, size - 1), st.integers(0, 0xFFFF))
    for s, h in enumerate(data.draw(st.lists(heads, min_size=size, max_size=size))):
        m.write_avail(s, h)
    idx = st.integers(0, size)
    m.set_avail_idx(data.draw(st.one_of(idx, idx, idx, st.integers(0, 0xFFFF))))
    _drain(dev, ref)
    m.close()
    r.close()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.sampled_from([2, 3, 4, 8]), indirect=st.booleans())
def test_fuzz_packed_device(data, size, indirect):
    r = Region.memfd(1 << 16, bus_base=BUS)
    m = MockDriver(r, "packed", size=size, indirect=indirect, buf_size=64, nbufs=1)
    dev = m.device_queue()
    ref = RefPackedDevice(m.aspace, size, m.desc_addr, m.driver_addr, m.device_addr, indirect=indirect)
    table = FUZZ_BUF + 0x800
    for i, (a, ln, f, bid) in enumerate(data.draw(st.lists(_desc_strategy(size), min_size=size,
                                                           max_size=size))):
        m.write_desc(i, a, ln, f, bid)
    for i, (a, ln, f, bid) in enumerate(data.draw(st.lists(_desc_strategy(size), max_size=6))):
        m.write_desc(i, a, ln, f, bid, table=table)
    if data.draw(st.booleans()):
        m.write_desc(0, table, 16 * data.draw(st.integers(0, 8)), INDIRECT | AVAIL, data.draw(st.integers(0, size)))
    _drain(dev, ref)
    m.close()
    r.close()
