"""pcapng for virtio-msg captures: a writer and a reader (stdlib only).

The file format is fixed so that other tools can read it:

* one Section Header Block, then one Interface Description Block per bus
  (link type LINKTYPE_USER0 = 147, ``if_name`` = the region URI,
  ``if_description`` = ``virtio-msg g2`` or ``virtio-msg g1``, ``if_tsresol``
  = 9, i.e. nanoseconds);
* one Enhanced Packet Block per message; the packet data is exactly the
  message (``msg_size`` bytes; for a slot whose ``msg_size`` is impossible,
  the bytes that were read, at most one slot);
* EPB flags carry the direction: outbound = driver -> device, inbound =
  device -> driver, whoever captured it.

The reader also takes classic pcap files (no direction there) so a capture
converted by ``editcap`` still decodes.  It treats the file as untrusted: a
truncated or inconsistent file raises :class:`CaptureFormatError` naming the
offset, never anything else.
"""
from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

LINKTYPE_USER0 = 147

# EPB flags bits 0-1 (pcapng spec, epb_flags).
DIR_UNKNOWN = 0
DIR_INBOUND = 1    # device -> driver
DIR_OUTBOUND = 2   # driver -> device
DIRECTION_NAMES = {DIR_UNKNOWN: "unknown", DIR_INBOUND: "device_to_driver",
                   DIR_OUTBOUND: "driver_to_device"}

DESCRIPTIONS = {"g2": "virtio-msg g2", "g1": "virtio-msg g1"}
MAX_PACKET = 64 * 1024   # sanity bound when reading; messages are at most one slot

_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_SPB = 0x00000003
_EPB = 0x00000006
_BOM = 0x1A2B3C4D

_OPT_END = 0
_OPT_COMMENT = 1
_IF_NAME = 2
_IF_DESCRIPTION = 3
_IF_TSRESOL = 9
_EPB_FLAGS = 2
_SHB_USERAPPL = 4

_U32 = struct.Struct("<I")
_EPB_HEAD = struct.Struct("<IIIIIII")   # type, total length, interface, ts high, ts low, caplen, origlen


class CaptureFormatError(ValueError):
    """The file is not a capture we can read (truncated, inconsistent, unknown)."""


@dataclass(frozen=True)
class Interface:
    """One Interface Description Block: one bus as one endpoint (or a passive
    observer) saw it."""

    name: str
    description: str = ""
    linktype: int = LINKTYPE_USER0
    comment: str = ""
    tsresol: int = 9          # the if_tsresol byte as written
    snaplen: int = 0

    @property
    def profile(self) -> str:
        """'g1' when the description says so, else 'g2' (the default header)."""
        return "g1" if self.description.strip().lower() == DESCRIPTIONS["g1"] else "g2"


@dataclass(frozen=True)
class Packet:
    interface: int
    time_ns: int
    data: bytes
    direction: int = DIR_UNKNOWN
    orig_len: int = 0


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) & 3)


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + _U32.pack(total)


def section_header(application: str = "vmsgamp") -> bytes:
    opts = _option(_SHB_USERAPPL, application.encode()) + _option(_OPT_END, b"")
    return _block(_SHB, struct.pack("<IHHq", _BOM, 1, 0, -1) + opts)


def interface_block(iface: Interface) -> bytes:
    opts = _option(_IF_NAME, iface.name.encode())
    if iface.description:
        opts += _option(_IF_DESCRIPTION, iface.description.encode())
    if iface.comment:
        opts += _option(_OPT_COMMENT, iface.comment.encode())
    opts += _option(_IF_TSRESOL, bytes([iface.tsresol])) + _option(_OPT_END, b"")
    return _block(_IDB, struct.pack("<HHI", iface.linktype, 0, iface.snaplen) + opts)


# The bytes after an EPB's packet data depend only on the direction and the
# data length: padding, the epb_flags option, opt_endofopt, the trailing
# length.  Cached by (length << 2 | direction).
_TAILS: dict[int, bytes] = {}
_CACHE_MAX = 4096   # distinct (length, direction) pairs kept; a message is at most one slot


