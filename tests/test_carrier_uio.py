"""uio: -- discovery, maps, the interrupt protocol and the register doorbell,
against a fake sysfs tree and a socketpair standing in for /dev/uioN's
interrupt side."""
from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import struct

import pytest

from fake_hw import PAGE, FakeTree, FakeUioIrq
from vmsgamp._core.doorbell import PollingDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import MEM_DEVICE, MEM_NORMAL
from vmsgamp.carriers import _hw, open_carrier, parse_uri, uio
from vmsgamp.carriers._hw import DeviceLookupError, RegisterDoorbell, UioInterrupt


@pytest.fixture
def tree(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    # uio0: the shared memory (map0 registers-ish, map1 "shm" not page aligned:
    # as current kernels publish it, addr is page-aligned, offset is the
    # in-page start and size is page-rounded and includes offset)
    t.add_uio(0, "vmsgamp-shm", [("ctrl", 0x4000_0000, 0x1000, 0),
                                 ("shm", 0x7000_0000, 0x9000, 0x100)])
    # uio1: a mailbox (Versal IPI style), uio2/uio3: two devices with the same name
    t.add_uio(1, "ipi", [("regs", 0xFF34_0000, 0x1000, 0)])
    t.add_uio(2, "dup", [(None, 0x1000, 0x1000, 0)])
    t.add_uio(3, "dup", [(None, 0x2000, 0x1000, 0)])
    return t


@pytest.fixture
def irq(monkeypatch):
    fake = FakeUioIrq()
    monkeypatch.setattr(uio, "open_interrupt_fd", fake.open)
    yield fake
    fake.close()


def _file_bytes(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def _put(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


# ---- discovery ------------------------------------------------------------------------

def test_list_devices_and_maps(tree):
    devs = uio.list_uio_devices()
    assert [d.dev for d in devs] == ["uio0", "uio1", "uio2", "uio3"]
    d0 = devs[0]
    assert d0.name == "vmsgamp-shm" and d0.driver == "uio_pdrv_genirq"
    assert [(m.index, m.name, m.addr, m.size, m.offset) for m in d0.maps] == [
        (0, "ctrl", 0x4000_0000, 0x1000, 0), (1, "shm", 0x7000_0000, 0x9000, 0x100)]
    assert d0.as_dict()["maps"][1]["addr"] == "0x70000000"
    assert d0.maps[1].usable == 0x8F00 and d0.maps[1].bus_address == 0x7000_0100


@pytest.mark.parametrize("target", ["vmsgamp-shm", "uio0", "/dev/uio0"])
def test_find_by_name_number_and_node(tree, target):
    assert uio.find_uio_device(target).dev == "uio0"


def test_missing_name_lists_what_exists(tree):
    with pytest.raises(DeviceLookupError) as ei:
        uio.find_uio_device("nope")
    msg = str(ei.value)
    assert "no UIO device named 'nope'" in msg
    assert "uio0 (vmsgamp-shm)" in msg and "uio1 (ipi)" in msg
    with pytest.raises(DeviceLookupError, match="no UIO device uio9; UIO devices: uio0"):
        uio.find_uio_device("uio9")


def test_ambiguous_name_is_an_error(tree):
    with pytest.raises(DeviceLookupError, match=r"'dup' is ambiguous: uio2, uio3 .*uio:uio2"):
        uio.find_uio_device("dup")
    assert uio.find_uio_device("uio3").name == "dup"


def test_no_uio_devices_at_all(tmp_path, monkeypatch):
    FakeTree(tmp_path).env(monkeypatch)
    with pytest.raises(ValueError, match="no UIO devices at all .*uio module loaded"):
        open_carrier("uio:anything")


def test_map_selection(tree):
    d0 = uio.find_uio_device("uio0")
    assert d0.find_map(1).name == "shm"
    assert d0.find_map("1").name == "shm"
    assert d0.find_map("map1").name == "shm"
    assert d0.find_map("ctrl").index == 0
    with pytest.raises(DeviceLookupError, match=r"no map 4; maps: map0 \(ctrl\), map1 \(shm\)"):
        d0.find_map(4)
    with pytest.raises(DeviceLookupError, match="no map named 'fifo'"):
        d0.find_map("fifo")


# ---- mapping --------------------------------------------------------------------------

def test_open_map_offset_bus_base_memtype(tree):
    node = tree.dev / "uio0"
    # map1 lives at mmap offset 1 * PAGE; its data starts 0x100 into that page.
    _put(node, PAGE + 0x100, b"HELLO")
    with open_carrier("uio:vmsgamp-shm#map=shm") as c:
        assert isinstance(c, uio.UioCarrier)
        assert c.map.index == 1
        assert c.region.size == 0x8F00             # size - offset: the mapping is size
        assert c.region.read(0, 5) == b"HELLO"
        assert c.region.bus_base == 0x7000_0100
        assert c.region.memtype == MEM_DEVICE
        assert isinstance(c.doorbell, PollingDoorbell)   # no interrupt, no ring
        c.region.write(8, b"back")
    assert _file_bytes(node, PAGE + 0x108, 4) == b"back"


def test_common_options_override(tree):
    with open_carrier("uio:uio0#map=1&bus_base=0x1000&memtype=normal&offset=0x40") as c:
        assert c.region.bus_base == 0x1000
        assert c.region.memtype == MEM_NORMAL
        assert c.offset == 0x40
    with open_carrier("uio:uio0#readonly=1") as c:
        with pytest.raises(PermissionError):
            c.region.write(0, b"x")


@pytest.mark.parametrize("uri", ["uio:/dev/uio0#map=1", "/dev/uio0#map=1", "uio:uio0#map=map1"])
def test_device_node_forms(tree, uri):
    with open_carrier(uri) as c:
        assert c.device.dev == "uio0" and c.map.index == 1


def test_bare_dev_uio_path_keeps_file_paths_working(tree, tmp_path):
    assert parse_uri("/dev/uio0")[0] == "uio"       # only exactly /dev/uioN goes to uio:
    assert parse_uri("/dev/uio0x")[0] == "file"
    with pytest.raises(ValueError, match="unknown option size for uio"):
        open_carrier("/dev/uio0#size=4K")
    f = tmp_path / "plain.bin"
    f.write_bytes(b"\0" * 4096)
    with open_carrier(f"{f}#size=4K") as c:
        assert c.region.size == 4096
    with pytest.raises(ValueError, match="unknown option map for file:"):
        open_carrier(f"{f}#map=1")


def test_bad_uris(tree):
    with pytest.raises(ValueError, match="needs a device name"):
        open_carrier("uio:")
    with pytest.raises(ValueError, match="unknown option size for uio"):
        open_carrier("uio:uio0#size=4K")
    with pytest.raises(ValueError, match=r"uio:uio0#map=7: uio0 \(vmsgamp-shm\) has no map 7"):
        open_carrier("uio:uio0#map=7")
    with pytest.raises(ValueError, match="not a UIO device node"):
        open_carrier("uio:/dev/mem")
    with pytest.raises(ValueError, match="unknown memtype"):
        open_carrier("uio:uio0#memtype=cached")


def test_missing_dev_node_and_permission(tree):
    os.unlink(tree.dev / "uio1")
    with pytest.raises(FileNotFoundError, match="does not exist although"):
        open_carrier("uio:ipi")


def test_sub_page_map_refused_by_the_kernel_gets_a_hint(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    t.add_uio(0, "small", [("regs", 0x1000, 0x100, 0)])

    class KernelSaysEinval:
        @staticmethod
        def from_fd(*args, **kwargs):
            raise OSError(errno.EINVAL, "cannot map 256 bytes: Invalid argument")

    monkeypatch.setattr(uio, "Region", KernelSaysEinval)
    with pytest.raises(OSError, match=r"map0 \(0x100 bytes at mmap offset 0x0\): Invalid argument "
                                      r"\(the map is not a whole number of"):
        open_carrier("uio:small")


def test_uio_pci_generic_has_no_maps_points_to_pci(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    t.add_pci("0000:00:04.0", 0x1AF4, 0x1110, {0: 256, 2: 0x10000}, driver="uio_pci_generic",
              uio=0)
    with pytest.raises(ValueError, match=r"uio_pci_generic maps only non-prefetchable memory BARs.*map the BAR with "
                                         r"pci:0000:00:04.0"):
        open_carrier("uio:uio0")


def test_timeout_waits_for_a_late_device_but_not_for_ambiguity(tree):
    with pytest.raises(ValueError, match="no UIO device named 'late'"):
        open_carrier("uio:late#timeout=0.1")
    with pytest.raises(ValueError, match="ambiguous"):
        open_carrier("uio:dup#timeout=5")      # must not wait 5 s


# ---- the interrupt protocol --------------------------------------------------------------

def test_interrupt_count_missed_and_reenable(tree, irq, caplog):
    with open_carrier("uio:vmsgamp-shm#map=1") as c:
        bell = c.doorbell
        assert isinstance(bell, RegisterDoorbell)
        assert bell.can_wait
        assert irq.opened == [str(tree.dev / "uio0")]
        assert irq.writes() == [1]                  # armed at open
        assert bell.wait(0) is False                # nothing pending
        irq.fire(1)
        assert bell.wait(1.0) is True
        assert irq.writes() == [1]                  # re-enabled after the interrupt
        assert bell.irq.count == 1 and bell.irq.missed == 0
        irq.fire(2)
        bell.drain()
        assert bell.irq.count == 2 and irq.writes() == [1]
        with caplog.at_level(logging.WARNING, logger="vmsgamp.carriers"):
            irq.fire(5)
            assert bell.wait(1.0)
        assert bell.irq.missed == 2
        assert "2 interrupt(s) missed (count 2 -> 5)" in caplog.text
        assert bell.interrupts == 3 and bell.wakeup_count == 3
        assert bell.fileno() >= 0
        bell.drain()                                # nothing pending: no write
        assert irq.writes() == [1]


def test_initial_count_comes_from_sysfs_event(tmp_path, monkeypatch, irq):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    t.add_uio(0, "shm", [("shm", 0, 0x1000, 0)], event=41)
    with open_carrier("uio:shm") as c:
        irq.fire(44)
        assert c.doorbell.wait(1.0)
        assert c.doorbell.irq.missed == 2


def test_count_wraps_around():
    a, b = __import__("socket").socketpair(__import__("socket").AF_UNIX,
                                           __import__("socket").SOCK_SEQPACKET)
    a.setblocking(False)
    src = UioInterrupt(os.dup(a.fileno()), name="uio9", initial_count=0xFFFFFFFF)
    b.send(struct.pack("=I", 1))
    assert src.consume() and src.missed == 1
    assert b.recv(4) == struct.pack("=i", 1)
    src.close()
    src.close()
    a.close()
    b.close()


def test_uio_pci_generic_clears_interrupt_disable_in_config(tmp_path, monkeypatch, irq):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    ddir = t.add_pci("0000:00:04.0", 0x1AF4, 0x1110, {0: 256, 2: 0x10000},
                     driver="uio_pci_generic", uio=0, intx_disabled=True)
    # give uio0 a map so uio: can open it
    t.add_uio(0, "uio_pci_generic", [(None, 0xFE100000, 0x10000, 0)],
              driver="uio_pci_generic", parent=ddir)
    cfg = ddir / "config"
    with open_carrier("uio:uio0") as c:
        assert c.device.driver == "uio_pci_generic"
        assert _file_bytes(cfg, 5, 1)[0] & 0x04 == 0      # cleared at open
        _put(cfg, 5, bytes([_file_bytes(cfg, 5, 1)[0] | 0x04]))   # the kernel masks on IRQ
        irq.fire(1)
        assert c.doorbell.wait(1.0)
        assert _file_bytes(cfg, 4, 2) == struct.pack("<H", 0x0002)  # only bit 10 cleared
        assert irq.writes() == []                 # no write(1) for uio_pci_generic


def test_enosys_means_no_irqcontrol(monkeypatch):
    sock = __import__("socket")
    a, b = sock.socketpair(sock.AF_UNIX, sock.SOCK_SEQPACKET)
    a.setblocking(False)
    real_write = os.write
    calls = []

    def fake_write(fd, data):
        if fd == src.fd:
            calls.append(data)
            raise OSError(errno.ENOSYS, "Function not implemented")
        return real_write(fd, data)

    src = UioInterrupt(os.dup(a.fileno()), name="uio5")
    monkeypatch.setattr(_hw.os, "write", fake_write)
    src.enable()
    b.send(struct.pack("=I", 1))
    assert src.consume()
    assert len(calls) == 1                  # not retried once ENOSYS was seen
    monkeypatch.undo()
    src.close()
    a.close()
    b.close()


def test_eio_means_no_interrupt(tree, irq, monkeypatch):
    real_write = os.write
    fds = set()
    orig_open = irq.open

    def opener(path):
        fd = orig_open(path)
        fds.add(fd)
        return fd

    def fake_write(fd, data):
        if fd in fds:
            raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, data)

    monkeypatch.setattr(uio, "open_interrupt_fd", opener)
    monkeypatch.setattr(_hw.os, "write", fake_write)
    with open_carrier("uio:vmsgamp-shm#map=1") as c:        # auto: falls back to polling
        assert isinstance(c.doorbell, PollingDoorbell)
    with pytest.raises(OSError, match="uio0: the device has no interrupt"):
        open_carrier("uio:vmsgamp-shm#map=1&irq=required")


def test_read_eio_is_reported(tree, irq, monkeypatch):
    with open_carrier("uio:vmsgamp-shm#map=1") as c:
        real_read = os.read
        fd = c.doorbell.fileno()

        def fake_read(f, n):
            if f == fd:
                raise OSError(errno.EIO, "Input/output error")
            return real_read(f, n)

        irq.fire(1)
        monkeypatch.setattr(_hw.os, "read", fake_read)
        with pytest.raises(OSError, match="no interrupt, or it was removed"):
            c.doorbell.wait(1.0)
        monkeypatch.undo()


def test_short_read_is_an_error():
    sock = __import__("socket")
    a, b = sock.socketpair(sock.AF_UNIX, sock.SOCK_SEQPACKET)
    a.setblocking(False)
    with UioInterrupt(os.dup(a.fileno()), name="uio7") as src:
        b.send(b"\x01\x00")
        with pytest.raises(OSError, match="expected the 4-byte interrupt count"):
            src.consume()
    a.close()
    b.close()


def test_irq_none_and_required_without_chardev(tree):
    with open_carrier("uio:vmsgamp-shm#irq=none") as c:
        assert isinstance(c.doorbell, PollingDoorbell)
    # the fake /dev/uio0 is a regular file: it cannot deliver interrupts
    with pytest.raises(OSError, match="not a character device"):
        open_carrier("uio:vmsgamp-shm#irq=required")
    with pytest.raises(ValueError, match="ack= needs an interrupt"):
        open_carrier("uio:vmsgamp-shm#irq=none&ack=map0:0")


def test_irq_from_another_device(tree, irq):
    with open_carrier("uio:vmsgamp-shm#map=1&irq=ipi") as c:
        assert irq.opened == [str(tree.dev / "uio1")]
        irq.fire(1)
        assert c.doorbell.wait(1.0)


# ---- the register doorbell towards the peer ------------------------------------------

def test_ring_register_in_another_map(tree):
    node = tree.dev / "uio0"
    with open_carrier("uio:vmsgamp-shm#map=shm&ring=map0:0x10") as c:
        bell = c.doorbell
        assert isinstance(bell, RegisterDoorbell)
        assert not bell.can_wait                  # no interrupt: event loops poll
        with pytest.raises(ValueError, match="no interrupt fd"):
            bell.fileno()
        assert bell.wait(0.001) is False
        with pytest.raises(ValueError, match="cannot wait forever"):
            bell.wait(None)
        bell.ring()
        assert _file_bytes(node, 0x10, 4) == struct.pack("=I", 1)
        assert bell.ring_count == 1


def test_ring_width_value_and_other_device(tree):
    with open_carrier("uio:vmsgamp-shm#map=1&ring=ctrl:0x20:16:0xabcd") as c:
        c.doorbell.ring()
    assert _file_bytes(tree.dev / "uio0", 0x20, 2) == struct.pack("=H", 0xABCD)
    with open_carrier("uio:vmsgamp-shm#map=1&ring=ipi/regs:0x8:32:0x1000000") as c:
        c.doorbell.ring()
    assert _file_bytes(tree.dev / "uio1", 0x8, 4) == struct.pack("=I", 0x1000000)
    # map1 is not page aligned: the register offset counts from the map's start
    with open_carrier("uio:vmsgamp-shm#map=0&ring=map1:0x0:8:0x5a") as c:
        c.doorbell.ring()
    assert _file_bytes(tree.dev / "uio0", PAGE + 0x100, 1) == b"\x5a"


def test_ack_register_written_after_each_interrupt(tree, irq):
    node = tree.dev / "uio1"
    with open_carrier("uio:vmsgamp-shm#map=1&irq=ipi&ack=ipi/0:0x18:32:0x3&ring=ipi/0:0x0") as c:
        assert _file_bytes(node, 0x18, 4) == b"\0" * 4
        irq.fire(1)
        assert c.doorbell.wait(1.0)
        assert _file_bytes(node, 0x18, 4) == struct.pack("=I", 3)


@pytest.mark.parametrize("spec, match", [
    ("map0", "use MAP:OFFSET"),
    ("map0:0x10:12", "width must be 8, 16, 32 or 64"),
    ("map0:0x11", "not aligned to 32 bits"),
    ("map0:0x1000", "outside uio0 map0"),
    ("map0:0x0:8:0x100", "does not fit in 8 bits"),
    ("map9:0", "has no map 9"),
    ("nodev/0:0", "no UIO device named 'nodev'"),
    ("map0:zz", "ring offset must be an integer"),
])
def test_bad_ring_specs(tree, spec, match):
    with pytest.raises(ValueError, match=match):
        open_carrier(f"uio:vmsgamp-shm#map=1&ring={spec}")


def test_close_is_idempotent_and_releases_everything(tree, irq):
    c = open_carrier("uio:vmsgamp-shm#map=1&ring=map0:0")
    bell = c.doorbell
    c.close()
    c.close()
    assert bell.closed and c.closed
    with pytest.raises(ValueError, match="closed"):
        bell.ring()
    bell.close()


# ---- a FIFO over a uio: carrier, two processes ------------------------------------------

def _msg(i: int) -> bytes:
    # G2 header: msg_size (bytes 6..7) = 64, then the sequence number repeated.
    return struct.pack("<BBHHH", 0x80, 0, i & 0xFFFF, 0, 64) + i.to_bytes(8, "little") * 7


def _peer(count: int, done) -> None:
    with open_carrier("uio:vmsgamp-shm#map=shm&ring=ctrl:0x4") as c:
        fifo = MsgFifo(c.region, role="driver", doorbell=c.doorbell)
        fifo.start(10)
        for i in range(count):
            got = fifo.recv_bytes(10)
            assert got == _msg(i), (i, got)
            fifo.send(_msg(i + 1000), 10)
        assert done.wait(10)
        fifo.close()


def test_fifo_round_trip_two_processes_over_uio(tree):
    count = 200
    ctx = multiprocessing.get_context("fork")
    with open_carrier("uio:vmsgamp-shm#map=shm&ring=ctrl:0x0") as c:
        assert c.region.memtype == MEM_DEVICE       # word-sized payload copies
        done = ctx.Event()
        child = ctx.Process(target=_peer, args=(count, done))
        child.start()
        try:
            fifo = MsgFifo(c.region, role="device", doorbell=c.doorbell)
            fifo.start(10)
            for i in range(count):
                fifo.send(_msg(i), 10)
                assert fifo.recv_bytes(10) == _msg(i + 1000)
            done.set()
            fifo.close()
        finally:
            done.set()
            child.join(10)
            if child.is_alive():
                child.kill()
        assert child.exitcode == 0
