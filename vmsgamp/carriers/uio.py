"""``uio:`` -- shared memory and interrupts of a Linux UIO device.

Grammar::

    uio:NAME[#map=N|MAPNAME][&ring=[DEV/]MAP:OFFSET[:WIDTH[:VALUE]]]
            [&ack=[DEV/]MAP:OFFSET[:WIDTH[:VALUE]]][&irq=auto|none|required|DEV]
    uio:uio3        uio:/dev/uio3        /dev/uio3   (the device by number)

* ``NAME`` is matched against ``/sys/class/uio/*/name`` (the device-tree
  node name or ``linux,uio-name`` with ``uio_pdrv_genirq``); no match or more
  than one is an error listing what exists.  ``uioN`` and ``/dev/uioN`` name
  the device directly.
* ``map`` selects ``maps/mapN`` by number or by its ``name`` (default 0).
  It is mapped at mmap offset ``N * pagesize``, and the map's ``offset``
  attribute is added to the pointer (devices not starting on a page), as the
  UIO HOWTO says.  Current kernels publish ``size`` page-rounded and
  including ``offset`` (and refuse longer mappings), so ``size`` bytes are
  mapped and the region is ``size - offset`` long.  ``bus_base`` defaults to
  the map's ``addr + offset``.
* ``irq``: ``auto`` (default) sleeps on the device's interrupt if it has one
  and polls otherwise; ``none`` always polls; ``required`` fails if there is
  no interrupt; another UIO device (``irq=libmetal-ipi``) takes the
  interrupt from that device (Versal: memory and IPI are separate UIO nodes).
* ``ring``: the doorbell towards the peer, a register write in a map of this
  or another UIO device: ``ring=map1:0x10`` writes a 32-bit 1 at offset
  0x10 of map 1; ``ring=ipcc/0:0x08:32:0x10`` writes 0x10 into map 0 of
  the device named ``ipcc``.  WIDTH is in bits (8/16/32/64).  Each SoC's
  mailbox differs (STM32 IPCC, Versal IPI), hence the general form.
  Without ``ring`` the peer must poll.
* ``ack``: a register write made after each received interrupt, before it
  is re-enabled (clear an IPCC channel flag or an IPI status bit).

Interrupts follow the UIO HOWTO: a read of exactly 4 bytes returns the
interrupt count (a jump means interrupts were missed: logged and counted in
``doorbell.irq.missed``); ``uio_pdrv_genirq``/``uio_dmem_genirq`` are
re-enabled by writing a native-endian 1, ``uio_pci_generic`` by clearing the
PCI Interrupt Disable bit through ``device/config``.

Memory type: UIO maps are device memory (mapped uncached by the kernel; arm64
faults on wide or unaligned accesses to it), so ``memtype`` defaults to
``device``.  All FIFO index and descriptor accesses go through fixed-width
helpers anyway; with ``memtype='device'`` payload copies into and out of the
region are made of aligned word-sized accesses too.  Use ``memtype=normal``
only for maps the kernel maps as normal memory (e.g. a write-combining
``uio-nc-mem``-style driver).

sysfs and /dev can be moved with ``VMSGAMP_SYSFS_ROOT`` / ``VMSGAMP_DEV_ROOT``
(tests use fake trees) or the ``sysfs_root``/``dev_root`` arguments of
:func:`list_uio_devices`, :func:`find_uio_device` and :func:`open_uio`.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from vmsgamp._core.doorbell import Doorbell, PollingDoorbell
from vmsgamp._core.region import Region
from vmsgamp.carriers._hw import (
    DeviceLookupError, MappedRegisters, RegisterDoorbell, RegisterWrite, UioInterrupt, dev_root,
    link_name,
    parse_register_spec, read_attr, read_int_attr, sysfs_root,
)
from vmsgamp.carriers._registry import (
    Carrier, parse_bool, parse_int, parse_timeout, register_bare_path,
    register_scheme,
)

__all__ = ["UioMap", "UioDevice", "UioCarrier", "list_uio_devices", "find_uio_device",
           "map_uio", "open_uio", "open_uio_interrupt", "UIO_OPTIONS"]

log = logging.getLogger("vmsgamp.uio")

UIO_OPTIONS = ("map", "ring", "ack", "irq")
PAGE_SIZE = mmap.PAGESIZE
_DEV_RE = re.compile(r"^(?:/dev/)?(uio\d+)$")
# Drivers that are re-armed through PCI config space rather than write(1).
CONFIG_SPACE_DRIVERS = ("uio_pci_generic",)


@dataclass(frozen=True)
class UioMap:
    index: int
    name: str | None
    addr: int
    size: int
    offset: int

    @property
    def usable(self) -> int:
        """Bytes from the device memory's start to the map's end.  Current
        kernels (uio_pdrv_genirq, uio_pci_generic) publish a page-aligned
        ``addr`` with the in-page start in ``offset`` and a page-rounded
        ``size`` that includes it, and refuse a mapping longer than ``size``;
        so ``size`` bytes are mapped and the region is ``size - offset``."""
        return self.size - self.offset if self.size > self.offset else self.size

    @property
    def bus_address(self) -> int:
        """Where the device memory starts (``addr`` + ``offset``)."""
        return self.addr + self.offset

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "addr": f"{self.addr:#x}",
                "size": self.size, "offset": self.offset}


@dataclass
class UioDevice:
    dev: str                      # "uio3"
    name: str | None              # the ``name`` attribute
    version: str | None
    driver: str | None
    maps: list[UioMap]
    sysfs_path: str
    dev_path: str
    event: int | None = None
    parent: str | None = None     # e.g. the PCI address for uio_pci_generic
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def number(self) -> int:
        return int(self.dev[3:])

    @property
    def config_path(self) -> str | None:
        path = os.path.join(self.sysfs_path, "device", "config")
        return path if os.path.exists(path) else None

    def find_map(self, sel: int | str) -> UioMap:
        """Map by number (``1``, ``map1``) or by name."""
        text = str(sel).strip()
        num = text[3:] if text.startswith("map") and text[3:].isdigit() else text
        if isinstance(sel, int) or num.isdigit() or num.lower().startswith("0x"):
            try:
                idx = parse_int(num, "map")
            except ValueError:
                idx = None
            if idx is not None:
                for m in self.maps:
                    if m.index == idx:
                        return m
                raise DeviceLookupError(f"{self.dev} ({self.name}) has no map {idx}; maps: "
                                  f"{self._map_list()}")
        named = [m for m in self.maps if m.name == text]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise DeviceLookupError(f"{self.dev} ({self.name}): map name {text!r} is ambiguous "
                              f"({', '.join(f'map{m.index}' for m in named)}); use map=N")
        raise DeviceLookupError(f"{self.dev} ({self.name}) has no map named {text!r}; maps: "
                          f"{self._map_list()}")

    def _map_list(self) -> str:
        if not self.maps:
            return "none"
        return ", ".join(f"map{m.index}" + (f" ({m.name})" if m.name else "") for m in self.maps)

    def describe(self) -> str:
        return f"{self.dev} ({self.name or '?'}, driver {self.driver or '?'})"

    def as_dict(self) -> dict[str, Any]:
        return {"dev": self.dev, "name": self.name, "version": self.version,
                "driver": self.driver, "dev_path": self.dev_path, "event": self.event,
                "parent": self.parent, "maps": [m.as_dict() for m in self.maps]}


def _load_device(sysdir: str, dev: str, devroot: str) -> UioDevice:
    maps: list[UioMap] = []
    mapsdir = os.path.join(sysdir, "maps")
    try:
        entries = os.listdir(mapsdir)
    except OSError:
        entries = []
    for entry in entries:
        if not (entry.startswith("map") and entry[3:].isdigit()):
            continue
        mdir = os.path.join(mapsdir, entry)
        size = read_int_attr(os.path.join(mdir, "size"))
        addr = read_int_attr(os.path.join(mdir, "addr")) or 0
        if not size:
            continue               # the kernel omits empty maps; be safe anyway
        off = read_int_attr(os.path.join(mdir, "offset"))
        if off is None:            # kernels before 3.x: the in-page part of addr
            off = addr % PAGE_SIZE
        maps.append(UioMap(int(entry[3:]), read_attr(os.path.join(mdir, "name")) or None,
                           addr, size, off))
    maps.sort(key=lambda m: m.index)
    parent = link_name(os.path.join(sysdir, "device"))
    return UioDevice(dev=dev, name=read_attr(os.path.join(sysdir, "name")),
                     version=read_attr(os.path.join(sysdir, "version")),
                     driver=link_name(os.path.join(sysdir, "device", "driver")),
                     maps=maps, sysfs_path=sysdir, dev_path=os.path.join(devroot, dev),
                     event=read_int_attr(os.path.join(sysdir, "event")), parent=parent)


def list_uio_devices(*, sysfs_root: str | None = None,
                     dev_root: str | None = None) -> list[UioDevice]:
    """Every UIO device under ``/sys/class/uio``, by number."""
    base = os.path.join(_sys(sysfs_root), "class", "uio")
    try:
        names = [n for n in os.listdir(base) if _DEV_RE.match(n)]
    except OSError:
        return []
    names.sort(key=lambda n: int(n[3:]))
    devroot = _dev(dev_root)
    return [_load_device(os.path.join(base, n), n, devroot) for n in names]


def _sys(root: str | None) -> str:
    return sysfs_root(root)


def _dev(root: str | None) -> str:
    return dev_root(root)


def _listing(devs: list[UioDevice]) -> str:
    if not devs:
        return ("no UIO devices at all (is the uio module loaded and a device bound to a "
                "UIO driver?)")
    return "UIO devices: " + ", ".join(f"{d.dev} ({d.name})" for d in devs)


def find_uio_device(target: str, *, sysfs_root: str | None = None,
                    dev_root: str | None = None) -> UioDevice:
    """``uio3``, ``/dev/uio3`` or a device name.  DeviceLookupError lists what exists."""
    target = target.strip()
    if not target:
        raise DeviceLookupError("uio: needs a device name or number, e.g. uio:shm or uio:uio0")
    devs = list_uio_devices(sysfs_root=sysfs_root, dev_root=dev_root)
    m = _DEV_RE.match(target)
    if m:
        for d in devs:
            if d.dev == m.group(1):
                return d
        raise DeviceLookupError(f"no UIO device {m.group(1)}; {_listing(devs)}")
    if target.startswith("/"):
        raise DeviceLookupError(f"{target!r} is not a UIO device node (use /dev/uioN, uioN or a "
                          f"device name)")
    found = [d for d in devs if d.name == target]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DeviceLookupError(f"UIO device name {target!r} is ambiguous: "
                          f"{', '.join(d.dev for d in found)} are all called that; "
                          f"name one by number, e.g. uio:{found[0].dev}")
    raise DeviceLookupError(f"no UIO device named {target!r}; {_listing(devs)}")


def _node_error(device: UioDevice, e: OSError) -> OSError:
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(e.errno, f"{device.dev_path} does not exist although "
                                 f"{device.sysfs_path} does (no udev/devtmpfs node?)")
    if isinstance(e, PermissionError):
        return PermissionError(e.errno, f"cannot open {device.dev_path}: permission denied "
                               f"(run as root, or give your user access with a udev rule, "
                               f"e.g. KERNEL==\"{device.dev}\", MODE=\"0660\", GROUP=...)")
    return type(e)(e.errno, f"cannot open {device.dev_path}: {e.strerror}")


def map_uio(device: UioDevice, umap: UioMap, *, memtype: str = "device",
            bus_base: int | None = None, readonly: bool = False,
            uri: str | None = None) -> Region:
    """Map one UIO map (its own fd, owned by the Region)."""
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(device.dev_path, flags)
    except OSError as e:
        raise _node_error(device, e) from None
    try:
        return Region.from_fd(fd, umap.usable, offset=umap.index * PAGE_SIZE,
                              map_offset=umap.offset,
                              bus_base=umap.bus_address if bus_base is None else bus_base,
                              memtype=memtype, readonly=readonly, own_fd=True,
                              uri=uri or f"uio:{device.dev}#map={umap.index}")
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            hint = ""
            if e.errno == errno.EINVAL and (umap.offset + umap.size) % PAGE_SIZE:
                # uio_mmap_physical() refuses a mapping longer than the map,
                # and a mapping is whole pages.
                hint = (f" (the map is not a whole number of {PAGE_SIZE}-byte pages; the "
                        f"kernel only maps whole pages of a physical UIO map: give it a "
                        f"page-multiple size in the device tree)")
            elif e.errno == errno.ENODEV:
                hint = " (the kernel maps only page-aligned physical UIO maps)"
            raise OSError(e.errno, f"cannot map {device.describe()} map{umap.index} "
                          f"({umap.size:#x} bytes at mmap offset {umap.index * PAGE_SIZE:#x}): "
                          f"{os.strerror(e.errno) if e.errno else e}{hint}") from None
        raise


def open_interrupt_fd(path: str) -> int | None:
    """Open a UIO node for its interrupt (non-blocking).  None if ``path`` is
    not a character device (a fake tree, or a wrong path).  Tests replace
    this function with one returning a test double's fd."""
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISCHR(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def open_uio_interrupt(device: UioDevice, *, ack: RegisterWrite | None = None,
                       required: bool = False) -> UioInterrupt | None:
    """The device's interrupt, armed; None if it has none (unless ``required``)."""
    try:
        fd = open_interrupt_fd(device.dev_path)
    except OSError as e:
        raise _node_error(device, e) from None
    if fd is None:
        if required:
            raise OSError(errno.ENODEV, f"{device.dev_path} is not a character device, so "
                          f"it cannot deliver interrupts")
        return None
    config = device.config_path if device.driver in CONFIG_SPACE_DRIVERS else None
    irq = UioInterrupt(fd, name=device.dev, driver=device.driver, config_path=config,
                       initial_count=device.event, ack=ack)
    try:
        irq.enable()
    except OSError as e:
        irq.close()
        if e.errno == errno.EIO and not required:
            log.info("%s has no interrupt; polling", device.describe())
            return None
        raise
    return irq


class UioCarrier(Carrier):
    """A :class:`Carrier` over a UIO map; ``device`` and ``map`` say which."""
    device: UioDevice
    map: UioMap


def _register_target(spec: str, what: str, device: UioDevice, sroot: str | None,
                     droot: str | None) -> tuple[UioDevice, UioMap, int, int, int]:
    where, off, width, value = parse_register_spec(spec, what)
    dev = device
    if "/" in where:
        devname, _, where = where.rpartition("/")
        dev = find_uio_device(devname, sysfs_root=sroot, dev_root=droot)
    m = dev.find_map(where)
    if off + width // 8 > m.usable:
        raise ValueError(f"{what}={spec!r}: offset {off:#x} is outside {dev.dev} "
                         f"map{m.index} ({m.size:#x} bytes)")
    return dev, m, off, width, value


def open_uio(target: str, *, uri: str, map: Any = 0, ring: Any = None, ack: Any = None,
             irq: Any = "auto", offset: Any = 0, timeout: Any = 0,
             sysfs_root: str | None = None, dev_root: str | None = None,
             **opts: Any) -> UioCarrier:
    """Opener for ``uio:`` (see the module docstring)."""
    wait = parse_timeout(timeout)
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        try:
            device = find_uio_device(target, sysfs_root=sysfs_root, dev_root=dev_root)
            break
        except DeviceLookupError as e:
            # A device that was just bound appears a moment later (udev): wait
            # for it if asked to, but never for an ambiguous name.
            if "ambiguous" in str(e) or (deadline is not None and time.monotonic() >= deadline):
                raise DeviceLookupError(f"{uri}: {e}") from None
            time.sleep(0.05)
    if not device.maps and device.driver == "uio_pci_generic":
        raise DeviceLookupError(f"{uri}: {device.describe()} has no maps (uio_pci_generic "
                                f"maps only non-prefetchable memory BARs, and only on newer "
                                f"kernels); map the BAR with pci:{device.parent}")
    try:
        umap = device.find_map(map)
    except DeviceLookupError as e:
        raise DeviceLookupError(f"{uri}: {e}") from None
    memtype = opts.get("memtype") or "device"
    readonly = parse_bool(opts.get("readonly", False), "readonly")
    bus_base = parse_int(opts["bus_base"], "bus_base") if opts.get("bus_base") is not None else None
    irq_mode = str(irq).strip()
    if irq_mode.lower() in ("0", "no", "off", "false", "poll"):
        irq_mode = "none"
    elif irq_mode.lower() in ("1", "yes", "on", "true"):
        irq_mode = "required"

    closers: list[Any] = []
    ring_write = ack_write = None
    irq_src = None

    def cleanup() -> None:
        for fn in reversed(closers):
            try:
                fn()
            except OSError:
                pass

    try:
        regs_cache: dict[tuple[str, int], MappedRegisters] = {}

        def regs_for(dev: UioDevice, m: UioMap) -> MappedRegisters:
            key = (dev.dev, m.index)
            if key not in regs_cache:
                r = map_uio(dev, m, memtype="device", uri=f"uio:{dev.dev}#map={m.index}")
                regs_cache[key] = MappedRegisters(r, name=f"{dev.dev} map{m.index}")
                closers.append(regs_cache[key].close)
            return regs_cache[key]

        for what, spec in (("ring", ring), ("ack", ack)):
            if spec is None or str(spec).strip().lower() in ("", "none"):
                continue
            dev, m, off, width, value = _register_target(str(spec), what, device,
                                                         sysfs_root, dev_root)
            w = RegisterWrite(regs_for(dev, m), off, width, value)
            if what == "ring":
                ring_write = w
            else:
                ack_write = w

        if irq_mode != "none":
            irq_dev = device
            if irq_mode not in ("auto", "required"):
                irq_dev = find_uio_device(irq_mode, sysfs_root=sysfs_root, dev_root=dev_root)
            irq_src = open_uio_interrupt(irq_dev, ack=ack_write,
                                         required=irq_mode != "auto")
            if irq_src is not None:
                closers.append(irq_src.close)
        elif ack_write is not None:
            raise ValueError(f"{uri}: ack= needs an interrupt (irq=none was given)")

        region = map_uio(device, umap, memtype=memtype, bus_base=bus_base,
                         readonly=readonly, uri=uri)
    except DeviceLookupError as e:
        cleanup()
        raise DeviceLookupError(f"{uri}: {e}") from None
    except BaseException:
        cleanup()
        raise

    doorbell: Doorbell
    if irq_src is None and ring_write is None:
        doorbell = PollingDoorbell()
        own_closers = closers
    else:
        doorbell = RegisterDoorbell(ring=ring_write, irq=irq_src, closers=closers,
                                    name=f"{device.dev} ({device.name})")
        own_closers = []
    try:
        carrier = UioCarrier(region, doorbell, uri=uri, offset=parse_int(offset, "offset"),
                             closers=own_closers)
    except BaseException:
        doorbell.close()
        region.close()
        cleanup()
        raise
    carrier.device = device
    carrier.map = umap
    return carrier


register_scheme("uio", open_uio, options=UIO_OPTIONS,
                summary="uio:NAME[#map=N]  a UIO device's map (uio:uio3, /dev/uio3); "
                        "UIO interrupt, register doorbell (ring=MAP:OFF)")


# ---- the bare /dev/uioN form -----------------------------------------------------------

_BARE_UIO_RE = re.compile(r"/dev/uio\d+")


# /dev/uio3 given as a bare path means the UIO device, not a file to map.
register_bare_path(_BARE_UIO_RE.pattern, "uio")
