"""One frozen dataclass per virtio-msg message (reference sections 1.4-1.6).

Field names are the reference's, in snake_case.  Reserved (MBZ) words are not
fields: they are written as zero and ignored on receive.  Counts that the wire
carries next to a variable-length tail (``num_blocks``, ``length``, ``count``)
are properties derived from the tail, so a message object cannot disagree with
itself; the one exception is SET_CONFIG's response, whose echoed data is
optional on the wire.

Each class knows its payload layout (``_FMT``, a little-endian struct format for
the fixed part, optionally a different one for the 6-byte-header "g1"
generation) and how to turn a tail of bytes into fields.  Header handling,
size limits and error translation live in ``_codec``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Iterable

from vmsgamp.errors import RemoteProtocolError

from ._constants import BusMsgId, TransportMsgId

__all__ = [
    "Message",
    "GetDeviceInfoRequest",
    "GetDeviceInfoResponse",
    "GetDeviceFeaturesRequest",
    "GetDeviceFeaturesResponse",
    "SetDriverFeaturesRequest",
    "SetDriverFeaturesResponse",
    "GetConfigRequest",
    "GetConfigResponse",
    "SetConfigRequest",
    "SetConfigResponse",
    "GetDeviceStatusRequest",
    "GetDeviceStatusResponse",
    "SetDeviceStatusRequest",
    "SetDeviceStatusResponse",
    "GetVqueueRequest",
    "GetVqueueResponse",
    "SetVqueueRequest",
    "SetVqueueResponse",
    "ResetVqueueRequest",
    "ResetVqueueResponse",
    "GetShmRequest",
    "GetShmResponse",
    "EventConfig",
    "EventAvail",
    "EventUsed",
    "GetDevicesRequest",
    "GetDevicesResponse",
    "PingRequest",
    "PingResponse",
    "EventDevice",
    "MESSAGE_CLASSES",
]

_HEADER_FIELDS = ("dev_num", "token", "msg_size")


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message.

    ``dev_num`` and ``token`` are header fields (``token`` is always 0 in the
    g1 profile, which has none).  ``msg_size`` is the size the peer put in the
    header of a decoded message (it may exceed what the fields need); it is 0
    for locally built messages, takes no part in equality and is never used
    when encoding.
    """

    MSG_ID: ClassVar[int]
    NAME: ClassVar[str]
    IS_BUS: ClassVar[bool] = False
    IS_RESPONSE: ClassVar[bool] = False
    _FMT: ClassVar[str] = "<"
    _FMT_G1: ClassVar[str | None] = None  # only where the 6-byte generation differs
    _FIELDS: ClassVar[tuple[str, ...]] = ()  # fields packed by _FMT, in order
    _DESCRIBE: ClassVar[tuple[str, ...] | None] = None  # payload keys for describe(), wire order

    dev_num: int = 0
    token: int = 0
    msg_size: int = field(default=0, compare=False)

    # -- classification ------------------------------------------------------
    @classmethod
    def is_event(cls) -> bool:
        return bool(cls.MSG_ID & 0x40)

    @classmethod
    def is_request(cls) -> bool:
        return not cls.IS_RESPONSE and not cls.is_event()

    @property
    def type_byte(self) -> int:
        return (1 if self.IS_RESPONSE else 0) | (2 if self.IS_BUS else 0)

    # -- payload codec (header-free; the codec adds the header) ---------------
    @classmethod
    def _fmt(cls, g1: bool) -> str:
        return cls._FMT_G1 if (g1 and cls._FMT_G1 is not None) else cls._FMT

    @classmethod
    def _min_payload(cls, g1: bool) -> int:
        return struct.calcsize(cls._fmt(g1))

    def _fixed_values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def _tail(self) -> bytes:
        return b""

    def _pack_payload(self, g1: bool) -> bytes:
        return struct.pack(self._fmt(g1), *self._fixed_values()) + self._tail()

    @classmethod
    def _from_payload(cls, payload: bytes, g1: bool, header: dict[str, int]) -> "Message":
        fmt = cls._fmt(g1)
        fixed = struct.unpack_from(fmt, payload, 0)
        tail = payload[struct.calcsize(fmt):]
        return cls._build(dict(zip(cls._FIELDS, fixed)), tail, header)

    @classmethod
    def _build(cls, values: dict[str, Any], tail: bytes, header: dict[str, int]) -> "Message":
        # Bytes beyond the fixed part of a fixed-size message are padding inside
        # msg_size: tolerated and ignored.
        return cls(**values, **header)

    def payload_fields(self) -> dict[str, Any]:
        """The payload as a dict in wire order (derived counts included)."""
        names = self._DESCRIBE
        if names is None:
            names = tuple(f.name for f in fields(self) if f.name not in _HEADER_FIELDS)
        return {name: getattr(self, name) for name in names}


