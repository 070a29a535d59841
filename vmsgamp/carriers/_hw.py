"""Pieces shared by the hardware carriers (``uio:``, ``pci:``, ``vfio:``):
where sysfs and /dev are, PCI addresses and config space, register access,
interrupt sources and the register doorbell built from them.

sysfs and /dev can be moved (tests use fake trees in a temporary directory;
a container may mount the host's sysfs elsewhere): ``VMSGAMP_SYSFS_ROOT``
and ``VMSGAMP_DEV_ROOT``, or the ``sysfs_root``/``dev_root`` arguments of the
classes.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import select
import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from vmsgamp._core.doorbell import Doorbell
from vmsgamp._core.region import Region
from vmsgamp.carriers._registry import parse_int

log = logging.getLogger("vmsgamp.carriers")

SYSFS_ENV = "VMSGAMP_SYSFS_ROOT"
DEV_ENV = "VMSGAMP_DEV_ROOT"

# How often a doorbell without an interrupt source looks again (seconds).
POLL_INTERVAL = 0.0005

# PCI config space (PCI Local Bus spec 3.0, 6.2).
PCI_COMMAND = 0x04
PCI_COMMAND_INTX_DISABLE = 0x400          # bit 10 = byte 5, bit 2
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_MSIX = 0x11

# Known devices: (vendor, device) -> kind.
IVSHMEM_IDS = {(0x1AF4, 0x1110)}
AMP_PCI_IDS = {(0x10EE, 0x9039), (0x10EE, 0x9038)}

# ivshmem BAR0 (QEMU docs/specs/ivshmem-spec.rst).
IVSHMEM_INTR_MASK = 0x00
IVSHMEM_INTR_STATUS = 0x04     # read clears
IVSHMEM_IV_POSITION = 0x08     # our own peer id
IVSHMEM_DOORBELL = 0x0C        # write peer << 16 | vector
# virtio-msg-amp-pci BAR0: NOTIFYi at 0x20 + 4*i (any value drains FIFO i).
AMP_PCI_NOTIFY_BASE = 0x20
AMP_PCI_FIFO_WINDOW = 0x4000   # BAR1: one 16 KiB window per FIFO


class DeviceLookupError(LookupError, ValueError):
    """A device, map or BAR named in a URI does not exist or is ambiguous
    (a ValueError too, so command-line tools report it as a usage error)."""


def sysfs_root(override: str | os.PathLike[str] | None = None) -> str:
    if override is not None:
        return os.fspath(override)
    return os.environ.get(SYSFS_ENV) or "/sys"


def dev_root(override: str | os.PathLike[str] | None = None) -> str:
    if override is not None:
        return os.fspath(override)
    return os.environ.get(DEV_ENV) or "/dev"


def read_attr(path: str, default: str | None = None) -> str | None:
    """A sysfs attribute, stripped; ``default`` if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return default


def read_int_attr(path: str) -> int | None:
    text = read_attr(path)
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        try:
            return int(text, 16)     # PCI ids are "0x1af4", but be lenient
        except ValueError:
            return None


