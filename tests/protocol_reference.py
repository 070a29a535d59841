"""A straightforward virtio-msg codec: the oracle for vmsgamp.protocol.

Written from the wire layouts field by field (int.to_bytes/from_bytes, one
field at a time, no precompiled structs, no generated code, no shared
tables with the package), so the property tests can compare the fast codec
with it.  It works on plain values: ``encode(name, response, values,
profile)`` takes the wire fields as a dict; ``decode(data, profile,
max_size)`` returns ``(layout, header, values)`` or raises ``Malformed``.

Layouts (little-endian; u16/u32/u64; "rsv" words are zero on send and
ignored on receive; a tail is bytes or u32 words whose count is a field):
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class Malformed(Exception):
    """The reference rejects the bytes."""


@dataclass(frozen=True)
class Layout:
    name: str
    bus: bool
    response: bool
    msg_id: int
    g2: tuple[tuple[str, int], ...]  # (field, width in bytes); "rsv" = reserved
    g1: tuple[tuple[str, int], ...] | None = None  # where the 6-byte-header generation differs
    tail: str | None = None  # "words:<count field>", "bytes:<length field>", "echo:<length field>",
    #                          "bitmap:<count field>" (count bits, count/8 bytes)

    @property
    def event(self) -> bool:
        return bool(self.msg_id & 0x40)

    def words(self, profile: str) -> tuple[tuple[str, int], ...]:
        return self.g1 if (profile == "g1" and self.g1 is not None) else self.g2


U16, U32, U64 = 2, 4, 8
_CONFIG = (("generation", U32), ("offset", U32), ("length", U32))
_FEATURES = (("block_index", U32), ("num_blocks", U32))

LAYOUTS: tuple[Layout, ...] = (
    Layout("GET_DEVICE_INFO", False, False, 0x02, ()),
    Layout("GET_DEVICE_INFO", False, True, 0x02,
           (("device_id", U32), ("vendor_id", U32), ("num_feature_bits", U32), ("config_size", U32),
            ("max_virtqueues", U32), ("admin_vq_start", U16), ("admin_vq_count", U16))),
    Layout("GET_DEVICE_FEATURES", False, False, 0x03, _FEATURES),
    Layout("GET_DEVICE_FEATURES", False, True, 0x03, _FEATURES, tail="words:num_blocks"),
    Layout("SET_DRIVER_FEATURES", False, False, 0x04, _FEATURES, tail="words:num_blocks"),
    Layout("SET_DRIVER_FEATURES", False, True, 0x04, ()),
    Layout("GET_CONFIG", False, False, 0x05, (("offset", U32), ("length", U32))),
    Layout("GET_CONFIG", False, True, 0x05, _CONFIG, tail="bytes:length"),
    Layout("SET_CONFIG", False, False, 0x06, _CONFIG, tail="bytes:length"),
    Layout("SET_CONFIG", False, True, 0x06, _CONFIG, tail="echo:length"),
    Layout("GET_DEVICE_STATUS", False, False, 0x07, ()),
    Layout("GET_DEVICE_STATUS", False, True, 0x07, (("status", U32),)),
    Layout("SET_DEVICE_STATUS", False, False, 0x08, (("status", U32),)),
    Layout("SET_DEVICE_STATUS", False, True, 0x08, (("status", U32),)),
    Layout("GET_VQUEUE", False, False, 0x09, (("index", U32),)),
    Layout("GET_VQUEUE", False, True, 0x09,
           (("index", U32), ("max_size", U32), ("cur_size", U32), ("rsv", U32), ("desc_addr", U64),
            ("driver_addr", U64), ("device_addr", U64)),
           g1=(("index", U32), ("max_size", U32), ("cur_size", U32), ("desc_addr", U64),
               ("driver_addr", U64), ("device_addr", U64))),
    Layout("SET_VQUEUE", False, False, 0x0A,
           (("index", U32), ("rsv", U32), ("size", U32), ("rsv", U32), ("desc_addr", U64),
            ("driver_addr", U64), ("device_addr", U64)),
           g1=(("index", U32), ("rsv", U32), ("size", U32), ("desc_addr", U64), ("driver_addr", U64),
               ("device_addr", U64))),
    Layout("SET_VQUEUE", False, True, 0x0A, ()),
    Layout("RESET_VQUEUE", False, False, 0x0B, (("index", U32),)),
    Layout("RESET_VQUEUE", False, True, 0x0B, ()),
    Layout("GET_SHM", False, False, 0x0C, (("index", U32),)),
    Layout("GET_SHM", False, True, 0x0C, (("index", U32), ("length", U32), ("address", U32))),
    Layout("EVENT_CONFIG", False, False, 0x40,
           (("device_status", U32), ("generation", U32), ("offset", U32), ("length", U32)),
           tail="bytes:length"),
    Layout("EVENT_AVAIL", False, False, 0x41, (("vq_index", U32), ("next_offset_wrap", U32))),
    Layout("EVENT_USED", False, False, 0x42, (("vq_index", U32),)),
    Layout("GET_DEVICES", True, False, 0x02, (("offset", U16), ("count", U16))),
    Layout("GET_DEVICES", True, True, 0x02, (("offset", U16), ("count", U16), ("next_offset", U16)),
           tail="bitmap:count"),
    Layout("PING", True, False, 0x03, (("data", U32),)),
    Layout("PING", True, True, 0x03, (("data", U32),)),
    Layout("EVENT_DEVICE", True, False, 0x40, (("device_number", U16), ("device_bus_state", U16))),
)


def layout(name: str, response: bool) -> Layout:
    return next(lay for lay in LAYOUTS if lay.name == name and lay.response == response)


def header_size(profile: str) -> int:
    return 8 if profile == "g2" else 6


def fixed_size(lay: Layout, profile: str) -> int:
    return header_size(profile) + sum(w for _, w in lay.words(profile))


def tail_field(lay: Layout) -> tuple[str, str] | tuple[None, None]:
    if lay.tail is None:
        return None, None
    kind, count = lay.tail.split(":")
    return kind, count


def _le(value: int, width: int) -> bytes:
    if not 0 <= value < 1 << (8 * width):
        raise OverflowError(f"{value} does not fit {width} bytes")
    return value.to_bytes(width, "little")


def encode(lay: Layout, values: dict[str, Any], *, dev_num: int, token: int, profile: str) -> bytes:
    """Header + payload for the wire fields in ``values``; the tail is
    ``values["features"]`` (words), ``values["data"]`` or ``values["bitmap"]``."""
    payload = b""
    for name, width in lay.words(profile):
        payload += bytes(width) if name == "rsv" else _le(values[name], width)
    kind, _ = tail_field(lay)
    if kind == "words":
        for word in values["features"]:
            payload += _le(word, 4)
    elif kind in ("bytes", "echo"):
        payload += bytes(values["data"])
    elif kind == "bitmap":
        payload += bytes(values["bitmap"])
    size = header_size(profile) + len(payload)
    type_byte = (1 if lay.response else 0) | (2 if lay.bus else 0)
    header = bytes([type_byte, lay.msg_id]) + _le(dev_num, 2)
    if profile == "g2":
        header += _le(token, 2)
    return header + _le(size, 2) + payload


def decode(data: bytes, *, profile: str, max_size: int) -> tuple[Layout, dict[str, int], dict[str, Any]]:
    hs = header_size(profile)
    if len(data) < hs:
        raise Malformed("short header")
    type_byte, msg_id = data[0], data[1]
    dev_num = int.from_bytes(data[2:4], "little")
    token = int.from_bytes(data[4:6], "little") if profile == "g2" else 0
    msg_size = int.from_bytes(data[hs - 2:hs], "little")
    if not hs <= msg_size <= max_size or msg_size > len(data):
        raise Malformed("msg_size")
    bus, response = bool(type_byte & 2), bool(type_byte & 1)  # bits 2..7 reserved: ignored
    matches = [lay for lay in LAYOUTS if (lay.bus, lay.response, lay.msg_id) == (bus, response, msg_id)]
    if not matches:
        raise Malformed("unknown id")
    lay = matches[0]
    msg = data[:msg_size]
    if msg_size < fixed_size(lay, profile):
        raise Malformed("below the fixed payload")
    values: dict[str, Any] = {}
    pos = hs
    for name, width in lay.words(profile):
        if name != "rsv":
            values[name] = int.from_bytes(msg[pos:pos + width], "little")
        pos += width
    rest = msg[pos:]
    kind, count = tail_field(lay)
    if kind == "words":
        n = values[count]
        if 4 * n > len(rest):
            raise Malformed("feature words cut short")
        values["features"] = tuple(int.from_bytes(rest[4 * i:4 * i + 4], "little") for i in range(n))
    elif kind == "bytes":
        if values[count] > len(rest):
            raise Malformed("data cut short")
        values["data"] = bytes(rest[:values[count]])
    elif kind == "echo":  # optional: present only when msg_size covers all of it
        n = values[count]
        values["data"] = bytes(rest[:n]) if n and len(rest) >= n else b""
    elif kind == "bitmap":
        if values[count] % 8:
            raise Malformed("bitmap count not a multiple of 8")
        if values[count] // 8 > len(rest):
            raise Malformed("bitmap cut short")
        values["bitmap"] = bytes(rest[:values[count] // 8])
    if lay.name == "GET_DEVICES" and not lay.response and values["count"] % 8:
        raise Malformed("count not a multiple of 8")
    return lay, {"dev_num": dev_num, "token": token, "msg_size": msg_size}, values
