"""Driver side of virtio-msg over an AMP bus: enumerate devices, probe one
(in Linux's order, docs/virtio-msg.md#the-probe-sequence), set up its
virtqueues in shared memory, kick and collect completions.

Blocking API; every wait has a timeout and pumps the bus so pings, hot-plug
events and used-buffer notifications are processed while waiting.
"""
from __future__ import annotations

import asyncio
import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.virtq import PackedQueueDriver, SplitQueueDriver
from vmsgamp.bus._amp import AmpBus, BusError, PeerLost
from vmsgamp.bus._wait import SPIN_SLICE_S
from vmsgamp.errors import FifoBrokenError, PeerStateError, VmsgampError
from vmsgamp.protocol import (
    VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, ConfigRead,
    DeviceBusState, DeviceStatus, DriverConnection, Event, EventConfig, EventDevice,
    EventUsed, FeaturesRead, FeaturesWritten, GetDeviceInfoRequest, GetDeviceInfoResponse,
    GetDevicesRequest, GetDevicesResponse, GetVqueueRequest, Message, NotificationReceived,
    OperationFailed, PingRequest, RequestCancelled, RequestTimedOut, ResetVqueueRequest,
    ResponseReceived, SetConfigRequest, SetDeviceStatusRequest, SetVqueueRequest,
)

log = logging.getLogger("vmsgamp.driver")
S = DeviceStatus
_ANSWERS = frozenset({ResponseReceived, RequestTimedOut, RequestCancelled})   # how a request ends

DEVICE_NAMES = {1: "net", 2: "block", 3: "console", 4: "rng", 5: "balloon", 8: "scsi", 9: "9p",
                16: "gpu", 18: "input", 19: "vsock", 20: "crypto", 26: "fs", 34: "i2c", 41: "gpio",
                25: "sound", 36: "can", 32: "scmi"}


class DriverError(VmsgampError):
    """A device did not behave (refused features, no queue, timeout...)."""


@dataclass
class DeviceInfo:
    dev_num: int
    device_id: int
    vendor_id: int
    num_feature_bits: int
    config_size: int
    max_virtqueues: int
    features: int = 0
    queue_max_sizes: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return DEVICE_NAMES.get(self.device_id, f"id{self.device_id}")

    def as_dict(self) -> dict[str, Any]:
        return {"dev_num": self.dev_num, "device_id": self.device_id, "name": self.name,
                "vendor_id": self.vendor_id, "features": self.features,
                "config_size": self.config_size, "max_virtqueues": self.max_virtqueues,
                "queue_max_sizes": self.queue_max_sizes}


