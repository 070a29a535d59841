"""Header profiles, encode/decode and describe() for virtio-msg messages.

Decoding treats the input as hostile: every way it can be malformed ends in
``RemoteProtocolError`` (the bus counts and drops it, reference 1.9); nothing
else escapes.  Encoding mistakes are ours and raise ``LocalProtocolError``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Union

from vmsgamp.errors import LocalProtocolError, RemoteProtocolError

from ._constants import DEFAULT_MAX_MSG_SIZE, TYPE_BUS, TYPE_RESPONSE
from ._messages import MESSAGE_CLASSES, GetDevicesRequest, Message, SetConfigResponse

__all__ = ["HeaderProfile", "G1", "G2", "ProfileLike", "get_profile", "encode", "decode",
           "encoded_size", "message_class", "describe", "peek_header"]


@dataclass(frozen=True)
class HeaderProfile:
    """A header generation: "g2" = 8 bytes with token (default), "g1" = 6 bytes,
    no token, unpadded GET/SET_VQUEUE (reference 1.1, 1.5)."""

    name: str
    header_size: int
    has_token: bool

    @property
    def is_g1(self) -> bool:
        return not self.has_token


G2 = HeaderProfile("g2", 8, True)
G1 = HeaderProfile("g1", 6, False)
_PROFILES = {"g2": G2, "g1": G1}

ProfileLike = Union[str, HeaderProfile]


def get_profile(profile: ProfileLike) -> HeaderProfile:
    if isinstance(profile, HeaderProfile):
        return profile
    try:
        return _PROFILES[str(profile).lower()]
    except KeyError:
        raise LocalProtocolError(f"unknown header profile {profile!r} (expected 'g2' or 'g1')") from None


_HDR_G2 = struct.Struct("<BBHHH")  # type, msg_id, dev_num, token, msg_size
_HDR_G1 = struct.Struct("<BBHH")  # type, msg_id, dev_id, msg_size

# (is_bus, is_response, msg_id) -> class
_REGISTRY: dict[tuple[bool, bool, int], type[Message]] = {
    (cls.IS_BUS, cls.IS_RESPONSE, int(cls.MSG_ID)): cls for cls in MESSAGE_CLASSES
}


def message_class(*, bus: bool, response: bool, msg_id: int) -> type[Message] | None:
    """The class for a (kind, direction, id) triple, or None if the spec has none."""
    return _REGISTRY.get((bool(bus), bool(response), msg_id))


def encoded_size(msg: Message, profile: ProfileLike = G2) -> int:
    """msg_size this message has on the wire in ``profile``."""
    prof = get_profile(profile)
    return prof.header_size + len(_payload(msg, prof))


def _payload(msg: Message, prof: HeaderProfile) -> bytes:
    if not isinstance(msg, Message) or type(msg) not in _CLASS_SET:
        raise LocalProtocolError(f"not a virtio-msg message: {msg!r}")
    try:
        return msg._pack_payload(prof.is_g1)
    except (struct.error, TypeError, ValueError, OverflowError) as e:
        raise LocalProtocolError(f"{msg.NAME}: field out of range: {e}") from None


_CLASS_SET = frozenset(MESSAGE_CLASSES)


def encode(msg: Message, *, profile: ProfileLike = G2, max_size: int = DEFAULT_MAX_MSG_SIZE,
           pad_to: int | None = None) -> bytes:
    """Header + payload, optionally zero-padded to ``pad_to`` bytes (a slot).

    ``msg_size`` in the header is the real size, never the padded one.  Raises
    LocalProtocolError if a field is out of range, the message would exceed
    ``max_size`` (48 towards QEMU-style peers, 64 otherwise), or ``pad_to`` is
    smaller than the message.
    """
    prof = get_profile(profile)
    payload = _payload(msg, prof)
    _check_semantics(msg)
    size = prof.header_size + len(payload)
    if size > max_size:
        raise LocalProtocolError(f"{msg.NAME} needs {size} bytes, more than the maximum message size {max_size}")
    try:
        if prof.has_token:
            header = _HDR_G2.pack(msg.type_byte, msg.MSG_ID, msg.dev_num, msg.token, size)
        else:
            header = _HDR_G1.pack(msg.type_byte, msg.MSG_ID, msg.dev_num, size)
    except struct.error as e:
        raise LocalProtocolError(f"{msg.NAME}: header field out of range: {e}") from None
    out = header + payload
    if pad_to is not None:
        if pad_to < size:
            raise LocalProtocolError(f"cannot pad a {size}-byte {msg.NAME} to {pad_to} bytes")
        out += bytes(pad_to - size)
    return out


def _check_semantics(msg: Message) -> None:
    """Rules struct.pack cannot see."""
    if isinstance(msg, GetDevicesRequest) and msg.count % 8:
        raise LocalProtocolError(f"GET_DEVICES count {msg.count} is not a multiple of 8")
    if isinstance(msg, SetConfigResponse) and msg.data and len(msg.data) != msg.length:
        raise LocalProtocolError("SET_CONFIG response: echoed data must be empty or exactly `length` bytes")


def peek_header(data: bytes, profile: ProfileLike = G2) -> tuple[int, int, int, int, int]:
    """(type, msg_id, dev_num, token, msg_size) without validating the rest."""
    prof = get_profile(profile)
    if len(data) < prof.header_size:
        raise RemoteProtocolError(f"message too short: {len(data)} bytes, header is {prof.header_size}")
    if prof.has_token:
        return _HDR_G2.unpack_from(data, 0)  # type: ignore[return-value]
    mtype, msg_id, dev_num, msg_size = _HDR_G1.unpack_from(data, 0)
    return mtype, msg_id, dev_num, 0, msg_size


def decode(data: bytes | bytearray | memoryview, *, profile: ProfileLike = G2,
           max_size: int = DEFAULT_MAX_MSG_SIZE) -> Message:
    """Parse one message (e.g. a FIFO slot).  Bytes beyond ``msg_size`` are
    ignored (slot leftovers); reserved type bits 2..7 are ignored.  Anything
    malformed raises RemoteProtocolError and nothing else."""
    prof = get_profile(profile)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode() needs bytes, got {type(data).__name__}")  # caller's bug, not the peer's
    # Copy first: the caller may hand us a view of shared memory the peer can
    # still write (house style: copy before parse).
    buf = bytes(data)
    try:
        return _decode(buf, prof, max_size)
    except RemoteProtocolError:
        raise
    except (struct.error, ValueError, TypeError, IndexError, OverflowError, LocalProtocolError) as e:
        # Belt and braces: the explicit checks should make this unreachable.
        raise RemoteProtocolError(f"malformed message: {e}") from None


def _decode(buf: bytes, prof: HeaderProfile, max_size: int) -> Message:
    mtype, msg_id, dev_num, token, msg_size = peek_header(buf, prof)
    if msg_size < prof.header_size or msg_size > max_size:
        raise RemoteProtocolError(f"msg_size {msg_size} outside [{prof.header_size}, {max_size}]")
    if msg_size > len(buf):
        raise RemoteProtocolError(f"msg_size {msg_size} but only {len(buf)} bytes received")
    is_bus = bool(mtype & TYPE_BUS)
    is_resp = bool(mtype & TYPE_RESPONSE)
    cls = _REGISTRY.get((is_bus, is_resp, msg_id))
    if cls is None:
        kind = "bus" if is_bus else "transport"
        what = "response" if is_resp else "request/event"
        if is_resp and msg_id & 0x40 and (is_bus, False, msg_id) in _REGISTRY:
            raise RemoteProtocolError(f"{kind} event 0x{msg_id:02x} flagged as a response")
        raise RemoteProtocolError(f"unknown {kind} {what} msg_id 0x{msg_id:02x}")
    minimum = prof.header_size + cls._min_payload(prof.is_g1)
    if msg_size < minimum:
        raise RemoteProtocolError(f"{cls.NAME} msg_size {msg_size} is below its minimum {minimum}")
    payload = buf[prof.header_size:msg_size]
    header = {"dev_num": dev_num, "token": token, "msg_size": msg_size}
    return cls._from_payload(payload, prof.is_g1, header)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)  # plain int, not an IntEnum
    return value


def describe(msg: Message, profile: ProfileLike = G2) -> dict[str, Any]:
    """A JSON-ready dict: kind, response, msg_id, name, dev_num, token,
    msg_size (as received, else as it would be encoded in ``profile``) and
    payload (reference field names, byte strings as hex)."""
    size = msg.msg_size or encoded_size(msg, profile)
    return {
        "kind": "bus" if msg.IS_BUS else "transport",
        "response": msg.IS_RESPONSE,
        "msg_id": int(msg.MSG_ID),
        "name": msg.NAME,
        "dev_num": msg.dev_num,
        "token": msg.token,
        "msg_size": size,
        "payload": {k: _jsonable(v) for k, v in msg.payload_fields().items()},
    }

