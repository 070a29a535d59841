"""Fake sysfs and /dev trees for the hardware carrier tests.

Regular files stand in for what can be mmapped (``/dev/uioN`` with map N at
``N * pagesize``, PCI ``resourceN`` files); symlinks mimic ``driver``,
``device`` and ``iommu_group``.  A SOCK_SEQPACKET socketpair stands in for
the UIO character device's interrupt side (4-byte counts one way, 4-byte
re-enable writes the other), and :class:`FakeVfioKernel` answers the VFIO
ioctls."""
from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
from pathlib import Path

PAGE = mmap.PAGESIZE


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text += "\n"
        path.write_text(text)
    else:
        path.write_bytes(text)


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target)


def pci_config(vendor: int, device: int, *, command: int = 0x0002, msix: bool = False,
               intx_disabled: bool = False) -> bytes:
    """A 256-byte type-0 config space, optionally with an MSI-X capability at 0x40."""
    cfg = bytearray(256)
    struct.pack_into("<HH", cfg, 0, vendor, device)
    if intx_disabled:
        command |= 0x400
    struct.pack_into("<H", cfg, 4, command)
    if msix:
        struct.pack_into("<H", cfg, 6, 0x10)     # capability list present
        cfg[0x34] = 0x40
        cfg[0x40] = 0x11                         # MSI-X
        cfg[0x41] = 0x00
    return bytes(cfg)


