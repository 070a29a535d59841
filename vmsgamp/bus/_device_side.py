"""Device side of virtio-msg over an AMP bus: answers a driver's transport
requests for each device model and serves the bus (enumeration, hot-plug,
ping, peer restart).

Behaviour follows what the Linux virtio-msg driver needs (reference sections
1.10, 3.2 and 7): num_feature_bits 64, VERSION_1 always offered,
NOTIFICATION_DATA never, RESET_VQUEUE always answered, GET_DEVICES answered
with exactly the count asked, queue size taken from SET_VQUEUE, and the
driver's queue head leaving RUN treated as a reset of every device.
"""
from __future__ import annotations

import logging
import select
import selectors
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from vmsgamp._core.addrspace import AddressSpace
from vmsgamp._core.virtq import PackedQueue, SplitQueue
from vmsgamp.bus._amp import AmpBus, BusError, PeerLost
from vmsgamp.devices._base import VirtioDevice, offered_features
from vmsgamp.devices._service import Serviced, needs_notification, service_queue
from vmsgamp.errors import PeerStateError
from vmsgamp.protocol import (
    NUM_FEATURE_BITS, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED,
    DeviceConnection, DeviceStatus, Event, EventAvail, EventConfig, EventUsed,
    GetConfigRequest, GetConfigResponse, GetDeviceFeaturesRequest, GetDeviceFeaturesResponse,
    GetDeviceInfoRequest, GetDeviceInfoResponse, GetDevicesRequest, GetDeviceStatusRequest,
    GetDeviceStatusResponse, GetShmRequest, GetShmResponse, GetVqueueRequest, GetVqueueResponse,
    Message, NotificationReceived, PingReceived, RequestCancelled, RequestReceived,
    RequestTimedOut, ResetVqueueRequest, ResetVqueueResponse, ResponseReceived, SetConfigRequest,
    SetConfigResponse, SetDeviceStatusRequest, SetDeviceStatusResponse, SetDriverFeaturesRequest,
    SetDriverFeaturesResponse, SetVqueueRequest, SetVqueueResponse, device_status_after_write,
)

log = logging.getLogger("vmsgamp.device")

S = DeviceStatus
MAX_DEVICES = 32  # Linux and QEMU both use a 32-device window


