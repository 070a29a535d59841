"""Indices and lengths that reach the virtqueue engine from outside: the
public batch API (the caller's arrays and counts) and a hostile driver's
chains.  Each is refused with a clean exception before any memory outside
its array or window is touched and before any allocation it would size.

Cases that crashed or allocated gigabytes on older code run in a child
process, so a crash there is this test's failure, not the end of the run."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.region import Region
from vmsgamp._core.virtq import (
    LINE, READ_LIMIT, ChainBatch, ChainTooLongError, PackedQueue,
    PackedQueueDriver, SplitQueue, SplitQueueDriver, packed_area_sizes, split_area_sizes,
)

DRIVERS = [SplitQueueDriver, PackedQueueDriver]


def run_isolated(code: str, *, timeout: float = 120) -> tuple[int, str]:
    """Run ``code`` in a fresh interpreter; (exit status, stdout + stderr)."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=timeout, cwd=os.getcwd())
    return p.returncode, p.stdout + p.stderr


def up(x: int, a: int = LINE) -> int:
    return (x + a - 1) // a * a


# ---- add_batch(ChainBatch): seg_start is the caller's ------------------------

ADD_BATCH = """
    from vmsgamp._core.addrspace import RegionAllocator
    from vmsgamp._core.region import Region
    from vmsgamp._core.virtq import ChainBatch, {cls}
    r = Region.memfd(1 << 16)
    d = {cls}.create(RegionAllocator(r), 8)
    b = ChainBatch(4)
    b.seg_start[0] = {start}
    b.seg_start[1] = {end}
    b.count = 1
    try:
        n = d.add_batch(b)
    except ValueError as e:
        print("refused:", e)
    else:
        print("added", n)
"""


@pytest.mark.parametrize("cls", ["SplitQueueDriver", "PackedQueueDriver"])
@pytest.mark.parametrize("start,end", [
    (0x8000_0000, 0x8000_0001),       # turned into a huge negative int: read 16 GiB before the array
    (0xFFFF_FFF0, 0xFFFF_FFF1),       # turned into -16: read just before the array
    (0x7FFF_FFFF, 0x8000_0000),       # past the arrays, and the end wraps negative
    (2, 1),                           # end before start
    (1000, 1001),                     # past the 16-entry segment arrays
])
def test_add_batch_seg_start_outside_arrays(cls, start, end):
    rc, out = run_isolated(ADD_BATCH.format(cls=cls, start=start, end=end))
    assert rc == 0, f"child died with status {rc}: {out}"
    assert "refused: chain 0: bad segment count" in out, out


@pytest.mark.parametrize("cls", DRIVERS)
def test_add_batch_chains_before_a_bad_one_are_added(cls):
    r = Region.memfd(1 << 16)
    d = cls.create(RegionAllocator(r), 8)
    b = ChainBatch(4)
    b.addr[:2] = [r.bus_base + 0x8000, r.bus_base + 0x8040]
    b.length[:2] = 64
    b.seg_start[:3] = [0, 1, 0x8000_0000]
    b.tokens[:2] = [7, 8]
    b.count = 2
    with pytest.raises(ValueError, match="chain 1: bad segment count"):
        d.add_batch(b)
    assert d.in_flight == 1


@pytest.mark.parametrize("cls", DRIVERS)
@pytest.mark.parametrize("count", [-1, -(1 << 31), 5])
def test_add_batch_count_outside_batch(cls, count):
    d = cls.create(RegionAllocator(Region.memfd(1 << 16)), 8)
    b = ChainBatch(4)
    b.count = count
    with pytest.raises(ValueError, match="batch count"):
        d.add_batch(b)
    assert d.in_flight == 0


# ---- add_used_batch / pop_batch / get_used_batch -----------------------------

def _popped(fmt):
    r = Region.memfd(1 << 16)
    cls = SplitQueueDriver if fmt == "split" else PackedQueueDriver
    d = cls.create(RegionAllocator(r, 0x8000), 8)
    buf = r.bus_base + 0x4000
    for i in range(3):
        assert d.add_buf(buf + 64 * i, 64, True, token=i)
    qcls = SplitQueue if fmt == "split" else PackedQueue
    q = qcls(AddressSpace.identity(r), 8, d.desc_addr, d.driver_addr, d.device_addr)
    b = ChainBatch(4)
    assert q.pop_batch(b) == 3
    return d, q, b


