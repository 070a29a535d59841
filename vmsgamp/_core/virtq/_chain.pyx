# cython: freethreading_compatible = False
"""Descriptor chains as the device side pops them, and ChainBatch, the
preallocated arrays the batch calls of both sides fill.

A chain's segments were validated when it was popped (every buffer inside
one window of the AddressSpace, readable ones first, lengths summing to at
most 4 GiB per direction) and copied into private memory: nothing here
re-reads the ring.  The buffers themselves still belong to the driver, which
may name one buffer many times: ``read()`` therefore bounds what it
allocates.
"""
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

from vmsgamp._core.io cimport vm_copy_from_shared, vm_copy_to_shared
from vmsgamp._core.addrspace cimport AddressSpace, vm_window

import numpy as np

from vmsgamp.errors import RemoteProtocolError

READ_LIMIT = 64 << 20


class ChainTooLongError(RemoteProtocolError, ValueError):
    """``DescriptorChain.read()`` refused a readable part longer than the
    memory it could come from (the driver named buffers more than once) or
    longer than the caller's limit.  Nothing was allocated."""


@cython.freelist(64)
cdef class DescriptorChain:
    """One chain popped by the device: readable segments, then writable
    segments, all validated at pop time.  Views are zero-copy windows of the
    driver's buffers.

    ``head`` is what ``add_used(head, written)`` takes back: for a split ring
    the index of the chain's first descriptor, for a packed ring its buffer
    id (the name is kept for compatibility; it is an id, not a position).

    The views use plain (byte-wide, possibly wide) CPU accesses: for a
    window in device memory (Region.memtype MEM_DEVICE) use read() and
    write(), which copy with the aligned word accesses such memory needs."""

    def __cinit__(self):
        self._segs = NULL
        self._n = 0

    def __dealloc__(self):
        if self._segs != NULL and self._segs != &self._inline[0]:
            free(self._segs)

    def __len__(self):
        return self._n

    cdef int _check(self) except -1:
        if self._as is None:
            raise TypeError("a DescriptorChain comes from a queue's pop()")
        self._as.check_open()
        return 0

    cdef object _view(self, int i):
        cdef vq_seg *s = &self._segs[i]
        cdef vm_window *w = &self._as._win[s.win]
        region = self._as.region_of(s.win)
        return region.view(w.offset + <uint64_t>(s.ptr - w.ptr), s.len)

    @property
    def readable(self):
        """Zero-copy memoryviews of the device-readable segments."""
        self._check()
        return [self._view(i) for i in range(self.readable_count)]

    @property
    def writable(self):
        """Zero-copy memoryviews of the device-writable segments."""
        self._check()
        return [self._view(i) for i in range(self.readable_count, self._n)]

    @property
    def segments(self):
        """``[(bus_addr, length, device_writable), ...]`` in chain order."""
        return [(self._segs[i].addr, self._segs[i].len, bool(self._segs[i].write))
                for i in range(self._n)]

    @property
    def readable_len(self):
        cdef uint64_t t = 0
        for i in range(self.readable_count):
            t += self._segs[i].len
        return t

    @property
    def writable_len(self):
        cdef uint64_t t = 0
        for i in range(self.readable_count, self._n):
            t += self._segs[i].len
        return t

    def read(self, uint64_t max_bytes=READ_LIMIT):
        """Gather every device-readable byte into one bytes object.

        The driver may name one buffer many times, so the readable part can
        reach 4 GiB out of a small window.  ChainTooLongError, before
        anything is allocated, when it is longer than all the memory the
        address space maps (so its segments overlap) or than ``max_bytes``
        (default READ_LIMIT, 64 MiB).  Take larger requests segment by
        segment through ``readable``."""
        self._check()
        cdef uint64_t total = self.readable_len
        if total > self._as.mapped_bytes:
            raise ChainTooLongError(f"chain has {total} readable bytes, more than the "
                                    f"{self._as.mapped_bytes} bytes mapped: its buffers overlap")
        if total > max_bytes:
            raise ChainTooLongError(f"chain has {total} readable bytes, over the read limit of "
                                    f"{max_bytes}")
        out = PyBytes_FromStringAndSize(NULL, total)
        cdef char *d = PyBytes_AS_STRING(out)
        cdef int i
        for i in range(self.readable_count):
            vm_copy_from_shared(d, self._segs[i].ptr, self._segs[i].len,
                                self._as._win[self._segs[i].win].memtype)
            d += self._segs[i].len
        self._as.check_open()   # the object shrank during the copy: zeros, not data
        return out

    def write(self, data, uint64_t offset=0):
        """Scatter ``data`` into the device-writable segments starting at byte
        ``offset`` of the writable part; returns the bytes written (pass
        ``offset + that`` to add_used).  ValueError if it does not fit."""
        self._check()
        cdef const unsigned char[::1] src = memoryview(data).cast("B")
        cdef uint64_t n = src.shape[0], done = 0, skip = offset, take
        cdef uint64_t room = self.writable_len
        # two comparisons, not offset + n > room: that sum can wrap
        if offset > room or n > room - offset:
            raise ValueError(f"{n} bytes at offset {offset} do not fit in {room} writable bytes")
        cdef int i
        for i in range(self.readable_count, self._n):
            if done == n:
                break
            if skip >= self._segs[i].len:
                skip -= self._segs[i].len
                continue
            take = min(self._segs[i].len - skip, n - done)
            vm_copy_to_shared(self._segs[i].ptr + skip, &src[done], take,
                              self._as._win[self._segs[i].win].memtype)
            done += take
            skip = 0
        self._as.check_open()   # the object shrank during the copy: the bytes went nowhere
        return done

    def __repr__(self):
        return (f"<DescriptorChain head={self.head} readable={self.readable_count} "
                f"writable={self._n - self.readable_count}>")


