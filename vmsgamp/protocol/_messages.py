"""One frozen dataclass per virtio-msg message (docs/virtio-msg.md#payloads).

Field names are the spec's, in snake_case.  Reserved (MBZ) words are not
fields: they are written as zero and ignored on receive.  Counts that the wire
carries next to a variable-length tail (``num_blocks``, ``length``, ``count``)
are properties derived from the tail, so a message object cannot disagree with
itself; the one exception is SET_CONFIG's response, whose echoed data is
optional on the wire.

Each class knows its payload layout (``_FMT``, a little-endian struct format for
the fixed part, optionally a different one for the 6-byte-header "g1"
generation; ``_FIELDS``, the words it packs) and, if the payload has a
variable-length tail, how to build and parse it (``_tail``/``_from_wire``).
Header handling, size limits, error translation and the compiled per-class
encoders and decoders live in ``_codec``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable, TypeVar

from vmsgamp.errors import LocalProtocolError, RemoteProtocolError

from ._constants import MSG_ID_EVENT_BIT, BusMsgId, TransportMsgId
from ._fastinit import fast_init

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

M = TypeVar("M", bound=type)


def _message(cls: M) -> M:
    """``@dataclass(frozen=True, kw_only=True)`` plus the cheaper constructors
    of ``_fastinit`` and the class facts the codec and state machines look up
    on every message (``_IS_EVENT``)."""
    cls = fast_init(dataclass(frozen=True, kw_only=True)(cls))
    msg_id = cls.__dict__.get("MSG_ID")
    cls._IS_EVENT = msg_id is not None and bool(msg_id & MSG_ID_EVENT_BIT)
    return cls


@_message
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
    _IS_EVENT: ClassVar[bool] = False
    _FMT: ClassVar[str] = "<"
    _FMT_G1: ClassVar[str | None] = None  # only where the 6-byte generation differs
    _FIELDS: ClassVar[tuple[str, ...]] = ()  # payload words packed by _FMT, in wire order
    _DESCRIBE: ClassVar[tuple[str, ...] | None] = None  # payload keys for describe(), wire order
    # Set by fast_init: every field, positionally, in declaration order.
    _make: ClassVar[Callable[..., Any]]

    dev_num: int = 0
    token: int = 0
    msg_size: int = field(default=0, compare=False)

    # -- classification ------------------------------------------------------
    @classmethod
    def is_event(cls) -> bool:
        return cls._IS_EVENT

    @classmethod
    def is_request(cls) -> bool:
        return not cls.IS_RESPONSE and not cls._IS_EVENT

    @property
    def type_byte(self) -> int:
        return (1 if self.IS_RESPONSE else 0) | (2 if self.IS_BUS else 0)

    # -- wire hooks (the codec owns headers, sizes and error translation) ------
    # A message whose payload is more than the fixed words of _FMT overrides:
    #   _tail(self) -> bytes: what follows the fixed words;
    #   _from_wire(cls, head, tail) -> Message: build from
    #       head = (dev_num, token, msg_size, *the _FIELDS words) and the bytes
    #       after the fixed words up to msg_size; it raises RemoteProtocolError
    #       for counts that do not fit.  Fixed-size messages are built with
    #       _make(*head) and tolerate padding inside msg_size.
    #   _check_encode(self): rules struct cannot see (LocalProtocolError).
    _tail: ClassVar[Callable[[Any], bytes] | None] = None
    _from_wire: ClassVar[Callable[..., Any] | None] = None
    _check_encode: ClassVar[Callable[[Any], None] | None] = None

    def payload_fields(self) -> dict[str, Any]:
        """The payload as a dict in wire order (derived counts included)."""
        names = self._DESCRIBE
        if names is None:
            names = tuple(f.name for f in fields(self) if f.name not in _HEADER_FIELDS)
        return {name: getattr(self, name) for name in names}


# Feature words: precompiled for every count that fits a 64-byte slot.
_U32_WORDS = tuple(struct.Struct(f"<{n}I") for n in range(17))
_MAX_WORDS = len(_U32_WORDS)


def _u32_struct(count: int) -> struct.Struct:
    return _U32_WORDS[count] if count < _MAX_WORDS else struct.Struct(f"<{count}I")


def _u32_words(tail: bytes, count: int, what: str) -> tuple[int, ...]:
    if count * 4 > len(tail):
        raise RemoteProtocolError(f"{what}: num_blocks {count} needs {count * 4} bytes, message has {len(tail)}")
    return _u32_struct(count).unpack_from(tail, 0)


def _short_tail(what: str, length: int, tail: bytes) -> RemoteProtocolError:
    return RemoteProtocolError(f"{what}: length {length} but only {len(tail)} data bytes in msg_size")


# ---------------------------------------------------------------------------
# Transport messages
# ---------------------------------------------------------------------------


@_message
class GetDeviceInfoRequest(Message):
    MSG_ID = TransportMsgId.GET_DEVICE_INFO
    NAME = "GET_DEVICE_INFO"


@_message
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


@_message
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
        words = self.features
        return (_U32_WORDS[len(words)] if len(words) < _MAX_WORDS else _u32_struct(len(words))).pack(*words)

    @classmethod
    def _from_wire(cls, head: tuple[int, ...], tail: bytes) -> Any:
        dev_num, token, msg_size, block_index, num_blocks = head
        if num_blocks < _MAX_WORDS and num_blocks * 4 <= len(tail):
            words = _U32_WORDS[num_blocks].unpack_from(tail)
        else:
            words = _u32_words(tail, num_blocks, cls.NAME)
        return cls._make(dev_num, token, msg_size, block_index, words)  # type: ignore[attr-defined]

    def as_int(self) -> int:
        """The blocks as one integer (bit 0 = feature bit 32*block_index)."""
        value = 0
        for i, word in enumerate(self.features):
            value |= word << (32 * i)
        return value << (32 * self.block_index)


@_message
class GetDeviceFeaturesResponse(_FeatureBlocks, Message):
    MSG_ID = TransportMsgId.GET_DEVICE_FEATURES
    NAME = "GET_DEVICE_FEATURES"
    IS_RESPONSE = True

    block_index: int
    features: tuple[int, ...] = ()


@_message
class SetDriverFeaturesRequest(_FeatureBlocks, Message):
    MSG_ID = TransportMsgId.SET_DRIVER_FEATURES
    NAME = "SET_DRIVER_FEATURES"

    block_index: int
    features: tuple[int, ...] = ()


@_message
class SetDriverFeaturesResponse(Message):
    MSG_ID = TransportMsgId.SET_DRIVER_FEATURES
    NAME = "SET_DRIVER_FEATURES"
    IS_RESPONSE = True


@_message
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
    def _from_wire(cls, head: tuple[int, ...], tail: bytes) -> Any:
        dev_num, token, msg_size, generation, offset, length = head
        if length > len(tail):
            raise _short_tail(cls.NAME, length, tail)
        return cls._make(dev_num, token, msg_size, generation, offset, tail[:length])  # type: ignore[attr-defined]


@_message
class GetConfigResponse(_ConfigData, Message):
    MSG_ID = TransportMsgId.GET_CONFIG
    NAME = "GET_CONFIG"
    IS_RESPONSE = True

    generation: int
    offset: int
    data: bytes = b""


@_message
class SetConfigRequest(_ConfigData, Message):
    MSG_ID = TransportMsgId.SET_CONFIG
    NAME = "SET_CONFIG"

    generation: int
    offset: int
    data: bytes = b""


@_message
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

    def _check_encode(self) -> None:
        if self.data and len(self.data) != self.length:
            raise LocalProtocolError("SET_CONFIG response: echoed data must be empty or exactly `length` bytes")

    @classmethod
    def _from_wire(cls, head: tuple[int, ...], tail: bytes) -> Message:
        # The echo is optional (docs/virtio-msg.md#payloads, SET_CONFIG): present only if
        # msg_size covers all of it.
        dev_num, token, msg_size, generation, offset, length = head
        data = bytes(tail[:length]) if length and len(tail) >= length else b""
        return cls._make(dev_num, token, msg_size, generation, offset, length, data)


@_message
class GetDeviceStatusRequest(Message):
    MSG_ID = TransportMsgId.GET_DEVICE_STATUS
    NAME = "GET_DEVICE_STATUS"


@_message
class GetDeviceStatusResponse(Message):
    MSG_ID = TransportMsgId.GET_DEVICE_STATUS
    NAME = "GET_DEVICE_STATUS"
    IS_RESPONSE = True
    _FMT = "<I"
    _FIELDS = ("status",)

    status: int


@_message
class SetDeviceStatusRequest(Message):
    MSG_ID = TransportMsgId.SET_DEVICE_STATUS
    NAME = "SET_DEVICE_STATUS"
    _FMT = "<I"
    _FIELDS = ("status",)

    status: int


@_message
class SetDeviceStatusResponse(Message):
    MSG_ID = TransportMsgId.SET_DEVICE_STATUS
    NAME = "SET_DEVICE_STATUS"
    IS_RESPONSE = True
    _FMT = "<I"
    _FIELDS = ("status",)

    status: int


@_message
class GetVqueueRequest(Message):
    MSG_ID = TransportMsgId.GET_VQUEUE
    NAME = "GET_VQUEUE"
    _FMT = "<I"
    _FIELDS = ("index",)

    index: int


@_message
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


@_message
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


@_message
class SetVqueueResponse(Message):
    MSG_ID = TransportMsgId.SET_VQUEUE
    NAME = "SET_VQUEUE"
    IS_RESPONSE = True


@_message
class ResetVqueueRequest(Message):
    MSG_ID = TransportMsgId.RESET_VQUEUE
    NAME = "RESET_VQUEUE"
    _FMT = "<I"
    _FIELDS = ("index",)

    index: int


@_message
class ResetVqueueResponse(Message):
    MSG_ID = TransportMsgId.RESET_VQUEUE
    NAME = "RESET_VQUEUE"
    IS_RESPONSE = True


@_message
class GetShmRequest(Message):
    MSG_ID = TransportMsgId.GET_SHM
    NAME = "GET_SHM"
    _FMT = "<I"
    _FIELDS = ("index",)

    index: int


@_message
class GetShmResponse(Message):
    """SPEC-PR28 layout (``address`` only 32 bits; G1 calls ``length`` ``count``).
    Newer drafts widen it; do not rely on GET_SHM (docs/virtio-msg.md#payloads)."""

    MSG_ID = TransportMsgId.GET_SHM
    NAME = "GET_SHM"
    IS_RESPONSE = True
    _FMT = "<III"
    _FIELDS = ("index", "length", "address")

    index: int
    length: int
    address: int


@_message
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
    def _from_wire(cls, head: tuple[int, ...], tail: bytes) -> Message:
        dev_num, token, msg_size, device_status, generation, offset, length = head
        if length > len(tail):
            raise _short_tail(cls.NAME, length, tail)
        return cls._make(dev_num, token, msg_size, device_status, generation, offset, tail[:length])


@_message
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


@_message
class EventUsed(Message):
    MSG_ID = TransportMsgId.EVENT_USED
    NAME = "EVENT_USED"
    _FMT = "<I"
    _FIELDS = ("vq_index",)

    vq_index: int


# ---------------------------------------------------------------------------
# Bus messages (type bit 1; dev_num 0)
# ---------------------------------------------------------------------------


@_message
class GetDevicesRequest(Message):
    """``count`` must be a multiple of 8 (Linux asks ``{0, 32}``)."""

    MSG_ID = BusMsgId.GET_DEVICES
    NAME = "GET_DEVICES"
    IS_BUS = True
    _FMT = "<HH"
    _FIELDS = ("offset", "count")

    offset: int = 0
    count: int = 32

    def _check_encode(self) -> None:
        if self.count % 8:
            raise LocalProtocolError(f"GET_DEVICES count {self.count} is not a multiple of 8")

    @classmethod
    def _from_wire(cls, head: tuple[int, ...], tail: bytes) -> Message:
        if head[4] % 8:
            raise RemoteProtocolError(f"GET_DEVICES count {head[4]} is not a multiple of 8")
        return cls._make(*head)


@_message
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
    def _from_wire(cls, head: tuple[int, ...], tail: bytes) -> Message:
        dev_num, token, msg_size, offset, count, next_offset = head
        if count % 8:
            raise RemoteProtocolError(f"GET_DEVICES response count {count} is not a multiple of 8")
        if count // 8 > len(tail):
            raise _short_tail("GET_DEVICES bitmap", count // 8, tail)
        return cls._make(dev_num, token, msg_size, offset, next_offset, tail[:count // 8])

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


@_message
class PingRequest(Message):
    MSG_ID = BusMsgId.PING
    NAME = "PING"
    IS_BUS = True
    _FMT = "<I"
    _FIELDS = ("data",)

    data: int


@_message
class PingResponse(Message):
    MSG_ID = BusMsgId.PING
    NAME = "PING"
    IS_BUS = True
    IS_RESPONSE = True
    _FMT = "<I"
    _FIELDS = ("data",)

    data: int


@_message
class EventDevice(Message):
    MSG_ID = BusMsgId.EVENT_DEVICE
    NAME = "EVENT_DEVICE"
    IS_BUS = True
    _FMT = "<HH"
    _FIELDS = ("device_number", "device_bus_state")

    device_number: int
    device_bus_state: int


def replace_header(msg: M, dev_num: int, token: int) -> M:  # type: ignore[type-var]
    """``dataclasses.replace(msg, dev_num=dev_num, token=token)`` without the
    generic machinery (the connections do it for every request and response)."""
    new = object.__new__(msg.__class__)
    d = new.__dict__
    d.update(msg.__dict__)
    d["dev_num"] = dev_num
    d["token"] = token
    return new


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

# Response class -> the request class it answers (same kind and msg_id).
REQUEST_CLASS: dict[type[Message], type[Message]] = {
    resp: req for resp in MESSAGE_CLASSES if resp.IS_RESPONSE for req in MESSAGE_CLASSES
    if req.is_request() and req.IS_BUS == resp.IS_BUS and req.MSG_ID == resp.MSG_ID
}
