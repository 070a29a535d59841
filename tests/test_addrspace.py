"""AddressSpace: bounds-checked bus -> Region translation, and the allocator."""
from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from vmsgamp._core.addrspace import AddressError, AddressSpace, RegionAllocator
from vmsgamp._core.region import Region

PAGE = 4096


@pytest.fixture
def regions():
    a, b = Region.memfd(4 * PAGE, bus_base=0x1000_0000), Region.memfd(2 * PAGE)
    yield a, b
    a.close()
    b.close()


def test_identity_window(regions):
    a, _ = regions
    s = AddressSpace.identity(a)
    assert s.windows == [(0x1000_0000, a, 0, 4 * PAGE)]
    assert s.translate(0x1000_0010, 16) == (a, 16)
    s.write(0x1000_0010, b"hello")
    assert a.read(16, 5) == b"hello"
    assert s.read(0x1000_0010, 5) == b"hello"
    v = s.view(0x1000_0010, 5)
    assert bytes(v) == b"hello"
    v.release()


def test_edges(regions):
    a, b = regions
    s = AddressSpace([(0x1000, a, PAGE, PAGE), (0x9000, b, 0, 2 * PAGE)])
    assert s.translate(0x1000, PAGE) == (a, PAGE)
    assert s.translate(0x1FFF, 1) == (a, 2 * PAGE - 1)
    assert s.translate(0x2000, 0) == (a, 2 * PAGE)          # empty range at the end
    for addr, n in [(0xFFF, 1), (0x1FFF, 2), (0x1000, PAGE + 1), (0x2000, 1), (0x8FFF, 2),
                    (0x9000, 2 * PAGE + 1), (2**64 - 1, 2), (0, 0), (0x1800, 2**64 - 1)]:
        with pytest.raises(AddressError):
            s.translate(addr, n)
        assert not s.contains(addr, n)


def test_range_spanning_two_adjacent_windows_is_refused(regions):
    a, b = regions
    s = AddressSpace([(0x1000, a, 0, PAGE), (0x2000, b, 0, PAGE)])
    s.translate(0x1000, PAGE)
    s.translate(0x2000, PAGE)
    with pytest.raises(AddressError):
        s.translate(0x1FF0, 32)


@pytest.mark.parametrize("base,length", [(0x1000, PAGE), (0x1800, 16), (0x0, 0x1001), (0x1FFF, 1),
                                         (0x800, 0x2000)])
def test_overlap_rejected(regions, base, length):
    a, b = regions
    s = AddressSpace([(0x1000, a, 0, PAGE)])
    with pytest.raises(ValueError, match="overlaps"):
        s.add_window(base, b, 0, length)


def test_window_must_fit_its_region(regions):
    a, _ = regions
    s = AddressSpace()
    with pytest.raises(ValueError):
        s.add_window(0, a, 0, 4 * PAGE + 1)
    with pytest.raises(ValueError):
        s.add_window(0, a, 4 * PAGE, 1)
    with pytest.raises(ValueError):
        s.add_window(2**64 - 16, a, 0, 32)
    with pytest.raises(ValueError):
        s.add_window(0, a, 0, 0)


def test_read_only_window_refuses_writes(regions):
    a, _ = regions
    ro = Region.from_fd(a.fd, PAGE, readonly=True)
    s = AddressSpace([(0, ro, 0, PAGE)])
    s.translate(0, 16)
    with pytest.raises(AddressError):
        s.translate(0, 16, write=True)
    ro.close()


def test_close_unpins_and_refuses(regions):
    a, _ = regions
    s = AddressSpace.identity(a)
    a.close()
    assert a.mapped            # pinned: unmap deferred
    s.close()
    assert not a.mapped
    with pytest.raises(ValueError):
        s.translate(0x1000_0000, 1)
    s.close()                  # idempotent


@settings(max_examples=300, deadline=None)
@given(wins=st.lists(st.tuples(st.integers(0, 64), st.integers(1, 16), st.integers(0, 8)),
                     min_size=1, max_size=5),
       probes=st.lists(st.tuples(st.integers(0, 90 * 256), st.integers(0, 20 * 256)), max_size=30))
def test_translate_matches_model(wins, probes):
    r = Region.memfd(32 * 256)
    s = AddressSpace()
    model = []
    for slot, ln, off in wins:
        base, ln, off = slot * 256, ln * 256, off * 256
        overl = any(base < b + l and b < base + ln for b, l, _ in model)
        if overl:
            with pytest.raises(ValueError):
                s.add_window(base, r, off, ln)
        else:
            s.add_window(base, r, off, ln)
            model.append((base, ln, off))
    for addr, n in probes:
        hit = [(b, l, o) for b, l, o in model if b <= addr and addr + n <= b + l]
        if hit:
            b, l, o = hit[0]
            assert s.translate(addr, n) == (r, o + addr - b)
        else:
            with pytest.raises(AddressError):
                s.translate(addr, n)
    s.close()
    r.close()


def test_allocator_alignment_and_exhaustion():
    r = Region.memfd(PAGE, bus_base=0x4000_0008)   # bus_base deliberately misaligned
    al = RegionAllocator(r, bus_base=0x4000_0000)
    a1 = al.alloc(3, 1)
    a2 = al.alloc(16, 16)
    assert a2 % 16 == 0 and a2 >= a1 + 3
    a3 = al.alloc(100, 64)
    assert a3 % 64 == 0
    assert al.offset_of(a3) == a3 - 0x4000_0000
    with pytest.raises(MemoryError):
        al.alloc(PAGE, 16)
    with pytest.raises(ValueError):
        al.alloc(8, 3)
    al.reset()
    assert al.alloc(16, 16) == 0x4000_0000
    r.close()
