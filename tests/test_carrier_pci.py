"""pci: -- BAR mapping through sysfs resource files and the ivshmem /
virtio-msg-amp-pci / custom register doorbells, against a fake sysfs tree."""
from __future__ import annotations

import struct

import pytest

from conftest import start_pair
from fake_hw import FakeTree, FakeUioIrq
from vmsgamp._core.doorbell import PollingDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import MEM_DEVICE
from vmsgamp.carriers import open_carrier, pci, uio
from vmsgamp.carriers._hw import DeviceLookupError, PciConfig, RegisterDoorbell, normalize_bdf

IVSHMEM = "0000:00:04.0"
AMP = "0000:00:05.0"
OTHER = "0000:01:00.0"


@pytest.fixture
def tree(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    t.add_pci(IVSHMEM, 0x1AF4, 0x1110, {0: 256, 1: 4096, 2: 0x10000}, msix=True,
              prefetch=(2,), group=3)
    t.add_pci(AMP, 0x10EE, 0x9039, {0: 0x4000, 1: 0x8000, 2: 4096}, prefetch=(1,))
    t.add_pci(OTHER, 0x8086, 0x1234, {0: 0x1000, 2: 0x4000})
    return t


def _bar(tree, bdf, n):
    return tree.sys / "bus" / "pci" / "devices" / bdf / f"resource{n}"


def _read(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def _put(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


# ---- addresses and discovery -----------------------------------------------------------

@pytest.mark.parametrize("text, bdf", [("00:04.0", "0000:00:04.0"), ("0000:00:04.0", "0000:00:04.0"),
                                       ("1:0a:1f.7", "0001:0a:1f.7"), (" 00:4.0 ", "0000:00:04.0")])
def test_normalize_bdf(text, bdf):
    assert normalize_bdf(text) == bdf


@pytest.mark.parametrize("bad", ["", "00:04", "00:04.8", "zz:00.0", "00:20.0", "0000:00:04.0.1"])
def test_bad_bdf(bad):
    with pytest.raises(ValueError, match="PCI|device number"):
        normalize_bdf(bad)


def test_device_discovery(tree):
    d = pci.PciDevice.load("00:04.0")
    assert d.ids == "1af4:1110" and d.kind == "ivshmem" and d.iommu_group == 3
    assert d.driver is None
    assert [(b.index, b.size, b.kind) for b in d.bars if b.size] == [
        (0, 256, "mem"), (1, 4096, "mem"), (2, 0x10000, "mem-prefetch")]
    assert d.has_msix()
    assert d.memory_decoding() is True
    assert pci.PciDevice.load(AMP).kind == "amp"
    assert [x.bdf for x in pci.list_pci_devices()] == [IVSHMEM, AMP, OTHER]


def test_missing_device(tree):
    with pytest.raises(DeviceLookupError, match=r"pci:00:09.0: no PCI device 0000:00:09.0 .*lspci -D"):
        open_carrier("pci:00:09.0")


# ---- ivshmem ------------------------------------------------------------------------

def test_ivshmem_defaults_bar2_and_rings_the_other_peer(tree):
    bar0 = _bar(tree, IVSHMEM, 0)
    _put(bar0, 8, struct.pack("<I", 1))            # IVPosition: we are peer 1
    _put(_bar(tree, IVSHMEM, 2), 0, b"shared")
    with open_carrier(f"pci:{IVSHMEM}") as c:
        assert isinstance(c, pci.PciCarrier)
        assert c.bar == 2 and c.region.size == 0x10000
        assert c.region.read(0, 6) == b"shared"
        assert c.region.memtype == MEM_DEVICE
        assert (c.own_id, c.peer_id) == (1, 0)
        bell = c.doorbell
        assert isinstance(bell, RegisterDoorbell) and not bell.can_wait    # MSI-X only: poll
        bell.ring()
        assert _read(bar0, 12, 4) == struct.pack("<I", 0 << 16 | 0)
    with open_carrier(f"pci:{IVSHMEM}#peer=7&vector=2") as c:
        c.doorbell.ring()
        assert _read(bar0, 12, 4) == struct.pack("<I", 7 << 16 | 2)


def test_ivshmem_peer_rules(tree):
    bar0 = _bar(tree, IVSHMEM, 0)
    _put(bar0, 8, struct.pack("<I", 0))
    with open_carrier(f"pci:{IVSHMEM}") as c:
        assert c.peer_id == 1
        c.doorbell.ring()
        assert _read(bar0, 12, 4) == struct.pack("<I", 1 << 16)
    with pytest.raises(ValueError, match="peer=0 is our own ivshmem id"):
        open_carrier(f"pci:{IVSHMEM}#peer=0")
    _put(bar0, 8, struct.pack("<I", 5))
    with pytest.raises(ValueError, match="our ivshmem id is 5; say which peer"):
        open_carrier(f"pci:{IVSHMEM}")
    with pytest.raises(ValueError, match="peer must be in 0..65535"):
        open_carrier(f"pci:{IVSHMEM}#peer=70000")


def test_wc_mapping(tree):
    with open_carrier(f"pci:{IVSHMEM}#wc=1&peer=1") as c:
        assert c.region.size == 0x10000
    with pytest.raises(ValueError, match="BAR0 is not prefetchable: there is no resource0_wc"):
        open_carrier(f"pci:{OTHER}#bar=0&wc=1")


def test_status_polling(tree):
    bar0 = _bar(tree, IVSHMEM, 0)
    with open_carrier(f"pci:{IVSHMEM}#irq=status&peer=1") as c:
        assert c.doorbell.wait(0.005) is False
        _put(bar0, 4, struct.pack("<I", 1))       # IntrStatus latched
        assert c.doorbell.wait(1.0) is True
        assert _read(bar0, 0, 4) == b"\0" * 4     # IntrMask untouched in status mode


def test_uio_interrupt_for_ivshmem_bound_to_uio_pci_generic(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    ddir = t.add_pci(IVSHMEM, 0x1AF4, 0x1110, {0: 256, 2: 0x10000}, driver="uio_pci_generic",
                     uio=0, intx_disabled=True)
    fake = FakeUioIrq()
    monkeypatch.setattr(uio, "open_interrupt_fd", fake.open)
    try:
        bar0 = ddir / "resource0"
        with open_carrier(f"pci:{IVSHMEM}#peer=1") as c:      # auto: no MSI-X -> uio
            bell = c.doorbell
            assert bell.can_wait and fake.opened == [str(t.dev / "uio0")]
            assert _read(bar0, 0, 4) == struct.pack("<I", 1)   # IntrMask = 1
            assert not PciConfig(str(ddir / "config")).read8(5) & 4
            fake.fire(1)
            assert bell.wait(1.0) is True
            assert fake.writes() == []        # uio_pci_generic: config space, not write()
        with open_carrier(f"pci:{IVSHMEM}#peer=1&irq=poll") as c:
            assert not c.doorbell.can_wait
    finally:
        fake.close()


def test_auto_irq_is_poll_with_msix_even_on_uio(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    t.add_pci(IVSHMEM, 0x1AF4, 0x1110, {0: 256, 1: 4096, 2: 0x10000}, driver="uio_pci_generic",
              uio=0, msix=True)
    with open_carrier(f"pci:{IVSHMEM}#peer=1") as c:
        assert not c.doorbell.can_wait


def test_irq_errors(tree):
    with pytest.raises(ValueError, match="irq=uio needs 0000:00:04.0 bound to uio_pci_generic"):
        open_carrier(f"pci:{IVSHMEM}#irq=uio&peer=1")
    with pytest.raises(ValueError, match="irq=status reads ivshmem's IntrStatus"):
        open_carrier(f"pci:{AMP}#irq=status")
    with pytest.raises(ValueError, match="irq='msix': use one of auto, uio, status, poll"):
        open_carrier(f"pci:{IVSHMEM}#irq=msix")


# ---- virtio-msg-amp-pci and other cards ------------------------------------------------

def test_amp_pci_notify_register_and_fifo_window(tree):
    bar0 = _bar(tree, AMP, 0)
    with open_carrier(f"pci:{AMP}") as c:
        assert c.bar == 1 and c.offset == 0 and c.region.size == 0x8000
        c.doorbell.ring()
        assert _read(bar0, 0x20, 4) == struct.pack("<I", 1)
    with open_carrier(f"pci:{AMP}#fifo=1") as c:
        assert c.offset == 0x4000
        c.doorbell.ring()
        assert _read(bar0, 0x24, 4) == struct.pack("<I", 1)
    with open_carrier(f"pci:{AMP}#fifo=1&offset=0x100") as c:
        assert c.offset == 0x100


def test_unknown_device_needs_bar_and_custom_ring(tree):
    with pytest.raises(ValueError, match=r"not a known device; say which BAR .*BAR0 \(0x1000 bytes, mem\)"):
        open_carrier(f"pci:{OTHER}")
    with open_carrier(f"pci:{OTHER}#bar=2") as c:
        assert isinstance(c.doorbell, PollingDoorbell)
    with open_carrier(f"pci:{OTHER}#bar=2&ring=bar0:0x40:16:0x1234") as c:
        c.doorbell.ring()
    assert _read(_bar(tree, OTHER, 0), 0x40, 2) == struct.pack("<H", 0x1234)
    with pytest.raises(ValueError, match="name a BAR"):
        open_carrier(f"pci:{OTHER}#bar=2&ring=regs:0x40")
    with pytest.raises(ValueError, match="exclude each other"):
        open_carrier(f"pci:{OTHER}#bar=2&ring=bar0:0&doorbell=amp")
    with open_carrier(f"pci:{IVSHMEM}#doorbell=none") as c:
        assert isinstance(c.doorbell, PollingDoorbell)


@pytest.mark.parametrize("uri, match", [
    (f"pci:{OTHER}#bar=3", r"has no BAR3 .*BARs: BAR0"),
    (f"pci:{OTHER}#bar=6", "bar must be 0..5"),
    (f"pci:{OTHER}#bar=x", "bar must be an integer"),
    (f"pci:{IVSHMEM}#doorbell=bogus", "doorbell='bogus': use auto, ivshmem, amp or none"),
    (f"pci:{IVSHMEM}#size=4K", "unknown option size for pci"),
    (f"pci:{AMP}#fifo=9", "fifo 0..7"),
    ("pci:nonsense", "is not a PCI address"),
])
def test_bad_uris(tree, uri, match):
    with pytest.raises(ValueError, match=match):
        open_carrier(uri)


def test_kernel_driver_refused_unless_forced(tree):
    tree.set_driver(OTHER, "e1000e")
    with pytest.raises(ValueError, match="bound to the kernel driver e1000e; unbind it"):
        open_carrier(f"pci:{OTHER}#bar=2")
    with open_carrier(f"pci:{OTHER}#bar=2&force=1"):
        pass


def test_memory_decoding_off(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    t.add_pci(OTHER, 0x8086, 0x1234, {2: 0x4000}, command=0)
    with pytest.raises(OSError, match="memory decoding is off .*enable"):
        open_carrier(f"pci:{OTHER}#bar=2")


def test_permission_denied_message(tree, monkeypatch):
    import os as _os
    real_open = _os.open

    def deny(path, flags, *a):
        if str(path).endswith("resource2"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a)

    monkeypatch.setattr(pci.os, "open", deny)
    with pytest.raises(PermissionError, match="root-only; run as root"):
        open_carrier(f"pci:{OTHER}#bar=2")


def test_close_idempotent(tree):
    c = open_carrier(f"pci:{IVSHMEM}#peer=1")
    c.close()
    c.close()
    assert c.doorbell.closed


def test_fifo_over_a_bar_with_the_ivshmem_doorbell(tree):
    """Both FIFO ends over the same BAR file; the ivshmem doorbell register is
    written whenever a side rings."""
    _put(_bar(tree, IVSHMEM, 0), 8, struct.pack("<I", 0))
    with open_carrier(f"pci:{IVSHMEM}") as a, open_carrier(f"pci:{IVSHMEM}") as b:
        dev = MsgFifo(a.region, role="device", doorbell=a.doorbell)
        drv = MsgFifo(b.region, role="driver", doorbell=b.doorbell)
        start_pair(dev, drv)
        msg = bytes(6) + struct.pack("<HQ", 16, 42)
        for _ in range(20):
            drv.send(msg, 5)
            assert dev.recv_bytes(5) == msg
            dev.send(msg, 5)
            assert drv.recv_bytes(5) == msg
        dev.close()
        drv.close()