def _u32_words(tail: bytes, count: int, what: str) -> tuple[int, ...]:
    if count * 4 > len(tail):
        raise RemoteProtocolError(f"{what}: num_blocks {count} needs {count * 4} bytes, message has {len(tail)}")
    return struct.unpack_from(f"<{count}I", tail, 0)


def _take(tail: bytes, length: int, what: str) -> bytes:
    if length > len(tail):
        raise RemoteProtocolError(f"{what}: length {length} but only {len(tail)} data bytes in msg_size")
    return bytes(tail[:length])


# ---------------------------------------------------------------------------
# Transport messages
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GetDeviceInfoRequest(Message):
    MSG_ID = TransportMsgId.GET_DEVICE_INFO
    NAME = "GET_DEVICE_INFO"


@dataclass(frozen=True, kw_only=True)
class GetDeviceInfoResponse(Message):
    MSG_ID = TransportMsgId.GET_DEVICE_INFO
    NAME = "GET_DEVICE_INFO"
    IS_RESPONSE = True
    _FMT = "<IIIIIHH"
    _FIELDS = ("device_id", "vendor_id", "num_feature_bits", "config_size", "max_virtqueues",
               "admin_vq_start", "admin_vq_count")

    device_id: int
    vendor_id: int
    num_feature_bits: int
    config_size: int
    max_virtqueues: int
    admin_vq_start: int = 0
    admin_vq_count: int = 0


@dataclass(frozen=True, kw_only=True)
class GetDeviceFeaturesRequest(Message):
    MSG_ID = TransportMsgId.GET_DEVICE_FEATURES
    NAME = "GET_DEVICE_FEATURES"
    _FMT = "<II"
    _FIELDS = ("block_index", "num_blocks")

    block_index: int
    num_blocks: int


class _FeatureBlocks:
    """Shared by the two messages that carry ``features[num_blocks]``."""

    _FMT = "<II"
    _FIELDS = ("block_index", "num_blocks")
    _DESCRIBE = ("block_index", "num_blocks", "features")
    block_index: int
    features: tuple[int, ...]
    NAME: ClassVar[str]

    @property
    def num_blocks(self) -> int:
        return len(self.features)

    def _tail(self) -> bytes:
        return struct.pack(f"<{len(self.features)}I", *self.features)

    @classmethod
    def _build(cls, values: dict[str, Any], tail: bytes, header: dict[str, int]) -> Any:
        words = _u32_words(tail, values.pop("num_blocks"), cls.NAME)
        return cls(block_index=values["block_index"], features=words, **header)  # type: ignore[call-arg]

    def as_int(self) -> int:
        """The blocks as one integer (bit 0 = feature bit 32*block_index)."""
        value = 0
        for i, word in enumerate(self.features):
            value |= word << (32 * i)
        return value << (32 * self.block_index)


@dataclass(frozen=True, kw_only=True)
class GetDeviceFeaturesResponse(_FeatureBlocks, Message):
    MSG_ID = TransportMsgId.GET_DEVICE_FEATURES
    NAME = "GET_DEVICE_FEATURES"
    IS_RESPONSE = True

    block_index: int
    features: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class SetDriverFeaturesRequest(_FeatureBlocks, Message):
    MSG_ID = TransportMsgId.SET_DRIVER_FEATURES
    NAME = "SET_DRIVER_FEATURES"

    block_index: int
    features: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class SetDriverFeaturesResponse(Message):
    MSG_ID = TransportMsgId.SET_DRIVER_FEATURES
    NAME = "SET_DRIVER_FEATURES"
    IS_RESPONSE = True


@dataclass(frozen=True, kw_only=True)
class GetConfigRequest(Message):
    MSG_ID = TransportMsgId.GET_CONFIG
    NAME = "GET_CONFIG"
    _FMT = "<II"
    _FIELDS = ("offset", "length")

    offset: int
    length: int