class FakeTree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        self.dev = root / "dev"
        self.sys.mkdir(parents=True, exist_ok=True)
        self.dev.mkdir(parents=True, exist_ok=True)
        (self.sys / "class" / "uio").mkdir(parents=True, exist_ok=True)
        (self.sys / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)

    def env(self, monkeypatch) -> None:
        monkeypatch.setenv("VMSGAMP_SYSFS_ROOT", str(self.sys))
        monkeypatch.setenv("VMSGAMP_DEV_ROOT", str(self.dev))

    # ---- UIO -------------------------------------------------------------------------
    def add_uio(self, n: int, name: str, maps: list[tuple[str | None, int, int, int]], *,
                driver: str = "uio_pdrv_genirq", event: int = 0,
                parent: Path | None = None) -> Path:
        """maps: (name, addr, size, offset) for map0, map1...  Returns /dev/uioN."""
        udir = self.sys / "devices" / "virtual" / "uio" / f"uio{n}"
        _write(udir / "name", name)
        _write(udir / "version", "0.1")
        _write(udir / "event", str(event))
        for i, (mname, addr, size, off) in enumerate(maps):
            mdir = udir / "maps" / f"map{i}"
            if mname is not None:
                _write(mdir / "name", mname)
            _write(mdir / "addr", f"0x{addr:016x}")
            _write(mdir / "size", f"0x{size:016x}")
            _write(mdir / "offset", f"0x{off:x}")
        if parent is None:
            parent = self.sys / "devices" / "platform" / f"{name}.{n}"
            parent.mkdir(parents=True, exist_ok=True)
            _link(parent / "driver", self.sys / "bus" / "platform" / "drivers" / driver)
        _link(udir / "device", parent)
        _link(self.sys / "class" / "uio" / f"uio{n}", udir)
        node = self.dev / f"uio{n}"
        # map i is at mmap offset i * PAGE; ``size`` already includes ``offset``
        total = max((i * PAGE + ((size + PAGE - 1) // PAGE) * PAGE
                     for i, (_, _, size, _) in enumerate(maps)), default=PAGE)
        with open(node, "wb") as f:
            f.truncate(total)
        return node

    # ---- PCI -------------------------------------------------------------------------
    def add_pci(self, bdf: str, vendor: int, device: int, bars: dict[int, int], *,
                driver: str | None = None, group: int | None = None, msix: bool = False,
                prefetch: tuple[int, ...] = (), command: int = 0x0002,
                uio: int | None = None, intx_disabled: bool = False) -> Path:
        ddir = self.sys / "devices" / "pci0000:00" / bdf
        ddir.mkdir(parents=True, exist_ok=True)
        _write(ddir / "vendor", f"0x{vendor:04x}")
        _write(ddir / "device", f"0x{device:04x}")
        _write(ddir / "class", "0x050000")
        lines = []
        base = 0xFE000000
        for i in range(13):
            size = bars.get(i, 0)
            if size:
                flags = 0x40200 | (0x2000 if i in prefetch else 0)
                lines.append(f"0x{base:016x} 0x{base + size - 1:016x} 0x{flags:016x}")
                with open(ddir / f"resource{i}", "wb") as f:
                    f.truncate(size)
                if i in prefetch:
                    os.link(ddir / f"resource{i}", ddir / f"resource{i}_wc")
                base += max(size, 0x100000)
            else:
                lines.append("0x0000000000000000 0x0000000000000000 0x0000000000000000")
        _write(ddir / "resource", "\n".join(lines))
        _write(ddir / "config", pci_config(vendor, device, command=command, msix=msix,
                                          intx_disabled=intx_disabled))
        if driver:
            _link(ddir / "driver", self.sys / "bus" / "pci" / "drivers" / driver)
        if group is not None:
            gdir = self.sys / "kernel" / "iommu_groups" / str(group)
            _link(ddir / "iommu_group", gdir)
            _link(gdir / "devices" / bdf, ddir)
        _link(self.sys / "bus" / "pci" / "devices" / bdf, ddir)
        if uio is not None:
            (ddir / "uio" / f"uio{uio}").mkdir(parents=True, exist_ok=True)
            self.add_uio(uio, "uio_pci_generic", [], driver="uio_pci_generic", parent=ddir)
        return ddir

    def set_driver(self, bdf: str, driver: str | None) -> None:
        ddir = self.sys / "devices" / "pci0000:00" / bdf
        if (ddir / "driver").is_symlink():
            (ddir / "driver").unlink()
        if driver:
            _link(ddir / "driver", self.sys / "bus" / "pci" / "drivers" / driver)


class FakeUioIrq:
    """The interrupt side of a UIO character device: ``fire(count)`` makes a
    4-byte count readable; ``writes()`` returns the re-enable values written."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        self.opened: list[str] = []

    def open(self, path: str) -> int:
        """Stands in for ``uio.open_interrupt_fd``."""
        self.opened.append(path)
        return os.dup(self.ours.fileno())

    def fire(self, count: int) -> None:
        self.theirs.send(struct.pack("=I", count))

    def writes(self) -> list[int]:
        out = []
        while True:
            try:
                data = self.theirs.recv(64)
            except BlockingIOError:
                return out
            assert len(data) == 4, data
            out.append(struct.unpack("=i", data)[0])

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


class FakeVfioKernel:
    """Answers VFIO ioctls like vfio-pci would, for one device in one group.

    ``regions``: index -> (size, flags); their data lives in one regular file
    (the "device fd") at ``index * 16 pages`` -- not VFIO's ``index << 40``,
    which also checks that the carrier uses the offset the kernel reports."""

    REGION_STRIDE = 16 * PAGE

    def __init__(self, tree: FakeTree, bdf: str, group: int, *,
                 regions: dict[int, tuple[int, int]],
                 irqs: dict[int, tuple[int, int]], viable: bool = True, api: int = 0,
                 extensions: tuple[int, ...] = (1, 3), device_flags: int = 0x3) -> None:
        from vmsgamp.carriers import vfio as v
        self.v = v
        self.bdf = bdf
        self.group = group
        self.regions = regions
        self.irqs = irqs
        self.viable = viable
        self.api = api
        self.extensions = extensions
        self.device_flags = device_flags
        vdir = tree.dev / "vfio"
        vdir.mkdir(parents=True, exist_ok=True)
        self.container_path = vdir / "vfio"
        self.group_path = vdir / str(group)
        self.container_path.write_bytes(b"")
        self.group_path.write_bytes(b"")
        self.device_path = tree.root / f"vfio-device-{bdf}"
        with open(self.device_path, "wb") as f:
            f.truncate(self.REGION_STRIDE * 10)
        self.calls: list[tuple[str, object]] = []
        self.bound: dict[tuple[int, int], int] = {}     # (index, vector) -> eventfd
        self.unmasks = 0
        self.iommu_set: int | None = None
        self.container_set = False
        self.device_fds: list[int] = []

    def _role(self, fd: int) -> str:
        ino = os.fstat(fd).st_ino
        for role, path in (("container", self.container_path), ("group", self.group_path),
                           ("device", self.device_path)):
            if os.stat(path).st_ino == ino:
                return role
        raise OSError(errno.EBADF, "not a fake VFIO fd")

    def region_offset(self, index: int) -> int:
        return index * self.REGION_STRIDE + self.REGION_STRIDE

    def write_region(self, index: int, off: int, data: bytes) -> None:
        with open(self.device_path, "r+b") as f:
            f.seek(self.region_offset(index) + off)
            f.write(data)

    def read_region(self, index: int, off: int, n: int) -> bytes:
        with open(self.device_path, "rb") as f:
            f.seek(self.region_offset(index) + off)
            return f.read(n)

    def ioctl(self, fd: int, req: int, arg=0, mutate: bool = True):
        v = self.v
        role = self._role(fd)
        names = {getattr(v, n): n for n in dir(v) if n.startswith("VFIO_") and
                 isinstance(getattr(v, n), int) and getattr(v, n) >= 0x3b64}
        name = names.get(req, hex(req))
        self.calls.append((name, bytes(arg) if isinstance(arg, bytearray) else arg))
        if role == "container":
            if req == v.VFIO_GET_API_VERSION:
                return self.api
            if req == v.VFIO_CHECK_EXTENSION:
                return 1 if arg in self.extensions else 0
            if req == v.VFIO_SET_IOMMU:
                if not self.container_set:
                    raise OSError(errno.EINVAL, "no group in the container")
                self.iommu_set = arg
                return 0
        elif role == "group":
            if req == v.VFIO_GROUP_GET_STATUS:
                argsz, _ = v.GROUP_STATUS.unpack_from(arg)
                assert argsz == 8
                flags = (v.VFIO_GROUP_FLAGS_VIABLE if self.viable else 0) | \
                    (v.VFIO_GROUP_FLAGS_CONTAINER_SET if self.container_set else 0)
                v.GROUP_STATUS.pack_into(arg, 0, 8, flags)
                return 0
            if req == v.VFIO_GROUP_SET_CONTAINER:
                (cfd,) = struct.unpack("=i", bytes(arg))
                assert self._role(cfd) == "container"
                self.container_set = True
                return 0
            if req == v.VFIO_GROUP_GET_DEVICE_FD:
                name_ = bytes(arg).rstrip(b"\0").decode()
                if name_ != self.bdf or self.iommu_set is None:
                    raise OSError(errno.EINVAL, "Invalid argument")
                fd_ = os.open(self.device_path, os.O_RDWR | os.O_CLOEXEC)
                self.device_fds.append(fd_)
                return fd_
        elif role == "device":
            if req == v.VFIO_DEVICE_GET_INFO:
                argsz = struct.unpack_from("=I", arg)[0]
                assert argsz >= 16
                v.DEVICE_INFO.pack_into(arg, 0, argsz, self.device_flags, 9, 5, 0)
                return 0
            if req == v.VFIO_DEVICE_GET_REGION_INFO:
                argsz, _, index, _, _, _ = v.REGION_INFO.unpack_from(arg)
                assert argsz == 32
                if index >= 9:
                    raise OSError(errno.EINVAL, "Invalid argument")
                size, flags = self.regions.get(index, (0, 0))
                v.REGION_INFO.pack_into(arg, 0, argsz, flags, index, 0, size,
                                        self.region_offset(index))
                return 0
            if req == v.VFIO_DEVICE_GET_IRQ_INFO:
                argsz, _, index, _ = v.IRQ_INFO.unpack_from(arg)
                assert argsz == 16
                if index >= 5:
                    raise OSError(errno.EINVAL, "Invalid argument")
                flags, count = self.irqs.get(index, (0, 0))
                v.IRQ_INFO.pack_into(arg, 0, argsz, flags, index, count)
                return 0
            if req == v.VFIO_DEVICE_SET_IRQS:
                argsz, flags, index, start, count = v.IRQ_SET.unpack_from(arg)
                data = bytes(arg[v.IRQ_SET.size:argsz])
                if flags & v.VFIO_IRQ_SET_DATA_EVENTFD:
                    assert len(data) == 4 * count
                    fds = struct.unpack(f"={count}i", data)
                    for i, efd in enumerate(fds):
                        self.bound[(index, start + i)] = efd
                elif flags & v.VFIO_IRQ_SET_ACTION_UNMASK:
                    self.unmasks += 1
                elif flags & v.VFIO_IRQ_SET_ACTION_TRIGGER and count == 0:
                    for key in [k for k in self.bound if k[0] == index]:
                        del self.bound[key]
                elif flags & v.VFIO_IRQ_SET_ACTION_TRIGGER:
                    efd = self.bound.get((index, start))
                    if efd is not None:
                        os.eventfd_write(efd, 1)
                return 0
            if req == v.VFIO_DEVICE_RESET:
                return 0
        raise OSError(errno.ENOTTY, f"fake VFIO: {name} on a {role} fd")

    def interrupt(self, index: int, vector: int = 0) -> None:
        """The device raises an interrupt: its bound eventfd is signalled."""
        os.eventfd_write(self.bound[(index, vector)], 1)