def _tail(direction: int, n: int) -> bytes:
    key = n << 2 | direction
    tail = _TAILS.get(key)
    if tail is None:
        total = 44 + n + (-n & 3)
        tail = (bytes(-n & 3) + struct.pack("<HHI", _EPB_FLAGS, 4, direction) + bytes(4)
                + _U32.pack(total))
        if len(_TAILS) < _CACHE_MAX:
            _TAILS[key] = tail
    return tail


# A whole EPB in one struct call (head, data, tail): what the writer thread
# does per message while it holds the GIL, so it is kept to one call.
# Cached by (length << 2 | direction): (pack, total length, tail).
_WHOLE: dict[int, tuple[Callable[..., bytes], int, bytes]] = {}


def _whole(direction: int, n: int) -> tuple[Callable[..., bytes], int, bytes]:
    key = n << 2 | direction
    entry = _WHOLE.get(key)
    if entry is None:
        tail = _tail(direction, n)
        entry = (struct.Struct(f"<7I{n}s{len(tail)}s").pack, 44 + n + (-n & 3), tail)
        if len(_WHOLE) < _CACHE_MAX:
            _WHOLE[key] = entry
    return entry


def encode_packets(items: Iterable[tuple[int, int, bytes]], out: bytearray) -> int:
    """Append one EPB per ``(time_ns, key, data)`` to ``out``; ``key`` is
    ``interface << 2 | direction`` and ``time_ns`` below 2**64.  Returns how
    many were encoded."""
    whole = _WHOLE
    count = 0
    for ts, key, data in items:
        n = len(data)
        pack, total, tail = whole.get(n << 2 | (key & 3)) or _whole(key & 3, n)
        out += pack(_EPB, total, key >> 2, ts >> 32, ts & 0xFFFFFFFF, n, n, data, tail)
        count += 1
    return count


class PcapngWriter:
    """Write a capture: ``add_interface()`` then ``write_packet()``s (or
    ``write_encoded()`` of :func:`encode_packets` output).  Owns the file when
    given a path; ``close()`` is idempotent."""

    def __init__(self, file: str | os.PathLike[str] | BinaryIO, *, application: str = "vmsgamp"):
        if isinstance(file, (str, os.PathLike)):
            self._file: BinaryIO = open(file, "wb")
            self._own = True
            self.path: str | None = os.fspath(file)
        else:
            self._file = file
            self._own = False
            self.path = getattr(file, "name", None) if isinstance(getattr(file, "name", None), str) else None
        self.interfaces: list[Interface] = []
        self.closed = False
        self._file.write(section_header(application))

    def add_interface(self, iface: Interface) -> int:
        self._file.write(interface_block(iface))
        self.interfaces.append(iface)
        return len(self.interfaces) - 1

    def write_packet(self, interface: int, time_ns: int, data: bytes, direction: int = DIR_UNKNOWN) -> None:
        if not 0 <= interface < len(self.interfaces):
            raise ValueError(f"interface {interface} was not added")
        out = bytearray()
        encode_packets([(time_ns, interface << 2 | (direction & 3), bytes(data))], out)
        self._file.write(out)

    def write_encoded(self, blob: bytes | bytearray) -> None:
        self._file.write(blob)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._file.flush()
        finally:
            if self._own:
                self._file.close()

    def __enter__(self) -> PcapngWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- reading --------------------------------------------------------------------

