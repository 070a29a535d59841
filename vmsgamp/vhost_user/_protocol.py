"""vhost-user message codec (QEMU ``docs/interop/vhost-user.rst``; what QEMU 7.2
really sends: this repository's ``docs/vhost-user.md``), no I/O.

A message is a 12-byte header ``{u32 request; u32 flags; u32 size}`` followed
by ``size`` payload bytes; file descriptors travel beside the header as
SCM_RIGHTS ancillary data.  :class:`Decoder` turns a byte stream (plus the fds
that arrived with it) into :class:`VhostMessage` objects; the ``parse_*``
functions turn payloads into frozen dataclasses; the ``encode_*`` functions
build replies (back-end) and requests (front-end, for tests).

Everything the peer sends is untrusted: a payload of the wrong size, a memory
table with too many regions or overlapping ranges raises
:class:`VhostProtocolError` (a RemoteProtocolError); the caller refuses that
message and keeps the connection when the framing is intact.
"""
from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Sequence

from vmsgamp.errors import RemoteProtocolError

__all__ = [
    "Request", "ProtocolFeature", "VhostMessage", "Decoder", "VhostProtocolError",
    "VringState", "VringAddr", "VringFd", "MemoryRegion", "ConfigSpace",
    "HEADER", "VERSION", "FLAG_REPLY", "FLAG_NEED_REPLY", "MAX_PAYLOAD", "MAX_REGIONS",
    "VHOST_USER_F_PROTOCOL_FEATURES", "VRING_NOFD", "VRING_IDX_MASK",
    "parse_u64", "parse_vring_state", "parse_vring_addr", "parse_vring_fd", "parse_memory_table",
    "parse_memory_region_single", "parse_config", "encode", "encode_reply", "encode_u64",
    "encode_vring_state", "encode_vring_addr", "encode_memory_table", "encode_config",
    "packed_base", "unpack_packed_base", "expected_fds",
]

HEADER = struct.Struct("<III")
VERSION = 0x1               # flags bits 0..1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_REGIONS = 8             # VHOST_MEMORY_BASELINE_NREGIONS
MAX_CONFIG_SIZE = 256
# The largest payload QEMU sends is the memory table (8 + 8 * 32); leave room
# for other devices' messages but refuse absurd sizes we would have to buffer.
MAX_PAYLOAD = 4096
MAX_FDS = 32

VHOST_USER_F_PROTOCOL_FEATURES = 30
VRING_IDX_MASK = 0xFF       # u64 of SET_VRING_KICK/CALL/ERR: bits 0..7 index
VRING_NOFD = 0x100          # bit 8: no fd attached (polling / no notifier)


class VhostProtocolError(RemoteProtocolError):
    """The front-end sent something malformed."""


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the protocol feature word."""
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


@dataclasses.dataclass(frozen=True)
class VhostMessage:
    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def name(self) -> str:
        return _name(self.request)

    def __repr__(self) -> str:
        return (f"VhostMessage({self.name}, flags={self.flags:#x}, size={len(self.payload)}, "
                f"fds={len(self.fds)})")


class Decoder:
    """Incremental decoder.  ``feed(data, fds)`` with bytes read from the
    socket and the fds that came with them; ``next_message()`` returns a
    complete message or None.  Fds belong to the message whose header they
    arrived with (QEMU sends header, payload and fds in one sendmsg).

    A header with a bad version or an oversized payload raises
    VhostProtocolError: the stream cannot be resynchronised, so the caller
    must drop the connection."""

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._fds: list[int] = []

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self._buf += data
        self._fds.extend(fds)

    def _header(self) -> tuple[int, int, int]:
        request, flags, size = HEADER.unpack_from(self._buf)
        if flags & 0x3 != VERSION:
            raise VhostProtocolError(f"{_name(request)}: header version {flags & 3}, expected {VERSION}")
        if size > self.max_payload:
            raise VhostProtocolError(f"{_name(request)}: payload of {size} bytes is larger than {self.max_payload}")
        return request, flags, size

    def needed(self) -> int:
        """Bytes still missing for the current message.  Reading exactly
        this much keeps each message's fds with it (a recvmsg never returns
        two senders' ancillary data at once)."""
        if len(self._buf) < HEADER.size:
            return HEADER.size - len(self._buf)
        return max(0, HEADER.size + self._header()[2] - len(self._buf))

    def next_message(self) -> VhostMessage | None:
        if len(self._buf) < HEADER.size:
            return None
        request, flags, size = self._header()
        if len(self._buf) < HEADER.size + size:
            return None
        payload = bytes(self._buf[HEADER.size:HEADER.size + size])
        del self._buf[:HEADER.size + size]
        fds, self._fds = tuple(self._fds), []
        return VhostMessage(request, flags, payload, fds)

    def take_fds(self) -> list[int]:
        """Fds not attached to any message yet (the caller closes them)."""
        fds, self._fds = self._fds, []
        return fds

    @property
    def pending(self) -> int:
        return len(self._buf)


