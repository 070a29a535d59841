"""``pci:`` -- a PCI device's BAR mapped through sysfs, with a register doorbell.

Grammar::

    pci:BDF[#bar=N][&wc=1][&doorbell=auto|ivshmem|amp|none][&ring=barN:OFFSET[:WIDTH[:VALUE]]]
           [&peer=P][&vector=V][&fifo=I][&irq=auto|uio|status|poll][&force=1]

* ``BDF`` is ``DDDD:BB:DD.F`` (``lspci -D``) or ``BB:DD.F`` (domain 0).
* ``bar`` is the BAR holding the shared memory: ``/sys/bus/pci/devices/BDF/resourceN``
  (``resourceN_wc`` with ``wc=1``, a write-combining map of a prefetchable
  BAR), sized from the file.  Default: BAR2 for ivshmem (1af4:1110), BAR1 (the
  FIFO RAM) for virtio-msg-amp-pci (10ee:9039/9038); other devices need it.
* ``doorbell`` (default ``auto``, from the device id):

  - ``ivshmem``: BAR0 register block.  Ringing writes ``peer << 16 | vector``
    to Doorbell (0x0C).  ``peer`` defaults to the other one of ids 0 and 1
    (our id is IVPosition, 0x08).  Waiting: ``irq=uio`` sleeps on the UIO fd
    when the device is bound to ``uio_pci_generic`` (IntrMask is set to 1 and
    IntrStatus is read to acknowledge); ``irq=status`` polls IntrStatus;
    ``irq=poll`` polls the FIFO.  ``auto`` picks ``uio`` when bound to
    uio_pci_generic and the device has no MSI-X (QEMU's ``ivshmem-doorbell``
    only ever signals MSI-X, which reaches user space only through
    ``vfio:``), else ``poll``.
  - ``amp``: virtio-msg-amp-pci: ringing writes 1 to NOTIFYi (BAR0 0x20 + 4*i,
    ``i = fifo``); the carrier's ``offset`` defaults to FIFO i's 16 KiB
    window in BAR1.  Its interrupts are MSI-X only, so waiting polls.
  - ``ring=barN:OFFSET[:WIDTH[:VALUE]]``: any other card's doorbell register
    (WIDTH in bits, VALUE default 1); waiting polls.
  - ``none``: a polling doorbell.

* ``force=1`` maps BARs of a device bound to a kernel driver (normally refused:
  two owners of one device).

Memory type: BARs are device memory (uncached; arm64 faults on wide or
unaligned accesses to it), so ``memtype`` defaults to ``device``.  All FIFO
index and descriptor accesses go through fixed-width helpers; with
``memtype='device'`` payload copies are made of aligned word-sized accesses
too.  ``memtype=normal`` is only right for a ``wc=1`` map of RAM-like
prefetchable memory on a platform that tolerates it.

sysfs can be moved with ``VMSGAMP_SYSFS_ROOT`` (tests use a fake tree).
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from vmsgamp._core.doorbell import Doorbell, PollingDoorbell
from vmsgamp._core.region import Region
from vmsgamp.carriers._hw import (
    AMP_PCI_FIFO_WINDOW, AMP_PCI_IDS, IVSHMEM_IDS, IVSHMEM_INTR_MASK, IVSHMEM_INTR_STATUS,
    IVSHMEM_IV_POSITION, PCI_CAP_ID_MSIX, PCI_COMMAND, DeviceLookupError, IrqSource,
    MappedRegisters, PciConfig, RegisterDoorbell, RegisterWrite, Registers, amp_pci_ring,
    ivshmem_peer_default, ivshmem_ring, ivshmem_status, link_name, normalize_bdf,
    parse_register_spec, read_attr, read_int_attr, sysfs_root,
)
from vmsgamp.carriers._registry import (
    Carrier, parse_bool, parse_int, register_scheme,
)

__all__ = ["PciBar", "PciDevice", "PciCarrier", "list_pci_devices", "map_bar", "open_pci",
           "PCI_OPTIONS"]

log = logging.getLogger("vmsgamp.pci")

PCI_OPTIONS = ("bar", "wc", "doorbell", "ring", "peer", "vector", "fifo", "irq", "force")
# Drivers whose BARs we may map without stepping on a kernel driver.
USER_SPACE_DRIVERS = (None, "uio_pci_generic", "pci-stub", "vfio-pci")
IORESOURCE_IO = 0x100
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000
PCI_COMMAND_MEMORY = 0x2


@dataclass(frozen=True)
class PciBar:
    index: int
    start: int
    end: int
    flags: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1 if self.end > self.start else 0

    @property
    def kind(self) -> str:
        if self.flags & IORESOURCE_IO:
            return "io"
        if self.flags & IORESOURCE_MEM:
            return "mem-prefetch" if self.flags & IORESOURCE_PREFETCH else "mem"
        return "none"


@dataclass
class PciDevice:
    bdf: str
    path: str
    vendor: int | None
    device: int | None
    class_code: int | None
    driver: str | None
    iommu_group: int | None
    bars: list[PciBar]
    uio: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, bdf: str, *, sysfs_root: str | None = None) -> "PciDevice":
        bdf = normalize_bdf(bdf)
        path = os.path.join(_sys(sysfs_root), "bus", "pci", "devices", bdf)
        if not os.path.isdir(path):
            raise DeviceLookupError(f"no PCI device {bdf} (no {path}); `lspci -D` lists the "
                                    f"devices")
        bars: list[PciBar] = []
        text = read_attr(os.path.join(path, "resource")) or ""
        for i, line in enumerate(text.splitlines()[:6]):
            parts = line.split()
            if len(parts) >= 3:
                try:
                    start, end, flags = (int(p, 16) for p in parts[:3])
                except ValueError:
                    continue
                bars.append(PciBar(i, start, end, flags))
        group = link_name(os.path.join(path, "iommu_group"))
        try:
            uio = sorted(os.listdir(os.path.join(path, "uio")), key=lambda n: int(n[3:] or 0))
        except (OSError, ValueError):
            uio = []
        cls_code = read_int_attr(os.path.join(path, "class"))
        return cls(bdf=bdf, path=path, vendor=read_int_attr(os.path.join(path, "vendor")),
                   device=read_int_attr(os.path.join(path, "device")), class_code=cls_code,
                   driver=link_name(os.path.join(path, "driver")),
                   iommu_group=int(group) if group and group.isdigit() else None,
                   bars=bars, uio=uio)

    @property
    def ids(self) -> str:
        return f"{self.vendor or 0:04x}:{self.device or 0:04x}"

    @property
    def kind(self) -> str | None:
        key = (self.vendor, self.device)
        if key in IVSHMEM_IDS:
            return "ivshmem"
        if key in AMP_PCI_IDS:
            return "amp"
        return None

    @property
    def config(self) -> PciConfig:
        return PciConfig(os.path.join(self.path, "config"))

    def bar(self, index: int) -> PciBar | None:
        for b in self.bars:
            if b.index == index:
                return b
        return None

    def resource_path(self, bar: int, wc: bool = False) -> str:
        return os.path.join(self.path, f"resource{bar}" + ("_wc" if wc else ""))

    def has_msix(self) -> bool:
        caps = self.config.capabilities()
        if caps:
            return PCI_CAP_ID_MSIX in caps
        # Capabilities unreadable (not root): QEMU's ivshmem-doorbell puts its
        # MSI-X table in BAR1 and ivshmem-plain has no BAR1.
        b1 = self.bar(1)
        return self.kind == "ivshmem" and b1 is not None and b1.size > 0

    def memory_decoding(self) -> bool | None:
        """The command register's Memory Space bit (None: unreadable)."""
        try:
            return bool(self.config.read16(PCI_COMMAND) & PCI_COMMAND_MEMORY)
        except OSError:
            return None

    def describe(self) -> str:
        return f"{self.bdf} [{self.ids}] driver {self.driver or 'none'}"

    def as_dict(self) -> dict[str, Any]:
        return {"bdf": self.bdf, "ids": self.ids, "kind": self.kind, "driver": self.driver,
                "iommu_group": self.iommu_group, "uio": self.uio,
                "bars": [{"index": b.index, "start": f"{b.start:#x}", "size": b.size,
                          "kind": b.kind} for b in self.bars if b.size]}


