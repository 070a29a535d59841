"""See the bus: message capture to pcapng, a passive observer, a Wireshark dissector.

* :class:`Tracer` records every message an :class:`~vmsgamp.bus.AmpBus` sends
  and receives (``AmpBus(..., tracer=t)`` or ``bus.attach_tracer(t)``).
* :class:`Observer` follows a live bus read-only from a third process.
* :func:`read_capture` / :class:`PcapngWriter`: the file format (pcapng, one
  interface per bus, LINKTYPE_USER0, ``if_description`` ``virtio-msg g2``/``g1``,
  nanosecond timestamps, EPB direction outbound = driver -> device).
* :func:`dissector_path`: the Lua dissector for Wireshark/tshark
  (``wireshark -X lua_script:$(vmsgamp trace --dissector-path) capture.pcapng``).
"""
from __future__ import annotations

from pathlib import Path

from vmsgamp.trace._format import line, message_entry, record, summary
from vmsgamp.trace._observer import Missed, Notice, Observer, Seen
from vmsgamp.trace._pcapng import (
    DESCRIPTIONS, DIR_INBOUND, DIR_OUTBOUND, DIR_UNKNOWN, DIRECTION_NAMES, LINKTYPE_USER0,
    Capture, CaptureFormatError, Interface, Packet, PcapngWriter, read_capture,
)
from vmsgamp.trace._tracer import BusTap, Tracer, interface_name


def dissector_path() -> str:
    """Absolute path of the Lua dissector shipped in the package."""
    return str((Path(__file__).parent / "vmsg.lua").resolve())


__all__ = [
    "BusTap", "Capture", "CaptureFormatError", "DESCRIPTIONS", "DIRECTION_NAMES", "DIR_INBOUND",
    "DIR_OUTBOUND", "DIR_UNKNOWN", "Interface", "LINKTYPE_USER0", "Missed", "Notice", "Observer",
    "Packet", "PcapngWriter", "Seen", "Tracer", "dissector_path", "interface_name", "line",
    "message_entry", "read_capture", "record", "summary",
]