# ---- payloads ------------------------------------------------------------------

_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_CONFIG_HDR = struct.Struct("<III")


@dataclasses.dataclass(frozen=True)
class VringState:
    index: int
    num: int


@dataclasses.dataclass(frozen=True)
class VringAddr:
    """Ring addresses in the front-end's user address space (unless
    ``flags`` says otherwise); note the wire order desc, used, avail."""
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclasses.dataclass(frozen=True)
class VringFd:
    """SET_VRING_KICK/CALL/ERR: ``fd`` is None when the NOFD bit is set."""
    index: int
    fd: int | None


@dataclasses.dataclass(frozen=True)
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclasses.dataclass(frozen=True)
class ConfigSpace:
    offset: int
    size: int
    flags: int
    data: bytes


def _need(msg: VhostMessage, size: int, exact: bool = True) -> None:
    n = len(msg.payload)
    if n != size if exact else n < size:
        raise VhostProtocolError(f"{msg.name}: payload of {n} bytes, expected {size}")


def parse_u64(msg: VhostMessage) -> int:
    _need(msg, 8)
    return _U64.unpack(msg.payload)[0]


def parse_vring_state(msg: VhostMessage) -> VringState:
    _need(msg, _STATE.size)
    return VringState(*_STATE.unpack(msg.payload))


def parse_vring_addr(msg: VhostMessage) -> VringAddr:
    _need(msg, _ADDR.size)
    return VringAddr(*_ADDR.unpack(msg.payload))


def parse_vring_fd(msg: VhostMessage) -> VringFd:
    """The fd must be attached unless NOFD is set; extra fds are an error."""
    v = parse_u64(msg)
    if v & ~(VRING_IDX_MASK | VRING_NOFD):
        raise VhostProtocolError(f"{msg.name}: unknown bits in {v:#x}")
    if v & VRING_NOFD:
        if msg.fds:
            raise VhostProtocolError(f"{msg.name}: NOFD set but {len(msg.fds)} fd(s) attached")
        return VringFd(v & VRING_IDX_MASK, None)
    if len(msg.fds) != 1:
        raise VhostProtocolError(f"{msg.name}: {len(msg.fds)} fds attached, expected 1")
    return VringFd(v & VRING_IDX_MASK, msg.fds[0])


def _check_regions(regions: Sequence[MemoryRegion], where: str) -> None:
    for r in regions:
        if r.memory_size == 0:
            raise VhostProtocolError(f"{where}: region at gpa {r.guest_phys_addr:#x} has size 0")
        for base in (r.guest_phys_addr, r.userspace_addr, r.mmap_offset):
            if base + r.memory_size > 1 << 64:
                raise VhostProtocolError(f"{where}: region at gpa {r.guest_phys_addr:#x} wraps around")
    for field in ("guest_phys_addr", "userspace_addr"):
        spans = sorted((getattr(r, field), getattr(r, field) + r.memory_size) for r in regions)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            if start < end:
                raise VhostProtocolError(f"{where}: regions overlap in {field}")


