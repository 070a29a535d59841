"""vfio: -- the ioctl sequence and struct marshalling against a fake VFIO
kernel (no real VFIO here), region mapping at the reported offsets,
eventfd interrupts (MSI-X, INTx with unmask) and every error message."""
from __future__ import annotations

import errno
import os
import struct

import pytest

from fake_hw import FakeTree, FakeVfioKernel
from vmsgamp._core.doorbell import PollingDoorbell
from vmsgamp._core.region import MEM_DEVICE
from vmsgamp.carriers import open_carrier, parse_uri, vfio as v
from vmsgamp.carriers._hw import FdRegisters, MappedRegisters, RegisterDoorbell

BDF = "0000:00:04.0"
GROUP = 7
R = v.VFIO_REGION_INFO_FLAG_READ | v.VFIO_REGION_INFO_FLAG_WRITE
RM = R | v.VFIO_REGION_INFO_FLAG_MMAP
INTX = (v.VFIO_IRQ_INFO_EVENTFD | v.VFIO_IRQ_INFO_MASKABLE | v.VFIO_IRQ_INFO_AUTOMASKED, 1)
MSIX = (v.VFIO_IRQ_INFO_EVENTFD | v.VFIO_IRQ_INFO_NORESIZE, 1)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    t.add_pci(BDF, 0x1AF4, 0x1110, {0: 256, 1: 4096, 2: 0x10000}, driver="vfio-pci",
              group=GROUP, msix=True)
    return t


def kernel(tree, **kw) -> FakeVfioKernel:
    kw.setdefault("regions", {0: (256, R), 1: (4096, RM), 2: (0x10000, RM), 7: (256, R)})
    kw.setdefault("irqs", {0: INTX, 1: (v.VFIO_IRQ_INFO_EVENTFD, 1), 2: MSIX})
    return FakeVfioKernel(tree, BDF, GROUP, **kw)


def vopen(uri: str, ioctl=None, opener=None) -> v.VfioCarrier:
    """open_carrier() with the fake kernel (ioctl/opener are not URI options)."""
    scheme, target, opts = parse_uri(uri)
    assert scheme == "vfio"
    return v.open_vfio(target, uri=uri, ioctl=ioctl, opener=opener, **opts)


def test_ioctl_numbers_match_linux_vfio_h():
    # Values printed by a C program compiled against /usr/include/linux/vfio.h.
    assert (v.VFIO_GET_API_VERSION, v.VFIO_CHECK_EXTENSION, v.VFIO_SET_IOMMU) == (0x3B64, 0x3B65, 0x3B66)
    assert (v.VFIO_GROUP_GET_STATUS, v.VFIO_GROUP_SET_CONTAINER, v.VFIO_GROUP_UNSET_CONTAINER,
            v.VFIO_GROUP_GET_DEVICE_FD) == (0x3B67, 0x3B68, 0x3B69, 0x3B6A)
    assert (v.VFIO_DEVICE_GET_INFO, v.VFIO_DEVICE_GET_REGION_INFO, v.VFIO_DEVICE_GET_IRQ_INFO,
            v.VFIO_DEVICE_SET_IRQS, v.VFIO_DEVICE_RESET) == (0x3B6B, 0x3B6C, 0x3B6D, 0x3B6E, 0x3B6F)
    assert (v.VFIO_TYPE1_IOMMU, v.VFIO_TYPE1v2_IOMMU) == (1, 3)
    assert (v.VFIO_IRQ_SET_DATA_EVENTFD | v.VFIO_IRQ_SET_ACTION_TRIGGER) == 0x24
    assert v.VFIO_IRQ_SET_DATA_NONE | v.VFIO_IRQ_SET_ACTION_UNMASK == 0x11
    assert (v.VFIO_PCI_INTX_IRQ_INDEX, v.VFIO_PCI_MSI_IRQ_INDEX, v.VFIO_PCI_MSIX_IRQ_INDEX) == (0, 1, 2)


