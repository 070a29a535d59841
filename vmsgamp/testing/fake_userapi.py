"""A fake Linux virtio-msg user API and loopback bus, in process: the
kernel side of ``vmsg-lb:`` for tests on machines without those modules.

It reproduces the device-side contract of the 2026 kernel modules (written
down in ``docs/vmsg-lb.md``), including its hazards:

* nodes: ``read`` of the message node returns one posted message or fails
  with ``EAGAIN`` at once (even though nothing is opened non-blocking), and
  with ``EINVAL`` for a ``count`` below 50; ``write`` needs 8 bytes and never
  blocks; the node's fd (an eventfd) polls readable exactly while a message
  is posted; the control node answers ADD/REMOVE (``ENOTTY`` for anything
  else, ``EFAULT`` for a short argument), ``lseek(SEEK_END)`` with the
  region size and ``mmap`` of a file standing for the reserved memory;
* one transfer in flight for the whole bus: a message is posted, then the
  kernel thread waits for a RESPONSE write (any msg_id and dev_id release
  it; a token mismatch is a kernel warning; ``min(msg_size, 50)`` bytes are
  copied into a zeroed 50-byte buffer read as the answer to the request);
* a RESPONSE written when nothing waits (or a second one) is remembered and
  completes the *next* transfer at once with zeros: the bus is then off by
  one for good, as on the real kernel;
* EVENT_USED writes interrupt the named queue; other writes are logged as
  unsupported and ignored (there is no config-change event from user space);
* ADD runs the Linux probe in the caller's thread and returns only after it
  has been answered; REMOVE runs the driver's remove path; ``poweroff()``
  sends the SET_DEVICE_STATUS 0 of a shutdown.

The kernel's drivers are vmsgamp's own driver side (``AmpDriver`` and the
device clients) over synchronous transfers, in the Linux message order:
GET_DEVICE_INFO; SET_DEVICE_STATUS 0; GET/SET status 1, 3;
GET_DEVICE_FEATURES {0, 2}; SET_DRIVER_FEATURES; GET/SET 0x0b, GET; per
queue GET_VQUEUE and SET_VQUEUE; GET/SET 0x0f; what the driver does at
probe (virtio-rng's first EVENT_AVAIL); one more GET_DEVICE_STATUS.

Where the real kernel would spin forever (a transfer nobody answers) the
fake waits ``hang_timeout`` seconds, records a violation and raises
:class:`KernelHang`; everything user space did against the contract is in
``violations`` (tests assert it stays empty), kernel log lines in ``log``,
and every message both ways in ``transcript``.

    kernel = FakeUserApiKernel(base=0x7000_0000)
    carrier = open_carrier("vmsg-lb:#base=0x70000000", nodes=kernel.open_nodes())
    server = UserApiServer(carrier); server.start()
    server.add_device(0, RngDevice())            # the probe runs here
    kernel.read_entropy(0, 64)
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.region import Region
from vmsgamp.bus._driver_side import AmpDriver
from vmsgamp.carriers.vmsg_lb import (
    CONTROL_NODE, HEADER, IOCTL_VMSG_LB_ADD, IOCTL_VMSG_LB_REMOVE, MSG_NODE, MSG_SIZE,
)
from vmsgamp.protocol import TransportMsgId
from vmsgamp.testing._fake_linux import (
    KernelDevice, KernelHang, LinuxDriverSide, _KernelBus, _name, _release_client,
)

log = logging.getLogger("vmsgamp.testing.fake_userapi")
EVENT_AVAIL = int(TransportMsgId.EVENT_AVAIL)
EVENT_USED = int(TransportMsgId.EVENT_USED)
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class _Transfer:
    request: bytes
    response: bytearray = field(default_factory=lambda: bytearray(MSG_SIZE))
    done: bool = False
    by_stray: bool = False


class FakeNodes:
    """One open of the two nodes (the :class:`vmsgamp.carriers.vmsg_lb.UserApiNodes`
    operations); any number may be open, as on the real kernel."""

    def __init__(self, kernel: FakeUserApiKernel, control_path: str, msg_path: str) -> None:
        self.kernel = kernel
        self.control_path = control_path
        self.msg_path = msg_path
        self.closed = False
        self.number = next(kernel._open_numbers)

    def _live(self) -> FakeUserApiKernel:
        if self.closed:
            raise OSError(errno.EBADF, "fake nodes are closed")
        return self.kernel

    def fileno(self) -> int:
        return self._live()._evfd

    def read(self, count: int) -> bytes:
        return self._live()._user_read(count)

    def write(self, data: bytes) -> int:
        return self._live()._user_write(bytes(data))

    def ioctl(self, request: int, arg: bytes) -> None:
        self._live()._ioctl(request, bytes(arg))

    def seek_end(self) -> int:
        return self._live().size

    def map(self, offset: int, length: int, *, bus_base: int, uri: str) -> Region:
        return self._live()._map(offset, length, bus_base, uri)

    def holders(self) -> list[str]:
        return [f"fake opener {n.number}" for n in sorted(self.kernel._opens, key=lambda n: n.number)
                if n is not self]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.kernel._opens.discard(self)


class FakeUserApiKernel(LinuxDriverSide):
    """The kernel side of one loopback bus (see the module doc).

    ``base``/``size``: the reserved region (a memfd) and its bus address.
    ``hang_timeout``: how long a transfer waits before the fake calls it a
    hang.  ``remove_deadlocks``: REMOVE blocks forever (until close()), as
    the upstream code of this version can.  ``deny``: opening the nodes
    fails with EACCES (not root)."""

    def __init__(self, *, base: int = 0x7000_0000, size: int = 4 << 20, hang_timeout: float = 10.0,
                 driver_timeout: float = 5.0, remove_deadlocks: bool = False, deny: bool = False,
                 control_name: str = CONTROL_NODE, msg_name: str = MSG_NODE) -> None:
        if size % PAGE:
            raise ValueError("the region size must be a multiple of the page size")
        self.base = base
        self.size = size
        self.hang_timeout = hang_timeout
        self.remove_deadlocks = remove_deadlocks
        self.deny = deny
        self.control_name = control_name
        self.msg_name = msg_name
        self.log: list[str] = []                       # kernel log lines
        self.violations: list[str] = []                # user space broke the contract
        self.notes: list[str] = []                     # oddities the real kernel does not check
        self.transcript: list[tuple[str, bytes]] = []  # ('post'|'read'|'write', bytes), in order
        self.maps: list[tuple[int, int]] = []
        self.ioctls: list[tuple[str, int]] = []
        self.stats = {"transfers": 0, "responses": 0, "strays": 0, "events_used": 0,
                      "unsupported_writes": 0, "token_warnings": 0}
        self.devices: dict[int, KernelDevice] = {}
        self._cv = threading.Condition()
        self._bus = threading.Lock()          # one transfer in flight for the whole bus
        self._drv_lock = threading.RLock()    # the kernel's driver side (one caller at a time)
        self._readq: deque[bytes] = deque()
        self._current: _Transfer | None = None
        self._strays = 0
        self._notifications: deque[bytes] = deque()
        self._readable = False
        self._closed = False
        self._released = threading.Event()    # ends a deadlocked REMOVE at close()
        self._opens: set[FakeNodes] = set()
        self._open_numbers = itertools.count()
        self._evfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._memfd = os.memfd_create("fake-virtio-msg-lb", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, size)
        self.region = Region.from_fd(os.dup(self._memfd), size, bus_base=base, own_fd=True,
                                     uri="fake-kernel:region")
        # "Ordinary RAM" past the region, where rings go without ACCESS_PLATFORM.
        self._ram = Region.memfd(1 << 20, "fake-kernel-ram", bus_base=base + size + (1 << 20))
        self.allocator = RegionAllocator(self.region, 0, bus_base=base)
        self._ram_allocator = RegionAllocator(self._ram, 0, bus_base=self._ram.bus_base)
        self.bus = _KernelBus(self)
        self.driver = AmpDriver(self.bus, self.allocator, timeout=driver_timeout)  # type: ignore[arg-type]
        self._ring_space = AddressSpace([(base, self.region, 0, size),
                                         (self._ram.bus_base, self._ram, 0, self._ram.size)])

    # ---- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Wake every waiter and release the memory.  Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._released.set()
        for n in list(self._opens):
            n.close()
        with self._drv_lock:
            for dev in self.devices.values():
                _release_client(dev)
            self.devices.clear()
            self.driver.devices.clear()
        self._ring_space.close()
        self.region.close()
        self._ram.close()
        for fd in (self._evfd, self._memfd):
            os.close(fd)

    def __enter__(self) -> FakeUserApiKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- nodes ------------------------------------------------------------------------------
    def open_nodes(self, control_path: str | None = None, msg_path: str | None = None) -> FakeNodes:
        """Open both nodes (signature of ``vmsgamp.carriers.vmsg_lb.open_nodes``,
        so tests can substitute it); paths whose names differ from this
        kernel's nodes do not exist."""
        control_path = control_path or f"/dev/{self.control_name}"
        msg_path = msg_path or f"/dev/{self.msg_name}"
        for path, name in ((control_path, self.control_name), (msg_path, self.msg_name)):
            if os.path.basename(path) != name:
                raise FileNotFoundError(errno.ENOENT, f"no such node {path}", path)
        if self.deny:
            raise PermissionError(errno.EACCES, f"{control_path}: permission denied", control_path)
        with self._cv:
            if self._closed:
                raise FileNotFoundError(errno.ENOENT, "the fake kernel is closed", control_path)
        nodes = FakeNodes(self, control_path, msg_path)
        self._opens.add(nodes)
        return nodes

    def _set_readable(self) -> None:
        # Level-triggered like the real poll(): the eventfd counts 1 while
        # anything is posted and 0 otherwise.  Called with _cv held.
        want = bool(self._readq)
        if want and not self._readable:
            os.eventfd_write(self._evfd, 1)
        elif not want and self._readable:
            os.eventfd_read(self._evfd)
        self._readable = want

    def _user_read(self, count: int) -> bytes:
        if count < MSG_SIZE:
            raise OSError(errno.EINVAL, f"read of {count} bytes: the message node needs at least {MSG_SIZE}")
        with self._cv:
            if not self._readq:
                raise BlockingIOError(errno.EAGAIN, "no kernel message pending")
            msg = self._readq.popleft()
            self._set_readable()
            self.transcript.append(("read", msg))
            return msg

    def _user_write(self, data: bytes) -> int:
        if len(data) < HEADER.size:
            raise OSError(errno.EINVAL, f"write of {len(data)} bytes: a header is {HEADER.size}")
        mtype, msg_id, dev_id, token, msg_size = HEADER.unpack_from(data)
        with self._cv:
            self.transcript.append(("write", data))
            if mtype & 1:
                self._on_response(data, msg_id, dev_id, token, msg_size)
            elif msg_id == EVENT_USED and not mtype & 2:
                self._on_event_used(data, dev_id, msg_size)
            else:
                self.stats["unsupported_writes"] += 1
                self.log.append(f"virtio-msg user: unsupported message type {mtype:#x} msg_id "
                                f"{msg_id:#04x} ignored")
            self._cv.notify_all()
        return len(data)

    def _on_response(self, data: bytes, msg_id: int, dev_id: int, token: int, msg_size: int) -> None:
        if msg_size > len(data):
            self.violations.append(f"RESPONSE msg_size {msg_size} > the {len(data)} bytes written: "
                                   f"the kernel copies past the user buffer")
        t = self._current
        if t is None:
            # Remembered: the next transfer completes at once, with zeros.
            self._strays += 1
            self.stats["strays"] += 1
            self.log.append(f"virtio-msg: response with no transfer pending (msg_id {msg_id:#04x} "
                            f"dev_id {dev_id}): remembered")
            return
        n = min(msg_size, MSG_SIZE, len(data))
        t.response[:n] = data[:n]
        rtype, rmsg, rdev, rtoken, _ = HEADER.unpack(t.request[:HEADER.size].ljust(HEADER.size, b"\0"))
        if token != rtoken:
            self.stats["token_warnings"] += 1
            self.log.append(f"WARNING: virtio-msg: response token {token} for a request with token {rtoken}")
        if msg_id != rmsg or dev_id != rdev:
            self.notes.append(f"response msg_id {msg_id:#04x} dev_id {dev_id} answers msg_id "
                              f"{rmsg:#04x} dev_id {rdev}")
        if rmsg == EVENT_AVAIL and not rtype & 3 and (msg_size != HEADER.size or data[0] != 1):
            self.notes.append(f"EVENT_AVAIL ack of type {data[0]:#x} msg_size {msg_size} (want 1 and 8)")
        t.done = True
        self._current = None
        self.stats["responses"] += 1

    def _on_event_used(self, data: bytes, dev_id: int, msg_size: int) -> None:
        dev = self.devices.get(dev_id)
        if dev is None:
            return     # unknown dev_id: ignored
        if msg_size < 12 or len(data) < 12:
            self.log.append(f"virtio-msg user: short EVENT_USED ({msg_size} bytes) ignored")
            return
        (vq,) = struct.unpack_from("<I", data, 8)
        t = self._current
        if t is not None and t.request[1] == EVENT_AVAIL and t.request[0] & 3 == 0:
            # Works, but the kicking kernel thread spins until the ack comes.
            self.notes.append(f"EVENT_USED for dev_id {dev_id} written before the ack of the "
                              f"pending EVENT_AVAIL")
        nq = len(dev.driver.queues) if dev.driver is not None else 0
        if vq >= nq:
            self.log.append(f"virtio-msg: EVENT_USED for unknown vq {vq} of dev_id {dev_id}")
            return
        self.stats["events_used"] += 1
        self._notifications.append(bytes(data[:12]))

    def _take_notifications(self, timeout: float | None) -> list[bytes]:
        with self._cv:
            if not self._notifications and timeout != 0 and not self._closed:
                self._cv.wait(timeout)
            out = list(self._notifications)
            self._notifications.clear()
            return out

    def _map(self, offset: int, length: int, bus_base: int, uri: str) -> Region:
        if offset % PAGE or length <= 0:
            raise OSError(errno.EINVAL, f"mmap offset {offset:#x} length {length:#x}")
        if offset + length > self.size:
            if offset != 0:
                raise OSError(errno.EINVAL, f"mmap of {length:#x} bytes at {offset:#x} beyond the region")
            # Upstream lets this through and maps the memory after the region.
            self.violations.append(f"mmap of {length:#x} bytes at offset 0: longer than the "
                                   f"{self.size:#x}-byte region (upstream exposes what follows it)")
        self.maps.append((offset, length))
        fd = os.dup(self._memfd)
        try:
            return Region.from_fd(fd, length, offset=offset, bus_base=bus_base, own_fd=True, uri=uri)
        except BaseException:
            os.close(fd)
            raise

    # ---- transfers -------------------------------------------------------------------------
    def transfer(self, data: bytes) -> tuple[bytes, bool]:
        """Post ``data`` and wait for its RESPONSE, as a kernel thread does:
        ``(the 50-byte response buffer, completed by an earlier stray)``.
        Public so tests can send what Linux never would."""
        if len(data) > MSG_SIZE:
            raise ValueError(f"the kernel never posts more than {MSG_SIZE} bytes")
        with self._bus:
            t = _Transfer(bytes(data))
            with self._cv:
                if self._closed:
                    raise OSError(errno.ENODEV, "the fake kernel is closed")
                self.stats["transfers"] += 1
                self._readq.append(t.request)
                self._set_readable()
                self.transcript.append(("post", t.request))
                if self._strays:
                    self._strays -= 1
                    t.done = t.by_stray = True
                    self.log.append("virtio-msg: transfer completed at once by a remembered response")
                    return bytes(t.response), True
                self._current = t
                deadline = time.monotonic() + self.hang_timeout
                while not t.done:
                    left = deadline - time.monotonic()
                    if self._closed:
                        self._current = None
                        raise OSError(errno.ENODEV, "the fake kernel was closed during a transfer")
                    if left <= 0:
                        self._current = None
                        what = f"{_name(t.request)} ({t.request.hex()})"
                        self.violations.append(f"{what} unanswered for {self.hang_timeout} s")
                        raise KernelHang(f"{what} unanswered for {self.hang_timeout} s: a real kernel "
                                         f"would spin a CPU forever")
                    self._cv.wait(left)
                return bytes(t.response), False

    # ---- the control node --------------------------------------------------------------------
    def _ioctl(self, request: int, arg: bytes) -> None:
        if request not in (IOCTL_VMSG_LB_ADD, IOCTL_VMSG_LB_REMOVE):
            raise OSError(errno.ENOTTY, f"ioctl {request:#x} is not ADD or REMOVE")
        if len(arg) < 4:
            raise OSError(errno.EFAULT, "short vmsg_lb_dev_info")
        dev_id = struct.unpack_from("<I", arg)[0] & 0xFFFF
        op = "ADD" if request == IOCTL_VMSG_LB_ADD else "REMOVE"
        self.ioctls.append((op, dev_id))
        if op == "ADD":
            self._add(dev_id)
        else:
            self._remove(dev_id)

    def wait_until(self, predicate: Callable[[FakeUserApiKernel], bool], timeout: float) -> bool:
        """Wait until ``predicate(kernel)`` holds (checked at every ADD,
        REMOVE and write)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return predicate(self)
                self._cv.wait(min(left, 0.1))
            return True

    def pending(self) -> int:
        """Messages posted and not read yet."""
        with self._cv:
            return len(self._readq)


__all__ = ["FakeNodes", "FakeUserApiKernel", "KernelDevice", "KernelHang"]
