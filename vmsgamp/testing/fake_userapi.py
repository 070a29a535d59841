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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.region import Region
from vmsgamp._core.virtq import PackedQueueDriver, SplitQueueDriver
from vmsgamp.bus._driver_side import AmpDriver, DeviceInfo, DriverDevice, DriverError
from vmsgamp.carriers.vmsg_lb import (
    CONTROL_NODE, HEADER, IOCTL_VMSG_LB_ADD, IOCTL_VMSG_LB_REMOVE, MSG_NODE, MSG_SIZE,
)
from vmsgamp.errors import VmsgampError
from vmsgamp.protocol import (
    VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
    DeviceStatus, DriverConnection, Event, FeaturesRead, FeaturesWritten, GetDeviceInfoRequest,
    GetDeviceInfoResponse, GetDeviceStatusRequest, GetVqueueRequest, ResetVqueueRequest,
    SetDeviceStatusRequest, SetVqueueRequest, TransportMsgId,
)

log = logging.getLogger("vmsgamp.testing.fake_userapi")

S = DeviceStatus
VIRTIO_F_ACCESS_PLATFORM = 33
EVENT_AVAIL = int(TransportMsgId.EVENT_AVAIL)
EVENT_USED = int(TransportMsgId.EVENT_USED)
PAGE = os.sysconf("SC_PAGE_SIZE")

# Transport bits Linux keeps (vring_transport_features) that vmsgamp's models may offer.
LINUX_TRANSPORT_FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
                            | 1 << VIRTIO_F_RING_PACKED | 1 << VIRTIO_F_INDIRECT_DESC
                            | 1 << VIRTIO_F_EVENT_IDX)
# Device-type bits each Linux driver asks for (its feature table).
LINUX_DRIVER_FEATURES = {
    2: 0x7E76,        # blk: SIZE_MAX SEG_MAX GEOMETRY RO BLK_SIZE FLUSH TOPOLOGY CONFIG_WCE MQ DISCARD WRITE_ZEROES
    3: 0b111,         # console: SIZE MULTIPORT EMERG_WRITE
    4: 0,             # rng
    34: 0b1,          # i2c: ZERO_LENGTH_REQUEST
    41: 0b1,          # gpio: IRQ
}
RNG_BUFFER = 64       # what virtio-rng asks for per request


class KernelHang(VmsgampError, RuntimeError):
    """A transfer stayed unanswered for ``hang_timeout``: the real kernel
    would spin a CPU forever (and the machine's driver would hang)."""


@dataclass
class _Transfer:
    request: bytes
    response: bytearray = field(default_factory=lambda: bytearray(MSG_SIZE))
    done: bool = False
    by_stray: bool = False


@dataclass
class KernelDevice:
    """One ADDed device as the kernel sees it."""

    dev_id: int
    info: GetDeviceInfoResponse
    driver: DriverDevice | None = None
    bound: bool = False               # a driver probed it successfully
    error: str | None = None          # why the driver probe failed
    client: Any = None                # I2cClient / ConsoleClient
    rng_buffer: tuple[int, memoryview] | None = None
    rng_posted: bool = False
    shut_down: bool = False


class _LinuxConnection(DriverConnection):
    def _new_token(self) -> int:
        return 1   # Linux uses token 1 for every request (0 for events)


class _KernelBus:
    """What AmpDriver needs from a bus, made of synchronous kernel transfers:
    ``transmit`` returns only when every message has been answered."""

    def __init__(self, kernel: FakeUserApiKernel) -> None:
        self.kernel = kernel
        self.conn = _LinuxConnection(max_msg_size=MSG_SIZE, max_rx_size=MSG_SIZE)
        self.up = True
        self.clock = time.monotonic

    def send(self, msg: Any, *, timeout: float | None = None) -> list[Event]:
        return self.transmit(self.conn.send(msg, self.clock(), timeout=timeout))

    def transmit(self, out: list[bytes]) -> list[Event]:
        events: list[Event] = []
        todo = deque(out)
        while todo:
            events.extend(self.kernel._driver_transfer(todo.popleft(), self.conn))
            todo.extend(self.conn.data_to_send())
        return events

    def poll(self, timeout: float | None = 0.0) -> list[Event]:
        events: list[Event] = []
        for data in self.kernel._take_notifications(timeout):
            events.extend(self.conn.receive_bytes(data, self.clock()))
        events.extend(self.conn.handle_timeout(self.clock()))
        events.extend(self.transmit(self.conn.data_to_send()))
        return events


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