def _sys(root: str | None) -> str:
    return sysfs_root(root)


def list_pci_devices(*, sysfs_root: str | None = None) -> list[PciDevice]:
    base = os.path.join(_sys(sysfs_root), "bus", "pci", "devices")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    out = []
    for n in names:
        try:
            out.append(PciDevice.load(n, sysfs_root=sysfs_root))
        except ValueError:
            continue
    return out


def map_bar(dev: PciDevice, bar: int, *, wc: bool = False, memtype: str = "device",
            bus_base: int = 0, readonly: bool = False, uri: str | None = None,
            size: int | None = None) -> Region:
    """Map BAR ``bar`` of ``dev`` through its sysfs resource file."""
    path = dev.resource_path(bar, wc)
    info = dev.bar(bar)
    if info is not None and info.kind == "io":
        raise ValueError(f"{dev.bdf} BAR{bar} is an I/O-port BAR; it cannot be mapped")
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if wc and os.path.exists(dev.resource_path(bar)):
            raise DeviceLookupError(f"{dev.bdf} BAR{bar} is not prefetchable: there is no "
                                    f"resource{bar}_wc; drop wc=1") from None
        raise DeviceLookupError(f"{dev.bdf} has no BAR{bar} ({path} does not exist); BARs: "
                                f"{_bar_list(dev)}") from None
    except PermissionError as e:
        raise PermissionError(e.errno, f"cannot open {path}: permission denied (BAR "
                              f"resource files are root-only; run as root)") from None
    try:
        actual = os.fstat(fd).st_size
        want = actual if size is None else size
        if want == 0:
            raise ValueError(f"{dev.bdf} BAR{bar} has size 0 (not implemented by the device)")
        if want > actual:
            raise ValueError(f"{dev.bdf} BAR{bar} is {actual:#x} bytes, {want:#x} needed")
        return Region.from_fd(fd, want, bus_base=bus_base, memtype=memtype,
                              readonly=readonly, own_fd=True,
                              uri=uri or f"pci:{dev.bdf}#bar={bar}")
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError) and not isinstance(e, PermissionError):
            raise OSError(e.errno, f"cannot map {path}: "
                          f"{os.strerror(e.errno) if e.errno else e}") from None
        raise