class AmpDriver:
    """The driver end of one bus (an AmpBus over a DriverConnection).

    ``allocator`` places rings and buffers in shared memory the device can
    reach (bus address = ``region.bus_base + offset``)."""

    def __init__(self, bus: AmpBus, allocator: RegionAllocator, *, timeout: float = 5.0):
        if not isinstance(bus.conn, DriverConnection):
            raise TypeError("AmpDriver needs an AmpBus with a DriverConnection")
        self.bus = bus
        self.conn: DriverConnection = bus.conn
        self.allocator = allocator
        self.aspace = AddressSpace([(allocator.bus_base, allocator.region, 0, allocator.region.size)])
        self.timeout = timeout
        self.devices: dict[int, DriverDevice] = {}
        self.hotplug: list[tuple[str, int]] = []       # ('ready'|'removed', dev_num)
        self.peer_lost: list[PeerLost] = []
        self._done: list[Event] = []                   # finished operations not yet claimed
        # Queues whose used-buffer notifications are off while wait_used()
        # spins on them; turned back on before the bus sleeps (_arm_queues).
        self._quiet: dict[int, tuple[DriverDevice, Any]] = {}
        bus.before_sleep = self._arm_queues
        # The queues wait_until() watches: looked at between idle sleeps on
        # a carrier without a doorbell (a used buffer is found even if its
        # EVENT_USED was suppressed).
        self._watched: list[Any] = []
        bus.while_asleep = self._rings_ready

    # ---- pumping -----------------------------------------------------------
    def pump(self, timeout: float | None = 0.0) -> None:
        """Process what the bus has, waiting up to ``timeout`` seconds for it
        (the bus's adaptive wait: spin while traffic flows, then block)."""
        events = self.bus.poll(timeout)
        if events:
            self.dispatch(events)

    def dispatch(self, events: list[Event]) -> None:
        for ev in events:
            cls = ev.__class__
            if cls is NotificationReceived:
                msg = ev.message
                mcls = msg.__class__
                if mcls is EventUsed:
                    dev = self.devices.get(msg.dev_num)
                    if dev is not None:
                        dev._on_used(msg.vq_index)
                elif mcls is EventConfig:
                    dev = self.devices.get(msg.dev_num)
                    if dev is not None:
                        dev._on_config(msg)
                elif mcls is EventDevice:
                    kind = ("ready" if msg.device_bus_state & DeviceBusState.READY else
                            "removed" if msg.device_bus_state & DeviceBusState.REMOVED else "other")
                    self.hotplug.append((kind, msg.device_number))
                    if kind == "removed" and msg.device_number in self.devices:
                        self.devices.pop(msg.device_number)._on_removed()
            elif cls is PeerLost:
                self.peer_lost.append(ev)
                for dev in self.devices.values():
                    dev._on_removed()
                self.devices.clear()
            else:
                self._done.append(ev)

    def _quiet_queue(self, dev: DriverDevice, q: Any) -> None:
        """Ask the device not to send EVENT_USED for ``q``: wait_used() is
        watching the ring itself."""
        if id(q) not in self._quiet:
            q.disable_callbacks()
            self._quiet[id(q)] = (dev, q)

    def _arm_queues(self) -> bool:
        """Before the bus sleeps: notifications back on for every quiet
        queue (their fence closes the lost-wake-up race); True if one has
        used buffers already (then do not sleep)."""
        ready = False
        for dev, q in self._quiet.values():
            if dev.removed:
                continue
            try:
                ready |= bool(q.enable_callbacks())
            except VmsgampError as e:   # a broken ring: its user finds out on its next call
                log.debug("device %d: re-enabling notifications: %s", dev.dev_num, e)
        self._quiet.clear()
        return ready

    def _rings_ready(self) -> bool:
        for q in self._watched:
            if q.has_used():
                return True
        return False

    def _wait_for(self, match: Callable[[Event], bool], what: str, timeout: float | None = None) -> Event:
        timeout = self.timeout if timeout is None else timeout
        deadline = self.bus.clock() + timeout
        while True:
            for i, ev in enumerate(self._done):
                if match(ev):
                    del self._done[i]
                    return ev
            if not self.bus.up:
                raise BusError(f"{what}: {self._why_down()}")
            left = deadline - self.bus.clock()
            if left <= 0:
                raise TimeoutError(f"{what}: no answer within {timeout} s")
            self.pump(min(left, 0.5))

    def _wait_answer(self, cls: type, dev_num: int, timeout: float) -> Event:
        """The ResponseReceived, RequestTimedOut or RequestCancelled of our
        request of class ``cls`` to ``dev_num`` (one is in flight per
        channel): _wait_for without a closure per call."""
        bus = self.bus
        done = self._done
        deadline = None
        while True:
            for i, ev in enumerate(done):
                if ev.__class__ in _ANSWERS:
                    req = ev.request
                    if req.__class__ is cls and req.dev_num == dev_num:
                        del done[i]
                        return ev
            if not bus.up:
                raise BusError(f"{cls.__name__}: {self._why_down()}")
            now = bus.clock()
            if deadline is None:
                deadline = now + timeout
            left = deadline - now
            if left <= 0:
                raise TimeoutError(f"{cls.__name__}: no answer within {timeout} s")
            events = bus.poll(left if left < 0.5 else 0.5)
            if events:
                self.dispatch(events)

    def request(self, msg: Message, *, timeout: float | None = None) -> Message:
        """Send a request and wait for its response."""
        timeout = self.timeout if timeout is None else timeout
        lost = self.bus.send(msg, timeout=timeout)
        if not lost and self.conn.pending_requests() == 1:   # ours went out (none queued before it)
            lost = self.bus.await_reply()
        if lost:
            self.dispatch(lost)
        ev = self._wait_answer(msg.__class__, msg.dev_num, timeout + 1.0)
        if ev.__class__ is ResponseReceived:
            return ev.response
        if ev.__class__ is RequestTimedOut:
            raise TimeoutError(f"{type(msg).__name__} to device {msg.dev_num}: no response "
                               f"within {timeout} s")
        raise BusError(f"{type(msg).__name__} to device {msg.dev_num} cancelled: {self._why_down()}")

    def _why_down(self) -> str:
        """How the last session ended, in the words of the error raised."""
        last = self.peer_lost[-1] if self.peer_lost else None
        if last is not None and last.event == "broken":
            return f"the FIFO broke ({last.peer_state})"
        return "the peer went away"

    def _op(self, start: Callable[[float], list[bytes]], cls: type, dev_num: int, what: str) -> Event:
        self.dispatch(self.bus.transmit(start(self.bus.clock())))

        def match(ev: Event) -> bool:
            return (isinstance(ev, (cls, OperationFailed)) and ev.dev_num == dev_num) or (
                isinstance(ev, (RequestTimedOut, RequestCancelled)) and ev.request.dev_num == dev_num)

        ev = self._wait_for(match, what, self.timeout * 4)
        if isinstance(ev, OperationFailed):
            raise DriverError(f"{what} on device {dev_num}: {ev.reason}")
        if isinstance(ev, (RequestTimedOut, RequestCancelled)):
            raise TimeoutError(f"{what} on device {dev_num}: no response")
        return ev

    # ---- bus operations ----------------------------------------------------------
    def enumerate(self, *, offset: int = 0, count: int = 32) -> list[int]:
        """GET_DEVICES {offset, count} (Linux asks {0, 32})."""
        resp = self.request(GetDevicesRequest(offset=offset, count=count))
        assert isinstance(resp, GetDevicesResponse)
        return list(resp.devices())

    def ping(self, count: int = 10, *, timeout: float | None = None) -> dict[str, Any]:
        """Bus PING round trips: p50/p99/min/max in microseconds."""
        rtts = []
        clock = self.bus.clock
        for i in range(count):
            data = (0x5A000000 + i) & 0xFFFFFFFF
            t0 = clock()
            answer = self.ping_once(data, timeout=timeout)
            rtts.append((clock() - t0) * 1e6)
            if answer != data:
                raise DriverError(f"PING {i} answered with the wrong data {answer:#x}")
        rtts.sort()
        return {"count": count, "min_us": rtts[0], "p50_us": rtts[len(rtts) // 2],
                "p99_us": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], "max_us": rtts[-1],
                "mean_us": statistics.fmean(rtts)}

    def ping_once(self, data: int, *, timeout: float | None = None) -> int:
        """One bus PING with ``data``; returns the data word of the answer.

        The connection's PING fast path (``start_ping``): no message objects
        or events on the way, so the round trip is the link's plus a few
        bytes of packing.  While another bus request is in flight the PING
        queues behind it like any request (``request()``)."""
        timeout = self.timeout if timeout is None else timeout
        bus, conn = self.bus, self.conn
        if not bus.up:
            raise BusError(f"PingRequest: {self._why_down()}")
        now = bus.clock()
        out = conn.start_ping(data, now, timeout=timeout)
        if out is None:   # the bus channel is busy: queue like any request
            resp = self.request(PingRequest(data=data), timeout=timeout)
            return int(resp.data)  # type: ignore[attr-defined]
        lost = bus.transmit(out) or bus.await_reply()
        if lost:
            self.dispatch(lost)
        deadline = now + timeout + 1.0
        while conn.ping_pending:
            if not bus.up:
                break
            left = deadline - bus.clock()
            if left <= 0:
                raise TimeoutError(f"PingRequest: no answer within {timeout} s")
            events = bus.poll(left if left < 0.5 else 0.5)
            if events:
                self.dispatch(events)
        result = conn.ping_result
        if result is not None and not conn.ping_pending:
            return result
        # Timed out or cancelled: its event says which, as for request().
        ev = self._wait_answer(PingRequest, 0, 1.0)
        if ev.__class__ is RequestTimedOut:
            raise TimeoutError(f"PingRequest to device 0: no response within {timeout} s")
        raise BusError(f"PingRequest to device 0 cancelled: {self._why_down()}")

    def info(self, dev_num: int) -> DeviceInfo:
        """GET_DEVICE_INFO, features and queue sizes, without touching status."""
        r = self.request(GetDeviceInfoRequest(dev_num=dev_num))
        assert isinstance(r, GetDeviceInfoResponse)
        info = DeviceInfo(dev_num, r.device_id, r.vendor_id, r.num_feature_bits, r.config_size,
                          r.max_virtqueues)
        if r.device_id:
            ev = self._op(lambda now: self.conn.read_features(dev_num, now), FeaturesRead, dev_num,
                          "reading features")
            info.features = ev.features
            for q in range(min(r.max_virtqueues, 64)):
                info.queue_max_sizes.append(self.request(GetVqueueRequest(dev_num=dev_num, index=q)).max_size)
        return info

    def open(self, dev_num: int, *, features: int = 0, queue_sizes: Sequence[int] | None = None,
             packed: bool | None = None, event_idx: bool = True, indirect: bool = True) -> DriverDevice:
        """Probe and bring up device ``dev_num``: reset, ACKNOWLEDGE, DRIVER,
        feature negotiation (``features`` = device-specific bits wanted; the
        transport bits are chosen from the other arguments), FEATURES_OK (checked),
        queues, DRIVER_OK.  ``packed=None`` takes the packed ring if offered."""
        dev = DriverDevice(self, dev_num)
        dev._probe(features, queue_sizes, packed, event_idx, indirect)
        self.devices[dev_num] = dev
        return dev

    def close(self) -> None:
        for dev in list(self.devices.values()):
            try:
                dev.close()
            except (VmsgampError, TimeoutError) as e:
                log.debug("closing device %d: %s", dev.dev_num, e)
        self.devices.clear()


