"""Numbers fixed by the virtio-msg wire format (docs/virtio-msg.md: Messages to Sizes)."""
from __future__ import annotations

import enum

# Header `type` byte (docs/virtio-msg.md#messages).  Bits 2..7 are MBZ and ignored on receive.
TYPE_RESPONSE = 1 << 0
TYPE_BUS = 1 << 1
TYPE_KNOWN_BITS = TYPE_RESPONSE | TYPE_BUS

# Bit 6 of msg_id marks an event (no response ever), docs/virtio-msg.md#messages.
MSG_ID_EVENT_BIT = 0x40

# Sizes (docs/virtio-msg.md#sizes).
SLOT_SIZE = 64  # AMP FIFO element size in every implementation
QEMU_MAX_MSG_SIZE = 48  # QEMU-RFC VIRTIO_MSG_MAX_SIZE: it drops anything larger
DEFAULT_MAX_MSG_SIZE = SLOT_SIZE


class TransportMsgId(enum.IntEnum):
    GET_DEVICE_INFO = 0x02
    GET_DEVICE_FEATURES = 0x03
    SET_DRIVER_FEATURES = 0x04
    GET_CONFIG = 0x05
    SET_CONFIG = 0x06
    GET_DEVICE_STATUS = 0x07
    SET_DEVICE_STATUS = 0x08
    GET_VQUEUE = 0x09
    SET_VQUEUE = 0x0A
    RESET_VQUEUE = 0x0B
    GET_SHM = 0x0C
    EVENT_CONFIG = 0x40
    EVENT_AVAIL = 0x41
    EVENT_USED = 0x42


class BusMsgId(enum.IntEnum):
    GET_DEVICES = 0x02
    PING = 0x03
    EVENT_DEVICE = 0x40


class DeviceBusState(enum.IntEnum):
    """EVENT_DEVICE `device_bus_state` (0x0003-0x7FFF reserved, 0x8000+ impl-defined)."""

    READY = 0x0001
    REMOVED = 0x0002


class DeviceStatus(enum.IntFlag):
    """virtio device status bits (virtio 1.x, section 2.1)."""

    RESET = 0
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


# Transport-independent feature bits the protocol layer cares about.
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_NOTIFICATION_DATA = 38  # never offer to Linux: its EVENT_AVAIL encoding is broken
VIRTIO_F_RING_RESET = 40

# Linux refuses any other value (docs/virtio-msg.md#what-the-linux-driver-needs-from-a-device-side).
NUM_FEATURE_BITS = 64
