import os

import pytest

from vmsgamp._core.region import ACQUIRE, RELEASE, SEQ_CST, Region


def test_typed_access_little_endian_and_orders():
    r = Region.memfd(4096)
    r.store64(8, 0x1122334455667788, RELEASE)
    assert r.read(8, 8) == bytes.fromhex("8877665544332211")
    assert r.load64(8, ACQUIRE) == 0x1122334455667788
    assert r.load32(8, "relaxed") == 0x55667788
    assert r.load16(12, SEQ_CST) == 0x3344
    assert r.load8(15) == 0x11
    r.store16(2, 0xBEEF, "release")
    assert r.load16(2, "acquire") == 0xBEEF
    r.close()


@pytest.mark.parametrize("call", [
    lambda r: r.load32(4094),          # crosses the end
    lambda r: r.load8(4096),           # past the end
    lambda r: r.store64(1 << 40, 1),   # far away
    lambda r: r.read(4000, 200),
    lambda r: r.write(4095, b"ab"),
    lambda r: r.view(4090, 10),
])
def test_out_of_bounds_is_an_error(call):
    r = Region.memfd(4096)
    with pytest.raises(IndexError):
        call(r)
    r.close()


def test_unaligned_and_bad_orders_refused():
    r = Region.memfd(4096)
    with pytest.raises(ValueError, match="aligned"):
        r.load32(2)
    with pytest.raises(ValueError, match="load"):
        r.load16(0, RELEASE)
    with pytest.raises(ValueError, match="store"):
        r.store16(0, 1, ACQUIRE)
    r.close()


def test_views_are_zero_copy_and_defer_close():
    r = Region.memfd(4096)
    v = r.view(100, 16)
    a = r.ndarray("<u4", 128, 4)
    v[0] = 7
    a[1] = 0xCAFEBABE
    assert r.load8(100) == 7 and r.load32(132) == 0xCAFEBABE
    r.close()
    assert r.closed and r.mapped          # deferred: views still exported
    with pytest.raises(ValueError, match="closed"):
        r.load8(0)
    assert v[0] == 7                       # no use-after-unmap
    del v, a
    assert not r.mapped
    r.close()                              # idempotent


def test_device_memtype_copies_word_by_word_same_result():
    fd = os.memfd_create("t")
    os.ftruncate(fd, 4096)
    r = Region.from_fd(fd, 4096, memtype="device", own_fd=True)
    data = bytes(range(256)) * 3
    for off in (0, 1, 2, 3, 5):
        r.write(off, data[:101])
        assert r.read(off, 101) == data[:101]
    r.zero(1, 9)
    assert r.read(0, 12)[1:10] == b"\0" * 9
    r.close()


def test_fd_and_bus_base_and_readonly():
    r = Region.memfd(8192, bus_base=0x8000_0000)
    assert r.bus_base == 0x8000_0000 and r.fd >= 0 and len(r) == 8192
    ro = Region.from_fd(r.fd, 8192, readonly=True)
    r.store32(0, 42)
    assert ro.load32(0) == 42
    with pytest.raises(PermissionError):
        ro.store32(0, 1)
    assert memoryview(ro).readonly
    with pytest.raises(TypeError):
        memoryview(ro)[0] = 1
    ro.close()
    r.close()


def test_bad_construction():
    with pytest.raises(TypeError):
        Region()
    with pytest.raises(OSError):
        Region.from_fd(-1, 4096)
    with pytest.raises(ValueError):
        Region.from_fd(0, 0)


def test_dealloc_uses_no_module_globals(monkeypatch):
    """At interpreter shutdown a module's globals may already be None: a
    Region collected then must still unmap and close its fd (C calls only),
    directly or through the last unpin of a FIFO that outlived close()."""
    import gc
    import sys
    import threading

    import vmsgamp._core.region as region_mod
    from vmsgamp._core.fifo import MsgFifo

    unraisable = []
    r = Region.memfd(16384)
    fd = r.fileno()
    fifo_region = Region.memfd(16384)
    fifo_fd = fifo_region.fileno()
    fifo = MsgFifo(fifo_region, role="device")
    fifo_region.close()               # deferred: the FIFO still pins it
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(region_mod, "os", None)
    del r, fifo_region
    del fifo                          # its __dealloc__ unpins: the region unmaps now
    gc.collect()
    monkeypatch.undo()
    assert unraisable == []
    for f in (fd, fifo_fd):
        with pytest.raises(OSError):
            os.fstat(f)
