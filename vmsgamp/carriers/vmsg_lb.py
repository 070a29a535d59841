"""``vmsg-lb:`` -- the Linux virtio-msg user API and loopback bus.

Grammar::

    vmsg-lb:[CONTROL_NODE][#msg=NODE&base=ADDR&packed=1]
    vmsg-lb:                      /dev/virtio-msg-lb + /dev/virtio-msg-0, base found automatically
    vmsg-lb:#base=0x70000000      the same with the region base given

The kernel side (documented in ``docs/vmsg-lb.md``) offers two nodes:

* the **control node** ``/dev/virtio-msg-lb``: ``ioctl`` ADD/REMOVE of a
  device (argument: a pointer to ``{u32 dev_id}``), ``mmap`` of the bus's
  reserved memory region and ``lseek(fd, 0, SEEK_END)`` = its size;
* the **message node** ``/dev/virtio-msg-N``: ``read`` one pending kernel
  message (``EAGAIN`` at once when none is pending, even on a blocking fd;
  a ``count`` below 50 is ``EINVAL``), ``write`` one message (a RESPONSE
  releases the pending kernel transfer), ``poll`` (POLLIN while a message is
  pending).

Every ring and buffer address the kernel sends lies in the reserved region,
at ``mmap offset = address - base``.  The API does not tell the base, so it
comes from ``base=``, else ``/proc/iomem`` (a range named ``virtio-msg-lb``),
else the device tree (a ``restricted-dma-pool`` under
``/proc/device-tree/reserved-memory`` named for the loopback device).  The
region is mapped whole and never beyond the size ``lseek`` reports (the
kernel's own bound check lets a longer mapping at offset 0 through, which
would expose the physical memory after the region).

This module is the carrier only: nodes, ioctls, region discovery and
mapping.  Answering the kernel is ``vmsgamp.bus.userapi``.  The node access
sits behind :class:`UserApiNodes` (read/write/ioctl/lseek/mmap), so the fake
kernel of ``vmsgamp.testing.fake_userapi`` drives this very code.

``VMSGAMP_DEV_ROOT`` moves ``/dev`` and ``VMSGAMP_PROC_ROOT`` moves ``/proc``
(tests use fake trees).
"""
from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from vmsgamp._core.doorbell import PollingDoorbell
from vmsgamp._core.region import Region
from vmsgamp.carriers._hw import dev_root
from vmsgamp.carriers._registry import Carrier, parse_bool, parse_int, register_scheme

PROC_ENV = "VMSGAMP_PROC_ROOT"

# ioctls on the control node: _IOC(_IOC_NONE, 'P', nr, sizeof(struct vmsg_lb_dev_info)).
IOCTL_VMSG_LB_ADD = 0x00045000
IOCTL_VMSG_LB_REMOVE = 0x00045001
_DEV_INFO = struct.Struct("<I")          # struct vmsg_lb_dev_info { unsigned int dev_id; }

MSG_SIZE = 50            # the bus's message size: 8-byte header + 42 bytes
READ_SIZE = 64           # what we ask read() for (it needs >= MSG_SIZE)
HEADER = struct.Struct("<BBHHH")         # type, msg_id, dev_id, token, msg_size
MAX_DEV_ID = 0xFFFF      # the kernel truncates dev_id to 16 bits

CONTROL_NODE = "virtio-msg-lb"
MSG_NODE = "virtio-msg-0"
IOMEM_NAME = "virtio-msg-lb"
# Device-tree reserved-memory node names taken as "named for the loopback device".
_DT_NAME_RE = re.compile(r"virtio[-_]?msg|vmsg[-_]?lb", re.IGNORECASE)


class VmsgLbError(OSError):
    """The loopback bus cannot be used as asked; the message says why and
    what to do (``errno`` is the kernel's)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def proc_root(override: str | os.PathLike[str] | None = None) -> str:
    if override is not None:
        return os.fspath(override)
    return os.environ.get(PROC_ENV) or "/proc"


# ---- the node operations -------------------------------------------------------------

class UserApiNodes(Protocol):
    """The system calls the carrier makes on the two nodes.  ``read`` and
    ``write`` go to the message node, ``ioctl``/``seek_end``/``map`` to the
    control node; errors are ``OSError`` with the kernel's errno."""

    control_path: str
    msg_path: str

    def fileno(self) -> int: ...            # pollable: readable while a message is pending
    def read(self, count: int) -> bytes: ...
    def write(self, data: bytes) -> int: ...
    def ioctl(self, request: int, arg: bytes) -> None: ...
    def seek_end(self) -> int: ...
    def map(self, offset: int, length: int, *, bus_base: int, uri: str) -> Region: ...
    def holders(self) -> list[str]: ...     # other processes with the message node open
    def close(self) -> None: ...


