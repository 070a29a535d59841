"""Driver side of virtio-blk (device id 2) over a probed device.

::

    blk = BlkClient.open(amp_driver, dev_num)
    data = blk.read(0, 4096)          # sector 0, 4 KiB
    blk.write(8, b"x" * 512)
    blk.flush()

Each request is laid out as Linux's virtio_blk does: a 16-byte device-readable
header ``{le32 type; le32 reserved; le64 sector}``, the data (device-writable
for reads, readable for writes) and a device-writable status byte.

Pipelines (benchmarks, anything that keeps many requests queued) use
``submit_read``/``submit_write``/``submit_flush`` and ``reap``: up to
``max_in_flight`` requests, each in its own preallocated slot (header, data
buffer of ``buffer_size`` bytes, status byte) in shared memory, recycled
when reaped; nothing is allocated per request.  A reaped read's ``data`` is
a view of its slot's buffer: valid until the next submit reuses the slot.

The synchronous calls raise ``BlkError`` when the device reports an error
status (or none); requests outside the disk are refused locally with
ValueError before anything is sent.
"""
from __future__ import annotations

import errno
import struct
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

from vmsgamp.devices.blk import (
    CFG_BLK_SIZE, CFG_CAPACITY, CFG_NUM_QUEUES, REQ_HEADER, SECTOR, VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_ID_BLOCK,
)
from vmsgamp.errors import VmsgampError

__all__ = ["BlkClient", "BlkCompletion", "BlkError", "STATUS_UNSET"]

STATUS_UNSET = 0xFF  # put in the status byte first, so "the device wrote none" is visible
_STATUS_NAMES = {VIRTIO_BLK_S_OK: "OK", VIRTIO_BLK_S_IOERR: "IOERR", VIRTIO_BLK_S_UNSUPP: "UNSUPP",
                 STATUS_UNSET: "no status"}
_ERRNO = {VIRTIO_BLK_S_IOERR: errno.EIO, VIRTIO_BLK_S_UNSUPP: errno.EOPNOTSUPP}

# Feature bits this client understands (RO must be accepted when offered).
_WANTED = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_RO
           | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH)


class BlkError(VmsgampError, OSError):
    """The device answered a request with an error status."""

    def __init__(self, what: str, status: int):
        OSError.__init__(self, _ERRNO.get(status, errno.EIO),
                         f"virtio-blk {what}: {_STATUS_NAMES.get(status, f'status {status}')}")
        self.status = status


class BlkCompletion(NamedTuple):
    """One reaped request.  ``data``: for reads and GET_ID, a view of the
    slot's buffer holding what the device wrote (valid until the slot is
    reused); empty otherwise.  ``used_len``: the device's used length."""

    tag: Any
    kind: int  # VIRTIO_BLK_T_*
    sector: int
    status: int
    used_len: int
    data: memoryview

    @property
    def ok(self) -> bool:
        return self.status == VIRTIO_BLK_S_OK


