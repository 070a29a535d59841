"""Mock virtio driver and device for tests of device models and drivers.

:class:`MockDriver` lays out a split or packed virtqueue in a Region and
writes descriptor chains into it exactly as a virtio driver would (it is the
pure-Python reference driver of :mod:`vmsgamp.testing.virtq_model` plus a buffer
pool), so a device model can be tested against real ring memory::

    drv = MockDriver(Region.memfd(1 << 20), "split", size=16)
    q = drv.device_queue()              # the SplitQueue a device model uses
    drv.add_chain([b"request"], [64], token="r1")
    chain = q.pop(); ...; q.add_used(chain.head, n)
    token, length, data = drv.get_used()

It also has raw writers (:meth:`MockDriver.write_desc`, ...) for hostile-peer
tests.  :class:`MockDevice` is the reference device for driver-side tests.
"""
from __future__ import annotations

import struct
from typing import Any, Sequence

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.region import Region
from vmsgamp._core.virtq import (
    PackedQueue, PackedQueueDriver, SplitQueue, SplitQueueDriver, packed_area_sizes, split_area_sizes,
)
from vmsgamp.testing.virtq_model import (
    RefChain, RefPackedDevice, RefPackedDriver, RefSplitDevice, RefSplitDriver,
)

__all__ = ["MockDriver", "MockDevice"]


