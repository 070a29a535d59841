"""One message as a tcpdump-style line or a JSON record.

Shared by ``vmsgamp trace`` and ``vmsgamp decode --pcap`` (same output for the
same messages); the Wireshark dissector's Info column is :func:`summary`,
written again in Lua (the dissector tests hold the two to each other).
"""
from __future__ import annotations

import time
from typing import Any

from vmsgamp.protocol import SLOT_SIZE, RemoteProtocolError, decode, describe
from vmsgamp.trace._pcapng import DIR_INBOUND, DIR_OUTBOUND, DIRECTION_NAMES

_HEX_SUFFIXES = ("addr", "address", "vendor_id", "features")
ARROWS = {DIR_OUTBOUND: "drv>dev", DIR_INBOUND: "dev>drv"}


def message_entry(data: bytes, profile: str = "g2", max_size: int = SLOT_SIZE) -> dict[str, Any]:
    """``describe()`` of the message, or ``{"hex", "error"}`` when it is
    malformed: exactly what ``vmsgamp decode --json`` prints for it."""
    try:
        return describe(decode(data, profile=profile, max_size=max_size), profile)
    except RemoteProtocolError as e:
        return {"hex": bytes(data).hex(), "error": str(e)}


def _value(key: str, value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_value(key, v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"0x{value:x}" if key.endswith(_HEX_SUFFIXES) or value > 0xFFFF else str(value)
    if isinstance(value, str):
        return value or "''"
    return str(value)


def what(entry: dict[str, Any]) -> str:
    if entry["response"]:
        return "response"
    return "event" if entry["msg_id"] & 0x40 else "request"


def summary(entry: dict[str, Any], profile: str = "g2") -> str:
    """``GET_DEVICE_INFO request dev 0 tok 5``, then the payload as key=value
    (integers in hex when they are addresses, feature words or above 0xffff;
    byte strings in hex).  G1 has no token.  Malformed: ``malformed: <why>``."""
    if "error" in entry:
        return f"malformed: {entry['error']}"
    parts = [entry["name"], what(entry), "dev", str(entry["dev_num"])]
    if profile == "g2":
        parts += ["tok", str(entry["token"])]
    parts += [f"{k}={_value(k, v)}" for k, v in entry["payload"].items()]
    return " ".join(parts)


def clock(time_ns: int) -> str:
    """Local wall-clock time with nanoseconds, as tcpdump prints microseconds."""
    sec, ns = divmod(time_ns, 10**9)
    return time.strftime("%H:%M:%S", time.localtime(sec)) + f".{ns:09d}"


def line(time_ns: int, direction: int, entry: dict[str, Any], profile: str = "g2",
         interface: str | None = None) -> str:
    where = f"{interface} " if interface else ""
    return f"{clock(time_ns)} {where}{ARROWS.get(direction, '?>?')} {summary(entry, profile)}"


def record(time_ns: int, direction: int, data: bytes, entry: dict[str, Any], profile: str,
           interface: str) -> dict[str, Any]:
    """A JSON Lines record: the decode --json entry plus where and when."""
    return {"record": "message", "time_ns": time_ns, "direction": DIRECTION_NAMES.get(direction, "unknown"),
            "interface": interface, "profile": profile, "hex": bytes(data).hex(), **entry}
