"""Header profiles, encode/decode and describe() for virtio-msg messages.

Decoding treats the input as hostile: every way it can be malformed ends in
``RemoteProtocolError`` (the bus counts and drops it: docs/virtio-msg.md,
"Errors and malformed messages"); nothing
else escapes.  Encoding mistakes are ours and raise ``LocalProtocolError``.

Speed: these functions sit on every bus round trip, so each message class
gets, per header profile, a precompiled ``struct.Struct`` covering header
and fixed payload together, and a generated encoder that packs the fields
in one call.  Decoding is one header peek, one dict lookup on (kind,
direction, msg_id), one unpack and the class's positional constructor.
``tests/protocol_reference.py`` is the straightforward field-by-field
oracle the property tests compare this with.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Union

from vmsgamp.errors import LocalProtocolError, RemoteProtocolError

from ._constants import DEFAULT_MAX_MSG_SIZE, MSG_ID_EVENT_BIT, TYPE_BUS, TYPE_RESPONSE
from ._messages import MESSAGE_CLASSES, Message

__all__ = ["HeaderProfile", "G1", "G2", "ProfileLike", "get_profile", "encode", "decode",
           "encoded_size", "message_class", "describe", "peek_header"]


@dataclass(frozen=True)
class HeaderProfile:
    """A header generation: "g2" = 8 bytes with token (default), "g1" = 6 bytes,
    no token, unpadded GET/SET_VQUEUE (docs/virtio-msg.md#messages)."""

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
# What decode() needs before it knows the class: type | msg_id << 8 as one
# little-endian word, and msg_size.
_PEEK_G2 = struct.Struct("<H4xH").unpack_from
_PEEK_G1 = struct.Struct("<H2xH").unpack_from
_KIND_BITS = TYPE_BUS | TYPE_RESPONSE  # reserved type bits 2..7 are ignored on receive
_KEY_MASK = 0xFF00 | _KIND_BITS

# (is_bus, is_response, msg_id) -> class
_REGISTRY: dict[tuple[bool, bool, int], type[Message]] = {
    (cls.IS_BUS, cls.IS_RESPONSE, int(cls.MSG_ID)): cls for cls in MESSAGE_CLASSES
}


def message_class(*, bus: bool, response: bool, msg_id: int) -> type[Message] | None:
    """The class for a (kind, direction, id) triple, or None if the spec has none."""
    return _REGISTRY.get((bool(bus), bool(response), msg_id))


def _type_byte(cls: type[Message]) -> int:
    return (TYPE_RESPONSE if cls.IS_RESPONSE else 0) | (TYPE_BUS if cls.IS_BUS else 0)


def _key(type_byte: int, msg_id: int) -> int:
    """Decoder table key: the first two header bytes, reserved type bits cleared."""
    return msg_id << 8 | (type_byte & _KIND_BITS)


# ---------------------------------------------------------------------------
# Per-class wire code, built once at import
# ---------------------------------------------------------------------------

Encoder = Callable[[Message, int, "int | None"], bytes]
# (minimum msg_size, unpack(buf) -> (dev_num, token, msg_size, *fixed words),
#  _make for fixed-size classes, _from_wire for the others)
DecodeEntry = tuple[int, Callable[[bytes], tuple[Any, ...]], Callable[..., Message] | None,
                    Callable[..., Message] | None]


def _payload_fmt(cls: type[Message], prof: HeaderProfile) -> str:
    fmt = cls._FMT_G1 if (prof.is_g1 and cls._FMT_G1 is not None) else cls._FMT
    return fmt[1:]  # drop the "<": it follows a header format


def _too_big(msg: Message, size: int, max_size: int) -> LocalProtocolError:
    return LocalProtocolError(f"{msg.NAME} needs {size} bytes, more than the maximum message size {max_size}")


def _pad(out: bytes, pad_to: int, msg: Message) -> bytes:
    if pad_to < len(out):
        raise LocalProtocolError(f"cannot pad a {len(out)}-byte {msg.NAME} to {pad_to} bytes")
    return out + bytes(pad_to - len(out))


def _compile_encoder(cls: type[Message], prof: HeaderProfile) -> Encoder:
    """``encode(msg, max_size, pad_to)`` for one class and profile: one
    Struct.pack of header and fixed words (plus the tail, if any).  Generated
    source, as dataclasses does for __init__, so the field loads are plain
    attribute reads rather than a getattr loop."""
    hdr = "<BBHHH" if prof.has_token else "<BBHH"
    packer = struct.Struct(hdr + _payload_fmt(cls, prof))
    head = f"{_type_byte(cls)}, {int(cls.MSG_ID)}, msg.dev_num, " + ("msg.token, " if prof.has_token else "")
    words = "".join(f", msg.{name}" for name in cls._FIELDS)
    lines = ["def encode(msg, max_size, pad_to):"]
    if cls._check_encode is not None:
        lines.append("    msg._check_encode()")
    if cls._tail is None:
        lines += [f"    if {packer.size} > max_size:",
                  f"        raise _too_big(msg, {packer.size}, max_size)",
                  f"    out = _pack({head}{packer.size}{words})"]
    else:
        lines += ["    tail = msg._tail()",
                  f"    size = {packer.size} + len(tail)",
                  "    if size > max_size:",
                  "        raise _too_big(msg, size, max_size)",
                  f"    out = _pack({head}size{words}) + tail"]
    lines += ["    if pad_to is None:",
              "        return out",
              "    return _pad(out, pad_to, msg)"]
    namespace: dict[str, Any] = {"_pack": packer.pack, "_too_big": _too_big, "_pad": _pad}
    exec(compile("\n".join(lines) + "\n", f"<encode {cls.__name__} {prof.name}>", "exec"), namespace)
    fn: Encoder = namespace["encode"]
    fn.__qualname__ = f"encode_{cls.__name__}_{prof.name}"
    return fn


def _decode_entry(cls: type[Message], prof: HeaderProfile) -> DecodeEntry:
    unpacker = struct.Struct(("<2xHHH" if prof.has_token else "<2xHH") + _payload_fmt(cls, prof))
    unpack: Callable[[bytes], tuple[Any, ...]] = unpacker.unpack_from
    if not prof.has_token:
        raw = unpack

        def unpack(buf: bytes) -> tuple[Any, ...]:  # g1 has no token: report 0
            v = raw(buf)
            return (v[0], 0) + v[1:]

    min_size = unpacker.size  # header + fixed payload words
    if cls._from_wire is None:
        return (min_size, unpack, cls._make, None)
    return (min_size, unpack, None, cls._from_wire)


# Tables per profile, keyed by has_token: a HeaderProfile's own hash is a
# Python-level dataclass __hash__, too slow for a per-message lookup.
_ENCODERS: dict[bool, dict[type[Message], Encoder]] = {
    prof.has_token: {cls: _compile_encoder(cls, prof) for cls in MESSAGE_CLASSES} for prof in (G2, G1)}
_DECODERS: dict[bool, dict[int, DecodeEntry]] = {
    prof.has_token: {_key(_type_byte(cls), int(cls.MSG_ID)): _decode_entry(cls, prof) for cls in MESSAGE_CLASSES}
    for prof in (G2, G1)}
# Fixed part (header + fixed payload words) of every class, per profile.
_FIXED_SIZE: dict[bool, dict[type[Message], int]] = {
    prof.has_token: {cls: prof.header_size + struct.calcsize("<" + _payload_fmt(cls, prof))
                     for cls in MESSAGE_CLASSES}
    for prof in (G2, G1)}
_ENC_G2, _ENC_G1 = _ENCODERS[True], _ENCODERS[False]
_DEC_G2, _DEC_G1 = _DECODERS[True], _DECODERS[False]


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def encoded_size(msg: Message, profile: ProfileLike = G2) -> int:
    """msg_size this message has on the wire in ``profile``."""
    prof = get_profile(profile)
    fixed = _FIXED_SIZE[prof.has_token].get(type(msg))
    if fixed is None:
        raise LocalProtocolError(f"not a virtio-msg message: {msg!r}")
    if msg._tail is None:
        return fixed
    try:
        return fixed + len(msg._tail())
    except (struct.error, TypeError, ValueError, OverflowError) as e:
        raise LocalProtocolError(f"{msg.NAME}: field out of range: {e}") from None


def encode(msg: Message, *, profile: ProfileLike = G2, max_size: int = DEFAULT_MAX_MSG_SIZE,
           pad_to: int | None = None) -> bytes:
    """Header + payload, optionally zero-padded to ``pad_to`` bytes (a slot).

    ``msg_size`` in the header is the real size, never the padded one.  Raises
    LocalProtocolError if a field is out of range, the message would exceed
    ``max_size`` (48 towards QEMU-style peers, 64 otherwise), or ``pad_to`` is
    smaller than the message.
    """
    return encode_with(_ENC_G2 if profile is G2 else encoder_table(profile), msg, max_size, pad_to)


def encoder_table(profile: ProfileLike) -> dict[type[Message], Encoder]:
    """The per-class encoders of ``profile`` (for ``encode_with``)."""
    return _ENC_G2 if get_profile(profile).has_token else _ENC_G1


def encode_with(table: dict[type[Message], Encoder], msg: Message, max_size: int, pad_to: int | None) -> bytes:
    """encode() with the profile already resolved to its table: what the
    connections call for every message they send."""
    enc = table.get(msg.__class__)
    if enc is None:
        raise LocalProtocolError(f"not a virtio-msg message: {msg!r}")
    try:
        return enc(msg, max_size, pad_to)
    except (struct.error, TypeError, ValueError, OverflowError) as e:
        raise LocalProtocolError(f"{msg.NAME}: field out of range: {e}") from None


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
    # Copy first: the caller may hand us a view of shared memory the peer can
    # still write (house style: copy before parse).  bytes are immutable.
    if data.__class__ is not bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"decode() needs bytes, got {type(data).__name__}")  # caller's bug, not the peer's
        data = bytes(data)
    if profile is G2:
        hs, peek, table = 8, _PEEK_G2, _DEC_G2
    elif get_profile(profile).has_token:
        hs, peek, table = 8, _PEEK_G2, _DEC_G2
    else:
        hs, peek, table = 6, _PEEK_G1, _DEC_G1
    try:
        n = len(data)
        if n < hs:
            raise RemoteProtocolError(f"message too short: {n} bytes, header is {hs}")
        kind, msg_size = peek(data)
        if msg_size < hs or msg_size > max_size or msg_size > n:
            raise _bad_size(msg_size, hs, max_size, n)
        entry = table.get(kind & _KEY_MASK)
        if entry is None:
            raise _unknown(kind & 0xFF, kind >> 8)
        min_size, unpack, make, from_wire = entry
        if msg_size < min_size:
            raise _too_short(kind, msg_size, min_size)
        if make is not None:
            return make(*unpack(data))
        return from_wire(unpack(data), data[min_size:msg_size])
    except RemoteProtocolError:
        raise
    except (struct.error, ValueError, TypeError, IndexError, OverflowError, LocalProtocolError) as e:
        # Belt and braces: the explicit checks should make this unreachable.
        raise RemoteProtocolError(f"malformed message: {e}") from None