def test_open_sequence_and_marshalling(tree):
    k = kernel(tree)
    with v.VfioDevice(BDF, ioctl=k.ioctl) as dev:
        names = [c[0] for c in k.calls]
        assert names == ["VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_GROUP_GET_STATUS",
                         "VFIO_GROUP_SET_CONTAINER", "VFIO_SET_IOMMU", "VFIO_GROUP_GET_DEVICE_FD",
                         "VFIO_DEVICE_GET_INFO"]
        args = dict(k.calls)
        assert args["VFIO_CHECK_EXTENSION"] == v.VFIO_TYPE1v2_IOMMU
        assert args["VFIO_GROUP_SET_CONTAINER"] == struct.pack("=i", dev.container_fd)
        assert args["VFIO_GROUP_GET_DEVICE_FD"] == BDF.encode() + b"\0"
        assert args["VFIO_GROUP_GET_STATUS"] == struct.pack("=II", 8, 0)
        assert k.iommu_set == v.VFIO_TYPE1v2_IOMMU
        assert (dev.group, dev.num_regions, dev.num_irqs) == (GROUP, 9, 5)
        info = dev.region_info(2)
        assert (info.size, info.offset, info.mmap) == (0x10000, k.region_offset(2), True)
        assert k.calls[-1][1] == v.REGION_INFO.pack(32, 0, 2, 0, 0, 0)
        irq = dev.irq_info(0)
        assert irq.automasked and irq.count == 1
        fds = (dev.container_fd, dev.group_fd, dev.device_fd)
    assert dev.closed
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    dev.close()


def test_type1_fallback(tree):
    k = kernel(tree, extensions=(1,))
    with v.VfioDevice(BDF, ioctl=k.ioctl):
        assert k.iommu_set == v.VFIO_TYPE1_IOMMU


def test_carrier_maps_bar2_and_rings_bar0_with_pwrite(tree):
    k = kernel(tree)
    k.write_region(0, 8, struct.pack("=I", 1))          # IVPosition = 1
    k.write_region(2, 0, b"from-the-host")
    k.write_region(7, 4, struct.pack("<H", 0x0002))     # command: memory on, no bus master
    with vopen(f"vfio:{BDF}", ioctl=k.ioctl) as c:
        assert isinstance(c, v.VfioCarrier)
        assert c.bar == 2 and c.region.size == 0x10000 and c.region.memtype == MEM_DEVICE
        assert c.region.read(0, 13) == b"from-the-host"
        c.region.write(0x100, b"from-the-guest")
        assert k.read_region(2, 0x100, 14) == b"from-the-guest"
        assert (c.own_id, c.peer_id) == (1, 0)
        bell = c.doorbell
        assert isinstance(bell, RegisterDoorbell)
        assert bell.can_wait
        # MSI-X needs Bus Master Enable, set through the VFIO config region
        assert k.read_region(7, 4, 2) == struct.pack("<H", 0x0006)
        bell.ring()
        assert k.read_region(0, 12, 4) == struct.pack("=I", 0 << 16 | 0)
        # MSI-X vector 0 is bound to an eventfd with DATA_EVENTFD | ACTION_TRIGGER
        efd = k.bound[(v.VFIO_PCI_MSIX_IRQ_INDEX, 0)]
        assert bell.fileno() == efd
        set_irqs = [a for n, a in k.calls if n == "VFIO_DEVICE_SET_IRQS"]
        assert set_irqs[0] == v.IRQ_SET.pack(24, 0x24, 2, 0, 1) + struct.pack("=i", efd)
        assert bell.wait(0) is False
        k.interrupt(v.VFIO_PCI_MSIX_IRQ_INDEX)
        assert bell.wait(1.0) is True
        assert bell.interrupts == 1 and k.unmasks == 0      # MSI-X: no unmask
        c.device.trigger_irq(v.VFIO_PCI_MSIX_IRQ_INDEX)      # self-trigger (loopback)
        bell.drain()
        assert bell.interrupts == 2
    # closing disabled the interrupt (count 0) and closed the fds
    assert [a for n, a in k.calls if n == "VFIO_DEVICE_SET_IRQS"][-1] == v.IRQ_SET.pack(20, 0x21, 2, 0, 0)
    assert k.bound == {}


def test_peer_and_vector_options(tree):
    k = kernel(tree, irqs={2: (v.VFIO_IRQ_INFO_EVENTFD, 4)})
    with vopen(f"vfio:{BDF}#peer=3&vector=2", ioctl=k.ioctl) as c:
        c.doorbell.ring()
        assert k.read_region(0, 12, 4) == struct.pack("=I", 3 << 16 | 2)
        assert (2, 2) in k.bound


