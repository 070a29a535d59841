"""virtio-blk (device id 2) backed by a host file (virtio spec "Block Device").

Each request is a chain: a 16-byte device-readable header ``{le32 type;
le32 reserved; le64 sector}``, data (readable for writes, writable for
reads), and a final device-writable status byte.  Every request is checked
against the file's size: an out-of-range sector gets VIRTIO_BLK_S_IOERR and
nothing outside the file is ever read or written.  Data moves with
preadv/pwritev straight between the file and the guest's buffers (the chain's
zero-copy segment views).

Served over any transport (AMP bus, vhost-user); ``num_queues`` > 1 gives
VIRTIO_BLK_F_MQ.  Requests complete synchronously, in order.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from typing import Any

from vmsgamp.devices._base import VirtioDevice, register_device

log = logging.getLogger("vmsgamp.devices.blk")

VIRTIO_ID_BLOCK = 2
SECTOR = 512

# feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# request types
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

# status
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
REQ_HEADER = struct.Struct("<IIQ")
DISCARD_SEG = struct.Struct("<QII")   # sector, num_sectors, flags (bit 0 unmap)
WZ_UNMAP = 1

# config space offsets (struct virtio_blk_config)
CFG_CAPACITY = 0
CFG_SIZE_MAX = 8
CFG_SEG_MAX = 12
CFG_BLK_SIZE = 20
CFG_NUM_QUEUES = 34
CFG_MAX_DISCARD_SECTORS = 36
CFG_MAX_DISCARD_SEG = 40
CFG_DISCARD_ALIGN = 44
CFG_MAX_WZ_SECTORS = 48
CFG_MAX_WZ_SEG = 52
CFG_WZ_MAY_UNMAP = 56
CONFIG_SIZE = 60                 # up to write_zeroes_may_unmap + padding

MAX_SEGMENT_BYTES = 1 << 20      # size_max: Linux splits larger segments
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR
ZERO_CHUNK = 1 << 20

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def _punch_hole_fn() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_fallocate = _punch_hole_fn()


class BlkDevice(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    name = "blk"
    queue_max_size = 256

    def __init__(self, path: str, *, readonly: bool = False, num_queues: int = 1,
                 serial: str | bytes | None = None, discard: bool = True, write_zeroes: bool = True,
                 queue_max_size: int = 256) -> None:
        if not 1 <= num_queues <= 64:
            raise ValueError(f"num_queues {num_queues} outside 1..64")
        self.path = path
        self.readonly = readonly
        self.num_queues = num_queues
        self.queue_max_size = queue_max_size
        self._fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            self.size = os.fstat(self._fd).st_size
            if self.size < SECTOR:
                raise ValueError(f"{path}: {self.size} bytes, smaller than one 512-byte sector")
        except BaseException:
            os.close(self._fd)
            raise
        self.capacity = self.size // SECTOR   # a partial last sector is not exposed
        if serial is None:
            st = os.stat(path)
            serial = f"vmsgamp-{st.st_dev:x}-{st.st_ino:x}"
        raw = serial.encode() if isinstance(serial, str) else bytes(serial)
        self.serial = raw[:VIRTIO_BLK_ID_BYTES]
        self.discard = discard and not readonly
        self.write_zeroes = write_zeroes and not readonly
        features = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE
                    | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_MQ)
        if readonly:
            features |= 1 << VIRTIO_BLK_F_RO
        if self.discard:
            features |= 1 << VIRTIO_BLK_F_DISCARD
        if self.write_zeroes:
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        self.features = features
        super().__init__()
        self._fill_config()
        self.stats = {"read_bytes": 0, "write_bytes": 0, "requests": 0, "errors": 0, "unsupported": 0}

    def config_size(self) -> int:
        return CONFIG_SIZE

    def _fill_config(self) -> None:
        c = self.config
        struct.pack_into("<Q", c, CFG_CAPACITY, self.capacity)
        struct.pack_into("<I", c, CFG_SIZE_MAX, MAX_SEGMENT_BYTES)
        # seg_max: data segments per request; the header and status take two.
        struct.pack_into("<I", c, CFG_SEG_MAX, max(1, self.queue_max_size - 2))
        struct.pack_into("<I", c, CFG_BLK_SIZE, SECTOR)
        struct.pack_into("<H", c, CFG_NUM_QUEUES, self.num_queues)
        if self.discard:
            struct.pack_into("<III", c, CFG_MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS, 1, 1)
        if self.write_zeroes:
            struct.pack_into("<II", c, CFG_MAX_WZ_SECTORS, MAX_DISCARD_SECTORS, 1)
            c[CFG_WZ_MAY_UNMAP] = 0

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(file=self.path, capacity_sectors=self.capacity, readonly=self.readonly,
                 num_queues=self.num_queues)
        return d

    # ---- requests ------------------------------------------------------------------
    def handle_queue(self, index: int, queue: Any) -> bool:
        used = False
        while True:
            chain = queue.pop()
            if chain is None:
                return used
            queue.add_used(chain.head, self._request(chain))
            used = True

    def _request(self, chain: Any) -> int:
        """Carry out one request; returns the used length (bytes written to
        the device-writable part, status byte included)."""
        self.stats["requests"] += 1
        wlen = chain.writable_len
        if chain.readable_len < REQ_HEADER.size or wlen < 1:
            # No header or no room for a status byte: nothing can be reported.
            log.warning("malformed request: %d readable, %d writable bytes", chain.readable_len, wlen)
            self.stats["errors"] += 1
            return 0
        readable = chain.readable
        header = bytes(_take(readable, REQ_HEADER.size))
        rtype, _, sector = REQ_HEADER.unpack(header)
        writable = chain.writable
        data_in = _take_views(writable, wlen - 1)   # everything but the status byte
        data_out = _take_views(readable, None, skip=REQ_HEADER.size)
        try:
            if rtype == VIRTIO_BLK_T_IN:
                status = self._read(sector, data_in, wlen - 1)
            elif rtype == VIRTIO_BLK_T_OUT:
                status = self._write(sector, data_out, chain.readable_len - REQ_HEADER.size)
            elif rtype == VIRTIO_BLK_T_FLUSH:
                status = self._flush()
            elif rtype == VIRTIO_BLK_T_GET_ID:
                ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:wlen - 1]
                chain.write(ident)
                status = VIRTIO_BLK_S_OK
            elif rtype == VIRTIO_BLK_T_DISCARD and self.discard:
                status = self._discard_like(data_out, chain.readable_len - REQ_HEADER.size, zero=False)
            elif rtype == VIRTIO_BLK_T_WRITE_ZEROES and self.write_zeroes:
                status = self._discard_like(data_out, chain.readable_len - REQ_HEADER.size, zero=True)
            else:
                status = VIRTIO_BLK_S_UNSUPP
                self.stats["unsupported"] += 1
        except OSError as e:
            log.warning("%s: I/O error: %s", self.path, e)
            status = VIRTIO_BLK_S_IOERR
        if status == VIRTIO_BLK_S_IOERR:
            self.stats["errors"] += 1
        chain.write(bytes([status]), wlen - 1)
        # The status byte is the last writable byte, so (as QEMU does) the
        # used length covers the whole writable part.
        return wlen

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        if nbytes % SECTOR:
            return False
        return sector <= self.capacity and nbytes // SECTOR <= self.capacity - sector

    def _read(self, sector: int, views: list[memoryview], n: int) -> int:
        if not self._range_ok(sector, n):
            log.debug("read of %d bytes at sector %d outside %d sectors", n, sector, self.capacity)
            return VIRTIO_BLK_S_IOERR
        off = sector * SECTOR
        done = 0
        while done < n:
            got = os.preadv(self._fd, _skip(views, done), off + done)
            if got <= 0:
                raise OSError(errno.EIO, "short read")
            done += got
        self.stats["read_bytes"] += n
        return VIRTIO_BLK_S_OK

    def _write(self, sector: int, views: list[memoryview], n: int) -> int:
        if self.readonly:
            return VIRTIO_BLK_S_IOERR
        if not self._range_ok(sector, n):
            log.debug("write of %d bytes at sector %d outside %d sectors", n, sector, self.capacity)
            return VIRTIO_BLK_S_IOERR
        off = sector * SECTOR
        done = 0
        while done < n:
            put = os.pwritev(self._fd, _skip(views, done), off + done)
            if put <= 0:
                raise OSError(errno.EIO, "short write")
            done += put
        self.stats["write_bytes"] += n
        return VIRTIO_BLK_S_OK

    def _flush(self) -> int:
        if not self.readonly:
            os.fdatasync(self._fd)
        return VIRTIO_BLK_S_OK

    def _discard_like(self, views: list[memoryview], nbytes: int, *, zero: bool) -> int:
        if self.readonly:
            return VIRTIO_BLK_S_IOERR
        # Judge by the driver's length before copying anything: the segment
        # list is peer-sized, and we serve one segment (max_discard_seg = 1).
        if nbytes == 0 or nbytes % DISCARD_SEG.size:
            return VIRTIO_BLK_S_IOERR
        if nbytes // DISCARD_SEG.size > 1:
            return VIRTIO_BLK_S_UNSUPP
        sector, count, flags = DISCARD_SEG.unpack(bytes(_take(views, DISCARD_SEG.size)))
        if flags & ~WZ_UNMAP or (not zero and flags):
            return VIRTIO_BLK_S_UNSUPP
        if count > MAX_DISCARD_SECTORS or not self._range_ok(sector, count * SECTOR):
            return VIRTIO_BLK_S_IOERR
        off, n = sector * SECTOR, count * SECTOR
        if zero:
            chunk = bytes(min(n, ZERO_CHUNK))
            done = 0
            while done < n:
                done += os.pwrite(self._fd, chunk[:n - done], off + done)
        elif _fallocate is not None:
            # Discard is a hint: a file system without hole punching is fine.
            _fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
        return VIRTIO_BLK_S_OK

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _take(views: list[memoryview], n: int) -> bytearray:
    out = bytearray()
    for v in views:
        if len(out) >= n:
            break
        out += v[:n - len(out)]
    return out


def _take_views(views: list[memoryview], n: int | None, *, skip: int = 0) -> list[memoryview]:
    """Views covering bytes [skip, skip + n) of the concatenation."""
    out: list[memoryview] = []
    left = n
    for v in views:
        if skip >= len(v):
            skip -= len(v)
            continue
        v = v[skip:]
        skip = 0
        if left is not None:
            if left <= 0:
                break
            v = v[:left]
            left -= len(v)
        if len(v):
            out.append(v)
    return out


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    return _take_views(views, None, skip=n) if n else views


def _flag(value: str | bool | None) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    return value.strip().lower() in ("1", "yes", "true", "on")


def _factory(file: str | None = None, readonly: str | None = None, queues: str | None = None,
             serial: str | None = None) -> BlkDevice:
    if not file:
        raise ValueError("blk needs file=PATH (a disk image; its size sets the capacity)")
    return BlkDevice(file, readonly=_flag(readonly), num_queues=int(queues or 1), serial=serial)


register_device("blk", _factory, {"file": "disk image file (required)",
                                  "readonly": "expose the disk read-only (VIRTIO_BLK_F_RO)",
                                  "queues": "number of request queues (VIRTIO_BLK_F_MQ)",
                                  "serial": "GET_ID string (20 bytes max)"}, path_key="file")