def _bad_size(msg_size: int, hs: int, max_size: int, n: int) -> RemoteProtocolError:
    if msg_size > n and hs <= msg_size <= max_size:
        return RemoteProtocolError(f"msg_size {msg_size} but only {n} bytes received")
    return RemoteProtocolError(f"msg_size {msg_size} outside [{hs}, {max_size}]")


def _too_short(kind: int, msg_size: int, min_size: int) -> RemoteProtocolError:
    mtype, msg_id = kind & 0xFF, kind >> 8
    name = _REGISTRY[(bool(mtype & TYPE_BUS), bool(mtype & TYPE_RESPONSE), msg_id)].NAME
    return RemoteProtocolError(f"{name} msg_size {msg_size} is below its minimum {min_size}")


def _unknown(mtype: int, msg_id: int) -> RemoteProtocolError:
    is_bus = bool(mtype & TYPE_BUS)
    is_resp = bool(mtype & TYPE_RESPONSE)
    kind = "bus" if is_bus else "transport"
    what = "response" if is_resp else "request/event"
    if is_resp and msg_id & MSG_ID_EVENT_BIT and (is_bus, False, msg_id) in _REGISTRY:
        return RemoteProtocolError(f"{kind} event 0x{msg_id:02x} flagged as a response")
    return RemoteProtocolError(f"unknown {kind} {what} msg_id 0x{msg_id:02x}")


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
    payload (the spec's field names, byte strings as hex)."""
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