def _bar_list(dev: PciDevice) -> str:
    bars = [f"BAR{b.index} ({b.size:#x} bytes, {b.kind})" for b in dev.bars if b.size]
    return ", ".join(bars) or "none"


class PciCarrier(Carrier):
    """A :class:`Carrier` over a PCI BAR; ``device``, ``bar``, ``own_id`` say more."""
    device: PciDevice
    bar: int


def default_bar(kind: str | None) -> int | None:
    return {"ivshmem": 2, "amp": 1}.get(kind or "")



def resolve_pci_options(uri: str, dev: Any, *, doorbell: Any, ring: Any, bar: Any, vector: Any,
                        fifo: Any, bar_hint: str = "") -> tuple[str, int, int, int]:
    """Doorbell kind, shared-memory BAR, vector and FIFO index for a PCI
    device opened through sysfs (pci:) or VFIO (vfio:)."""
    kind = str(doorbell).strip().lower()
    if ring is not None:
        if kind not in ("auto", "ring"):
            raise ValueError(f"{uri}: ring= and doorbell={doorbell} exclude each other")
        kind = "ring"
    elif kind == "auto":
        kind = dev.kind or "none"
    if kind not in ("ivshmem", "amp", "ring", "none"):
        raise ValueError(f"{uri}: doorbell={doorbell!r}: use auto, ivshmem, amp or none "
                         f"(or ring=barN:OFFSET)")
    if bar is None:
        bar_no = default_bar(dev.kind)
        if bar_no is None:
            raise ValueError(f"{uri}: {dev.describe()} is not a known device; say which BAR "
                             f"holds the shared memory with #bar=N{bar_hint}")
    else:
        bar_no = parse_int(bar, "bar")
        if not 0 <= bar_no <= 5:
            raise ValueError(f"{uri}: bar must be 0..5, not {bar_no}")
    vec = parse_int(vector, "vector")
    fifo_no = parse_int(fifo, "fifo")
    if not 0 <= vec <= 0xFFFF or not 0 <= fifo_no < 8:
        raise ValueError(f"{uri}: vector must be 0..65535 and fifo 0..7")
    return kind, bar_no, vec, fifo_no


