"""The kernel's driver side of the fake user-API kernel
(:mod:`vmsgamp.testing.fake_userapi`): vmsgamp's own driver side
(``AmpDriver``, ``DriverDevice`` and the device clients) over synchronous
kernel transfers, probing and removing devices in the Linux message order,
plus what the machine's users do (read /dev/hwrng, use the i2c and console
clients, power off)."""
from __future__ import annotations

import errno
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.virtq import PackedQueueDriver, SplitQueueDriver
from vmsgamp.bus._driver_side import AmpDriver, DeviceInfo, DriverDevice, DriverError
from vmsgamp.carriers.vmsg_lb import HEADER, MSG_SIZE
from vmsgamp.errors import VmsgampError
from vmsgamp.protocol import (
    VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
    DeviceStatus, DriverConnection, Event, FeaturesRead, FeaturesWritten, GetDeviceInfoRequest,
    GetDeviceInfoResponse, GetDeviceStatusRequest, GetVqueueRequest, ResetVqueueRequest,
    SetDeviceStatusRequest, SetVqueueRequest, TransportMsgId,
)

if TYPE_CHECKING:
    import threading

    from vmsgamp.testing.fake_userapi import FakeUserApiKernel  # noqa: F401

EVENT_AVAIL = int(TransportMsgId.EVENT_AVAIL)
S = DeviceStatus
VIRTIO_F_ACCESS_PLATFORM = 33
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


class LinuxDriverSide:
    """Mixed into FakeUserApiKernel: ADD/REMOVE as the kernel runs them, and
    the machine's use of the devices.  Every driver-side call holds
    ``_drv_lock`` (one kernel caller at a time, like the bus lock)."""

    driver: AmpDriver
    devices: dict[int, KernelDevice]
    log: list[str]
    remove_deadlocks: bool
    allocator: RegionAllocator
    _ram_allocator: RegionAllocator
    _ring_space: AddressSpace
    _drv_lock: threading.RLock
    _cv: threading.Condition
    _released: threading.Event

    def transfer(self, data: bytes) -> tuple[bytes, bool]:
        raise NotImplementedError

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
        r: Any = self.driver.request(SetDeviceStatusRequest(dev_num=d.dev_num, status=status))
        d.status = r.status
        return int(r.status)

    def _get_status(self, d: DriverDevice) -> int:
        r: Any = self.driver.request(GetDeviceStatusRequest(dev_num=d.dev_num))
        return int(r.status)

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
        ev: Any = drv._op(lambda now: drv.conn.read_features(n, now), FeaturesRead, n, "reading features")
        offered = int(ev.features)
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
            r: Any = self.driver.request(GetVqueueRequest(dev_num=n, index=i))
            mx = int(r.max_size)
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
    def locked(self) -> Iterator[Any]:
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

    def bound(self) -> list[int]:
        return sorted(n for n, d in self.devices.items() if d.bound and not d.shut_down)


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
