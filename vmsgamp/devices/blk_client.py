"""Driver side of virtio-blk: sector reads and writes on a device on the bus.

::

    disk = BlkClient.open(amp_driver, dev_num)
    disk.write(8, b"x" * 512)         # sector 8
    disk.read(8, 1)                   # -> 512 bytes
    disk.flush(); disk.get_id()

One request at a time on queue 0, laid out as Linux's virtio_blk does: the
16-byte header (device-readable), the data, the status byte (device-
writable).  A request the device fails raises ``BlkError`` with its status.
"""
from __future__ import annotations

import errno
import struct
from typing import Any

from vmsgamp.devices.blk import (
    CFG_CAPACITY, REQ_HEADER, SECTOR, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_ID_BLOCK,
)
from vmsgamp.errors import VmsgampError

__all__ = ["BlkClient", "BlkError"]

STATUS_UNSET = 0xFF


class BlkError(VmsgampError, OSError):
    """The device answered a request with a status other than OK."""

    def __init__(self, what: str, status: int):
        name = {1: "IOERR", 2: "UNSUPP", STATUS_UNSET: "no status"}.get(status, str(status))
        OSError.__init__(self, errno.EOPNOTSUPP if status == VIRTIO_BLK_S_UNSUPP else errno.EIO,
                         f"virtio-blk {what} failed: {name}")
        self.status = status


class BlkClient:
    """virtio-blk over a probed ``DriverDevice`` (``dev``)."""

    def __init__(self, dev: Any, *, max_bytes: int = 64 << 10, timeout: float | None = None) -> None:
        self.dev = dev
        self.timeout = dev.drv.timeout if timeout is None else timeout
        self.capacity = struct.unpack("<Q", dev.read_config(CFG_CAPACITY, 8))[0]   # in sectors
        self.readonly = bool(dev.features >> VIRTIO_BLK_F_RO & 1)
        self.max_bytes = max_bytes
        self._hdr_addr, self._hdr = dev.alloc(REQ_HEADER.size)
        self._data_addr, self._data = dev.alloc(max_bytes)
        self._st_addr, self._st = dev.alloc(1)
        self._closed = False

    @classmethod
    def open(cls, driver: Any, dev_num: int, *, packed: bool | None = None, **kw: Any) -> "BlkClient":
        """Probe ``dev_num`` on ``driver`` (an AmpDriver) and wrap it."""
        info = driver.info(dev_num)
        if info.device_id != VIRTIO_ID_BLOCK:
            raise VmsgampError(f"device {dev_num} is {info.name}, not blk")
        wanted = info.features & (1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_RO)
        return cls(driver.open(dev_num, features=wanted, packed=packed), **kw)

    def _request(self, what: str, kind: int, sector: int, out: bytes = b"", read: int = 0) -> bytes:
        if self._closed:
            raise ValueError("request on a closed BlkClient")
        if len(out) > self.max_bytes or read > self.max_bytes:
            raise ValueError(f"at most {self.max_bytes} bytes per request")
        self._hdr[:] = REQ_HEADER.pack(kind, 0, sector)
        self._st[0] = STATUS_UNSET
        readable = [(self._hdr_addr, REQ_HEADER.size)]
        writable = [(self._st_addr, 1)]
        if out:
            self._data[:len(out)] = out
            readable.append((self._data_addr, len(out)))
        if read:
            writable.insert(0, (self._data_addr, read))
        q = self.dev.queues[0]
        if not q.add(readable, writable, token=what):
            raise VmsgampError("virtio-blk: queue 0 is full")
        self.dev.notify(0)
        if not self.dev.wait_used(0, self.timeout):
            raise TimeoutError(f"virtio-blk {what}: no answer within {self.timeout} s")
        q.get_used()
        if self._st[0] != VIRTIO_BLK_S_OK:
            raise BlkError(what, self._st[0])
        return bytes(self._data[:read])

    def read(self, sector: int, count: int = 1) -> bytes:
        """``count`` sectors from ``sector``."""
        return self._request(f"read of {count} sector(s) at {sector}", VIRTIO_BLK_T_IN, sector,
                             read=count * SECTOR)

    def write(self, sector: int, data: bytes) -> None:
        """``data`` (whole sectors) at ``sector``."""
        if not data or len(data) % SECTOR:
            raise ValueError(f"write whole sectors of {SECTOR} bytes, not {len(data)} bytes")
        self._request(f"write of {len(data) // SECTOR} sector(s) at {sector}", VIRTIO_BLK_T_OUT,
                      sector, out=bytes(data))

    def flush(self) -> None:
        """Make every completed write durable (no-op without VIRTIO_BLK_F_FLUSH)."""
        if self.dev.features >> VIRTIO_BLK_F_FLUSH & 1:
            self._request("flush", VIRTIO_BLK_T_FLUSH, 0)

    def get_id(self) -> str:
        """The device's serial (GET_ID), without trailing NULs."""
        raw = self._request("get-id", VIRTIO_BLK_T_GET_ID, 0, read=VIRTIO_BLK_ID_BYTES)
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    def close(self) -> None:
        """Drop the buffer views (idempotent); the device keeps running."""
        if self._closed:
            return
        self._closed = True
        for view in (self._hdr, self._data, self._st):
            view.release()

    def __enter__(self) -> "BlkClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