@pytest.mark.parametrize("fmt", ["split", "packed"])
@pytest.mark.parametrize("count", [-2, -(1 << 31)])
def test_add_used_batch_negative_count(fmt, count):
    d, q, b = _popped(fmt)
    with pytest.raises(ValueError, match="negative"):
        q.add_used_batch(b, count=count)
    with pytest.raises(ValueError, match="negative"):
        q.add_used_batch(b.heads, b.used_len, count)
    assert d.get_used() is None


@pytest.mark.parametrize("fmt", ["split", "packed"])
@pytest.mark.parametrize("bcount", [-1, -(1 << 31), 5])
def test_add_used_batch_batch_count_outside(fmt, bcount):
    d, q, b = _popped(fmt)
    b.count = bcount
    with pytest.raises(ValueError, match="outside the batch"):
        q.add_used_batch(b)
    assert d.get_used() is None
    b.count = 3
    assert q.add_used_batch(b) == 3
    assert sorted(d.get_used()[0] for _ in range(3)) == [0, 1, 2]


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_add_used_batch_count_past_arrays(fmt):
    _, q, b = _popped(fmt)
    with pytest.raises(ValueError, match="larger than the arrays"):
        q.add_used_batch(b.heads[:2], b.used_len[:2], 3)


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_pop_batch_ignores_stale_counts(fmt):
    """count and nseg are public: whatever a caller left there, pop_batch
    starts from zero and never writes past the arrays."""
    r = Region.memfd(1 << 16)
    cls = SplitQueueDriver if fmt == "split" else PackedQueueDriver
    d = cls.create(RegionAllocator(r, 0x8000), 8)
    for i in range(6):
        d.add([(r.bus_base + 64 * i, 16)], [(r.bus_base + 0x1000 + 64 * i, 16)], token=i)
    qcls = SplitQueue if fmt == "split" else PackedQueue
    q = qcls(AddressSpace.identity(r), 8, d.desc_addr, d.driver_addr, d.device_addr)
    b = ChainBatch(2, 4)
    b.count, b.nseg = -5, 1 << 30
    assert q.pop_batch(b) == 2 and b.nseg == 4
    assert list(b.seg_start[:3]) == [0, 2, 4]
    b.count, b.nseg = 7, -3
    assert q.pop_batch(b) == 2


@pytest.mark.parametrize("cls", DRIVERS)
def test_get_used_batch_huge_arrays_view(cls):
    """The count is capped by what can be in flight, not taken from the arrays."""
    r = Region.memfd(1 << 16)
    d = cls.create(RegionAllocator(r, 0x8000), 4)
    tok = np.zeros(1 << 20, np.uint64)
    ln = np.zeros(1 << 20, np.uint32)
    assert d.get_used_batch(tok, ln) == 0


def test_chain_batch_and_chain_made_directly():
    """Objects built without a queue hold no dangling state: no crash."""
    rc, out = run_isolated("""
        from vmsgamp._core.virtq import ChainBatch, DescriptorChain
        b = ChainBatch.__new__(ChainBatch)
        print("batch", b.max_chains, len(b.heads))
        c = DescriptorChain.__new__(DescriptorChain)
        for f in (lambda: c.read(), lambda: c.write(b"x"), lambda: c.readable):
            try:
                f()
            except (TypeError, ValueError) as e:
                print("refused", type(e).__name__)
    """)
    assert rc == 0, f"child died with status {rc}: {out}"
    assert "batch 256 256" in out and out.count("refused") == 3, out


@pytest.mark.parametrize("max_chains,max_segments", [(0, None), (-1, None), (4, 0), (4, -8)])
def test_chain_batch_sizes(max_chains, max_segments):
    with pytest.raises(ValueError):
        ChainBatch(max_chains, max_segments)