def test_mappable_bar0_uses_a_mapping(tree):
    k = kernel(tree, regions={0: (4096, RM), 2: (0x10000, RM), 7: (256, R)})
    with v.VfioDevice(BDF, ioctl=k.ioctl) as dev:
        regs = dev.registers(0)
        assert isinstance(regs, MappedRegisters)
        regs.write(12, 0x10000)
        assert k.read_region(0, 12, 4) == struct.pack("=I", 0x10000)
        regs.close()
        regs2 = dev.registers(7)
        assert isinstance(regs2, FdRegisters)
        regs2.close()
        regs2.close()


def test_intx_sets_mask_acks_status_and_unmasks(tree):
    k = kernel(tree, irqs={0: INTX})
    k.write_region(0, 8, struct.pack("=I", 1))
    with vopen(f"vfio:{BDF}", ioctl=k.ioctl) as c:      # auto falls back to INTx
        assert k.read_region(0, 0, 4) == struct.pack("=I", 1)    # IntrMask = 1
        k.interrupt(v.VFIO_PCI_INTX_IRQ_INDEX)
        assert c.doorbell.wait(1.0)
        assert k.unmasks == 1
        unmask = [a for n, a in k.calls if n == "VFIO_DEVICE_SET_IRQS"][-1]
        assert unmask == v.IRQ_SET.pack(20, 0x11, 0, 0, 1)


def test_irq_mode_selection(tree):
    k = kernel(tree, irqs={1: (v.VFIO_IRQ_INFO_EVENTFD, 1)})
    with vopen(f"vfio:{BDF}#peer=1", ioctl=k.ioctl) as c:
        assert (1, 0) in k.bound and c.doorbell.can_wait           # MSI
    k = kernel(tree, irqs={})
    with vopen(f"vfio:{BDF}#peer=1", ioctl=k.ioctl) as c:
        assert not c.doorbell.can_wait                              # polling
    k = kernel(tree)
    with vopen(f"vfio:{BDF}#peer=1&irq=poll", ioctl=k.ioctl) as c:
        assert k.bound == {} and not c.doorbell.can_wait
        assert k.read_region(7, 4, 2) == b"\0\0"     # polling: config space untouched
    k = kernel(tree, irqs={0: INTX})
    with pytest.raises(OSError, match="no usable msix interrupt"):
        vopen(f"vfio:{BDF}#peer=1&irq=msix", ioctl=k.ioctl)
    with pytest.raises(ValueError, match="irq='uio': use one of auto, msix, msi, intx, poll"):
        vopen(f"vfio:{BDF}#irq=uio", ioctl=k.ioctl)


def test_doorbell_none_and_reset(tree):
    k = kernel(tree)
    with vopen(f"vfio:{BDF}#doorbell=none&irq=poll&reset=1", ioctl=k.ioctl) as c:
        assert isinstance(c.doorbell, PollingDoorbell)
        assert "VFIO_DEVICE_RESET" in [n for n, _ in k.calls]
    k = kernel(tree, device_flags=v.VFIO_DEVICE_FLAGS_PCI)
    with pytest.raises(OSError, match="has no VFIO reset"):
        vopen(f"vfio:{BDF}#reset=1", ioctl=k.ioctl)


def test_region_errors(tree):
    k = kernel(tree, regions={0: (256, R), 2: (0x10000, R)})
    with pytest.raises(OSError, match="does not allow mmap of BAR2"):
        vopen(f"vfio:{BDF}#peer=1", ioctl=k.ioctl)
    k = kernel(tree, regions={0: (256, R)})
    with pytest.raises(ValueError, match="BAR2 is not implemented"):
        vopen(f"vfio:{BDF}#peer=1", ioctl=k.ioctl)


# ---- what is missing, said clearly -----------------------------------------------------

def test_not_bound_to_vfio_pci(tree):
    tree.set_driver(BDF, "uio_pci_generic")
    with pytest.raises(OSError, match=r"bound to uio_pci_generic, not vfio-pci; bind it: .*"
                                      r"driver_override.*drivers/uio_pci_generic/unbind"):
        open_carrier(f"vfio:{BDF}")
    tree.set_driver(BDF, None)
    with pytest.raises(OSError, match="not bound to any driver, not vfio-pci"):
        open_carrier(f"vfio:{BDF}")