class DeviceTransport:
    """The transport state of one device number: features, status, config
    generation, virtqueues.  Pure request -> response logic plus the queue
    objects; the server does the I/O."""

    def __init__(self, dev_num: int, device: VirtioDevice, aspace: AddressSpace, *,
                 send: Callable[[Message], None], offer_packed: bool = True,
                 offer_event_idx: bool = True, offer_indirect: bool = True,
                 max_msg_size: int = 64):
        self.dev_num = dev_num
        self.device = device
        self.aspace = aspace
        self._send = send
        self.max_msg_size = max_msg_size
        self.offered = offered_features(device, packed=offer_packed, event_idx=offer_event_idx,
                                        indirect=offer_indirect) & ((1 << NUM_FEATURE_BITS) - 1)
        self.status = 0
        self.driver_features = 0
        self.vq_config: dict[int, tuple[int, int, int, int]] = {}
        self.queues: dict[int, Any] = {}
        self.broken_reason: str | None = None
        self.stats = {"requests": 0, "kicks": 0, "used_notifications": 0, "broken": 0}
        device._notify_queue = self.device_notify
        device._notify_config = self.config_changed

    # ---- lifecycle ---------------------------------------------------------
    def reset(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.vq_config.clear()
        self.queues.clear()
        self.broken_reason = None
        try:
            self.device.reset()
        except Exception:
            log.exception("device %d (%s): reset failed", self.dev_num, self.device.name)

    @property
    def negotiated(self) -> int:
        return self.driver_features & self.offered

    def _needs_reset(self, reason: str) -> None:
        """A queue broke: DEVICE_NEEDS_RESET, and tell the driver."""
        log.warning("device %d (%s): %s -> DEVICE_NEEDS_RESET", self.dev_num, self.device.name, reason)
        self.broken_reason = reason
        self.stats["broken"] += 1
        self.status |= S.DEVICE_NEEDS_RESET
        self._send(EventConfig(dev_num=self.dev_num, device_status=self.status,
                               generation=self.device.config_generation))

    # ---- requests -------------------------------------------------------------
    def handle(self, req: Message) -> Message | None:
        """The response to ``req`` (token/dev_num are filled by the connection)."""
        self.stats["requests"] += 1
        d = self.device
        if isinstance(req, GetDeviceInfoRequest):
            return GetDeviceInfoResponse(device_id=d.device_id, vendor_id=d.vendor_id,
                                         num_feature_bits=NUM_FEATURE_BITS,
                                         config_size=len(d.config), max_virtqueues=d.num_queues)
        if isinstance(req, GetDeviceFeaturesRequest):
            fit = max(0, (self.max_msg_size - 16) // 4)
            n = min(req.num_blocks, fit)
            words = tuple((self.offered >> (32 * (req.block_index + i))) & 0xFFFFFFFF
                          if req.block_index + i < NUM_FEATURE_BITS // 32 else 0 for i in range(n))
            return GetDeviceFeaturesResponse(block_index=req.block_index, features=words)
        if isinstance(req, SetDriverFeaturesRequest):
            if not self.status & S.FEATURES_OK:
                for i, w in enumerate(req.features):
                    shift = 32 * (req.block_index + i)
                    if shift < NUM_FEATURE_BITS:
                        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (w << shift)
            return SetDriverFeaturesResponse()
        if isinstance(req, GetConfigRequest):
            fit = max(0, self.max_msg_size - 20)
            data = b""
            if req.offset + req.length <= len(d.config):
                data = d.read_config(req.offset, min(req.length, fit))
            return GetConfigResponse(generation=d.config_generation, offset=req.offset, data=data)
        if isinstance(req, SetConfigRequest):
            applied = 0
            if (req.generation == d.config_generation and req.offset + len(req.data) <= len(d.config)
                    and d.write_config(req.offset, bytes(req.data))):
                applied = len(req.data)
            return SetConfigResponse(generation=d.config_generation, offset=req.offset, length=applied)
        if isinstance(req, GetDeviceStatusRequest):
            return GetDeviceStatusResponse(status=self.status)
        if isinstance(req, SetDeviceStatusRequest):
            return SetDeviceStatusResponse(status=self._set_status(req.status))
        if isinstance(req, GetVqueueRequest):
            if req.index >= d.num_queues:
                return GetVqueueResponse(index=req.index, max_size=0)
            size, desc, drv, dev = self.vq_config.get(req.index, (0, 0, 0, 0))
            return GetVqueueResponse(index=req.index, max_size=d.queue_max_size, cur_size=size,
                                     desc_addr=desc, driver_addr=drv, device_addr=dev)
        if isinstance(req, SetVqueueRequest):
            self._set_vqueue(req)
            return SetVqueueResponse()
        if isinstance(req, ResetVqueueRequest):
            # Always answered, with or without RING_RESET (Linux waits for it).
            self.vq_config.pop(req.index, None)
            if self.queues.pop(req.index, None) is not None:
                try:
                    d.queue_reset(req.index)
                except Exception:
                    log.exception("device %d: queue_reset(%d) failed", self.dev_num, req.index)
            return ResetVqueueResponse()
        if isinstance(req, GetShmRequest):
            return GetShmResponse(index=req.index, length=0, address=0)  # no shared memory regions
        return None

    def _set_status(self, requested: int) -> int:
        if requested & 0xFF == 0:
            self.reset()
            return 0
        old = self.status
        acceptable = True
        if requested & S.FEATURES_OK and not old & S.FEATURES_OK:
            feats = self.driver_features
            acceptable = (feats & ~self.offered) == 0
            if acceptable:
                try:
                    acceptable = bool(self.device.features_ok(feats & self.offered))
                except Exception:
                    log.exception("device %d: features_ok failed", self.dev_num)
                    acceptable = False
        self.status = device_status_after_write(old, requested, features_acceptable=acceptable)
        if self.status & S.DRIVER_OK and not old & S.DRIVER_OK:
            try:
                self.device.activate([self.queues.get(i) for i in range(self.device.num_queues)],
                                     self.negotiated)
            except Exception as e:
                log.exception("device %d: activate failed", self.dev_num)
                self.status |= S.DEVICE_NEEDS_RESET
                self.broken_reason = f"activate failed: {e}"
        return self.status

    def _set_vqueue(self, req: SetVqueueRequest) -> None:
        d = self.device
        if req.index >= d.num_queues:
            self._needs_reset(f"SET_VQUEUE for queue {req.index}, the device has {d.num_queues}")
            return
        if not 0 < req.size <= d.queue_max_size:
            self._needs_reset(f"SET_VQUEUE size {req.size} outside 1..{d.queue_max_size}")
            return
        feats = self.negotiated
        cls = PackedQueue if feats >> VIRTIO_F_RING_PACKED & 1 else SplitQueue
        try:
            q = cls(self.aspace, req.size, req.desc_addr, req.driver_addr, req.device_addr,
                    event_idx=bool(feats >> VIRTIO_F_EVENT_IDX & 1),
                    indirect=bool(feats >> VIRTIO_F_INDIRECT_DESC & 1))
        except (ValueError, IndexError, OverflowError) as e:
            # Addresses outside every window are refused, never followed.
            self._needs_reset(f"SET_VQUEUE {req.index}: {e}")
            return
        self.vq_config[req.index] = (req.size, req.desc_addr, req.driver_addr, req.device_addr)
        self.queues[req.index] = q
        if self.status & S.DRIVER_OK:
            # Re-enabled after a RESET_VQUEUE while running.
            d.queues = [self.queues.get(i) for i in range(d.num_queues)]

    # ---- notifications ------------------------------------------------------------
    def on_avail(self, vq_index: int) -> bool:
        """EVENT_AVAIL from the driver.  Returns True when chains are still
        waiting (the server calls again on its next step)."""
        self.stats["kicks"] += 1
        if not self.status & S.DRIVER_OK or self.status & S.DEVICE_NEEDS_RESET:
            # As QEMU does: tell a driver that kicks too early what the status is.
            self._send(EventConfig(dev_num=self.dev_num, device_status=self.status,
                                   generation=self.device.config_generation))
            return False
        q = self.queues.get(vq_index)
        if q is None:
            return False
        done = service_queue(self.device, vq_index, q)
        self._after_service(vq_index, done)
        return done.more and done.broken is None

    def _after_service(self, vq_index: int, done: Serviced) -> None:
        if done.broken is not None:
            self._needs_reset(f"queue {vq_index}: {done.broken}")
        elif done.notify:
            self.stats["used_notifications"] += 1
            self._send(EventUsed(dev_num=self.dev_num, vq_index=vq_index))

    def device_notify(self, vq_index: int) -> None:
        """The model added used buffers on its own (input arrived, IRQ)."""
        q = self.queues.get(vq_index)
        if q is not None and self.status & S.DRIVER_OK:
            self._after_service(vq_index, needs_notification(q))

    def on_fd_ready(self, fd: int) -> None:
        """A host fd of the model is readable; a model error here must not
        take the serving loop down."""
        try:
            self.device.on_fd_ready(fd)
        except Exception as e:
            log.exception("device %d (%s): host input handler failed", self.dev_num, self.device.name)
            self._needs_reset(f"device model error on host input: {e}")

    def config_changed(self) -> None:
        if self.status & S.DRIVER_OK:
            self._send(EventConfig(dev_num=self.dev_num, device_status=self.status,
                                   generation=self.device.config_generation))


class DeviceServer:
    """Serves device models on an AmpBus whose connection is a
    DeviceConnection.  Device numbers are the dict keys (or list order)."""

    def __init__(self, bus: AmpBus, aspace: AddressSpace, devices: Iterable[VirtioDevice] | dict[int, VirtioDevice] = (),
                 *, offer_packed: bool = True, offer_event_idx: bool = True, offer_indirect: bool = True,
                 handshake_timeout: float = 1.0):
        if not isinstance(bus.conn, DeviceConnection):
            raise TypeError("DeviceServer needs an AmpBus with a DeviceConnection")
        self.bus = bus
        self.conn: DeviceConnection = bus.conn
        self.aspace = aspace
        self.opts = dict(offer_packed=offer_packed, offer_event_idx=offer_event_idx,
                         offer_indirect=offer_indirect)
        self.handshake_timeout = handshake_timeout
        self.transports: dict[int, DeviceTransport] = {}
        self._outbox: list[Message] = []
        self._rescan: set[tuple[int, int]] = set()   # (dev_num, vq) with chains left over
        self._fds: dict[int, Callable[[], None]] = {}  # host fds watched by the loop
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self.events: list[Any] = []      # PeerLost and hot-plug history, for reports
        self.pings_answered = 0
        self._ping_seq = 0
        self._ping_sent: dict[int, float] = {}
        self.ping_rtts: list[float] = []
        items = devices.items() if isinstance(devices, dict) else enumerate(devices)
        for num, dev in items:
            self._attach(num, dev)

    # ---- devices -------------------------------------------------------------
    def _attach(self, dev_num: int, device: VirtioDevice) -> DeviceTransport:
        if not 0 <= dev_num < MAX_DEVICES:
            raise ValueError(f"device number {dev_num} outside 0..{MAX_DEVICES - 1}")
        if dev_num in self.transports:
            raise ValueError(f"device number {dev_num} is already in use")
        t = DeviceTransport(dev_num, device, self.aspace, send=self._queue_event,
                            max_msg_size=self.conn.max_msg_size, **self.opts)
        self.transports[dev_num] = t
        return t

    def add_device(self, device: VirtioDevice, dev_num: int | None = None) -> int:
        """Hot-plug: attach and announce with EVENT_DEVICE READY."""
        with self._lock:
            if dev_num is None:
                dev_num = next(i for i in range(MAX_DEVICES) if i not in self.transports)
            self._attach(dev_num, device)
            if self.bus.up:
                self.bus.transmit(self.conn.device_ready(dev_num, self.bus.clock()))
            return dev_num

    def remove_device(self, dev_num: int) -> VirtioDevice:
        """Hot-unplug: reset, detach and announce EVENT_DEVICE REMOVED."""
        with self._lock:
            t = self.transports.pop(dev_num)
            t.reset()
            if self.bus.up:
                self.bus.transmit(self.conn.device_removed(dev_num, self.bus.clock()))
            return t.device

    @property
    def devices(self) -> dict[int, VirtioDevice]:
        return {n: t.device for n, t in self.transports.items()}

    def add_fd(self, fd: int, callback: Callable[[], None]) -> None:
        """Watch a host fd in the serving loop (carrier notifications, control
        pipes); ``callback()`` runs when it is readable."""
        self._fds[fd] = callback

    def remove_fd(self, fd: int) -> None:
        self._fds.pop(fd, None)

    def _queue_event(self, msg: Message) -> None:
        self._outbox.append(msg)

    def _flush(self) -> None:
        while self._outbox and self.bus.up:
            msg = self._outbox.pop(0)
            self.bus.transmit(self.conn.send(msg, self.bus.clock()))

    def reset_all(self) -> None:
        for t in self.transports.values():
            t.reset()
        self._outbox.clear()
        self._rescan.clear()

    # ---- serving ----------------------------------------------------------------
    def handle_events(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, RequestReceived):
                self._on_request(ev.request)
            elif isinstance(ev, NotificationReceived) and isinstance(ev.message, EventAvail):
                self._kick(ev.message.dev_num, ev.message.vq_index)
            elif isinstance(ev, PingReceived):
                self.pings_answered += 1
            elif isinstance(ev, ResponseReceived):
                sent = self._ping_sent.pop(getattr(ev.response, "data", -1), None)
                if sent is not None:
                    self.ping_rtts.append(self.bus.clock() - sent)
            elif isinstance(ev, PeerLost):
                # The driver's queue head left RUN: every device is reset (ref. section 7).
                self.events.append(ev)
                self.reset_all()
            elif isinstance(ev, (RequestTimedOut, RequestCancelled)):
                pass
        self._flush()

    def _kick(self, dev_num: int, vq_index: int) -> None:
        t = self.transports.get(dev_num)
        if t is not None and t.on_avail(vq_index):
            self._rescan.add((dev_num, vq_index))
        else:
            self._rescan.discard((dev_num, vq_index))

    def _on_request(self, req: Message) -> None:
        if isinstance(req, GetDevicesRequest):
            present = [n for n in self.transports if req.offset <= n < req.offset + req.count]
            self.bus.transmit(self.conn.answer_get_devices(req, present))
            return
        t = self.transports.get(req.dev_num)
        if t is None:
            resp = _absent_response(req)
        else:
            resp = t.handle(req)
        if resp is None:
            self.conn.ignore(req)
        else:
            self.bus.transmit(self.conn.respond(req, resp))

    def step(self, timeout: float | None = 0.05) -> None:
        """Serve one wake-up: bus traffic, device fds, timeouts."""
        with self._lock:
            if not self.bus.up:
                for fd, cb in list(self._fds.items()):
                    if select.select([fd], [], [], 0)[0]:
                        cb()
                try:
                    self.bus.start(self.handshake_timeout)
                    log.info("peer is back: session %d", self.bus.sessions)
                except TimeoutError:
                    return
            if self._rescan:
                for dev_num, vq in list(self._rescan):
                    self._kick(dev_num, vq)
                self._flush()
                timeout = 0
            fds = [fd for t in self.transports.values() for fd in t.device.poll_fds()] + list(self._fds)
            if fds and timeout != 0:
                try:
                    self._wait_with_fds(fds, timeout)
                except PeerStateError as e:
                    self.handle_events(self.bus.peer_lost(e))
                    return
                timeout = 0
            self.handle_events(self.bus.poll(timeout))

    def _wait_with_fds(self, fds: list[int], timeout: float | None) -> None:
        """Sleep until the bus doorbell or a device fd is ready."""
        fifo = self.bus.fifo
        sel = selectors.DefaultSelector()
        try:
            for fd in fds:
                sel.register(fd, selectors.EVENT_READ)
            has_bell = fifo.doorbell.can_wait
            if has_bell:
                if fifo.arm_wait():
                    return
                sel.register(fifo.doorbell.fileno(), selectors.EVENT_READ, "bell")
            # Without a doorbell the FIFO must be polled: cap the sleep.
            limit = timeout if has_bell else min(timeout if timeout is not None else 0.002, 0.002)
            for key, _ in sel.select(limit):
                if key.data == "bell":
                    fifo.doorbell.drain()
                elif key.fd in self._fds:
                    self._fds[key.fd]()
                else:
                    for t in self.transports.values():
                        if key.fd in t.device.poll_fds():
                            t.on_fd_ready(key.fd)
        finally:
            if fifo.doorbell.can_wait:
                fifo.disarm_wait()
            sel.close()

    def ping(self) -> None:
        """Send a bus PING; its round trip lands in ``ping_rtts``."""
        with self._lock:
            self._ping_seq = (self._ping_seq + 1) & 0xFFFFFFFF
            self._ping_sent[self._ping_seq] = self.bus.clock()
            self.bus.transmit(self.conn.ping(self._ping_seq, self.bus.clock(), timeout=5.0))

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or self._stop
        while not stop.is_set():
            try:
                self.step(0.1)
            except BusError as e:
                log.warning("bus error: %s", e)
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.stop()
        for t in self.transports.values():
            try:
                t.device.close()
            except Exception:
                log.exception("closing device %d", t.dev_num)


def _absent_response(req: Message) -> Message | None:
    """Answers for a device number with no device: harmless zeros, so a
    driver that probes a gap fails fast (device_id 0 = no device) instead of
    timing out."""
    if isinstance(req, GetDeviceInfoRequest):
        return GetDeviceInfoResponse(device_id=0, vendor_id=0, num_feature_bits=NUM_FEATURE_BITS,
                                     config_size=0, max_virtqueues=0)
    if isinstance(req, GetDeviceFeaturesRequest):
        return GetDeviceFeaturesResponse(block_index=req.block_index, features=(0,) * min(req.num_blocks, 8))
    if isinstance(req, SetDriverFeaturesRequest):
        return SetDriverFeaturesResponse()
    if isinstance(req, GetConfigRequest):
        return GetConfigResponse(generation=0, offset=req.offset, data=b"")
    if isinstance(req, SetConfigRequest):
        return SetConfigResponse(generation=0, offset=req.offset, length=0)
    if isinstance(req, GetDeviceStatusRequest):
        return GetDeviceStatusResponse(status=0)
    if isinstance(req, SetDeviceStatusRequest):
        return SetDeviceStatusResponse(status=0)
    if isinstance(req, GetVqueueRequest):
        return GetVqueueResponse(index=req.index, max_size=0)
    if isinstance(req, SetVqueueRequest):
        return SetVqueueResponse()
    if isinstance(req, ResetVqueueRequest):
        return ResetVqueueResponse()
    if isinstance(req, GetShmRequest):
        return GetShmResponse(index=req.index, length=0, address=0)
    return None
