"""``vfio:`` -- a PCI device opened through VFIO: BARs mapped from the device
fd, interrupts (MSI-X, MSI or INTx) delivered to eventfds.  Pure Python
(``fcntl.ioctl`` + ``struct``).

Grammar::

    vfio:BDF[#bar=N][&doorbell=auto|ivshmem|amp|none][&ring=barN:OFFSET[:WIDTH[:VALUE]]]
            [&peer=P][&vector=V][&fifo=I][&irq=auto|msix|msi|intx|poll][&reset=1]

The sequence (Documentation/driver-api/vfio.rst): the IOMMU group from
``/sys/bus/pci/devices/BDF/iommu_group``; open ``/dev/vfio/vfio`` (check
VFIO_GET_API_VERSION and the type1 IOMMU extension) and ``/dev/vfio/<group>``
(check it is viable: every device in the group bound to vfio-pci or to no
driver); VFIO_GROUP_SET_CONTAINER, VFIO_SET_IOMMU (type1v2, else type1),
VFIO_GROUP_GET_DEVICE_FD(BDF); VFIO_DEVICE_GET_REGION_INFO per BAR and an
mmap of the device fd at the region's offset.  Registers the kernel will not
let us mmap (a BAR smaller than a page) are reached with pread/pwrite at the
region offset instead.  No DMA mapping is made: the peer's memory is a BAR
of the device, not our RAM.

Interrupts: Bus Master Enable is set in the command register through the
VFIO config region (MSI/MSI-X are device memory writes, dropped without it;
vfio-pci leaves it to user space), VFIO_DEVICE_GET_IRQ_INFO, then
VFIO_DEVICE_SET_IRQS with
DATA_EVENTFD | ACTION_TRIGGER binds an eventfd to vector ``vector``; an
interrupt makes it readable.  INTx is AUTOMASKED: after each one the device's
status is acknowledged and the line unmasked (DATA_NONE | ACTION_UNMASK).
``irq=auto`` takes MSI-X if the device has the vector, else MSI, else INTx.

Doorbells (same as ``pci:``): ``ivshmem`` (ring = BAR0 Doorbell register
``peer << 16 | vector``, wait = the vector's eventfd; on INTx IntrMask is set
and IntrStatus read to acknowledge), ``amp`` (virtio-msg-amp-pci NOTIFYi),
``ring=barN:...`` for other cards, ``none``.  Default BAR: 2 for ivshmem, 1
for virtio-msg-amp-pci.

Errors say what is missing: no IOMMU group (IOMMU off), device not bound to
vfio-pci, group not viable (which other devices hold it), permissions on
/dev/vfio, group busy in another process.

Memory type: BARs are device memory (uncached), so ``memtype`` defaults to
``device``: FIFO indexes and descriptors use fixed-width accesses and payload
copies are word-sized.

The ioctl numbers and struct layouts below were checked against
``/usr/include/linux/vfio.h`` (linux-libc-dev, Debian 12) with a C program.
:class:`VfioDevice` takes ``ioctl`` and ``opener`` arguments so tests can
replace the kernel.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

from vmsgamp._core.region import Region
from vmsgamp.carriers._hw import (
    IVSHMEM_INTR_MASK, IVSHMEM_INTR_STATUS, DeviceLookupError, FdRegisters, MappedRegisters,
    Registers, RegisterWrite, dev_root, link_name, normalize_bdf, parse_register_spec,
    sysfs_root,
)
from vmsgamp.carriers._registry import Carrier, parse_bool, parse_int, register_scheme
from vmsgamp.carriers.pci import (
    PciDevice, build_register_doorbell, parse_irq_mode, resolve_pci_options,
)

__all__ = ["VfioDevice", "VfioError", "VfioPermissionError", "VfioNotFoundError", "VfioIrq",
           "VfioCarrier", "RegionInfo", "IrqInfo",
           "open_vfio", "VFIO_OPTIONS"]

log = logging.getLogger("vmsgamp.vfio")

# ---- linux/vfio.h ------------------------------------------------------------------
# _IO(VFIO_TYPE, VFIO_BASE + n): no size or direction bits, so 0x3b64 + n.
VFIO_TYPE = ord(";")      # 0x3B
VFIO_BASE = 100


def _vfio_io(n: int) -> int:
    return (VFIO_TYPE << 8) | (VFIO_BASE + n)


VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_GET_API_VERSION = _vfio_io(0)          # 0x3b64
VFIO_CHECK_EXTENSION = _vfio_io(1)          # 0x3b65
VFIO_SET_IOMMU = _vfio_io(2)                # 0x3b66
VFIO_GROUP_GET_STATUS = _vfio_io(3)         # 0x3b67
VFIO_GROUP_SET_CONTAINER = _vfio_io(4)      # 0x3b68
VFIO_GROUP_UNSET_CONTAINER = _vfio_io(5)    # 0x3b69
VFIO_GROUP_GET_DEVICE_FD = _vfio_io(6)      # 0x3b6a
VFIO_DEVICE_GET_INFO = _vfio_io(7)          # 0x3b6b
VFIO_DEVICE_GET_REGION_INFO = _vfio_io(8)   # 0x3b6c
VFIO_DEVICE_GET_IRQ_INFO = _vfio_io(9)      # 0x3b6d
VFIO_DEVICE_SET_IRQS = _vfio_io(10)         # 0x3b6e
VFIO_DEVICE_RESET = _vfio_io(11)            # 0x3b6f

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
IRQ_INDEX = {"intx": VFIO_PCI_INTX_IRQ_INDEX, "msi": VFIO_PCI_MSI_IRQ_INDEX,
             "msix": VFIO_PCI_MSIX_IRQ_INDEX}

# struct vfio_group_status {u32 argsz, flags}
GROUP_STATUS = struct.Struct("=II")
# struct vfio_device_info {u32 argsz, flags, num_regions, num_irqs, cap_offset}
DEVICE_INFO = struct.Struct("=IIIII")
# struct vfio_region_info {u32 argsz, flags, index, cap_offset; u64 size, offset}
REGION_INFO = struct.Struct("=IIIIQQ")
# struct vfio_irq_info {u32 argsz, flags, index, count}
IRQ_INFO = struct.Struct("=IIII")
# struct vfio_irq_set {u32 argsz, flags, index, start, count; u8 data[]}
IRQ_SET = struct.Struct("=IIIII")
assert (GROUP_STATUS.size, DEVICE_INFO.size, REGION_INFO.size, IRQ_INFO.size,
        IRQ_SET.size) == (8, 20, 32, 16, 20)

VFIO_OPTIONS = ("bar", "doorbell", "ring", "peer", "vector", "fifo", "irq", "reset")

IoctlFn = Callable[..., Any]
OpenFn = Callable[[str, int], int]


class VfioError(OSError):
    """A VFIO step failed; the message says which and what to do."""


class VfioPermissionError(VfioError, PermissionError):
    """A VFIO node exists but we may not open it."""


class VfioNotFoundError(VfioError, FileNotFoundError):
    """A VFIO node does not exist (module not loaded, device not claimed)."""


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int

    @property
    def mmap(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_MMAP)


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: int
    count: int

    @property
    def automasked(self) -> bool:
        return bool(self.flags & VFIO_IRQ_INFO_AUTOMASKED)


def _default_open(path: str, flags: int) -> int:
    return os.open(path, flags)


class VfioDevice:
    """One PCI device opened through its IOMMU group.  Owns the container,
    group and device fds; :meth:`close` is idempotent."""

    def __init__(self, bdf: str, *, sysfs_root: str | None = None, dev_root: str | None = None,
                 ioctl: IoctlFn | None = None, opener: OpenFn | None = None) -> None:
        self.bdf = normalize_bdf(bdf)
        self._sysroot = _sys(sysfs_root)
        self._devroot = dev_root_path(dev_root)
        self._ioctl_fn = ioctl or fcntl.ioctl
        self._open = opener or _default_open
        self.container_fd = self.group_fd = self.device_fd = -1
        self.group: int | None = None
        self.iommu_type: int | None = None
        self.flags = self.num_regions = self.num_irqs = 0
        self.closed = False
        self._enabled_irqs: set[int] = set()
        try:
            self._open_all()
        except BaseException:
            self.close()
            raise

    # ---- setup -------------------------------------------------------------------------
    @property
    def sysfs_path(self) -> str:
        return os.path.join(self._sysroot, "bus", "pci", "devices", self.bdf)

    def _ioctl(self, fd: int, request: int, arg: Any = 0) -> Any:
        if isinstance(arg, bytearray):
            return self._ioctl_fn(fd, request, arg, True)
        return self._ioctl_fn(fd, request, arg)

    def _open_node(self, path: str, what: str, missing_hint: str) -> int:
        try:
            return self._open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VfioNotFoundError(errno.ENOENT,
                                    f"{path} does not exist: {missing_hint}") from None
        except PermissionError:
            raise VfioPermissionError(
                errno.EACCES, f"cannot open {path} ({what}): permission denied; run as root "
                f"or give your user the group node (chown/chmod {path}, or a udev rule)") from None
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise VfioError(errno.EBUSY, f"{path} ({what}) is busy: another process (QEMU, "
                                f"another vmsgamp) has the group open") from None
            raise VfioError(e.errno, f"cannot open {path} ({what}): {e.strerror}") from None

    def _open_all(self) -> None:
        if not os.path.isdir(self.sysfs_path):
            raise DeviceLookupError(f"no PCI device {self.bdf} (no {self.sysfs_path}); "
                                    f"`lspci -D` lists the devices")
        driver = link_name(os.path.join(self.sysfs_path, "driver"))
        if driver != "vfio-pci":
            state = f"bound to {driver}" if driver else "not bound to any driver"
            raise VfioError(errno.ENODEV, f"{self.bdf} is {state}, "
                            f"not vfio-pci; bind it: modprobe vfio-pci; "
                            f"echo vfio-pci > {self.sysfs_path}/driver_override; "
                            + (f"echo {self.bdf} > /sys/bus/pci/drivers/{driver}/unbind; "
                               if driver else "")
                            + f"echo {self.bdf} > /sys/bus/pci/drivers_probe")
        group = link_name(os.path.join(self.sysfs_path, "iommu_group"))
        if group is None or not group.isdigit():
            raise VfioError(errno.ENODEV, f"{self.bdf} has no IOMMU group: the IOMMU is off or "
                            f"absent (boot with intel_iommu=on or amd_iommu=on; under QEMU add "
                            f"-device intel-iommu,intremap=on with "
                            f"-machine q35,kernel-irqchip=split)")
        self.group = int(group)
        self.container_fd = self._open_node(
            os.path.join(self._devroot, "vfio", "vfio"), "the VFIO container",
            "the vfio module is not loaded (modprobe vfio-pci)")
        version = self._ioctl(self.container_fd, VFIO_GET_API_VERSION)
        if version != VFIO_API_VERSION:
            raise VfioError(errno.EPROTO, f"unknown VFIO API version {version} "
                            f"(expected {VFIO_API_VERSION})")
        for t in (VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU):
            if self._ioctl(self.container_fd, VFIO_CHECK_EXTENSION, t) > 0:
                self.iommu_type = t
                break
        else:
            raise VfioError(errno.ENOTSUP, "the VFIO container supports neither the type1v2 "
                            "nor the type1 IOMMU (modprobe vfio_iommu_type1)")
        self.group_fd = self._open_node(
            os.path.join(self._devroot, "vfio", str(self.group)), f"IOMMU group {self.group}",
            f"vfio-pci has not claimed group {self.group} (is {self.bdf} bound to vfio-pci?)")
        status = bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))
        self._ioctl(self.group_fd, VFIO_GROUP_GET_STATUS, status)
        _, gflags = GROUP_STATUS.unpack(status)
        if not gflags & VFIO_GROUP_FLAGS_VIABLE:
            raise VfioError(errno.EPERM, f"IOMMU group {self.group} is not viable: every device "
                            f"in it must be bound to vfio-pci (or to no driver); group members: "
                            f"{self._group_members()}")
        self._ioctl(self.group_fd, VFIO_GROUP_SET_CONTAINER,
                    bytearray(struct.pack("=i", self.container_fd)))
        try:
            self._ioctl(self.container_fd, VFIO_SET_IOMMU, self.iommu_type)
        except OSError as e:
            raise VfioError(e.errno, f"VFIO_SET_IOMMU({self.iommu_type}) failed: "
                            f"{e.strerror or e}") from None
        try:
            fd = self._ioctl(self.group_fd, VFIO_GROUP_GET_DEVICE_FD,
                             bytearray(self.bdf.encode() + b"\0"))
        except OSError as e:
            raise VfioError(e.errno, f"VFIO_GROUP_GET_DEVICE_FD({self.bdf}) failed: "
                            f"{e.strerror or e} (device already open elsewhere?)") from None
        if not isinstance(fd, int) or fd < 0:
            raise VfioError(errno.EIO, f"VFIO_GROUP_GET_DEVICE_FD returned {fd!r}")
        self.device_fd = fd
        info = bytearray(DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0, 0))
        self._ioctl(self.device_fd, VFIO_DEVICE_GET_INFO, info)
        _, self.flags, self.num_regions, self.num_irqs, _ = DEVICE_INFO.unpack(info)
        if not self.flags & VFIO_DEVICE_FLAGS_PCI:
            log.warning("%s: VFIO says this is not a PCI device (flags %#x)", self.bdf, self.flags)

    def _group_members(self) -> str:
        base = os.path.join(self._sysroot, "kernel", "iommu_groups", str(self.group), "devices")
        try:
            names = sorted(os.listdir(base))
        except OSError:
            return "unknown (no " + base + ")"
        parts = []
        for n in names:
            drv = link_name(os.path.join(base, n, "driver"))
            parts.append(f"{n} ({drv or 'no driver'})")
        return ", ".join(parts)

    # ---- regions --------------------------------------------------------------------
    def region_info(self, index: int) -> RegionInfo:
        buf = bytearray(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
        try:
            self._ioctl(self._live(), VFIO_DEVICE_GET_REGION_INFO, buf)
        except OSError as e:
            raise VfioError(e.errno, f"{self.bdf}: VFIO_DEVICE_GET_REGION_INFO({index}) "
                            f"failed: {e.strerror or e}") from None
        _, flags, idx, _, size, offset = REGION_INFO.unpack(buf)
        return RegionInfo(idx, flags, size, offset)

    def map_region(self, index: int, *, memtype: str = "device", bus_base: int = 0,
                   readonly: bool = False, uri: str | None = None) -> Region:
        """mmap a region (BAR) of the device fd at the offset VFIO reports."""
        info = self.region_info(index)
        if info.size == 0:
            raise DeviceLookupError(f"{self.bdf}: BAR{index} is not implemented (size 0)")
        if not info.mmap:
            raise VfioError(errno.ENOTSUP, f"{self.bdf}: VFIO does not allow mmap of BAR{index} "
                            f"({info.size:#x} bytes, flags {info.flags:#x})")
        fd = os.dup(self._live())    # the Region owns its own fd
        try:
            return Region.from_fd(fd, info.size, offset=info.offset, bus_base=bus_base,
                                  memtype=memtype, readonly=readonly, own_fd=True,
                                  uri=uri or f"vfio:{self.bdf}#bar={index}")
        except BaseException:
            os.close(fd)
            raise

    def registers(self, index: int) -> Registers:
        """A register block: mapped if VFIO allows, else pread/pwrite."""
        info = self.region_info(index)
        if info.size == 0:
            raise DeviceLookupError(f"{self.bdf}: BAR{index} is not implemented (size 0)")
        name = f"vfio:{self.bdf} BAR{index}"
        if info.mmap:
            return MappedRegisters(self.map_region(index, uri=name), name=name)
        return FdRegisters(os.dup(self._live()), info.offset, info.size, name=name)

    # ---- config space -------------------------------------------------------------
    def config_read(self, off: int, n: int) -> bytes:
        info = self.region_info(VFIO_PCI_CONFIG_REGION_INDEX)
        data = os.pread(self._live(), n, info.offset + off)
        if len(data) != n:
            raise VfioError(errno.EIO, f"{self.bdf}: short config read at {off:#x}")
        return data

    def config_write(self, off: int, data: bytes) -> None:
        info = self.region_info(VFIO_PCI_CONFIG_REGION_INDEX)
        if os.pwrite(self._live(), data, info.offset + off) != len(data):
            raise VfioError(errno.EIO, f"{self.bdf}: short config write at {off:#x}")

    def enable_bus_master(self) -> bool:
        """Set Memory Space and Bus Master Enable in the command register.
        MSI and MSI-X are memory writes by the device: without bus
        mastering they are dropped (QEMU drops them too), and vfio-pci leaves
        the bit to user space.  Returns True if the register changed."""
        cmd = struct.unpack("<H", self.config_read(PCI_COMMAND, 2))[0]
        want = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        if want == cmd:
            return False
        self.config_write(PCI_COMMAND, struct.pack("<H", want))
        return True

    # ---- interrupts -----------------------------------------------------------------
    def irq_info(self, index: int) -> IrqInfo:
        buf = bytearray(IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0))
        try:
            self._ioctl(self._live(), VFIO_DEVICE_GET_IRQ_INFO, buf)
        except OSError as e:
            raise VfioError(e.errno, f"{self.bdf}: VFIO_DEVICE_GET_IRQ_INFO({index}) failed: "
                            f"{e.strerror or e}") from None
        _, flags, idx, count = IRQ_INFO.unpack(buf)
        return IrqInfo(idx, flags, count)

    def set_irqs(self, index: int, flags: int, start: int, count: int,
                 data: bytes = b"") -> None:
        buf = bytearray(IRQ_SET.pack(IRQ_SET.size + len(data), flags, index, start, count) + data)
        try:
            self._ioctl(self._live(), VFIO_DEVICE_SET_IRQS, buf)
        except OSError as e:
            raise VfioError(e.errno, f"{self.bdf}: VFIO_DEVICE_SET_IRQS(index {index}, flags "
                            f"{flags:#x}, start {start}, count {count}) failed: "
                            f"{e.strerror or e}") from None

    def bind_eventfds(self, index: int, fds: list[int], start: int = 0) -> None:
        """Interrupt ``start + i`` of ``index`` signals ``fds[i]`` (-1 skips)."""
        self.set_irqs(index, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, start,
                      len(fds), struct.pack(f"={len(fds)}i", *fds))
        self._enabled_irqs.add(index)

    def disable_irqs(self, index: int) -> None:
        self.set_irqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)
        self._enabled_irqs.discard(index)

    def unmask_irq(self, index: int, sub: int = 0) -> None:
        self.set_irqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, sub, 1)

    def trigger_irq(self, index: int, sub: int = 0) -> None:
        """Fire an interrupt from user space (loopback tests)."""
        self.set_irqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, sub, 1)

    def reset(self) -> None:
        if not self.flags & VFIO_DEVICE_FLAGS_RESET:
            raise VfioError(errno.ENOTSUP, f"{self.bdf}: the device has no VFIO reset")
        self._ioctl(self._live(), VFIO_DEVICE_RESET)

    # ---- lifetime -------------------------------------------------------------------
    def _live(self) -> int:
        if self.device_fd < 0:
            raise ValueError(f"vfio:{self.bdf} is closed")
        return self.device_fd

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.device_fd >= 0:
            for index in sorted(self._enabled_irqs):
                try:
                    self.disable_irqs(index)
                except OSError:
                    pass
        # The device fd first, then the group (which leaves the container), then the container.
        for attr in ("device_fd", "group_fd", "container_fd"):
            fd = getattr(self, attr)
            setattr(self, attr, -1)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __enter__(self) -> "VfioDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<VfioDevice {self.bdf} group={self.group} regions={self.num_regions} "
                f"irqs={self.num_irqs}{' closed' if self.closed else ''}>")


def _sys(root: str | None) -> str:
    return sysfs_root(root)


def dev_root_path(root: str | None) -> str:
    return dev_root(root)


class VfioIrq:
    """One interrupt vector bound to an eventfd (an :class:`IrqSource`)."""

    def __init__(self, device: VfioDevice, index: int, vector: int = 0, *,
                 ack: Callable[[], object] | None = None) -> None:
        info = device.irq_info(index)
        name = {v: k for k, v in IRQ_INDEX.items()}.get(index, str(index))
        if not info.flags & VFIO_IRQ_INFO_EVENTFD or info.count <= vector:
            raise VfioError(errno.ENOTSUP, f"{device.bdf}: no {name} vector {vector} "
                            f"(the device has {info.count})")
        self.device = device
        self.index = index
        self.vector = vector
        self.kind = name
        self.automasked = info.automasked
        self.interrupts = 0
        self._ack = ack
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            device.bind_eventfds(index, [self.fd], start=vector)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def fileno(self) -> int:
        if self.fd < 0:
            raise ValueError(f"vfio:{self.device.bdf} {self.kind} interrupt is closed")
        return self.fd

    def consume(self) -> bool:
        try:
            os.eventfd_read(self.fileno())
        except BlockingIOError:
            return False
        self.interrupts += 1
        if self._ack is not None:
            self._ack()
        if self.automasked:
            self.device.unmask_irq(self.index, self.vector)
        return True

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        if not self.device.closed:
            try:
                self.device.disable_irqs(self.index)
            except (OSError, ValueError):
                pass
        os.close(fd)

    def __enter__(self) -> "VfioIrq":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VfioCarrier(Carrier):
    """A :class:`Carrier` over a BAR opened with VFIO; ``device`` is the
    :class:`VfioDevice` (for register access, reset, self-triggered IRQs)."""
    device: VfioDevice
    bar: int


def open_vfio(target: str, *, uri: str, bar: Any = None, doorbell: Any = "auto",
              ring: Any = None, peer: Any = None, vector: Any = 0, fifo: Any = 0,
              irq: Any = "auto", reset: Any = False, offset: Any = None, timeout: Any = None,
              sysfs_root: str | None = None, dev_root: str | None = None,
              ioctl: IoctlFn | None = None, opener: OpenFn | None = None,
              **opts: Any) -> VfioCarrier:
    """Opener for ``vfio:`` (see the module docstring)."""
    try:
        pdev = PciDevice.load(target, sysfs_root=sysfs_root)
    except ValueError as e:
        raise type(e)(f"{uri}: {e}") from None
    kind, bar_no, vec, fifo_no = resolve_pci_options(
        uri, pdev, doorbell=doorbell, ring=ring, bar=bar, vector=vector, fifo=fifo)
    mode = parse_irq_mode(irq, ("auto", "msix", "msi", "intx", "poll"), uri)
    memtype = opts.get("memtype") or "device"
    readonly = parse_bool(opts.get("readonly", False), "readonly")
    bus_base = parse_int(opts["bus_base"], "bus_base") if opts.get("bus_base") is not None else 0

    try:
        dev = VfioDevice(pdev.bdf, sysfs_root=sysfs_root, dev_root=dev_root, ioctl=ioctl,
                         opener=opener)
    except VfioError as e:
        raise type(e)(e.errno, f"{uri}: {e.strerror}") from None
    except DeviceLookupError as e:
        raise DeviceLookupError(f"{uri}: {e}") from None
    closers: list[Callable[[], object]] = []
    try:
        if parse_bool(reset, "reset"):
            dev.reset()
        regs: Registers | None = None
        ring_write = None
        if kind in ("ivshmem", "amp"):
            regs = dev.registers(VFIO_PCI_BAR0_REGION_INDEX)
            closers.append(regs.close)
        elif kind == "ring":
            where, roff, rwidth, rvalue = parse_register_spec(str(ring), "ring")
            rbar = where[3:] if where.startswith("bar") else where
            if not rbar.isdigit():
                raise ValueError(f"{uri}: ring={ring!r}: name a BAR, e.g. ring=bar0:0x40")
            rregs = dev.registers(int(rbar))
            closers.append(rregs.close)
            ring_write = RegisterWrite(rregs, roff, rwidth, rvalue)
        irq_src = None
        if mode != "poll":
            if dev.num_regions > VFIO_PCI_CONFIG_REGION_INDEX:
                dev.enable_bus_master()
            irq_src = _open_irq(dev, mode, vec, kind, regs, uri)
            if irq_src is not None:
                closers.append(irq_src.close)
        bell, own_id, peer_id = build_register_doorbell(
            uri=uri, kind=kind, regs=regs, peer=peer, vector=vec, fifo=fifo_no, irq=irq_src,
            status=False, closers=closers, name=f"vfio:{dev.bdf}", ring=ring_write)
        closers = []
        try:
            region = dev.map_region(bar_no, memtype=memtype, bus_base=bus_base,
                                    readonly=readonly, uri=uri)
        except BaseException:
            bell.close()
            raise
        if offset is None:
            off = fifo_no * 0x4000 if kind == "amp" else 0
        else:
            off = parse_int(offset, "offset")
        try:
            carrier = VfioCarrier(region, bell, uri=uri, offset=off, own_id=own_id,
                                  peer_id=peer_id, closers=[dev.close])
        except BaseException:
            bell.close()
            region.close()
            raise
    except BaseException as e:
        for fn in reversed(closers):
            try:
                fn()
            except OSError:
                pass
        dev.close()
        if isinstance(e, DeviceLookupError):
            raise DeviceLookupError(f"{uri}: {e}") from None
        raise
    carrier.device = dev
    carrier.bar = bar_no
    return carrier


def _open_irq(dev: VfioDevice, mode: str, vector: int, kind: str, regs: Registers | None,
              uri: str) -> VfioIrq | None:
    order = ["msix", "msi", "intx"] if mode == "auto" else [mode]
    for name in order:
        index = IRQ_INDEX[name]
        if index >= dev.num_irqs:
            continue
        info = dev.irq_info(index)
        want = 0 if name == "intx" else vector
        if not info.flags & VFIO_IRQ_INFO_EVENTFD or info.count <= want:
            continue
        ack = None
        if kind == "ivshmem" and name == "intx" and regs is not None:
            # INTx is level: raised while IntrStatus & IntrMask; reading
            # IntrStatus clears it before the line is unmasked.
            regs.write(IVSHMEM_INTR_MASK, 1)
            ack = (lambda r: lambda: r.read(IVSHMEM_INTR_STATUS))(regs)
        return VfioIrq(dev, index, want, ack=ack)
    if mode != "auto":
        raise VfioError(errno.ENOTSUP, f"{uri}: the device has no usable {mode} interrupt "
                        f"(vector {vector})")
    log.info("%s: no usable interrupt; polling", uri)
    return None


register_scheme("vfio", open_vfio, options=VFIO_OPTIONS,
                summary="vfio:BDF[#bar=N]  a PCI device through VFIO: BARs, MSI-X/INTx eventfd "
                        "interrupts, ivshmem / virtio-msg-amp-pci doorbell")