def test_no_iommu_group(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    t.add_pci(BDF, 0x1AF4, 0x1110, {0: 256, 2: 0x10000}, driver="vfio-pci")
    with pytest.raises(OSError, match="has no IOMMU group: the IOMMU is off .*intel_iommu=on"):
        open_carrier(f"vfio:{BDF}")


def test_vfio_module_missing(tree):
    with pytest.raises(OSError, match=r"vfio/vfio does not exist: the vfio module is not loaded"):
        open_carrier(f"vfio:{BDF}")


def test_group_node_missing(tree):
    k = kernel(tree)
    os.unlink(k.group_path)
    with pytest.raises(OSError, match=r"vfio/7 does not exist: vfio-pci has not claimed group 7"):
        vopen(f"vfio:{BDF}", ioctl=k.ioctl)


def _failing_opener(match: str, err: OSError):
    def opener(path, flags):
        if path.endswith(match):
            raise err
        return os.open(path, flags)
    return opener


def test_permission_and_busy(tree):
    k = kernel(tree)
    with pytest.raises(PermissionError,
                       match=r"cannot open .*vfio/7 \(IOMMU group 7\): permission denied"):
        vopen(f"vfio:{BDF}", ioctl=k.ioctl,
                     opener=_failing_opener("/7", PermissionError(errno.EACCES, "denied")))
    with pytest.raises(OSError, match=r"vfio/7 \(IOMMU group 7\) is busy: another process"):
        vopen(f"vfio:{BDF}", ioctl=k.ioctl,
                     opener=_failing_opener("/7", OSError(errno.EBUSY, "busy")))
    with pytest.raises(OSError, match=r"the VFIO container\): permission denied"):
        vopen(f"vfio:{BDF}", ioctl=k.ioctl,
                     opener=_failing_opener("/vfio", PermissionError(errno.EACCES, "denied")))


def test_group_not_viable_lists_members(tree):
    tree.add_pci("0000:00:04.1", 0x1AF4, 0x1111, {0: 256}, driver="snd_hda_intel", group=GROUP)
    k = kernel(tree, viable=False)
    with pytest.raises(OSError, match=r"IOMMU group 7 is not viable.*0000:00:04.0 \(vfio-pci\), "
                                      r"0000:00:04.1 \(snd_hda_intel\)"):
        vopen(f"vfio:{BDF}", ioctl=k.ioctl)


def test_api_and_extension_errors(tree):
    with pytest.raises(OSError, match="unknown VFIO API version 1"):
        vopen(f"vfio:{BDF}", ioctl=kernel(tree, api=1).ioctl)
    with pytest.raises(OSError, match="neither the type1v2 nor the type1 IOMMU"):
        vopen(f"vfio:{BDF}", ioctl=kernel(tree, extensions=()).ioctl)


def test_get_device_fd_failure(tree):
    k = kernel(tree)
    k.bdf = "0000:00:09.0"      # the group does not hold our device
    with pytest.raises(OSError, match=r"VFIO_GROUP_GET_DEVICE_FD\(0000:00:04.0\) failed"):
        vopen(f"vfio:{BDF}", ioctl=k.ioctl)


@pytest.mark.parametrize("uri, match", [
    ("vfio:00:09.0", "no PCI device 0000:00:09.0"),
    ("vfio:junk", "is not a PCI address"),
    (f"vfio:{BDF}#bar=9", "bar must be 0..5"),
    (f"vfio:{BDF}#wc=1", "unknown option wc for vfio"),
    (f"vfio:{BDF}#doorbell=x", "doorbell='x'"),
])
def test_bad_uris(tree, uri, match):
    with pytest.raises(ValueError, match=match):
        open_carrier(uri)


def test_close_idempotent_and_failed_open_leaks_nothing(tree):
    k = kernel(tree)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        vopen(f"vfio:{BDF}#irq=msi&vector=3", ioctl=k.ioctl)
    assert set(os.listdir("/proc/self/fd")) <= before
    c = vopen(f"vfio:{BDF}", ioctl=k.ioctl)
    c.close()
    c.close()
    assert c.device.closed
    assert set(os.listdir("/proc/self/fd")) <= before