class MockDriver:
    """A virtio driver written in plain Python over ``region``.

    The rings come first (from ``ring_offset``), then the indirect pool, then
    ``nbufs`` buffers of ``buf_size`` bytes.  Bus addresses are
    ``bus_base + offset`` (``bus_base`` defaults to ``region.bus_base``)."""

    def __init__(self, region: Region, fmt: str = "split", size: int = 16, *,
                 event_idx: bool = False, indirect: bool = False, indirect_max: int = 8,
                 buf_size: int = 4096, nbufs: int | None = None, bus_base: int | None = None,
                 ring_offset: int = 0) -> None:
        if fmt not in ("split", "packed"):
            raise ValueError(f"format {fmt!r}: 'split' or 'packed'")
        self.region = region
        self.fmt = fmt
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.bus_base = region.bus_base if bus_base is None else bus_base
        self.aspace = AddressSpace([(self.bus_base, region, 0, region.size)])
        self.alloc = RegionAllocator(region, ring_offset, bus_base=self.bus_base)
        if fmt == "split":
            d, dr, dv = split_area_sizes(size)
            self.desc_addr = self.alloc.alloc(d, 16)
            self.driver_addr = self.alloc.alloc(dr, 2)
            self.device_addr = self.alloc.alloc(dv, 4)
        else:
            d, dr, dv = packed_area_sizes(size)
            self.desc_addr = self.alloc.alloc(d, 16)
            self.driver_addr = self.alloc.alloc(dr, 4)
            self.device_addr = self.alloc.alloc(dv, 4)
        pool = None
        if indirect and indirect_max > 1:
            pool = self.alloc.alloc(size * min(indirect_max, size) * 16, 16)
        cls = RefSplitDriver if fmt == "split" else RefPackedDriver
        self.ref = cls(self.aspace, size, self.desc_addr, self.driver_addr, self.device_addr,
                       event_idx=event_idx, indirect=indirect, indirect_addr=pool,
                       indirect_max=indirect_max)
        self.buf_size = buf_size
        n = nbufs if nbufs is not None else max(1, min(3 * size, self.alloc.free_bytes // (buf_size + 16)))
        self._bufs = [self.alloc.alloc(buf_size, 16) for _ in range(n)]
        self._chains: dict[int, tuple[Any, list[int], list[tuple[int, int]]]] = {}
        self._seq = 0

    # ---- the queue a device model uses --------------------------------------

    def device_queue(self, aspace: AddressSpace | None = None) -> SplitQueue | PackedQueue:
        """The device side of these rings (vmsgamp's Cython queue)."""
        cls = SplitQueue if self.fmt == "split" else PackedQueue
        return cls(aspace or self.aspace, self.size, self.desc_addr, self.driver_addr,
                   self.device_addr, event_idx=self.event_idx, indirect=self.indirect)

    def driver_queue_args(self) -> tuple[int, int, int, int]:
        """(size, desc_addr, driver_addr, device_addr), as SET_VQUEUE carries them."""
        return self.size, self.desc_addr, self.driver_addr, self.device_addr

    # ---- normal driver operations --------------------------------------------

    def add_chain(self, out: Sequence[bytes], in_sizes: Sequence[int] = (), token: Any = None) -> bool:
        """Copy each ``out`` buffer into its own pool buffer, reserve one
        buffer per ``in_sizes`` entry, expose the chain.  False if the ring or
        the pool is full."""
        need = len(out) + len(in_sizes)
        if any(len(b) > self.buf_size for b in out) or any(s > self.buf_size for s in in_sizes):
            raise ValueError(f"buffers are at most {self.buf_size} bytes")
        if need > len(self._bufs):
            return False
        bufs = [self._bufs.pop() for _ in range(need)]
        for a, data in zip(bufs, out):
            self.aspace.write(a, data)
        for a, s in zip(bufs[len(out):], in_sizes):
            self.aspace.write(a, bytes(s))
        outs = [(a, len(d)) for a, d in zip(bufs, out)]
        ins = [(a, s) for a, s in zip(bufs[len(out):], in_sizes)]
        key = self._seq
        self._seq += 1
        if not self.ref.add(outs, ins, key):
            self._bufs.extend(reversed(bufs))
            return False
        self._chains[key] = (token, bufs, ins)
        return True

    def add_sg(self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]] = (),
               token: Any = None) -> bool:
        """Expose a chain of raw (bus_addr, length) segments (hostile tests)."""
        key = self._seq
        self._seq += 1
        if not self.ref.add(list(out), list(in_), key):
            return False
        self._chains[key] = (token, [], list(in_))
        return True

    def kick_prepare(self) -> bool:
        return self.ref.kick_prepare()

    def get_used(self) -> tuple[Any, int, bytes] | None:
        """``(token, length, bytes the device wrote)`` or None."""
        r = self.ref.get_used()
        if r is None:
            return None
        key, ln = r
        token, bufs, ins = self._chains.pop(key)
        data = bytearray()
        left = ln
        for a, s in ins:
            take = min(s, left)
            data += self.aspace.read(a, take)
            left -= take
        self._bufs.extend(bufs)
        return token, ln, bytes(data)

    def enable_callbacks(self) -> bool:
        return self.ref.enable_callbacks()

    def disable_callbacks(self) -> None:
        self.ref.disable_callbacks()

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    # ---- raw access for hostile tests ----------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_or_id: int = 0,
                   table: int | None = None) -> None:
        """Write descriptor ``index`` of the ring (or of an indirect ``table``
        at that bus address).  Split: ``next_or_id`` is next; packed: id."""
        base = self.desc_addr if table is None else table
        if self.fmt == "split":
            self.aspace.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, next_or_id))
        else:
            self.aspace.write(base + 16 * index, struct.pack("<QIHH", addr, length, next_or_id, flags))

    def write_avail(self, slot: int, desc_idx: int) -> None:
        """Split: avail.ring[slot] = desc_idx (the first descriptor of a chain)."""
        self.aspace.write(self.driver_addr + 4 + 2 * slot, struct.pack("<H", desc_idx))

    def set_avail_idx(self, idx: int) -> None:
        """Split: avail.idx = idx (publish)."""
        self.aspace.write(self.driver_addr + 2, struct.pack("<H", idx & 0xFFFF))

    def set_used(self, slot: int, id_: int, length: int, idx: int | None = None) -> None:
        """Split: used.ring[slot] = (id, len) (id: the chain's first descriptor
        index), optionally used.idx = idx."""
        self.aspace.write(self.device_addr + 4 + 8 * slot, struct.pack("<II", id_, length))
        if idx is not None:
            self.aspace.write(self.device_addr + 2, struct.pack("<H", idx & 0xFFFF))

    def buffer(self) -> int:
        """A free pool buffer's bus address (not returned to the pool)."""
        return self._bufs.pop()

    def close(self) -> None:
        self.aspace.close()

    def __enter__(self) -> "MockDriver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MockDevice:
    """The reference device, for tests of driver-side code.  Pops chains as
    RefChain (readable/writable lists of (bus_addr, length))."""

    def __init__(self, aspace: AddressSpace, fmt: str, size: int, desc_addr: int, driver_addr: int,
                 device_addr: int, *, event_idx: bool = False, indirect: bool = False) -> None:
        cls = RefSplitDevice if fmt == "split" else RefPackedDevice
        self.aspace = aspace
        self.ref = cls(aspace, size, desc_addr, driver_addr, device_addr,
                       event_idx=event_idx, indirect=indirect)

    @classmethod
    def for_driver(cls, drv: SplitQueueDriver | PackedQueueDriver) -> "MockDevice":
        fmt = "split" if isinstance(drv, SplitQueueDriver) else "packed"
        return cls(drv.aspace, fmt, drv.size, drv.desc_addr, drv.driver_addr, drv.device_addr,
                   event_idx=drv.event_idx, indirect=drv.indirect)

    def pop(self) -> RefChain | None:
        return self.ref.pop()

    def read(self, chain: RefChain) -> bytes:
        return b"".join(self.aspace.read(a, n) for a, n in chain.readable)

    def complete(self, chain: RefChain, data: bytes = b"") -> int:
        """Write ``data`` into the writable part and mark the chain used."""
        off = 0
        for a, n in chain.writable:
            part = data[off:off + n]
            if part:
                self.aspace.write(a, part)
            off += len(part)
        if off < len(data):
            raise ValueError("data larger than the writable part")
        self.ref.add_used(chain.head, len(data))
        return len(data)

    def echo_all(self) -> int:
        """Pop every chain, copy its readable bytes into its writable part
        (truncated), mark it used; returns the number of chains."""
        n = 0
        while (c := self.pop()) is not None:
            data = self.read(c)[:sum(ln for _, ln in c.writable)]
            self.complete(c, data)
            n += 1
        return n

    def needs_notification(self) -> bool:
        return self.ref.needs_notification()

    def enable_notification(self) -> bool:
        return self.ref.enable_notification()

    def disable_notification(self) -> None:
        self.ref.disable_notification()
