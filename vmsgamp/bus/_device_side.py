"""Device side of virtio-msg: the transport state of one device number
(DeviceTransport), pure request -> response logic that any carrier of
virtio-msg messages can drive (the AMP bus's DeviceServer does).

Behaviour follows what the Linux virtio-msg driver needs (docs/virtio-msg.md,
"What the Linux driver needs from a device side"): num_feature_bits 64, VERSION_1 always offered,
NOTIFICATION_DATA never, RESET_VQUEUE always answered, queue size taken from
SET_VQUEUE.  Request fields are untrusted: counts and offsets are clamped to
what the device has and what one message can carry, never trusted to fit an
encoder.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vmsgamp._core.addrspace import AddressSpace
from vmsgamp._core.virtq import PackedQueue, SplitQueue
from vmsgamp.devices._base import VirtioDevice, offered_features
from vmsgamp.devices._service import Serviced, needs_notification, service_queue
from vmsgamp.protocol import (
    NUM_FEATURE_BITS, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED,
    DeviceStatus, EventConfig, EventUsed,
    GetConfigRequest, GetConfigResponse, GetDeviceFeaturesRequest, GetDeviceFeaturesResponse,
    GetDeviceInfoRequest, GetDeviceInfoResponse, GetDevicesRequest, GetDevicesResponse,
    GetDeviceStatusRequest, GetDeviceStatusResponse, GetShmRequest, GetShmResponse,
    GetVqueueRequest, GetVqueueResponse, Message, ResetVqueueRequest, ResetVqueueResponse,
    SetConfigRequest, SetConfigResponse, SetDeviceStatusRequest, SetDeviceStatusResponse,
    SetDriverFeaturesRequest, SetDriverFeaturesResponse, SetVqueueRequest, SetVqueueResponse,
    device_status_after_write,
)

log = logging.getLogger("vmsgamp.device")

S = DeviceStatus
# Plain ints for the per-kick status tests (IntFlag arithmetic costs a
# Python-level call per operator).
_DRIVER_OK = int(S.DRIVER_OK)
_NOT_SERVING = int(S.DEVICE_NEEDS_RESET)
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
            n = min(req.num_blocks, feature_blocks_fit(self.max_msg_size))
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
            data = b""
            if req.offset + req.length <= len(d.config):
                data = d.read_config(req.offset, min(req.length, config_bytes_fit(self.max_msg_size)))
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
        status = int(self.status)
        if not status & _DRIVER_OK or status & _NOT_SERVING:
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
        if q is not None and int(self.status) & _DRIVER_OK:
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


def feature_blocks_fit(max_msg_size: int) -> int:
    """Feature words one GET_DEVICE_FEATURES response can carry (8-byte
    header, block_index and num_blocks: 16 bytes before the words)."""
    return max(0, (max_msg_size - 16) // 4)


def config_bytes_fit(max_msg_size: int) -> int:
    """Config bytes one GET_CONFIG response can carry (8-byte header,
    generation, offset, length: 20 bytes before the data)."""
    return max(0, max_msg_size - 20)


def absent_response(req: Message, max_msg_size: int = 64) -> Message | None:
    """Answers for a device number with no device: harmless zeros, so a
    driver that probes a gap fails fast (device_id 0 = no device) instead of
    timing out."""
    if isinstance(req, GetDeviceInfoRequest):
        return GetDeviceInfoResponse(device_id=0, vendor_id=0, num_feature_bits=NUM_FEATURE_BITS,
                                     config_size=0, max_virtqueues=0)
    if isinstance(req, GetDeviceFeaturesRequest):
        n = min(req.num_blocks, feature_blocks_fit(max_msg_size))
        return GetDeviceFeaturesResponse(block_index=req.block_index, features=(0,) * n)
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


def fallback_response(req: Message, transport: DeviceTransport | None = None,
                      max_msg_size: int = 64) -> Message | None:
    """The answer owed to ``req`` when building the real one failed (the
    last-resort guard of a serving loop): an empty GET_DEVICES window,
    the device's actual status for status requests (the caller has set
    DEVICE_NEEDS_RESET), harmless zeros otherwise."""
    if isinstance(req, GetDevicesRequest):
        return GetDevicesResponse(offset=req.offset, next_offset=0, bitmap=b"")
    if transport is not None:
        status = transport.status & 0xFFFFFFFF
        if isinstance(req, GetDeviceStatusRequest):
            return GetDeviceStatusResponse(status=status)
        if isinstance(req, SetDeviceStatusRequest):
            return SetDeviceStatusResponse(status=status)
    return absent_response(req, max_msg_size)