def _parse_options(body: bytes, pos: int, end: int, bo: str, where: int) -> list[tuple[int, bytes]]:
    opts = []
    while pos + 4 <= end:
        code, length = struct.unpack_from(bo + "HH", body, pos)
        pos += 4
        if code == _OPT_END:
            break
        if pos + length > end:
            raise CaptureFormatError(f"option {code} at offset {where + pos} runs past its block")
        opts.append((code, body[pos:pos + length]))
        pos += length + (-length & 3)
    return opts


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def _tsresol_ns(tsresol: int) -> tuple[int, int]:
    """(numerator, denominator) turning timestamp units into nanoseconds."""
    if tsresol & 0x80:
        exp = tsresol & 0x7F
        if exp > 64:
            raise CaptureFormatError(f"if_tsresol 2^-{exp} is not supported")
        return 10**9, 1 << exp
    if tsresol > 18:
        raise CaptureFormatError(f"if_tsresol 10^-{tsresol} is not supported")
    return (10 ** (9 - tsresol), 1) if tsresol <= 9 else (1, 10 ** (tsresol - 9))


class Capture:
    """A capture read back: ``interfaces`` (grows as IDBs are met) and the
    packets, by iterating.  Reads pcapng (either byte order) and classic pcap."""

    def __init__(self, file: str | os.PathLike[str] | BinaryIO):
        if isinstance(file, (str, os.PathLike)):
            self._file: BinaryIO = open(file, "rb")
            self._own = True
        else:
            self._file = file
            self._own = False
        self.interfaces: list[Interface] = []
        self.application = ""
        self._scale: list[tuple[int, int]] = []
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._own:
                self._file.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Packet]:
        head = self._file.read(4)
        if not head:
            raise CaptureFormatError("empty file: not a capture")
        if len(head) < 4:
            raise CaptureFormatError("file too short for a capture header")
        magic_le = struct.unpack("<I", head)[0]
        if magic_le == _SHB:
            yield from self._pcapng(head)
        elif magic_le in (0xA1B2C3D4, 0xA1B23C4D, 0xD4C3B2A1, 0x4D3CB2A1):
            yield from self._pcap(head)
        else:
            raise CaptureFormatError(f"not a pcapng or pcap file (starts with {head.hex()})")

    # classic pcap: a global header, then (ts_sec, ts_frac, caplen, origlen) + data
    def _pcap(self, head: bytes) -> Iterator[Packet]:
        rest = self._file.read(20)
        if len(rest) < 20:
            raise CaptureFormatError("truncated pcap file header")
        hdr = head + rest
        le = struct.unpack("<I", head)[0] in (0xA1B2C3D4, 0xA1B23C4D)
        bo = "<" if le else ">"
        magic, _maj, _min, _tz, _sig, snaplen, linktype = struct.unpack(bo + "IHHiIII", hdr)
        nano = magic == 0xA1B23C4D
        self.interfaces.append(Interface(name="", linktype=linktype & 0xFFFF, tsresol=9 if nano else 6,
                                         snaplen=snaplen))
        offset = 24
        while True:
            rec = self._file.read(16)
            if not rec:
                return
            if len(rec) < 16:
                raise CaptureFormatError(f"truncated packet record at offset {offset}")
            sec, frac, caplen, orig = struct.unpack(bo + "IIII", rec)
            if caplen > MAX_PACKET:
                raise CaptureFormatError(f"packet at offset {offset} claims {caplen} bytes")
            data = self._file.read(caplen)
            if len(data) < caplen:
                raise CaptureFormatError(f"truncated packet at offset {offset}")
            yield Packet(0, sec * 10**9 + (frac if nano else frac * 1000), data, DIR_UNKNOWN, orig)
            offset += 16 + caplen

    def _pcapng(self, head: bytes) -> Iterator[Packet]:
        bo = "<"
        offset = 0
        pending = head
        while True:
            hdr = pending + self._file.read(8 - len(pending))
            pending = b""
            if not hdr:
                return
            if len(hdr) < 8:
                raise CaptureFormatError(f"truncated block header at offset {offset}")
            if hdr[:4] == b"\x0a\x0d\x0d\x0a":
                # A section header: its byte-order magic says how to read everything
                # up to the next one (the block type reads the same either way).
                bom = self._file.read(4)
                if bom == b"\x4d\x3c\x2b\x1a":
                    bo = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    bo = ">"
                else:
                    raise CaptureFormatError(f"bad byte-order magic {bom.hex()} at offset {offset}")
                btype, total = _SHB, struct.unpack(bo + "I", hdr[4:8])[0]
                prefix, need = bom, total - 12
                self.interfaces = []     # a new section starts a new set of interfaces
                self._scale = []
            else:
                btype, total = struct.unpack(bo + "II", hdr)
                prefix, need = b"", total - 8
            if total < 12 + len(prefix) or total % 4 or total > MAX_PACKET + 4096:
                raise CaptureFormatError(f"block at offset {offset} has an impossible length {total}")
            rest = self._file.read(need)
            if len(rest) < need:
                raise CaptureFormatError(f"truncated block at offset {offset} (a capture still "
                                         f"being written, or a damaged file)")
            if struct.unpack(bo + "I", rest[-4:])[0] != total:
                raise CaptureFormatError(f"block at offset {offset}: trailing length does not match")
            pkt = self._block(btype, prefix + rest[:-4], bo, offset)
            if pkt is not None:
                yield pkt
            offset += total

    def _block(self, btype: int, body: bytes, bo: str, where: int) -> Packet | None:
        if btype == _SHB:
            if len(body) < 16:
                raise CaptureFormatError(f"section header at offset {where} is too short")
            major = struct.unpack_from(bo + "H", body, 4)[0]
            if major != 1:
                raise CaptureFormatError(f"pcapng version {major} is not supported")
            for code, value in _parse_options(body, 16, len(body), bo, where):
                if code == _SHB_USERAPPL:
                    self.application = _text(value)
            return None
        if btype == _IDB:
            if len(body) < 8:
                raise CaptureFormatError(f"interface block at offset {where} is too short")
            linktype, _res, snaplen = struct.unpack_from(bo + "HHI", body, 0)
            name = desc = comment = ""
            tsresol = 6
            for code, value in _parse_options(body, 8, len(body), bo, where):
                if code == _IF_NAME:
                    name = _text(value)
                elif code == _IF_DESCRIPTION:
                    desc = _text(value)
                elif code == _OPT_COMMENT:
                    comment = _text(value)
                elif code == _IF_TSRESOL and value:
                    tsresol = value[0]
            self.interfaces.append(Interface(name, desc, linktype, comment, tsresol, snaplen))
            self._scale.append(_tsresol_ns(tsresol))
            return None
        if btype == _EPB:
            if len(body) < 20:
                raise CaptureFormatError(f"packet block at offset {where} is too short")
            iface, hi, lo, caplen, orig = struct.unpack_from(bo + "IIIII", body, 0)
            if iface >= len(self.interfaces):
                raise CaptureFormatError(f"packet at offset {where} names interface {iface}, "
                                         f"which no interface block described")
            if 20 + caplen > len(body):
                raise CaptureFormatError(f"packet at offset {where}: {caplen} bytes do not fit its block")
            data = body[20:20 + caplen]
            direction = DIR_UNKNOWN
            for code, value in _parse_options(body, 20 + caplen + (-caplen & 3), len(body), bo, where):
                if code == _EPB_FLAGS and len(value) == 4:
                    direction = struct.unpack(bo + "I", value)[0] & 3
            num, den = self._scale[iface]
            return Packet(iface, ((hi << 32) | lo) * num // den, data, direction, orig)
        if btype == _SPB:
            if not self.interfaces or len(body) < 4:
                raise CaptureFormatError(f"simple packet block at offset {where} without an interface")
            orig = struct.unpack_from(bo + "I", body, 0)[0]
            return Packet(0, 0, body[4:4 + min(orig, len(body) - 4)], DIR_UNKNOWN, orig)
        return None   # other block types (statistics, name resolution, custom): skipped


def read_capture(file: str | os.PathLike[str] | BinaryIO | bytes) -> tuple[list[Interface], list[Packet]]:
    """Read a whole capture: (interfaces, packets)."""
    if isinstance(file, (bytes, bytearray)):
        file = io.BytesIO(bytes(file))
    with Capture(file) as cap:
        packets = list(cap)
        return cap.interfaces, packets