cdef DescriptorChain vq_make_chain(AddressSpace a, int id, const vq_seg *src, int n, int nread):
    """A DescriptorChain holding a private copy of src[:n] (n <= queue size)."""
    cdef DescriptorChain c = DescriptorChain.__new__(DescriptorChain)
    if n <= 2:
        c._segs = &c._inline[0]
    else:
        c._segs = <vq_seg *>malloc(n * sizeof(vq_seg))
        if c._segs == NULL:
            raise MemoryError()
    memcpy(c._segs, src, n * sizeof(vq_seg))
    c._n = n
    c.readable_count = nread
    c.head = id
    c._as = a
    return c


cdef class ChainBatch:
    """Preallocated chains for the batch APIs: numpy arrays whose buffers
    are acquired once, so a batch call costs no Python object per chain and
    no buffer acquisition per call.

    Device: after ``n = q.pop_batch(b)`` chain ``i`` has id ``heads[i]`` (split:
    descriptor index, packed: buffer id) and segments
    ``seg_start[i]:seg_start[i+1]`` of ``addr`` / ``length`` / ``writable``
    (readable ones first) / ``offset`` + ``window`` (offset inside
    ``aspace.windows[window]``'s region, for numpy views of the region); fill
    ``used_len[:n]`` and call ``q.add_used_batch(b)``.

    Driver: fill ``seg_start[:n+1]``, the segment arrays and ``tokens[:n]``,
    set ``count = n`` and call ``d.add_batch(b)``; ``d.get_used_batch(b)``
    fills ``tokens`` and ``used_len`` and sets ``count``.

    The arrays are allocated here (``__cinit__``, so a batch is never without
    them) and never replaced; the batch calls check ``count`` and every
    ``seg_start`` entry against them."""

    def __cinit__(self, int max_chains=256, max_segments=None):
        if max_chains <= 0:
            raise ValueError("max_chains must be positive")
        self.max_chains = max_chains
        self.max_segments = 4 * max_chains if max_segments is None else max_segments
        if self.max_segments <= 0:
            raise ValueError("max_segments must be positive")
        self.heads = np.zeros(max_chains, np.uint16)
        self.seg_start = np.zeros(max_chains + 1, np.uint32)
        self.addr = np.zeros(self.max_segments, np.uint64)
        self.length = np.zeros(self.max_segments, np.uint32)
        self.writable = np.zeros(self.max_segments, np.uint8)
        self.offset = np.zeros(self.max_segments, np.uint64)
        self.window = np.zeros(self.max_segments, np.uint16)
        self.tokens = np.zeros(max_chains, np.uint64)
        self.used_len = np.zeros(max_chains, np.uint32)
        self._heads_v = self.heads
        self._seg_start_v = self.seg_start
        self._addr_v = self.addr
        self._length_v = self.length
        self._writable_v = self.writable
        self._offset_v = self.offset
        self._window_v = self.window
        self._tokens_v = self.tokens
        self._used_len_v = self.used_len
        # every array has at least one entry (max_chains, max_segments > 0)
        self._heads = &self._heads_v[0]
        self._seg_start = &self._seg_start_v[0]
        self._addr = &self._addr_v[0]
        self._length = &self._length_v[0]
        self._writable = &self._writable_v[0]
        self._offset = &self._offset_v[0]
        self._window = &self._window_v[0]
        self._tokens = &self._tokens_v[0]
        self._used_len = &self._used_len_v[0]
        self.count = 0
        self.nseg = 0

    def __repr__(self):
        return (f"<ChainBatch count={self.count}/{self.max_chains} "
                f"nseg={self.nseg}/{self.max_segments}>")