class FakeUserApiKernel:
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

    def _driver_transfer(self, data: bytes, conn: DriverConnection) -> list[Event]:
        try:
            response, _ = self.transfer(data)
        except BaseException:
            conn.reset()     # nothing else is in flight: transfers are synchronous
            raise
        mtype, msg_id, dev_id, token, _ = HEADER.unpack_from(data)
        if msg_id == EVENT_AVAIL and not mtype & 3:
            return []     # the ack only releases the kicking thread
        # The kernel reads its buffer as the answer to what it asked,
        # whatever header was written into it.
        as_read = HEADER.pack(mtype | 1, msg_id, dev_id, token, MSG_SIZE) + response[HEADER.size:]
        before = conn.counters.rx_malformed
        events = conn.receive_bytes(as_read, time.monotonic())
        if conn.counters.rx_malformed != before:
            self.log.append(f"virtio-msg: garbled response to {_name(data)}: {conn.counters.last_error}")
            conn.reset()
            raise OSError(errno.EIO, f"garbled response to {_name(data)}")
        return events

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

    def _add(self, dev_id: int) -> None:
        with self._drv_lock:
            if dev_id in self.devices:
                raise OSError(errno.EEXIST, f"dev_id {dev_id} exists")
            info = self.driver.request(GetDeviceInfoRequest(dev_num=dev_id))
            assert isinstance(info, GetDeviceInfoResponse)
            if info.device_id == 0:
                raise OSError(errno.ENODEV, f"dev_id {dev_id}: device_id 0")
            if info.num_feature_bits != 64:
                raise OSError(errno.EINVAL, f"dev_id {dev_id}: num_feature_bits {info.num_feature_bits}")
            dev = KernelDevice(dev_id, info)
            self.devices[dev_id] = dev
            try:
                self._probe(dev)
                dev.bound = True
            except (DriverError, OSError, TimeoutError, VmsgampError) as e:
                if isinstance(e, KernelHang):
                    raise
                dev.error = str(e)
                self.log.append(f"virtio-msg: probe of dev_id {dev_id} failed: {e}")
                self._fail(dev)
            with self._cv:
                self._cv.notify_all()

    def _status(self, d: DriverDevice, status: int) -> int:
        r = self.driver.request(SetDeviceStatusRequest(dev_num=d.dev_num, status=status))
        d.status = r.status
        return r.status

    def _get_status(self, d: DriverDevice) -> int:
        return self.driver.request(GetDeviceStatusRequest(dev_num=d.dev_num)).status

    def _add_status(self, d: DriverDevice, bits: int) -> int:
        return self._status(d, self._get_status(d) | bits)

    def _probe(self, dev: KernelDevice) -> None:
        """The Linux probe of one device, in the kernel's message order."""
        drv, n, info = self.driver, dev.dev_id, dev.info
        d = DriverDevice(drv, n)
        dev.driver = d
        self._status(d, 0)                       # register_virtio_device: reset
        self._add_status(d, S.ACKNOWLEDGE)
        self._add_status(d, S.DRIVER)
        ev = drv._op(lambda now: drv.conn.read_features(n, now), FeaturesRead, n, "reading features")
        offered = ev.features
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            raise DriverError("the device does not offer VERSION_1 (legacy devices are refused)")
        d.features = offered & (LINUX_DRIVER_FEATURES.get(info.device_id, 0) | LINUX_TRANSPORT_FEATURES)
        drv._op(lambda now: drv.conn.write_features(n, d.features, now), FeaturesWritten, n,
                "writing features")
        self._add_status(d, S.FEATURES_OK)
        if not self._get_status(d) & S.FEATURES_OK:
            raise DriverError(f"the device refused features {d.features:#x}")
        if d.features >> VIRTIO_F_ACCESS_PLATFORM & 1:
            rings = self.allocator
        else:
            self.log.append(f"virtio-msg: dev_id {n} without ACCESS_PLATFORM: DMA bypasses the "
                            f"region (rings in ordinary RAM)")
            rings = self._ram_allocator
        ei = bool(d.features >> VIRTIO_F_EVENT_IDX & 1)
        ind = bool(d.features >> VIRTIO_F_INDIRECT_DESC & 1)
        packed = bool(d.features >> VIRTIO_F_RING_PACKED & 1)
        d.info = DeviceInfo(n, info.device_id, info.vendor_id, info.num_feature_bits, info.config_size,
                            info.max_virtqueues, features=offered)
        for i in range(min(info.max_virtqueues, 64)):
            mx = self.driver.request(GetVqueueRequest(dev_num=n, index=i)).max_size
            d.info.queue_max_sizes.append(mx)
            if mx == 0:
                raise DriverError(f"queue {i} has size 0")
            size = mx if packed else 1 << (mx.bit_length() - 1)
            cls = PackedQueueDriver if packed else SplitQueueDriver
            q = cls.create(rings, size, aspace=self._ring_space, event_idx=ei, indirect=ind)
            self.driver.request(SetVqueueRequest(dev_num=n, index=i, size=size, desc_addr=q.desc_addr,
                                                 driver_addr=q.driver_addr, device_addr=q.device_addr))
            d.queues.append(q)
            d.used_events.append(0)
        st = self._add_status(d, S.DRIVER_OK)    # virtio_device_ready
        if st & S.DEVICE_NEEDS_RESET or not st & S.DRIVER_OK:
            raise DriverError(f"status {st:#x} after DRIVER_OK")
        drv.devices[n] = d
        self._driver_start(dev)
        self._get_status(d)

    def _driver_start(self, dev: KernelDevice) -> None:
        """What each driver does at the end of its probe."""
        d = dev.driver
        assert d is not None
        kind = dev.info.device_id
        if kind == 4:
            # virtio-rng asks for its first buffer at once (the probe's EVENT_AVAIL).
            dev.rng_buffer = d.alloc(RNG_BUFFER)
            self._rng_post(dev)
        elif kind == 3:
            from vmsgamp.devices.console_client import ConsoleClient

            dev.client = ConsoleClient(d)
        elif kind == 34:
            from vmsgamp.devices.i2c_client import I2cClient

            dev.client = I2cClient(d)

    def _fail(self, dev: KernelDevice) -> None:
        d = dev.driver
        if d is None:
            return
        try:
            self._add_status(d, S.FAILED)
        except (DriverError, OSError, TimeoutError, VmsgampError) as e:
            if isinstance(e, KernelHang):
                raise
            self.log.append(f"virtio-msg: dev_id {dev.dev_id}: setting FAILED: {e}")

    def _remove(self, dev_id: int) -> None:
        if dev_id not in self.devices:
            raise OSError(errno.ENODEV, f"dev_id {dev_id} is not on the bus")
        if self.remove_deadlocks:
            # Upstream unregisters while holding the bus lock the reset needs.
            self.log.append(f"virtio-msg: REMOVE of dev_id {dev_id} deadlocked")
            self._released.wait()
            raise OSError(errno.ENODEV, "the fake kernel was closed during a deadlocked REMOVE")
        with self._drv_lock:
            dev = self.devices[dev_id]
            d = dev.driver
            if dev.bound and d is not None and not dev.shut_down:
                # The driver's remove path (observed for virtio-rng).
                self._status(d, 0)
                for i in range(len(d.queues)):
                    self.driver.request(ResetVqueueRequest(dev_num=dev_id, index=i))
                self._get_status(d)
                self._get_status(d)
                self._status(d, S.ACKNOWLEDGE)
            _release_client(dev)
            del self.devices[dev_id]
            if d is not None:
                self.driver.devices.pop(dev_id, None)
                d._on_removed()
            with self._cv:
                self._cv.notify_all()

    # ---- what the machine's users do -------------------------------------------------------------
    def poweroff(self) -> None:
        """The SET_DEVICE_STATUS 0 every bound device gets at shutdown."""
        with self._drv_lock:
            for dev in list(self.devices.values()):
                if dev.bound and dev.driver is not None and not dev.shut_down:
                    self._status(dev.driver, 0)
                    dev.shut_down = True

    @contextmanager
    def locked(self) -> Iterator[FakeUserApiKernel]:
        """Hold the kernel's driver side (ADD/REMOVE wait meanwhile)."""
        with self._drv_lock:
            yield self

    def client(self, dev_id: int) -> Any:
        """The driver client of a bound device (I2cClient, ConsoleClient);
        use it inside ``locked()`` when ADD/REMOVE may run concurrently."""
        return self._bound(dev_id).client

    def _bound(self, dev_id: int) -> KernelDevice:
        dev = self.devices.get(dev_id)
        if dev is None or not dev.bound or dev.shut_down:
            raise OSError(errno.ENODEV, f"dev_id {dev_id} has no bound driver"
                          + (f" ({dev.error})" if dev is not None and dev.error else ""))
        return dev

    def _rng_post(self, dev: KernelDevice) -> None:
        d, buf = dev.driver, dev.rng_buffer
        assert d is not None and buf is not None
        d.queues[0].add([], [(buf[0], RNG_BUFFER)], token=0)
        dev.rng_posted = True
        d.notify(0)

    def read_entropy(self, dev_id: int, n: int, timeout: float = 5.0) -> bytes:
        """``n`` bytes from a virtio-rng, as /dev/hwrng reads them."""
        with self._drv_lock:
            dev = self._bound(dev_id)
            d, buf = dev.driver, dev.rng_buffer
            assert d is not None and buf is not None
            out = bytearray()
            while len(out) < n:
                if not dev.rng_posted:
                    self._rng_post(dev)
                if not d.wait_used(0, timeout):
                    raise TimeoutError(f"virtio-rng dev_id {dev_id}: no entropy within {timeout} s")
                while (used := d.queues[0].get_used()) is not None:
                    out += bytes(buf[1][:min(used[1], RNG_BUFFER)])
                    dev.rng_posted = False
            return bytes(out[:n])

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

    def bound(self) -> list[int]:
        return sorted(n for n, d in self.devices.items() if d.bound and not d.shut_down)

    def pending(self) -> int:
        """Messages posted and not read yet."""
        with self._cv:
            return len(self._readq)


def _release_client(dev: KernelDevice) -> None:
    # Views into the region die with the client; the region's unmap waits for them.
    dev.client = None
    dev.rng_buffer = None


def _name(data: bytes) -> str:
    if len(data) < HEADER.size:
        return f"{len(data)}-byte message"
    mtype, msg_id, dev_id, token, _ = HEADER.unpack_from(data)
    try:
        name = TransportMsgId(msg_id).name
    except ValueError:
        name = f"msg {msg_id:#04x}"
    return f"{name} dev_id {dev_id}"


__all__ = ["FakeNodes", "FakeUserApiKernel", "KernelDevice", "KernelHang"]