def parse_memory_table(msg: VhostMessage) -> list[MemoryRegion]:
    """SET_MEM_TABLE: u32 nregions, u32 padding, nregions x region; one fd
    per region."""
    _need(msg, 8, exact=False)
    nregions = struct.unpack_from("<I", msg.payload)[0]
    if not 1 <= nregions <= MAX_REGIONS:
        raise VhostProtocolError(f"SET_MEM_TABLE: {nregions} regions, expected 1..{MAX_REGIONS}")
    # QEMU sends the whole fixed-size array; accept exactly the used part or more
    _need(msg, 8 + nregions * _REGION.size, exact=False)
    if len(msg.fds) != nregions:
        raise VhostProtocolError(f"SET_MEM_TABLE: {nregions} regions but {len(msg.fds)} fds")
    regions = [MemoryRegion(*_REGION.unpack_from(msg.payload, 8 + i * _REGION.size)) for i in range(nregions)]
    _check_regions(regions, "SET_MEM_TABLE")
    return regions


def parse_memory_region_single(msg: VhostMessage) -> MemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, one region."""
    _need(msg, 8 + _REGION.size)
    r = MemoryRegion(*_REGION.unpack_from(msg.payload, 8))
    _check_regions([r], msg.name)
    return r


def parse_config(msg: VhostMessage) -> ConfigSpace:
    """GET_CONFIG / SET_CONFIG: u32 offset, u32 size, u32 flags, size bytes."""
    _need(msg, _CONFIG_HDR.size, exact=False)
    offset, size, flags = _CONFIG_HDR.unpack_from(msg.payload)
    if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
        raise VhostProtocolError(f"{msg.name}: offset {offset} size {size} outside {MAX_CONFIG_SIZE} bytes")
    _need(msg, _CONFIG_HDR.size + size)
    return ConfigSpace(offset, size, flags, msg.payload[_CONFIG_HDR.size:])


def expected_fds(request: int, payload: bytes) -> int:
    """How many fds a well-formed ``request`` carries (surplus fds are closed)."""
    if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        return 0 if len(payload) == 8 and _U64.unpack(payload)[0] & VRING_NOFD else 1
    if request == Request.SET_MEM_TABLE:
        return struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
    if request in (Request.ADD_MEM_REG, Request.SET_LOG_BASE, Request.SET_LOG_FD,
                   Request.SET_BACKEND_REQ_FD, Request.SET_INFLIGHT_FD):
        return 1
    return 0


# ---- encoding ------------------------------------------------------------------

def encode(request: int, payload: bytes = b"", *, flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    return encode(request, payload, flags=VERSION | FLAG_REPLY)


def encode_u64(value: int) -> bytes:
    return _U64.pack(value & 0xFFFFFFFFFFFFFFFF)


def encode_vring_state(index: int, num: int) -> bytes:
    return _STATE.pack(index, num & 0xFFFFFFFF)


def encode_vring_addr(index: int, desc: int, used: int, avail: int, log: int = 0, flags: int = 0) -> bytes:
    return _ADDR.pack(index, flags, desc, used, avail, log)


def encode_memory_table(regions: Sequence[MemoryRegion], *, pad_to: int = MAX_REGIONS) -> bytes:
    """As QEMU sends it: the fixed-size region array (unused slots zero)."""
    out = struct.pack("<II", len(regions), 0)
    out += b"".join(_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                    for r in regions)
    return out + bytes(_REGION.size * max(0, pad_to - len(regions)))


def encode_config(offset: int, data: bytes, flags: int = 0, size: int | None = None) -> bytes:
    return _CONFIG_HDR.pack(offset, len(data) if size is None else size, flags) + bytes(data)


# ---- packed-ring base encoding (GET/SET_VRING_BASE) -------------------------------

def packed_base(next_avail: int, avail_wrap: bool, next_used: int, used_wrap: bool) -> int:
    """``(last_avail_idx | avail_wrap << 15) | (used_idx | used_wrap << 15) << 16``."""
    return ((next_avail & 0x7FFF) | int(avail_wrap) << 15) | (((next_used & 0x7FFF) | int(used_wrap) << 15) << 16)


def unpack_packed_base(num: int) -> tuple[int, bool, int, bool]:
    """(next_avail, avail_wrap, next_used, used_wrap)."""
    lo = num & 0xFFFF
    hi = (num >> 16) & 0xFFFF
    return lo & 0x7FFF, bool(lo >> 15), hi & 0x7FFF, bool(hi >> 15)