# ---- DescriptorChain.read(): the driver sizes the allocation ------------------

# A split queue of 4096 whose one chain is an indirect table of 4095
# descriptors that all name the same 1 MiB buffer: 4095 MiB "readable" out
# of a 4 MiB region.  The child caps its address space at 1 GiB more than it
# already uses, so code that tries to allocate it fails (MemoryError) instead
# of taking the machine's memory.
OVERLAP = """
    import resource, struct
    from vmsgamp._core.addrspace import AddressSpace
    from vmsgamp._core.region import Region
    from vmsgamp._core.virtq import SplitQueue
    Q, N, BUF = 4096, 4095, 1 << 20
    r = Region.memfd(4 << 20, bus_base=0x1000_0000)
    a = AddressSpace.identity(r)
    base = r.bus_base
    desc, avail, used, table, buf = 0, 0x10000, 0x14000, 0x20000, 0x100000
    for i in range(N):
        last = i == N - 1
        a.write(base + table + 16 * i, struct.pack("<QIHH", base + buf, BUF, 0 if last else 1,
                                                   0 if last else i + 1))
    a.write(base + desc, struct.pack("<QIHH", base + table, 16 * N, 4, 0))
    a.write(base + avail, struct.pack("<HHH", 0, 1, 0))
    q = SplitQueue(a, Q, base + desc, base + avail, base + used, indirect=True)
    c = q.pop()
    print("readable", c.readable_len)
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    try:
        data = c.read({args})
    except MemoryError:
        print("MemoryError: tried to allocate it")
    except ValueError as e:
        print("refused:", type(e).__name__, e)
    else:
        print("read", len(data))
"""


@pytest.mark.parametrize("args", ["", "max_bytes=1 << 40"])
def test_read_overlapping_segments_refused_before_allocating(args):
    rc, out = run_isolated(OVERLAP.format(args=args))
    assert rc == 0, f"child died with status {rc}: {out}"
    assert f"readable {4095 << 20}" in out, out
    assert "refused: ChainTooLongError" in out and "buffers overlap" in out, out


def test_read_limit():
    m = Region.memfd(1 << 20)
    d = SplitQueueDriver.create(RegionAllocator(m, 0x10000), 8)
    data = bytes(range(256)) * 12
    m.write(0x1000, data)
    segs = [(m.bus_base + 0x1000 + 1024 * i, 1024) for i in range(3)]
    assert d.add(segs, [], token=1)
    q = SplitQueue(AddressSpace.identity(m), 8, d.desc_addr, d.driver_addr, d.device_addr)
    c = q.pop()
    assert c.read() == data[:3072]
    assert c.read(max_bytes=3072) == data[:3072]
    with pytest.raises(ChainTooLongError, match="over the read limit of 3071") as ei:
        c.read(max_bytes=3071)
    assert isinstance(ei.value, ValueError)
    assert READ_LIMIT == 64 << 20


def test_read_capped_by_mapped_memory_even_without_a_limit():
    """Two windows of 64 KiB: a 100 KiB readable part fits (distinct
    buffers may span both); 200 KiB cannot be distinct buffers."""
    r1, r2 = Region.memfd(1 << 16, bus_base=0x10_0000), Region.memfd(1 << 16, bus_base=0x20_0000)
    ring = Region.memfd(1 << 16, bus_base=0x40_0000)
    a = AddressSpace([(0x10_0000, r1, 0, 1 << 16), (0x20_0000, r2, 0, 1 << 16),
                      (0x40_0000, ring, 0, 1 << 16)])
    assert a.mapped_bytes == 3 << 16
    d = SplitQueueDriver.create(RegionAllocator(ring), 8, aspace=a)
    q = SplitQueue(a, 8, d.desc_addr, d.driver_addr, d.device_addr)
    d.add([(0x10_0000, 1 << 16), (0x20_0000, 36 << 10)], [], token=1)
    assert len(q.pop().read(max_bytes=1 << 40)) == 100 << 10
    d.add([(0x10_0000, 1 << 16)] * 4, [], token=2)
    with pytest.raises(ChainTooLongError, match="buffers overlap"):
        q.pop().read(max_bytes=1 << 40)