def parse_irq_mode(value: Any, allowed: tuple[str, ...], uri: str) -> str:
    mode = str(value).strip().lower()
    if mode in ("0", "no", "off", "none", "false"):
        mode = "poll"
    if mode not in allowed:
        raise ValueError(f"{uri}: irq={value!r}: use one of {', '.join(allowed)}")
    return mode


def build_register_doorbell(*, uri: str, kind: str, regs: Registers | None, peer: Any,
                            vector: int, fifo: int, irq: IrqSource | None, status: bool,
                            closers: list[Callable[[], object]], name: str,
                            ring: RegisterWrite | None = None
                            ) -> tuple[Doorbell, int | None, int | None]:
    """The doorbell for a register block of ``kind`` (ivshmem/amp/ring/none),
    shared by ``pci:`` and ``vfio:``.  Returns (doorbell, own_id, peer_id)."""
    own_id = peer_id = None
    ring_fn: Callable[[], None] | None = ring
    status_fn = None
    if kind == "ivshmem":
        assert regs is not None
        own_id = regs.read(IVSHMEM_IV_POSITION) & 0xFFFF
        peer_id = ivshmem_peer_default(own_id, peer, uri)
        ring_fn = ivshmem_ring(regs, peer_id, vector)
        if status:
            status_fn = ivshmem_status(regs)
    elif kind == "amp":
        assert regs is not None
        ring_fn = amp_pci_ring(regs, fifo)
    if ring_fn is None and irq is None and status_fn is None:
        for fn in reversed(closers):
            fn()
        return PollingDoorbell(), own_id, peer_id
    return (RegisterDoorbell(ring=ring_fn, irq=irq, status=status_fn, closers=closers,
                             name=name), own_id, peer_id)