def link_name(path: str) -> str | None:
    """Basename of a symlink's target (a device's driver, its IOMMU group)."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def mode_string(path: str) -> dict[str, object]:
    """Owner, group, mode and whether we may read/write ``path``."""
    try:
        st = os.stat(path)
    except OSError as e:
        return {"path": path, "exists": False, "error": e.strerror}
    return {"path": path, "exists": True, "mode": f"{st.st_mode & 0o7777:04o}",
            "uid": st.st_uid, "gid": st.st_gid,
            "readable": os.access(path, os.R_OK), "writable": os.access(path, os.W_OK)}


# ---- PCI addresses and config space -------------------------------------------------

_BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def normalize_bdf(text: str) -> str:
    """``00:04.0`` or ``0000:00:04.0`` -> ``0000:00:04.0`` (domain 0 when omitted)."""
    m = _BDF_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a PCI address: use DDDD:BB:DD.F or BB:DD.F "
                         f"(e.g. 0000:00:04.0, as `lspci -D` shows)")
    dom, bus, dev, fn = m.groups()
    if int(dev, 16) > 0x1F:
        raise ValueError(f"{text!r}: PCI device number {dev} is above 1f")
    return f"{int(dom or '0', 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{fn}"


class PciConfig:
    """Byte access to ``/sys/bus/pci/devices/BDF/config`` (also reached as
    ``/sys/class/uio/uioN/device/config``).  Unprivileged readers only see
    the first 64 bytes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self, off: int, n: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, n, off)
        finally:
            os.close(fd)

    def read16(self, off: int) -> int:
        data = self.read(off, 2)
        if len(data) != 2:
            raise OSError(errno.EIO, f"{self.path}: short read at {off:#x}")
        return struct.unpack("<H", data)[0]

    def read8(self, off: int) -> int:
        data = self.read(off, 1)
        if len(data) != 1:
            raise OSError(errno.EIO, f"{self.path}: short read at {off:#x}")
        return data[0]

    def write8(self, off: int, value: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.pwrite(fd, bytes([value & 0xFF]), off) != 1:
                raise OSError(errno.EIO, f"{self.path}: short write at {off:#x}")
        finally:
            os.close(fd)

    def clear_intx_disable(self) -> bool:
        """Clear the command register's Interrupt Disable bit (bit 10, i.e.
        byte 5 bit 2), as uio_pci_generic expects after each interrupt.
        Only byte 5 is written so the other command bits are never touched.
        Returns True if the bit was set."""
        hi = self.read8(PCI_COMMAND + 1)
        if not hi & (PCI_COMMAND_INTX_DISABLE >> 8):
            return False
        self.write8(PCI_COMMAND + 1, hi & ~(PCI_COMMAND_INTX_DISABLE >> 8))
        return True

    def capabilities(self) -> list[int]:
        """Capability ids in the standard list (empty if unreadable)."""
        try:
            if not self.read16(PCI_STATUS) & PCI_STATUS_CAP_LIST:
                return []
            ptr = self.read8(PCI_CAPABILITY_LIST) & 0xFC
            found: list[int] = []
            seen: set[int] = set()
            while ptr and ptr not in seen and len(found) < 48:
                seen.add(ptr)
                hdr = self.read(ptr, 2)
                if len(hdr) != 2:
                    break        # beyond what an unprivileged reader may see
                found.append(hdr[0])
                ptr = hdr[1] & 0xFC
            return found
        except OSError:
            return []


# ---- register access ---------------------------------------------------------------

_WIDTHS = (8, 16, 32, 64)


class Registers(Protocol):
    size: int

    def read(self, off: int, width: int = 32) -> int: ...
    def write(self, off: int, value: int, width: int = 32) -> None: ...
    def close(self) -> None: ...


def _check_access(size: int, off: int, width: int, what: str) -> None:
    if width not in _WIDTHS:
        raise ValueError(f"register width must be one of 8, 16, 32, 64 bits, not {width}")
    if off < 0 or off % (width // 8):
        raise ValueError(f"{what}: offset {off:#x} is not aligned to {width} bits")
    if off + width // 8 > size:
        raise ValueError(f"{what}: offset {off:#x} (+{width // 8}) is outside the "
                         f"{size:#x}-byte register block")


class MappedRegisters:
    """Registers in a mapping: single, naturally aligned loads and stores of
    the given width (acquire on read, release on write, so payload written
    before a doorbell write is visible first)."""

    def __init__(self, region: Region, *, own: bool = True, name: str = "") -> None:
        self.region: Region | None = region
        self.size = region.size
        self.name = name or (region.uri or "registers")
        self._own = own

    def read(self, off: int, width: int = 32) -> int:
        r = self._live()
        _check_access(self.size, off, width, self.name)
        return getattr(r, f"load{width}")(off, "acquire")

    def write(self, off: int, value: int, width: int = 32) -> None:
        r = self._live()
        _check_access(self.size, off, width, self.name)
        getattr(r, f"store{width}")(off, value & ((1 << width) - 1), "release")

    def _live(self) -> Region:
        if self.region is None:
            raise ValueError(f"{self.name}: registers are closed")
        return self.region

    def close(self) -> None:
        region, self.region = self.region, None
        if region is not None and self._own:
            region.close()

    def __enter__(self) -> "MappedRegisters":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FdRegisters:
    """Registers reached by pread/pwrite at ``base`` of an fd: a VFIO region
    the kernel does not let us mmap (BARs smaller than a page).  The kernel
    turns an aligned 4-byte pwrite into one 32-bit MMIO write."""

    _FMT = {8: "=B", 16: "=H", 32: "=I", 64: "=Q"}

    def __init__(self, fd: int, base: int, size: int, *, own: bool = True, name: str = "") -> None:
        self.fd = fd
        self.base = base
        self.size = size
        self.name = name or "registers"
        self._own = own

    def read(self, off: int, width: int = 32) -> int:
        _check_access(self.size, off, width, self.name)
        data = os.pread(self._live(), width // 8, self.base + off)
        if len(data) != width // 8:
            raise OSError(errno.EIO, f"{self.name}: short read at {off:#x}")
        return struct.unpack(self._FMT[width], data)[0]

    def write(self, off: int, value: int, width: int = 32) -> None:
        _check_access(self.size, off, width, self.name)
        data = struct.pack(self._FMT[width], value & ((1 << width) - 1))
        if os.pwrite(self._live(), data, self.base + off) != len(data):
            raise OSError(errno.EIO, f"{self.name}: short write at {off:#x}")

    def _live(self) -> int:
        if self.fd < 0:
            raise ValueError(f"{self.name}: registers are closed")
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0 and self._own:
            os.close(fd)

    def __enter__(self) -> "FdRegisters":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RegisterWrite:
    """One register write: the doorbell towards the peer, or an interrupt
    acknowledge (STM32 IPCC channel flag, Versal IPI status bit)."""
    regs: Registers
    offset: int
    width: int = 32
    value: int = 1

    def __call__(self) -> None:
        self.regs.write(self.offset, self.value, self.width)

    def describe(self) -> str:
        return f"write {self.value:#x} ({self.width}-bit) at {self.offset:#x}"


def parse_register_spec(spec: str, what: str) -> tuple[str, int, int, int]:
    """``WHERE:OFFSET[:WIDTH[:VALUE]]`` -> (where, offset, width in bits, value).
    WIDTH is in bits (8, 16, 32, 64; default 32); VALUE defaults to 1."""
    parts = spec.split(":")
    if len(parts) < 2 or len(parts) > 4 or not parts[0]:
        raise ValueError(f"{what}={spec!r}: use MAP:OFFSET[:WIDTH[:VALUE]], e.g. "
                         f"{what}=map1:0x10 or {what}=map1:0x10:32:0x1")
    where = parts[0]
    offset = parse_int(parts[1], f"{what} offset")
    width = parse_int(parts[2], f"{what} width") if len(parts) > 2 and parts[2] else 32
    if width not in _WIDTHS:
        raise ValueError(f"{what}={spec!r}: width must be 8, 16, 32 or 64 (bits), not {width}")
    value = parse_int(parts[3], f"{what} value") if len(parts) > 3 else 1
    if offset < 0 or offset % (width // 8):
        raise ValueError(f"{what}={spec!r}: offset {offset:#x} is not aligned to {width} bits")
    if not 0 <= value < (1 << width):
        raise ValueError(f"{what}={spec!r}: value {value:#x} does not fit in {width} bits")
    return where, offset, width, value


# ---- interrupt sources and the register doorbell -------------------------------------

class IrqSource(Protocol):
    """Something with an fd that becomes readable on an interrupt."""
    interrupts: int

    def fileno(self) -> int: ...
    def consume(self) -> bool: ...      # non-blocking: take pending events and re-arm
    def close(self) -> None: ...


_FD_SETSIZE = 1024


def wait_readable(fd: int, timeout: float | None) -> bool:
    """Whether ``fd`` became readable within ``timeout`` s (None: no limit).
    select() where the fd allows it: its timeout has microseconds, so a
    short wait stays short (poll() would round 20 us up to 1 ms)."""
    if fd < _FD_SETSIZE:
        return bool(select.select([fd], [], [], None if timeout is None else max(0.0, timeout))[0])
    p = select.poll()
    p.register(fd, select.POLLIN)
    ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return bool(p.poll(ms))


class RegisterDoorbell(Doorbell):
    """A doorbell made of parts: ``ring`` (a register write towards the peer,
    or None: the peer polls), ``irq`` (an interrupt source we sleep on, or
    None; a device-side acknowledge such as reading ivshmem IntrStatus
    belongs to the source, which runs it before re-arming) and ``status``
    (a register poll that says "rung", for devices whose interrupt
    cannot reach user space).

    Without ``irq`` (and without ``status``) waits sleep in short slices and
    report "not rung", and ``can_wait`` is False so event loops poll the FIFO
    instead of waiting on :meth:`fileno`.  The FIFO calls ``ring``/``wait``
    with the GIL held (Python doorbell)."""

    def __init__(self, *, ring: Callable[[], None] | None = None, irq: IrqSource | None = None,
                 status: Callable[[], bool] | None = None,
                 closers: Iterable[Callable[[], object]] = (), name: str = "doorbell") -> None:
        self._ring = ring
        self.irq = irq
        self._status = status
        self._closers = list(closers)
        self.name = name
        self.ring_count = 0
        self.wakeup_count = 0
        self._warned_no_ring = False

    @property
    def can_wait(self) -> bool:
        return self.irq is not None and not self.closed

    @property
    def interrupts(self) -> int:
        return self.irq.interrupts if self.irq is not None else 0

    def ring(self) -> None:
        if self.closed:
            raise ValueError(f"{self.name}: doorbell is closed")
        if self._ring is None:
            if not self._warned_no_ring:
                self._warned_no_ring = True
                log.info("%s: no doorbell register towards the peer; it must poll", self.name)
            return
        self._ring()
        self.ring_count += 1

    def _take(self) -> bool:
        assert self.irq is not None
        got = self.irq.consume()
        if got:
            self.wakeup_count += 1
        return got

    def wait(self, timeout: float | None = None) -> bool:
        if self.closed:
            raise ValueError(f"{self.name}: doorbell is closed")
        if self.irq is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if wait_readable(self.irq.fileno(), left) and self._take():
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
        if self._status is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._status():
                    self.wakeup_count += 1
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(POLL_INTERVAL)
        if timeout is None:
            raise ValueError(f"{self.name}: no interrupt source, cannot wait forever; "
                             f"poll the FIFO instead")
        time.sleep(min(timeout, POLL_INTERVAL))
        return False

    def drain(self) -> None:
        if self.closed:
            return
        if self.irq is not None:
            if wait_readable(self.irq.fileno(), 0):
                self._take()
        elif self._status is not None:
            self._status()

    def fileno(self) -> int:
        if self.irq is None or self.closed:
            raise ValueError(f"{self.name} has no interrupt fd (polling mode)")
        return self.irq.fileno()

    def close(self) -> None:
        if self.closed:
            return
        Doorbell.close(self)
        irq, self.irq = self.irq, None
        if irq is not None:
            irq.close()
        closers, self._closers = self._closers, []
        for fn in reversed(closers):
            try:
                fn()
            except OSError as e:   # closing must not fail half-way
                log.debug("%s: close: %s", self.name, e)

    def __repr__(self) -> str:
        mode = ("irq" if self.irq is not None else "status" if self._status is not None
                else "poll")
        return (f"<{type(self).__name__} {self.name} wait={mode} "
                f"ring={'yes' if self._ring else 'no'}{' closed' if self.closed else ''}>")


class UioInterrupt:
    """The interrupt side of ``/dev/uioN`` (Documentation/driver-api/uio-howto.rst).

    * A read of exactly 4 bytes returns the total interrupt count (native
      s32); a jump of more than one means interrupts were missed
      (``missed``, logged).
    * Re-arm: ``uio_pdrv_genirq``/``uio_dmem_genirq`` (and most drivers with
      an ``irqcontrol``) disable the line in their handler; writing a
      native-endian 1 re-enables it.  ``uio_pci_generic`` sets the PCI
      Interrupt Disable bit instead; it is cleared through the device's
      config space (``config_path``).  A driver without ``irqcontrol``
      answers the write with ENOSYS: nothing to re-arm then.
    * A device without an interrupt answers reads and writes with EIO.
    """

    def __init__(self, fd: int, *, name: str, driver: str | None = None,
                 config_path: str | None = None, initial_count: int | None = None,
                 ack: Callable[[], None] | None = None, own: bool = True) -> None:
        self.fd = fd
        self.name = name
        self.driver = driver
        self.config = PciConfig(config_path) if config_path else None
        self.count = initial_count       # last count seen (None: not yet known)
        self.interrupts = 0
        self.missed = 0
        self._ack = ack
        self._own = own
        self._irqcontrol = True          # False after ENOSYS

    @property
    def uses_config_space(self) -> bool:
        return self.driver == "uio_pci_generic" and self.config is not None

    def enable(self) -> None:
        """Arm the interrupt.  Raises OSError(EIO) if the device has none."""
        if self.uses_config_space:
            try:
                assert self.config is not None
                self.config.clear_intx_disable()
                return
            except PermissionError:
                # Config space not writable for us: the driver's irqcontrol
                # (pci_intx) does the same job.
                log.debug("%s: config space not writable, re-arming via write()", self.name)
        if not self._irqcontrol:
            return
        try:
            n = os.write(self._live(), struct.pack("=i", 1))
        except OSError as e:
            if e.errno == errno.ENOSYS:
                self._irqcontrol = False   # no irqcontrol: the line stays enabled
                return
            if e.errno == errno.EIO:
                raise OSError(errno.EIO, f"{self.name}: the device has no interrupt "
                              f"(write to re-enable failed with EIO)") from None
            raise OSError(e.errno, f"{self.name}: cannot re-enable the interrupt: "
                          f"{e.strerror}") from None
        if n != 4:
            raise OSError(errno.EIO, f"{self.name}: short write ({n} bytes) re-enabling "
                          f"the interrupt")

    def consume(self) -> bool:
        """Read the count if an interrupt is pending (non-blocking), ack,
        re-arm.  True if there was one."""
        try:
            data = os.read(self._live(), 4)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno == errno.EIO:
                raise OSError(errno.EIO, f"{self.name}: interrupt read failed with EIO (the "
                              f"device has no interrupt, or it was removed)") from None
            raise
        if len(data) != 4:
            raise OSError(errno.EIO, f"{self.name}: read {len(data)} bytes from the UIO "
                          f"device, expected the 4-byte interrupt count")
        count = struct.unpack("=I", data)[0]
        if self.count is not None:
            delta = (count - self.count) & 0xFFFFFFFF
            if delta > 1:
                self.missed += delta - 1
                log.warning("%s: %d interrupt(s) missed (count %d -> %d)",
                            self.name, delta - 1, self.count, count)
        self.count = count
        self.interrupts += 1
        if self._ack is not None:
            self._ack()
        self.enable()
        return True

    def fileno(self) -> int:
        return self._live()

    def _live(self) -> int:
        if self.fd < 0:
            raise ValueError(f"{self.name}: the interrupt fd is closed")
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0 and self._own:
            os.close(fd)

    def __enter__(self) -> "UioInterrupt":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ivshmem_peer_default(own_id: int, peer: object, uri: str) -> int:
    """``peer=`` or, in the usual two-party set-up, the other one of 0 and 1."""
    if peer is not None:
        pid = parse_int(peer, "peer")
        if not 0 <= pid <= 0xFFFF:
            raise ValueError(f"{uri}: peer must be in 0..65535, not {pid}")
        if pid == own_id:
            raise ValueError(f"{uri}: peer={pid} is our own ivshmem id (IVPosition)")
        return pid
    if own_id in (0, 1):
        return 1 - own_id
    raise ValueError(f"{uri}: our ivshmem id is {own_id}; say which peer to ring "
                     f"with peer=N")


def ivshmem_ring(regs: Registers, peer: int, vector: int) -> Callable[[], None]:
    value = ((peer & 0xFFFF) << 16) | (vector & 0xFFFF)
    return RegisterWrite(regs, IVSHMEM_DOORBELL, 32, value)


def ivshmem_status(regs: Registers) -> Callable[[], bool]:
    """Read (and so clear) IntrStatus: True if an interrupt was pending."""
    return lambda: regs.read(IVSHMEM_INTR_STATUS) != 0


def amp_pci_ring(regs: Registers, fifo: int) -> Callable[[], None]:
    return RegisterWrite(regs, AMP_PCI_NOTIFY_BASE + 4 * fifo, 32, 1)