class BlkClient:
    """Requests to a virtio-blk device through one of its queues.

    ``dev`` is a DriverDevice (``AmpDriver.open``); ``open`` probes and wraps.
    Not thread-safe: one thread submits and reaps."""

    def __init__(self, dev: Any, *, queue: int = 0, max_in_flight: int = 32, buffer_size: int = 64 * 1024,
                 timeout: float = 5.0) -> None:
        info = dev.info
        if info is None or info.device_id != VIRTIO_ID_BLOCK:
            raise VmsgampError(f"device {dev.dev_num} is not a block device")
        if not 0 <= queue < len(dev.queues):
            raise ValueError(f"queue {queue}: the device has {len(dev.queues)} queues")
        if max_in_flight < 1 or buffer_size < SECTOR or buffer_size % SECTOR:
            raise ValueError("max_in_flight must be >= 1 and buffer_size a positive multiple of 512")
        self.dev = dev
        self.queue_index = queue
        self.queue = dev.queues[queue]
        self.timeout = timeout
        self.features = dev.features
        self.capacity = struct.unpack("<Q", dev.read_config(CFG_CAPACITY, 8))[0]  # 512-byte sectors
        self.readonly = bool(self.features >> VIRTIO_BLK_F_RO & 1)
        self.blk_size = (struct.unpack("<I", dev.read_config(CFG_BLK_SIZE, 4))[0]
                         if self.features >> VIRTIO_BLK_F_BLK_SIZE & 1 else SECTOR)
        self.num_queues = (struct.unpack("<H", dev.read_config(CFG_NUM_QUEUES, 2))[0]
                           if self.features >> VIRTIO_BLK_F_MQ & 1 else 1)
        # A split ring without indirect descriptors needs three per request.
        self.max_in_flight = min(max_in_flight, max(1, self.queue.size // 3))
        self.buffer_size = buffer_size
        n = self.max_in_flight
        self._hdr_addr, self._hdr = dev.alloc(REQ_HEADER.size * n, 16)
        self._st_addr, self._st = dev.alloc(n, 16)
        self._buf_addr, self._buf = dev.alloc(buffer_size * n, 4096)
        self._free = list(range(n - 1, -1, -1))
        self._req: list[tuple[Any, int, int, int] | None] = [None] * n  # (tag, kind, sector, nbytes)
        self._stale = False

    @classmethod
    def open(cls, driver: Any, dev_num: int, *, packed: bool | None = None, queues: int = 1,
             queue_size: int | None = None, **kw: Any) -> "BlkClient":
        """Probe ``dev_num`` on ``driver`` (an AmpDriver) and wrap queue 0.
        ``queues`` > 1 negotiates VIRTIO_BLK_F_MQ and sets up that many."""
        info = driver.info(dev_num)
        if info.device_id != VIRTIO_ID_BLOCK:
            raise VmsgampError(f"device {dev_num} is {info.name}, not block")
        wanted = _WANTED | ((1 << VIRTIO_BLK_F_MQ) if queues > 1 else 0)
        sizes = None if queue_size is None else [queue_size] * max(1, queues)
        dev = driver.open(dev_num, features=info.features & wanted, packed=packed, queue_sizes=sizes)
        try:
            return cls(dev, **kw)
        except BaseException:
            dev.close()
            raise

    # ---- pipelined requests ----------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self.max_in_flight - len(self._free)

    @property
    def size(self) -> int:
        """Disk size in bytes."""
        return self.capacity * SECTOR

    def _check_range(self, sector: int, nbytes: int) -> None:
        if nbytes <= 0 or nbytes % SECTOR or nbytes > self.buffer_size:
            raise ValueError(f"{nbytes} bytes: requests are positive multiples of 512 up to "
                             f"buffer_size {self.buffer_size}")
        if sector < 0 or sector + nbytes // SECTOR > self.capacity:
            raise ValueError(f"sectors {sector}+{nbytes // SECTOR} outside the disk ({self.capacity} sectors)")

    def _slot(self) -> int:
        if self._stale:
            raise VmsgampError("blk client is unusable after a timed-out request; reopen the device")
        if not self._free:
            raise VmsgampError(f"{self.max_in_flight} requests already in flight: reap() first")
        return self._free.pop()

    def _post(self, slot: int, kind: int, sector: int, nbytes: int, tag: Any, kick: bool) -> int:
        REQ_HEADER.pack_into(self._hdr, REQ_HEADER.size * slot, kind, 0, sector)
        self._st[slot] = STATUS_UNSET
        hdr = (self._hdr_addr + REQ_HEADER.size * slot, REQ_HEADER.size)
        status = (self._st_addr + slot, 1)
        data = (self._buf_addr + self.buffer_size * slot, nbytes)
        if kind == VIRTIO_BLK_T_OUT:
            added = self.queue.add([hdr, data], [status], slot)
        elif nbytes:
            added = self.queue.add([hdr], [data, status], slot)
        else:
            added = self.queue.add([hdr], [status], slot)
        if not added:  # cannot happen: max_in_flight fits the ring
            self._free.append(slot)
            raise VmsgampError("request queue full")
        self._req[slot] = (tag, kind, sector, nbytes)
        if kick:
            self.dev.notify(self.queue_index)
        return slot

    def submit_read(self, sector: int, nbytes: int, tag: Any = None, *, kick: bool = True) -> int:
        """Queue a read of ``nbytes`` at ``sector``; returns the slot.  With
        ``kick=False`` call ``kick()`` after the last of a batch."""
        self._check_range(sector, nbytes)
        return self._post(self._slot(), VIRTIO_BLK_T_IN, sector, nbytes, tag, kick)

    def submit_write(self, sector: int, data: bytes | bytearray | memoryview, tag: Any = None, *,
                     kick: bool = True) -> int:
        if self.readonly:
            raise PermissionError("the device is read-only (VIRTIO_BLK_F_RO)")
        nbytes = memoryview(data).nbytes
        self._check_range(sector, nbytes)
        slot = self._slot()
        off = self.buffer_size * slot
        self._buf[off:off + nbytes] = memoryview(data).cast("B")
        return self._post(slot, VIRTIO_BLK_T_OUT, sector, nbytes, tag, kick)

    def submit_flush(self, tag: Any = None, *, kick: bool = True) -> int:
        return self._post(self._slot(), VIRTIO_BLK_T_FLUSH, 0, 0, tag, kick)

    def kick(self) -> None:
        self.dev.notify(self.queue_index)

    def reap(self, *, wait: bool = False, timeout: float | None = None) -> list[BlkCompletion]:
        """Completed requests, in completion order (empty if none).  With
        ``wait``, block (pumping the bus) until at least one completes or
        ``timeout`` (default: the client's) expires: TimeoutError."""
        out: list[BlkCompletion] = []
        get_used = self.queue.get_used
        while True:
            used = get_used()
            if used is None:
                if out or not wait or not self.in_flight:
                    return out
                if not self.dev.wait_used(self.queue_index, self.timeout if timeout is None else timeout):
                    self._stale = True
                    raise TimeoutError(f"virtio-blk: {self.in_flight} requests not completed "
                                       f"within {self.timeout if timeout is None else timeout} s")
                continue
            slot, used_len = used
            req = self._req[slot]
            if req is None:  # not ours: the queue only hands back tokens we added
                continue
            self._req[slot] = None
            self._free.append(slot)
            tag, kind, sector, nbytes = req
            status = self._st[slot]
            if kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID) and status == VIRTIO_BLK_S_OK:
                off = self.buffer_size * slot
                data = self._buf[off:off + min(nbytes, max(0, used_len - 1))]
            else:
                data = memoryview(b"")
            out.append(BlkCompletion(tag, kind, sector, status, used_len, data))

    def drain(self, timeout: float | None = None) -> Iterator[BlkCompletion]:
        """Reap until nothing is in flight."""
        while self.in_flight:
            yield from self.reap(wait=True, timeout=timeout)

    # ---- synchronous calls ---------------------------------------------------------------
    def _idle(self) -> None:
        if self.in_flight:
            raise VmsgampError("synchronous calls need an idle client: reap() the pipeline first")

    def _one(self, what: str, slot: int) -> BlkCompletion:
        for c in self.drain():
            if c.tag is _SYNC:
                if not c.ok:
                    raise BlkError(what, c.status)
                return c
        raise VmsgampError(f"virtio-blk {what}: the request vanished")  # pragma: no cover

    def read(self, sector: int, nbytes: int) -> bytes:
        """``nbytes`` (a multiple of 512) from ``sector``, in requests of at
        most ``buffer_size`` bytes."""
        self._idle()
        out = bytearray()
        while nbytes > 0:
            n = min(nbytes, self.buffer_size)
            c = self._one(f"read of sector {sector}", self.submit_read(sector, n, _SYNC))
            if len(c.data) != n:
                raise BlkError(f"read of sector {sector}: used length {c.used_len}", VIRTIO_BLK_S_IOERR)
            out += c.data
            sector += n // SECTOR
            nbytes -= n
        return bytes(out)

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        self._idle()
        view = memoryview(data).cast("B")
        for off in range(0, len(view), self.buffer_size):
            chunk = view[off:off + self.buffer_size]
            self._one(f"write of sector {sector}", self.submit_write(sector, chunk, _SYNC))
            sector += len(chunk) // SECTOR

    def flush(self) -> None:
        self._idle()
        if self.features >> VIRTIO_BLK_F_FLUSH & 1:
            self._one("flush", self.submit_flush(_SYNC))

    def get_id(self) -> bytes:
        """The device's serial (up to 20 bytes, NUL padding removed)."""
        self._idle()
        slot = self._slot()
        c = self._one("GET_ID", self._post(slot, VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES, _SYNC, True))
        return bytes(c.data).rstrip(b"\0")

    def close(self) -> None:
        """Reset the device's queues (``DriverDevice.close``); idempotent."""
        if self.dev is None:
            return
        dev, self.dev = self.dev, None
        for view in (self._hdr, self._st, self._buf):
            view.release()
        dev.close()

    def __enter__(self) -> "BlkClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Sync:
    """Tag of the requests the synchronous calls make."""

    def __repr__(self) -> str:
        return "<sync>"


_SYNC = _Sync()


def time_reads(client: BlkClient, offsets: Iterator[int], nbytes: int, duration: float) -> dict[str, float]:
    """Keep ``client.max_in_flight`` reads of ``nbytes`` queued (sectors from
    ``offsets``) for ``duration`` seconds; returns requests, bytes, seconds
    and any error statuses.  What ``vmsgamp bench devices`` measures."""
    requests = errors = 0
    t0 = time.perf_counter()
    end = t0 + duration
    for _ in range(client.max_in_flight):
        client.submit_read(next(offsets), nbytes, kick=False)
    client.kick()
    while client.in_flight:
        done = client.reap(wait=True)
        requests += len(done)
        errors += sum(not c.ok for c in done)
        if time.perf_counter() < end:
            for _ in done:
                client.submit_read(next(offsets), nbytes, kick=False)
            client.kick()  # every buffer added is kicked, deadline or not
    secs = time.perf_counter() - t0
    return {"requests": requests, "bytes": requests * nbytes, "seconds": secs, "errors": errors}