class DriverDevice:
    """One probed device: its queues (driver side) and configuration space."""

    def __init__(self, drv: AmpDriver, dev_num: int):
        self.drv = drv
        self.dev_num = dev_num
        self.info: DeviceInfo | None = None
        self.features = 0
        self.status = 0
        self.queues: list[Any] = []
        self.used_events: list[int] = []   # EVENT_USED count per queue
        self.config_events = 0
        self.config_generation = 0
        self.removed = False

    @property
    def packed(self) -> bool:
        return bool(self.features >> VIRTIO_F_RING_PACKED & 1)

    def _set_status(self, status: int) -> int:
        r = self.drv.request(SetDeviceStatusRequest(dev_num=self.dev_num, status=status))
        self.status = r.status
        return r.status

    def _probe(self, want: int, queue_sizes, packed, event_idx, indirect) -> None:
        d = self.drv
        self.info = d.info(self.dev_num)
        if self.info.device_id == 0:
            raise DriverError(f"no device at number {self.dev_num}")
        offered = self.info.features
        self._set_status(0)
        self._set_status(S.ACKNOWLEDGE)
        self._set_status(S.ACKNOWLEDGE | S.DRIVER)
        wanted = want | 1 << VIRTIO_F_VERSION_1
        if event_idx:
            wanted |= 1 << VIRTIO_F_EVENT_IDX
        if indirect:
            wanted |= 1 << VIRTIO_F_INDIRECT_DESC
        if packed is None or packed:
            wanted |= 1 << VIRTIO_F_RING_PACKED
        self.features = offered & wanted
        if packed and not self.packed:
            raise DriverError(f"device {self.dev_num} does not offer the packed ring")
        d._op(lambda now: d.conn.write_features(self.dev_num, self.features, now), FeaturesWritten,
              self.dev_num, "writing features")
        st = self._set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        if not st & S.FEATURES_OK:
            self._set_status(S.ACKNOWLEDGE | S.DRIVER | S.FAILED)
            raise DriverError(f"device {self.dev_num} refused features {self.features:#x}")
        nq = self.info.max_virtqueues
        sizes = list(queue_sizes) if queue_sizes is not None else [256] * nq
        ei = bool(self.features >> VIRTIO_F_EVENT_IDX & 1)
        ind = bool(self.features >> VIRTIO_F_INDIRECT_DESC & 1)
        for i in range(min(nq, len(sizes))):
            mx = self.info.queue_max_sizes[i] if i < len(self.info.queue_max_sizes) else 0
            if mx == 0:
                raise DriverError(f"device {self.dev_num} has no queue {i}")
            size = min(sizes[i], mx)
            if not self.packed:  # split rings need a power of two
                size = 1 << (size.bit_length() - 1)
            cls = PackedQueueDriver if self.packed else SplitQueueDriver
            q = cls.create(d.allocator, size, aspace=d.aspace, event_idx=ei, indirect=ind)
            d.request(SetVqueueRequest(dev_num=self.dev_num, index=i, size=size, desc_addr=q.desc_addr,
                                       driver_addr=q.driver_addr, device_addr=q.device_addr))
            self.queues.append(q)
            self.used_events.append(0)
        st = self._set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        if st & S.DEVICE_NEEDS_RESET or not st & S.DRIVER_OK:
            raise DriverError(f"device {self.dev_num} did not accept DRIVER_OK (status {st:#x})")

    # ---- buffers and queues ---------------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> tuple[int, memoryview]:
        """A buffer in shared memory: (bus address, writable view)."""
        addr = self.drv.allocator.alloc(size, align)
        off = self.drv.allocator.offset_of(addr)
        return addr, self.drv.allocator.region.view(off, size)

    def notify(self, index: int) -> bool:
        """EVENT_AVAIL for queue ``index`` if the device wants a kick."""
        q = self.queues[index]
        if q.kick_prepare():
            drv = self.drv
            lost = drv.bus.transmit(drv.conn.notify(self.dev_num, index, 0.0))
            if lost:
                drv.dispatch(lost)
            return True
        return False

    def wait_used(self, index: int, timeout: float | None = None) -> bool:
        """Wait until queue ``index`` has a used buffer (True) or the
        timeout expires (False), pumping the bus meanwhile."""
        return self.wait_until(self.queues[index].has_used, (index,), timeout)

    def wait_until(self, done: Callable[[], bool], indices: Sequence[int] | None = None,
                   timeout: float | None = None) -> bool:
        """Pump the bus until ``done()`` (True) or the timeout (False);
        ``done`` is looked at whenever queue ``indices`` (default: all) have
        used buffers or the bus had traffic.

        The wait is the bus's adaptive one: while the spin window lasts the
        rings themselves are watched with used-buffer notifications off
        (the device then sends no EVENT_USED at all); before the bus sleeps
        they are turned back on, so the device's next used buffer wakes us."""
        if done():
            return True
        drv = self.drv
        bus = drv.bus
        waiter = getattr(bus, "waiter", None)
        if waiter is None:   # a bus without a FIFO (a fake kernel's transfers): plain pumping
            return self._pump_until(done, drv.timeout if timeout is None else timeout)
        fifo = bus.fifo
        clock = waiter.clock
        queues = self.queues if indices is None else [self.queues[i] for i in indices]
        now = clock()
        deadline = now + (drv.timeout if timeout is None else timeout)
        waiter.observe(fifo, now)
        drv._watched = queues
        try:
            return self._wait_until(done, queues, deadline, now)
        finally:
            drv._watched = []

    def _pump_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = self.drv.bus.clock() + timeout
        while not done():
            if self.removed:
                raise BusError(f"device {self.dev_num} was removed")
            left = deadline - self.drv.bus.clock()
            if left <= 0:
                return done()
            self.drv.pump(min(left, 0.5))
        return True

    def _wait_until(self, done: Callable[[], bool], queues: Sequence[Any], deadline: float,
                    now: float) -> bool:
        drv = self.drv
        bus = drv.bus
        waiter = bus.waiter
        fifo = bus.fifo
        clock = waiter.clock
        while True:
            if self.removed:
                raise BusError(f"device {self.dev_num} was removed")
            for q in queues:   # armed again by the bus before it sleeps
                drv._quiet_queue(self, q)
            spin = waiter.spin_left(now)
            if spin > 0 and bus.up:
                end = now + min(spin, SPIN_SLICE_S)
                while True:
                    try:
                        waiting = fifo.pending()
                    except (PeerStateError, FifoBrokenError):
                        waiting = 1     # the bus turns it into a PeerLost
                    if waiting:
                        drv.pump(0)
                        if self.removed or done():
                            break
                    else:
                        for q in queues:
                            if q.has_used():
                                if done():
                                    return True
                                break
                    now = clock()
                    if now >= end or now >= deadline:
                        break
            else:
                left = deadline - now
                if left <= 0:
                    return done()
                drv.pump(min(left, 0.5))
            if done():
                return True
            now = clock()
            if now >= deadline:
                return done()

    def _on_used(self, index: int) -> None:
        if index < len(self.used_events):
            self.used_events[index] += 1

    def _on_config(self, msg: EventConfig) -> None:
        self.config_events += 1
        self.status = msg.device_status
        self.config_generation = msg.generation

    def _on_removed(self) -> None:
        self.removed = True

    # ---- configuration ----------------------------------------------------------------
    def read_config(self, offset: int, length: int) -> bytes:
        ev = self.drv._op(lambda now: self.drv.conn.read_config(self.dev_num, offset, length, now),
                          ConfigRead, self.dev_num, "reading config")
        self.config_generation = ev.generation
        return ev.data

    def write_config(self, offset: int, data: bytes) -> bool:
        r = self.drv.request(SetConfigRequest(dev_num=self.dev_num, generation=self.config_generation,
                                              offset=offset, data=bytes(data)))
        self.config_generation = r.generation
        return r.length == len(data)

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & S.DEVICE_NEEDS_RESET)

    def close(self) -> None:
        """Linux-style teardown: RESET_VQUEUE for every queue, then status 0."""
        if self.removed or not self.drv.bus.up:
            return
        for i in range(len(self.queues)):
            self.drv.request(ResetVqueueRequest(dev_num=self.dev_num, index=i))
        self._set_status(0)
        for q in self.queues:
            self.drv._quiet.pop(id(q), None)
        self.queues = []
        self.drv.devices.pop(self.dev_num, None)


class AsyncDriver:
    """asyncio face of an AmpDriver: the same operations, run without
    blocking the event loop (the bus is pumped in a worker thread, one
    operation at a time)."""

    def __init__(self, driver: AmpDriver):
        self.driver = driver
        self._lock = asyncio.Lock()

    async def _run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        async with self._lock:
            return await asyncio.to_thread(fn, *args, **kw)

    async def enumerate(self) -> list[int]:
        return await self._run(self.driver.enumerate)

    async def ping(self, count: int = 10) -> dict[str, Any]:
        return await self._run(self.driver.ping, count)

    async def open(self, dev_num: int, **kw: Any) -> DriverDevice:
        return await self._run(self.driver.open, dev_num, **kw)

    async def wait_used(self, dev: DriverDevice, index: int, timeout: float | None = None) -> bool:
        return await self._run(dev.wait_used, index, timeout)

    async def read_config(self, dev: DriverDevice, offset: int, length: int) -> bytes:
        return await self._run(dev.read_config, offset, length)