def test_write_offset_cannot_wrap():
    m = Region.memfd(1 << 16)
    d = SplitQueueDriver.create(RegionAllocator(m, 0x8000), 8)
    d.add([], [(m.bus_base, 16)], token=1)
    c = SplitQueue(AddressSpace.identity(m), 8, d.desc_addr, d.driver_addr, d.device_addr).pop()
    for off in ((1 << 64) - 1, (1 << 64) - 4, 17):
        with pytest.raises(ValueError, match="do not fit"):
            c.write(b"abcdefgh", off)
    assert c.write(b"abcdefgh", 8) == 8


# ---- driver ring layout: no cache line written by both sides (issue 14) -------

@pytest.mark.parametrize("size", [1, 2, 4, 8, 16, 64, 256, 512, 1024])
@pytest.mark.parametrize("indirect", [False, True])
def test_split_create_used_ring_on_its_own_lines(size, indirect):
    r = Region.memfd(1 << 20, bus_base=0x8000_0000)
    al = RegionAllocator(r, 40)                   # start mid-line on purpose
    d = SplitQueueDriver.create(al, size, indirect=indirect, event_idx=True)
    dsz, avsz, usz = split_area_sizes(size)
    # used.idx (device) never shares a line with used_event (driver), the
    # last word of the avail ring
    assert d.device_addr % LINE == 0
    assert d.device_addr >= up(d.driver_addr + avsz)
    if usz >= 4096:
        assert d.device_addr % 4096 == 0
    # nor does avail_event (device), the last word of the used ring, share
    # one with what the driver allocates next
    after = al.alloc(1, 1)
    assert after >= up(d.device_addr + usz)
    if indirect:
        assert d.indirect_addr >= up(d.device_addr + usz)
    # descriptor table and avail ring stay as the spec aligns them
    assert d.desc_addr % 16 == 0 and d.driver_addr % 2 == 0
    assert d.driver_addr >= d.desc_addr + dsz


@pytest.mark.parametrize("size", [1, 3, 8, 256])
@pytest.mark.parametrize("indirect", [False, True])
def test_packed_create_event_areas_on_their_own_lines(size, indirect):
    r = Region.memfd(1 << 20, bus_base=0x8000_0000)
    al = RegionAllocator(r, 40)
    d = PackedQueueDriver.create(al, size, indirect=indirect, event_idx=True)
    dsz, drsz, dvsz = packed_area_sizes(size)
    assert d.driver_addr % LINE == 0 and d.device_addr % LINE == 0
    assert d.driver_addr >= up(d.desc_addr + dsz)
    assert d.device_addr >= d.driver_addr + LINE
    assert al.alloc(1, 1) >= d.device_addr + LINE
    if indirect:
        assert d.indirect_addr >= d.device_addr + LINE


@pytest.mark.parametrize("cls,qcls", [(SplitQueueDriver, SplitQueue), (PackedQueueDriver, PackedQueue)])
def test_device_takes_the_addresses_it_is_given(cls, qcls):
    """The layout is the driver's choice; a device built from the addresses
    SET_VQUEUE carries works whatever they are."""
    r = Region.memfd(1 << 18, bus_base=0x8000_0000)
    d = cls.create(RegionAllocator(r, 40), 16, event_idx=True, indirect=True)
    q = qcls(AddressSpace.identity(r), 16, d.desc_addr, d.driver_addr, d.device_addr,
             event_idx=True, indirect=True)
    buf = RegionAllocator(r, 0x20000).alloc(4096)
    r.write(buf - r.bus_base, b"ping")
    assert d.add([(buf, 4)], [(buf + 64, 8), (buf + 128, 8)], token="t")
    c = q.pop()
    assert c.read() == b"ping"
    q.add_used(c.head, c.write(b"pong"))
    assert d.get_used() == ("t", 4)
    assert r.read(buf + 64 - r.bus_base, 4) == b"pong"


def test_chain_batch_repr():
    assert repr(ChainBatch(2)) == "<ChainBatch count=0/2 nseg=0/8>"