def open_pci(target: str, *, uri: str, bar: Any = None, wc: Any = False, doorbell: Any = "auto",
             ring: Any = None, peer: Any = None, vector: Any = 0, fifo: Any = 0,
             irq: Any = "auto", force: Any = False, offset: Any = None, timeout: Any = None,
             sysfs_root: str | None = None, dev_root: str | None = None,
             **opts: Any) -> PciCarrier:
    """Opener for ``pci:`` (see the module docstring)."""
    try:
        dev = PciDevice.load(target, sysfs_root=sysfs_root)
    except DeviceLookupError as e:
        raise DeviceLookupError(f"{uri}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{uri}: {e}") from None
    if dev.driver not in USER_SPACE_DRIVERS and not parse_bool(force, "force"):
        raise ValueError(f"{uri}: {dev.bdf} is bound to the kernel driver {dev.driver}; "
                         f"unbind it (echo {dev.bdf} > /sys/bus/pci/drivers/{dev.driver}/unbind) "
                         f"or bind uio_pci_generic, or pass force=1")
    if dev.memory_decoding() is False:
        raise OSError(errno.EIO, f"{uri}: memory decoding is off for {dev.bdf} (command "
                      f"register); enable the device: echo 1 > {dev.path}/enable")
    kind, bar_no, vec, fifo_no = resolve_pci_options(
        uri, dev, doorbell=doorbell, ring=ring, bar=bar, vector=vector, fifo=fifo,
        bar_hint=f" (BARs: {_bar_list(dev)})")
    mode = parse_irq_mode(irq, ("auto", "uio", "status", "poll"), uri)
    if mode == "status" and kind != "ivshmem":
        raise ValueError(f"{uri}: irq=status reads ivshmem's IntrStatus; this doorbell is {kind}")
    if mode == "auto":
        mode = ("uio" if kind == "ivshmem" and dev.driver == "uio_pci_generic" and dev.uio
                and not dev.has_msix() else "poll")
    if mode == "uio" and not dev.uio:
        raise ValueError(f"{uri}: irq=uio needs {dev.bdf} bound to uio_pci_generic "
                         f"(driver: {dev.driver or 'none'})")

    memtype = opts.get("memtype") or "device"
    readonly = parse_bool(opts.get("readonly", False), "readonly")
    bus_base = parse_int(opts["bus_base"], "bus_base") if opts.get("bus_base") is not None else 0
    closers: list[Callable[[], object]] = []
    region = None
    try:
        regs: MappedRegisters | None = None
        ring_write = None
        if kind in ("ivshmem", "amp"):
            regs = MappedRegisters(map_bar(dev, 0, memtype="device", uri=f"pci:{dev.bdf}#bar=0"),
                                   name=f"{dev.bdf} BAR0")
            closers.append(regs.close)
        elif kind == "ring":
            where, roff, rwidth, rvalue = parse_register_spec(str(ring), "ring")
            rbar = where[3:] if where.startswith("bar") else where
            if not rbar.isdigit():
                raise ValueError(f"{uri}: ring={ring!r}: name a BAR, e.g. ring=bar0:0x40")
            rregs = MappedRegisters(map_bar(dev, int(rbar), memtype="device"),
                                    name=f"{dev.bdf} BAR{rbar}")
            closers.append(rregs.close)
            ring_write = RegisterWrite(rregs, roff, rwidth, rvalue)
        irq_src = None
        if mode == "uio":
            from vmsgamp.carriers.uio import find_uio_device, open_uio_interrupt
            assert regs is not None
            udev = find_uio_device(dev.uio[0], sysfs_root=sysfs_root, dev_root=dev_root)
            # INTx is raised while IntrStatus & IntrMask; reading IntrStatus
            # acknowledges before the line is re-enabled.
            regs.write(IVSHMEM_INTR_MASK, 1)
            status_reader = regs
            irq_src = open_uio_interrupt(
                udev, ack=lambda: status_reader.read(IVSHMEM_INTR_STATUS), required=True)
            if irq_src is not None:
                closers.append(irq_src.close)
        bell, own_id, peer_id = build_register_doorbell(
            uri=uri, kind=kind, regs=regs, peer=peer, vector=vec, fifo=fifo_no, irq=irq_src,
            status=mode == "status", closers=closers, name=f"pci:{dev.bdf}", ring=ring_write)
        closers = []              # the doorbell owns them now
        try:
            region = map_bar(dev, bar_no, wc=parse_bool(wc, "wc"), memtype=memtype,
                             bus_base=bus_base, readonly=readonly, uri=uri)
        except BaseException:
            bell.close()
            raise
        if offset is None:
            off = fifo_no * AMP_PCI_FIFO_WINDOW if kind == "amp" else 0
        else:
            off = parse_int(offset, "offset")
        try:
            carrier = PciCarrier(region, bell, uri=uri, offset=off, own_id=own_id,
                                 peer_id=peer_id)
        except BaseException:
            bell.close()
            region.close()
            raise
    except DeviceLookupError as e:
        _close_all(closers)
        raise DeviceLookupError(f"{uri}: {e}") from None
    except BaseException:
        _close_all(closers)
        raise
    carrier.device = dev
    carrier.bar = bar_no
    return carrier


def _close_all(closers: list[Callable[[], object]]) -> None:
    for fn in reversed(closers):
        try:
            fn()
        except OSError:
            pass


register_scheme("pci", open_pci, options=PCI_OPTIONS,
                summary="pci:BDF[#bar=N]  a PCI BAR via sysfs; ivshmem / virtio-msg-amp-pci "
                        "register doorbell, UIO interrupt or polling")