class _ConfigData:
    """Shared by the two messages that carry ``{generation, offset, length,
    data[length]}``."""

    _FMT = "<III"
    _FIELDS = ("generation", "offset", "length")
    _DESCRIBE = ("generation", "offset", "length", "data")
    data: bytes
    NAME: ClassVar[str]

    @property
    def length(self) -> int:
        return len(self.data)

    def _tail(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def _build(cls, values: dict[str, Any], tail: bytes, header: dict[str, int]) -> Any:
        data = _take(tail, values["length"], cls.NAME)
        return cls(generation=values["generation"], offset=values["offset"], data=data,  # type: ignore[call-arg]
                   **header)


@dataclass(frozen=True, kw_only=True)
class GetConfigResponse(_ConfigData, Message):
    MSG_ID = TransportMsgId.GET_CONFIG
    NAME = "GET_CONFIG"
    IS_RESPONSE = True

    generation: int
    offset: int
    data: bytes = b""


@dataclass(frozen=True, kw_only=True)
class SetConfigRequest(_ConfigData, Message):
    MSG_ID = TransportMsgId.SET_CONFIG
    NAME = "SET_CONFIG"

    generation: int
    offset: int
    data: bytes = b""


@dataclass(frozen=True, kw_only=True)
class SetConfigResponse(Message):
    """``length`` is the number of bytes applied (0 = rejected); ``data`` is the
    optional echo (empty, or exactly ``length`` bytes)."""

    MSG_ID = TransportMsgId.SET_CONFIG
    NAME = "SET_CONFIG"
    IS_RESPONSE = True
    _FMT = "<III"
    _FIELDS = ("generation", "offset", "length")

    generation: int
    offset: int
    length: int
    data: bytes = b""

    def _tail(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def _build(cls, values: dict[str, Any], tail: bytes, header: dict[str, int]) -> Message:
        # The echo is optional (reference 1.4: "12+len or 12"): present only if
        # msg_size covers all of it.
        length = values["length"]
        data = bytes(tail[:length]) if length and len(tail) >= length else b""
        return cls(**values, data=data, **header)


@dataclass(frozen=True, kw_only=True)
class GetDeviceStatusRequest(Message):
    MSG_ID = TransportMsgId.GET_DEVICE_STATUS
    NAME = "GET_DEVICE_STATUS"


@dataclass(frozen=True, kw_only=True)
class GetDeviceStatusResponse(Message):
    MSG_ID = TransportMsgId.GET_DEVICE_STATUS
    NAME = "GET_DEVICE_STATUS"
    IS_RESPONSE = True
    _FMT = "<I"
    _FIELDS = ("status",)

    status: int


@dataclass(frozen=True, kw_only=True)
class SetDeviceStatusRequest(Message):
    MSG_ID = TransportMsgId.SET_DEVICE_STATUS
    NAME = "SET_DEVICE_STATUS"
    _FMT = "<I"
    _FIELDS = ("status",)

    status: int


@dataclass(frozen=True, kw_only=True)
class SetDeviceStatusResponse(Message):
    MSG_ID = TransportMsgId.SET_DEVICE_STATUS
    NAME = "SET_DEVICE_STATUS"
    IS_RESPONSE = True
    _FMT = "<I"
    _FIELDS = ("status",)

    status: int


@dataclass(frozen=True, kw_only=True)
class GetVqueueRequest(Message):
    MSG_ID = TransportMsgId.GET_VQUEUE
    NAME = "GET_VQUEUE"
    _FMT = "<I"
    _FIELDS = ("index",)

    index: int


@dataclass(frozen=True, kw_only=True)
class GetVqueueResponse(Message):
    """``cur_size`` is the G2 name; the G1 uapi calls the same word ``size``."""

    MSG_ID = TransportMsgId.GET_VQUEUE
    NAME = "GET_VQUEUE"
    IS_RESPONSE = True
    _FMT = "<III4xQQQ"  # G2: a reserved word aligns the addresses to 8 bytes
    _FMT_G1 = "<IIIQQQ"  # G1: no padding (36 bytes)
    _FIELDS = ("index", "max_size", "cur_size", "desc_addr", "driver_addr", "device_addr")

    index: int
    max_size: int
    cur_size: int = 0
    desc_addr: int = 0
    driver_addr: int = 0
    device_addr: int = 0


@dataclass(frozen=True, kw_only=True)
class SetVqueueRequest(Message):
    MSG_ID = TransportMsgId.SET_VQUEUE
    NAME = "SET_VQUEUE"
    _FMT = "<I4xI4xQQQ"  # G2: reserved0 and reserved1 (MBZ)
    _FMT_G1 = "<I4xIQQQ"  # G1: only the `unused` word after index
    _FIELDS = ("index", "size", "desc_addr", "driver_addr", "device_addr")

    index: int
    size: int
    desc_addr: int
    driver_addr: int
    device_addr: int


@dataclass(frozen=True, kw_only=True)
class SetVqueueResponse(Message):
    MSG_ID = TransportMsgId.SET_VQUEUE
    NAME = "SET_VQUEUE"
    IS_RESPONSE = True


@dataclass(frozen=True, kw_only=True)
class ResetVqueueRequest(Message):
    MSG_ID = TransportMsgId.RESET_VQUEUE
    NAME = "RESET_VQUEUE"
    _FMT = "<I"
    _FIELDS = ("index",)

    index: int


@dataclass(frozen=True, kw_only=True)
class ResetVqueueResponse(Message):
    MSG_ID = TransportMsgId.RESET_VQUEUE
    NAME = "RESET_VQUEUE"
    IS_RESPONSE = True


@dataclass(frozen=True, kw_only=True)
class GetShmRequest(Message):
    MSG_ID = TransportMsgId.GET_SHM
    NAME = "GET_SHM"
    _FMT = "<I"
    _FIELDS = ("index",)

    index: int


@dataclass(frozen=True, kw_only=True)
class GetShmResponse(Message):
    """SPEC-PR28 layout (``address`` only 32 bits; G1 calls ``length`` ``count``).
    Newer drafts widen it; do not rely on GET_SHM (reference 1.4)."""

    MSG_ID = TransportMsgId.GET_SHM
    NAME = "GET_SHM"
    IS_RESPONSE = True
    _FMT = "<III"
    _FIELDS = ("index", "length", "address")

    index: int
    length: int
    address: int


@dataclass(frozen=True, kw_only=True)
class EventConfig(Message):
    MSG_ID = TransportMsgId.EVENT_CONFIG
    NAME = "EVENT_CONFIG"
    _FMT = "<IIII"
    _FIELDS = ("device_status", "generation", "offset", "length")
    _DESCRIBE = ("device_status", "generation", "offset", "length", "data")

    device_status: int
    generation: int
    offset: int = 0
    data: bytes = b""  # usually empty: the driver re-reads with GET_CONFIG

    @property
    def length(self) -> int:
        return len(self.data)

    def _tail(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def _build(cls, values: dict[str, Any], tail: bytes, header: dict[str, int]) -> Message:
        data = _take(tail, values.pop("length"), cls.NAME)
        return cls(**values, data=data, **header)


@dataclass(frozen=True, kw_only=True)
class EventAvail(Message):
    """``next_offset_wrap``: bits 30..0 offset, bit 31 wrap; 0 unless
    VIRTIO_F_NOTIFICATION_DATA was negotiated."""

    MSG_ID = TransportMsgId.EVENT_AVAIL
    NAME = "EVENT_AVAIL"
    _FMT = "<II"
    _FIELDS = ("vq_index", "next_offset_wrap")

    vq_index: int
    next_offset_wrap: int = 0

    @property
    def next_offset(self) -> int:
        return self.next_offset_wrap & 0x7FFFFFFF

    @property
    def wrap(self) -> bool:
        return bool(self.next_offset_wrap >> 31)


@dataclass(frozen=True, kw_only=True)
class EventUsed(Message):
    MSG_ID = TransportMsgId.EVENT_USED
    NAME = "EVENT_USED"
    _FMT = "<I"
    _FIELDS = ("vq_index",)

    vq_index: int


# ---------------------------------------------------------------------------
# Bus messages (type bit 1; dev_num 0)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GetDevicesRequest(Message):
    """``count`` must be a multiple of 8 (Linux asks ``{0, 32}``)."""

    MSG_ID = BusMsgId.GET_DEVICES
    NAME = "GET_DEVICES"
    IS_BUS = True
    _FMT = "<HH"
    _FIELDS = ("offset", "count")

    offset: int = 0
    count: int = 32

    @classmethod
    def _build(cls, values: dict[str, Any], tail: bytes, header: dict[str, int]) -> Message:
        if values["count"] % 8:
            raise RemoteProtocolError(f"GET_DEVICES count {values['count']} is not a multiple of 8")
        return cls(**values, **header)


@dataclass(frozen=True, kw_only=True)
class GetDevicesResponse(Message):
    """``bitmap`` bit n (LSB first in each byte) = device ``offset + n`` present;
    ``count`` = 8 * len(bitmap); ``next_offset`` 0 = no more devices."""

    MSG_ID = BusMsgId.GET_DEVICES
    NAME = "GET_DEVICES"
    IS_BUS = True
    IS_RESPONSE = True
    _FMT = "<HHH"
    _FIELDS = ("offset", "count", "next_offset")
    _DESCRIBE = ("offset", "count", "next_offset", "bitmap")

    offset: int
    next_offset: int
    bitmap: bytes

    @property
    def count(self) -> int:
        return 8 * len(self.bitmap)

    def _tail(self) -> bytes:
        return bytes(self.bitmap)

    @classmethod
    def _build(cls, values: dict[str, Any], tail: bytes, header: dict[str, int]) -> Message:
        count = values.pop("count")
        if count % 8:
            raise RemoteProtocolError(f"GET_DEVICES response count {count} is not a multiple of 8")
        bitmap = _take(tail, count // 8, "GET_DEVICES bitmap")
        return cls(**values, bitmap=bitmap, **header)

    @classmethod
    def from_devices(cls, devices: Iterable[int], *, offset: int = 0, count: int = 32,
                     next_offset: int | None = None, **header: int) -> "GetDevicesResponse":
        """Window ``[offset, offset+count)`` with the given device numbers set.
        ``next_offset`` defaults to QEMU's ``offset + count``."""
        bits = bytearray(count // 8)
        for dev in devices:
            rel = dev - offset
            if 0 <= rel < count:
                bits[rel // 8] |= 1 << (rel % 8)
        if next_offset is None:
            next_offset = offset + count
        return cls(offset=offset, next_offset=next_offset, bitmap=bytes(bits), **header)

    def devices(self) -> list[int]:
        """Device numbers present in this window."""
        return [self.offset + i for i in range(self.count) if self.bitmap[i // 8] >> (i % 8) & 1]


@dataclass(frozen=True, kw_only=True)
class PingRequest(Message):
    MSG_ID = BusMsgId.PING
    NAME = "PING"
    IS_BUS = True
    _FMT = "<I"
    _FIELDS = ("data",)

    data: int


@dataclass(frozen=True, kw_only=True)
class PingResponse(Message):
    MSG_ID = BusMsgId.PING
    NAME = "PING"
    IS_BUS = True
    IS_RESPONSE = True
    _FMT = "<I"
    _FIELDS = ("data",)

    data: int


@dataclass(frozen=True, kw_only=True)
class EventDevice(Message):
    MSG_ID = BusMsgId.EVENT_DEVICE
    NAME = "EVENT_DEVICE"
    IS_BUS = True
    _FMT = "<HH"
    _FIELDS = ("device_number", "device_bus_state")

    device_number: int
    device_bus_state: int


MESSAGE_CLASSES: tuple[type[Message], ...] = (
    GetDeviceInfoRequest, GetDeviceInfoResponse,
    GetDeviceFeaturesRequest, GetDeviceFeaturesResponse,
    SetDriverFeaturesRequest, SetDriverFeaturesResponse,
    GetConfigRequest, GetConfigResponse,
    SetConfigRequest, SetConfigResponse,
    GetDeviceStatusRequest, GetDeviceStatusResponse,
    SetDeviceStatusRequest, SetDeviceStatusResponse,
    GetVqueueRequest, GetVqueueResponse,
    SetVqueueRequest, SetVqueueResponse,
    ResetVqueueRequest, ResetVqueueResponse,
    GetShmRequest, GetShmResponse,
    EventConfig, EventAvail, EventUsed,
    GetDevicesRequest, GetDevicesResponse,
    PingRequest, PingResponse,
    EventDevice,
)