class OsNodes:
    """The real nodes, through os calls."""

    def __init__(self, control_path: str, msg_path: str) -> None:
        self.control_path = control_path
        self.msg_path = msg_path
        self._ctl = -1
        self._msg = -1
        self._ctl = os.open(control_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            # O_NONBLOCK: the 2026 node never blocks anyway; older versions
            # (read blocks unless O_NONBLOCK) then behave the same.
            self._msg = os.open(msg_path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except BaseException:
            os.close(self._ctl)
            self._ctl = -1
            raise

    def _live(self) -> None:
        if self._ctl < 0:
            raise ValueError(f"{self.control_path}: nodes are closed")

    def fileno(self) -> int:
        self._live()
        return self._msg

    def read(self, count: int) -> bytes:
        self._live()
        return os.read(self._msg, count)

    def write(self, data: bytes) -> int:
        self._live()
        return os.write(self._msg, data)

    def ioctl(self, request: int, arg: bytes) -> None:
        self._live()
        # Immutable bytes on purpose: CPython releases the GIL around ioctl()
        # for them, but not for a writable buffer with mutate_flag.  ADD
        # blocks until our own responder thread has answered the probe, so
        # holding the GIL here would hang the machine's driver for good.
        fcntl.ioctl(self._ctl, request, bytes(arg))

    def seek_end(self) -> int:
        self._live()
        return os.lseek(self._ctl, 0, os.SEEK_END)

    def map(self, offset: int, length: int, *, bus_base: int, uri: str) -> Region:
        self._live()
        fd = os.dup(self._ctl)
        try:
            return Region.from_fd(fd, length, offset=offset, bus_base=bus_base, own_fd=True, uri=uri)
        except BaseException:
            os.close(fd)
            raise

    def holders(self) -> list[str]:
        return node_holders(self.msg_path)

    def close(self) -> None:
        for name in ("_msg", "_ctl"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                try:
                    os.close(fd)
                except OSError:
                    pass


def open_nodes(control_path: str, msg_path: str) -> UserApiNodes:
    """Open the two nodes (the hook tests replace to serve a fake kernel)."""
    return OsNodes(control_path, msg_path)


def node_holders(path: str, *, proc: str | None = None) -> list[str]:
    """``"PID (COMM)"`` of every other process with ``path`` open, from
    ``/proc/*/fd`` (only what we may look at: all of it as root)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    want = _file_key(st)
    root = proc_root(proc)
    me = os.getpid()
    found = []
    for fd_dir in glob.glob(os.path.join(root, "[0-9]*", "fd")):
        pid = int(os.path.basename(os.path.dirname(fd_dir)))
        if pid == me:
            continue
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                s = os.stat(os.path.join(fd_dir, name))
            except OSError:
                continue
            if _file_key(s) == want:
                found.append(f"{pid} ({_comm(root, pid)})")
                break
    return found


def _file_key(st: os.stat_result) -> tuple[int, ...]:
    # A device node is the device (any path to it), a file is its inode.
    return (0, st.st_rdev) if stat.S_ISCHR(st.st_mode) else (1, st.st_dev, st.st_ino)


def _comm(root: str, pid: int) -> str:
    try:
        with open(os.path.join(root, str(pid), "comm")) as f:
            return f.read().strip()
    except OSError:
        return "?"


# ---- where the region is ---------------------------------------------------------------

@dataclass(frozen=True)
class RegionBase:
    """The region's bus base and where it came from; ``size`` is what that
    source says (None when it does not say)."""

    base: int
    source: str
    size: int | None = None


class BaseNotFound(VmsgLbError):
    pass


_IOMEM_RE = re.compile(r"^\s*([0-9a-fA-F]+)-([0-9a-fA-F]+)\s*:\s*(.*?)\s*$")


def base_from_iomem(proc: str | None = None) -> RegionBase | None:
    """The ``virtio-msg-lb`` range of ``/proc/iomem`` (x86 test kernels
    reserve it with ``memmap=``).  Raises BaseNotFound when it is there but
    unusable (addresses hidden from non-root readers, or more than one)."""
    path = os.path.join(proc_root(proc), "iomem")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    hits = []
    for line in lines:
        m = _IOMEM_RE.match(line)
        if m and (m.group(3) == IOMEM_NAME or m.group(3).startswith(IOMEM_NAME + ".")):
            hits.append((int(m.group(1), 16), int(m.group(2), 16)))
    if not hits:
        return None
    if len(hits) > 1:
        ranges = ", ".join(f"{a:#x}-{b:#x}" for a, b in hits)
        raise BaseNotFound(errno.EINVAL, f"{path} lists {len(hits)} {IOMEM_NAME} ranges ({ranges}): "
                           f"pick one with base=")
    start, end = hits[0]
    if start == 0 and end == 0:
        raise BaseNotFound(errno.EACCES, f"{path} has a {IOMEM_NAME} range but hides its addresses "
                           f"(only root sees them): run as root or give base=")
    return RegionBase(start, f"{path} ({IOMEM_NAME})", end - start + 1)


def _be_cells(data: bytes, count: int, at: int) -> tuple[int, int]:
    value = 0
    for i in range(count):
        value = value << 32 | struct.unpack_from(">I", data, at + 4 * i)[0]
    return value, at + 4 * count


def base_from_device_tree(proc: str | None = None) -> RegionBase | None:
    """``reg`` of the ``restricted-dma-pool`` reserved-memory node named for
    the loopback device (``virtio-msg…`` / ``vmsg-lb…`` / ``vmsglb…``)."""
    resv = os.path.join(proc_root(proc), "device-tree", "reserved-memory")
    if not os.path.isdir(resv):
        return None
    acells = _dt_u32(os.path.join(resv, "#address-cells"), 2)
    scells = _dt_u32(os.path.join(resv, "#size-cells"), 1)
    hits = []
    for node in sorted(os.listdir(resv)):
        path = os.path.join(resv, node)
        if not os.path.isdir(path) or not _DT_NAME_RE.search(node.partition("@")[0]):
            continue
        try:
            with open(os.path.join(path, "compatible"), "rb") as f:
                compatible = f.read().split(b"\0")
            with open(os.path.join(path, "reg"), "rb") as f:
                reg = f.read()
        except OSError:
            continue
        if b"restricted-dma-pool" not in compatible:
            continue
        if len(reg) < 4 * (acells + scells):
            raise BaseNotFound(errno.EINVAL, f"{path}/reg is {len(reg)} bytes, shorter than one "
                               f"(address, size) pair of {acells}+{scells} cells")
        addr, at = _be_cells(reg, acells, 0)
        size, _ = _be_cells(reg, scells, at)
        hits.append(RegionBase(addr, f"{path} (device tree)", size))
    if len(hits) > 1:
        raise BaseNotFound(errno.EINVAL, f"{len(hits)} reserved-memory nodes look like the loopback "
                           f"region ({', '.join(h.source for h in hits)}): pick one with base=")
    return hits[0] if hits else None


def _dt_u32(path: str, default: int) -> int:
    try:
        with open(path, "rb") as f:
            data = f.read()
        return struct.unpack(">I", data[:4])[0] if len(data) >= 4 else default
    except OSError:
        return default


def find_base(option: Any = None, *, proc: str | None = None) -> RegionBase:
    """The region's base: ``option`` (``base=``), else /proc/iomem, else
    the device tree.  Raises BaseNotFound saying where it looked."""
    if option is not None:
        return RegionBase(parse_int(option, "base"), "base= option")
    for finder in (base_from_iomem, base_from_device_tree):
        found = finder(proc)
        if found is not None:
            return found
    root = proc_root(proc)
    raise BaseNotFound(errno.ENOENT, f"cannot tell the region's base address: no {IOMEM_NAME} range in "
                       f"{root}/iomem and no restricted-dma-pool named for virtio-msg under "
                       f"{root}/device-tree/reserved-memory; give it with base=ADDR (the start of "
                       f"the memory reserved for the loopback bus, e.g. from memmap=)")


# ---- the carrier ------------------------------------------------------------------------

def explain_open_error(path: str, what: str, e: OSError) -> VmsgLbError:
    if isinstance(e, FileNotFoundError):
        hint = ("this kernel has no virtio-msg loopback bus (the loopback and user-API modules are "
                "not loaded, or the kernel lacks the virtio-msg patches; see docs/vmsg-lb.md)")
    elif isinstance(e, PermissionError):
        hint = "the nodes are root-only (mode 0600): run as root"
    elif e.errno == errno.EBUSY:
        hint = "the node is busy: another device side has it open"
    else:
        hint = e.strerror or str(e)
    return VmsgLbError(e.errno or errno.EIO, f"cannot open the {what} {path}: {hint}")


def explain_ioctl_error(op: str, dev_id: int, e: OSError) -> VmsgLbError:
    """ADD/REMOVE errno -> what it means on this bus."""
    why = {
        errno.EEXIST: f"dev_id {dev_id} is already on the loopback bus (another device side added it; "
                      f"REMOVE it first or use other device numbers)",
        errno.ENODEV: (f"the kernel refused dev_id {dev_id}: it read device_id 0 in the answer to "
                       f"GET_DEVICE_INFO (no device side serves that dev_id, or a stray response "
                       f"has shifted the bus by one: see docs/vmsg-lb.md)") if op == "ADD"
        else f"dev_id {dev_id} is not on the bus",
        errno.EINVAL: f"the kernel refused dev_id {dev_id}: num_feature_bits was not 64",
        errno.ENOTTY: "the control node does not know this ioctl: not the 2026 loopback bus "
                      "(an older virtio-msg version? see docs/vmsg-lb.md)",
        errno.EFAULT: "the kernel could not read the ioctl argument",
    }.get(e.errno or 0, e.strerror or str(e))
    return VmsgLbError(e.errno or errno.EIO, f"{op} of dev_id {dev_id}: {why}")


class VmsgLbCarrier(Carrier):
    """The loopback bus: ``region`` is the whole reserved region mapped with
    ``bus_base = base``; messages go through :meth:`read_message` and
    :meth:`write_message`; devices come and go with :meth:`add_device` /
    :meth:`remove_device` (ADD blocks until the kernel's probe has been
    answered, so something must be answering: ``vmsgamp.bus.userapi``)."""

    def __init__(self, nodes: UserApiNodes, region: Region, *, uri: str, base: RegionBase,
                 size: int, packed: bool = False) -> None:
        super().__init__(region, PollingDoorbell(), uri=uri, offset=0)
        self.nodes = nodes
        self.base = base.base
        self.base_source = base.source
        self.base_info = base
        self.size = size
        self.packed = packed
        self.control_path = nodes.control_path
        self.msg_path = nodes.msg_path

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self.nodes.close()

    # ---- messages -------------------------------------------------------------------
    def msg_fileno(self) -> int:
        """Poll this for POLLIN: a kernel message is pending."""
        return self.nodes.fileno()

    def read_message(self) -> bytes | None:
        """The pending kernel message, or None (EAGAIN: nothing pending).
        An empty read is no message either: answering it would be a stray
        response that shifts the bus."""
        try:
            data = self.nodes.read(READ_SIZE)
        except BlockingIOError:
            return None
        return data or None

    def write_message(self, data: bytes) -> None:
        if len(data) < HEADER.size:
            raise ValueError(f"a message is at least {HEADER.size} bytes, not {len(data)}")
        n = self.nodes.write(bytes(data))
        if n != len(data):
            raise OSError(errno.EIO, f"{self.msg_path}: short write ({n} of {len(data)} bytes)")

    # ---- devices ----------------------------------------------------------------------
    def add_device(self, dev_id: int) -> None:
        """IOCTL_VMSG_LB_ADD; returns once the kernel's probe has been answered."""
        self._ioctl("ADD", IOCTL_VMSG_LB_ADD, dev_id)

    def remove_device(self, dev_id: int) -> None:
        """IOCTL_VMSG_LB_REMOVE; returns once the driver's remove path has
        been answered (this kernel version may never return: see docs)."""
        self._ioctl("REMOVE", IOCTL_VMSG_LB_REMOVE, dev_id)

    def _ioctl(self, op: str, request: int, dev_id: int) -> None:
        if not 0 <= dev_id <= MAX_DEV_ID:
            raise ValueError(f"dev_id {dev_id} outside 0..{MAX_DEV_ID}")
        try:
            self.nodes.ioctl(request, _DEV_INFO.pack(dev_id))
        except OSError as e:
            raise explain_ioctl_error(op, dev_id, e) from None

    def holders(self) -> list[str]:
        """Other processes with the message node open (two responders race
        for the same messages)."""
        return self.nodes.holders()

    def describe(self) -> dict[str, Any]:
        return {"control": self.control_path, "msg": self.msg_path, "base": self.base,
                "base_source": self.base_source, "size": self.size}

    def __repr__(self) -> str:
        return (f"<VmsgLbCarrier {self.uri} base={self.base:#x} size={self.size:#x} "
                f"({self.base_source}){' closed' if self.closed else ''}>")


def open_vmsg_lb(target: str, *, uri: str, msg: Any = None, base: Any = None, packed: Any = False,
                 nodes: UserApiNodes | None = None, proc: str | None = None,
                 **common: Any) -> VmsgLbCarrier:
    """Open the nodes, find the base, map the region.  ``nodes`` replaces
    the real nodes (the fake kernel); ``proc`` moves /proc."""
    unsupported = sorted(k for k, v in common.items() if v is not None and k != "timeout")
    if unsupported:
        if nodes is not None:
            nodes.close()      # handed to us: ours to close, whatever happens
        raise ValueError(f"{uri}: option {', '.join(unsupported)} does not apply to vmsg-lb: (the "
                         f"region is the kernel's reserved memory, mapped whole at its base)")
    if isinstance(nodes, str):
        raise ValueError(f"{uri}: nodes= takes a node object from a program, not a URI value")
    droot = dev_root()
    control_path = target or os.path.join(droot, CONTROL_NODE)
    msg_path = str(msg) if msg else os.path.join(droot, MSG_NODE)
    if nodes is None:
        try:
            nodes = open_nodes(control_path, msg_path)
        except OSError as e:
            if e.filename == msg_path:
                raise explain_open_error(msg_path, "message node", e) from None
            raise explain_open_error(control_path, "control node", e) from None
    try:
        where = find_base(base, proc=proc)
        try:
            size = nodes.seek_end()
        except OSError as e:
            raise VmsgLbError(e.errno or errno.EIO, f"{nodes.control_path}: lseek(SEEK_END) failed "
                              f"({e.strerror}): cannot learn the region size") from None
        if size <= 0:
            raise VmsgLbError(errno.ENXIO, f"{nodes.control_path}: the loopback bus reports a region "
                              f"of {size} bytes: the kernel has no memory reserved for it (boot with "
                              f"the reservation: memmap= on x86, a reserved-memory node on DT)")
        if where.base + size > 1 << 64:
            raise VmsgLbError(errno.EINVAL, f"base {where.base:#x} + size {size:#x} does not fit in 64 bits")
        try:
            # Exactly the size lseek reports, never more (see the module doc).
            region = nodes.map(0, size, bus_base=where.base, uri=uri)
        except OSError as e:
            raise VmsgLbError(e.errno or errno.EIO, f"{nodes.control_path}: cannot map the {size:#x}-byte "
                              f"region ({e.strerror or e}): the kernel offers no memory for "
                              f"ACCESS_PLATFORM rings") from None
        try:
            return VmsgLbCarrier(nodes, region, uri=uri, base=where, size=size,
                                 packed=parse_bool(packed, "packed"))
        except BaseException:
            region.close()
            raise
    except BaseException:
        nodes.close()
        raise


VMSG_LB_OPTIONS = ("msg", "base", "packed", "nodes", "proc")

register_scheme("vmsg-lb", open_vmsg_lb, options=VMSG_LB_OPTIONS,
                summary="vmsg-lb:[CONTROL_NODE][#msg=NODE&base=ADDR]  the kernel's virtio-msg "
                        "loopback bus (serve its own drivers)")
