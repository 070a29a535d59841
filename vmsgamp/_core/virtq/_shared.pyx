# cython: freethreading_compatible = False
"""Pieces every virtqueue shares: constants, QueueState, QueueBrokenError,
the message table of the error side channel, and _Virtqueue, the base class
that maps the three areas, validates buffer descriptors and keeps the
broken state.  The ring formats live in _split.pyx and _packed.pyx."""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free

cdef extern from "<stdint.h>" nogil:
    const uint64_t U32_MAX "UINT32_MAX"

from vmsgamp._core.addrspace cimport AddressSpace
from vmsgamp._core.virtq._layout cimport *
from vmsgamp._core.virtq._chain cimport vq_seg, ChainBatch, vq_make_chain, vq_batch_put

import dataclasses

from vmsgamp.errors import RemoteProtocolError

SPLIT = "split"
PACKED = "packed"

DESC_F_NEXT = VIRTQ_DESC_F_NEXT
DESC_F_WRITE = VIRTQ_DESC_F_WRITE
DESC_F_INDIRECT = VIRTQ_DESC_F_INDIRECT
DESC_F_AVAIL = VIRTQ_DESC_F_AVAIL
DESC_F_USED = VIRTQ_DESC_F_USED
AVAIL_F_NO_INTERRUPT = VIRTQ_AVAIL_F_NO_INTERRUPT
USED_F_NO_NOTIFY = VIRTQ_USED_F_NO_NOTIFY
EVENT_F_ENABLE = VIRTQ_EVENT_F_ENABLE
EVENT_F_DISABLE = VIRTQ_EVENT_F_DISABLE
EVENT_F_DESC = VIRTQ_EVENT_F_DESC
MAX_SIZE = VIRTQ_MAX_SIZE
LINE = VIRTQ_LINE
F_INDIRECT_DESC = VIRTIO_F_INDIRECT_DESC
F_EVENT_IDX = VIRTIO_F_EVENT_IDX
F_RING_PACKED = VIRTIO_F_RING_PACKED

LAYOUT = {
    "virtq_desc": sizeof(virtq_desc),
    "pvirtq_desc": sizeof(pvirtq_desc),
    "desc.addr": VIRTQ_DESC_OFF_ADDR, "desc.len": VIRTQ_DESC_OFF_LEN,
    "desc.flags": VIRTQ_DESC_OFF_FLAGS, "desc.next": VIRTQ_DESC_OFF_NEXT,
    "avail.flags": VIRTQ_AVAIL_OFF_FLAGS, "avail.idx": VIRTQ_AVAIL_OFF_IDX,
    "avail.ring": VIRTQ_AVAIL_OFF_RING,
    "used.flags": VIRTQ_USED_OFF_FLAGS, "used.idx": VIRTQ_USED_OFF_IDX,
    "used.ring": VIRTQ_USED_OFF_RING, "used_elem": VIRTQ_USED_ELEM_SIZE,
    "pdesc.addr": PVIRTQ_DESC_OFF_ADDR, "pdesc.len": PVIRTQ_DESC_OFF_LEN,
    "pdesc.id": PVIRTQ_DESC_OFF_ID, "pdesc.flags": PVIRTQ_DESC_OFF_FLAGS,
    "event.off_wrap": PVIRTQ_EVENT_OFF_OFF_WRAP, "event.flags": PVIRTQ_EVENT_OFF_FLAGS,
    "event": PVIRTQ_EVENT_SIZE,
}


def need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx) -> bool:
    """The event-idx rule of csrc/virtq.h (exported for tests)."""
    return bool(virtq_need_event(event, new_idx, old_idx))


def packed_need_notify(uint32_t ev, bint event_idx, uint16_t new_off, bint wrap,
                       unsigned moved, unsigned size) -> bool:
    """The packed event-suppression rule of csrc/virtq.h that device
    needs_notification() and driver kick_prepare() share (exported for tests)."""
    return bool(virtq_packed_need_notify(ev, event_idx, new_off, wrap, moved, size))


def split_area_sizes(unsigned size):
    """(descriptor table, driver area, device area) bytes of a split ring."""
    return (virtq_split_desc_bytes(size), virtq_split_avail_bytes(size),
            virtq_split_used_bytes(size))


def packed_area_sizes(unsigned size):
    """(descriptor ring, driver area, device area) bytes of a packed ring."""
    return (virtq_packed_desc_bytes(size), PVIRTQ_EVENT_SIZE, PVIRTQ_EVENT_SIZE)


def alloc_line(allocator, size, align):
    """Bus address of ``size`` bytes from ``allocator`` that start and end
    on their own VIRTQ_LINE-byte lines (aligned to ``max(align, LINE)``,
    size rounded up), so an area one side writes shares no cache line with
    whatever the other side writes before or after it."""
    return allocator.alloc((size + VIRTQ_LINE - 1) & ~(VIRTQ_LINE - 1), max(align, VIRTQ_LINE))


class QueueBrokenError(RemoteProtocolError):
    """The peer corrupted the ring; the queue refuses further work.
    ``reason`` says what was seen."""

    def __init__(self, reason: str):
        super().__init__(f"virtqueue broken: {reason}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class QueueState:
    """Device-side queue state as plain data (vhost-user GET/SET_VRING_BASE,
    reconnects).  Untrusted: ``SplitQueue.from_state`` / ``PackedQueue.from_state``
    validate it.  For packed rings ``next_avail``/``next_used`` are ring
    offsets and the wrap counters matter; for split rings they are the
    free-running u16 indices."""
    format: str
    size: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    event_idx: bool = False
    indirect: bool = False
    next_avail: int = 0
    next_used: int = 0
    avail_wrap: bool = True
    used_wrap: bool = True
    signalled_used: int | None = None
    inflight: tuple = ()
    """Packed only: ``((buffer_id, descriptors), ...)`` of chains popped and
    not used yet (their ring slots may already hold other used entries, so
    they cannot be re-read from the ring)."""


def check_state(state, fmt):
    """Type and range checks shared by both from_state()s: ValueError, never
    TypeError or OverflowError, for anything that came from outside."""
    if not isinstance(state, QueueState):
        raise ValueError(f"expected a QueueState, got {type(state).__name__}")
    if state.format != fmt:
        raise ValueError(f"state is for a {state.format!r} queue")
    for f in ("size", "desc_addr", "driver_addr", "device_addr", "next_avail", "next_used"):
        v = getattr(state, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{f}={v!r} is not a non-negative integer")
    for f in ("desc_addr", "driver_addr", "device_addr"):
        if getattr(state, f) >= 1 << 64:
            raise ValueError(f"{f} does not fit in 64 bits")
    if not 1 <= state.size <= VIRTQ_MAX_SIZE:
        raise ValueError(f"queue size {state.size} outside [1, 32768]")
    if not isinstance(state.inflight, (tuple, list)):
        raise ValueError("inflight must be a sequence of (buffer_id, descriptors) pairs")
    for item in state.inflight:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"inflight entry {item!r} is not a (buffer_id, descriptors) pair")


# The error side channel: code -> message, e1/e2 filled in.
_MESSAGES = {
    E_AVAIL_JUMP: "avail.idx moved from {e1} to {e2}: more chains than the queue holds",
    E_HEAD: "head descriptor index {e1} outside the table of {e2} entries",
    E_NEXT: "descriptor next {e1} outside the table of {e2} entries",
    E_LONG: "descriptor chain longer than the queue size {e1} (loop?)",
    E_ADDR: "buffer [{e1:#x}, +{e2:#x}) is not inside one window (or is device-writable "
            "in a read-only window)",
    E_OVERFLOW: "descriptor lengths overflow (addr {e1:#x}, len {e2:#x})",
    E_ORDER: "device-readable descriptor after a device-writable one (descriptor {e1})",
    E_IND_FEATURE: "INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC was not negotiated",
    E_IND_NEXT: "descriptor with both NEXT and INDIRECT",
    E_IND_NESTED: "INDIRECT descriptor inside an indirect table",
    E_IND_LEN: "indirect table of {e1} bytes: not a non-zero multiple of 16 within the queue size {e2}",
    E_IND_ADDR: "indirect table [{e1:#x}, +{e2:#x}) outside every window or not 8-byte aligned",
    E_WRAP: "descriptor {e1} of a chain has AVAIL/USED bits that contradict wrap counter {e2}",
    E_ID: "buffer id {e1} outside the queue size {e2}",
    E_ID_INFLIGHT: "buffer id {e1} made available while still in flight",
    E_TOO_MANY: "driver made {e1} descriptors available, more than the queue size {e2}",
    E_USED_JUMP: "used.idx moved from {e1} to {e2}: more than is in flight",
    E_USED_ID: "used id {e1} is not a chain in flight",
    E_USED_LEN: "used len {e1} larger than the {e2} device-writable bytes of the chain",
    E_USED_NOTHING: "used descriptor at offset {e1} while nothing is in flight",
}


cdef class _Virtqueue:
    """Shared plumbing: area translation, buffer validation, broken state.

    Every public call starts with ``_ready()`` (broken? address space
    closed?) and every GIL-free section runs between ``self._as.enter()``
    and ``self._as.leave()``: the two places a check on the memory itself
    belongs."""

    def __cinit__(self, *args, **kwargs):
        self._scratch = NULL
        self.broken = False
        self.broken_reason = None
        self._err.code = E_NONE

    def __dealloc__(self):
        free(self._scratch)

    cdef int _init_areas(self, AddressSpace aspace, unsigned size, uint64_t desc_addr,
                         uint64_t driver_addr, uint64_t device_addr, bint event_idx,
                         bint indirect, bint packed, bint device_side) except -1:
        """Record the queue's parameters and translate its three areas once
        (they stay pinned with the AddressSpace), checking bus and local
        alignment and that the side that writes an area may write it."""
        cdef int w
        cdef char *p
        aspace.check_open()
        self._as = aspace
        self.size = size
        self._mask = size - 1
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        if packed:
            sizes = packed_area_sizes(size)
            aligns = (PVIRTQ_DESC_ALIGN, PVIRTQ_EVENT_ALIGN, PVIRTQ_EVENT_ALIGN)
        else:
            sizes = split_area_sizes(size)
            aligns = (VIRTQ_DESC_ALIGN, VIRTQ_AVAIL_ALIGN, VIRTQ_USED_ALIGN)
        names = ("descriptor area", "driver area", "device area")
        addrs = (desc_addr, driver_addr, device_addr)
        # the driver writes descriptors and the driver area, the device the
        # device area (and, packed, used descriptors into the ring)
        writes = ((not device_side) or packed, not device_side, device_side)
        ptrs = []
        for name, addr, sz, al, wr in zip(names, addrs, sizes, aligns, writes):
            if addr % al:
                raise ValueError(f"{name} at {addr:#x} is not {al}-byte aligned")
            p = aspace.tr(addr, sz, wr, &w)
            if p == NULL:
                raise ValueError(f"{name} [{addr:#x}, +{sz:#x}) is not inside one "
                                 f"{'writable ' if wr else ''}window of the address space")
            if (<uintptr_t>p) % al:
                raise ValueError(f"{name} maps to a local address that is not {al}-byte aligned")
            ptrs.append(<uintptr_t>p)
        self._desc = <char *><uintptr_t>ptrs[0]
        self._drv = <char *><uintptr_t>ptrs[1]
        self._dev = <char *><uintptr_t>ptrs[2]
        self._scratch = <vq_seg *>calloc(size, sizeof(vq_seg))
        if self._scratch == NULL:
            raise MemoryError()
        return 0

    cdef int _ready(self) except -1:
        if self.broken:
            raise QueueBrokenError(self.broken_reason)
        self._as.check_open()
        return 0

    cdef int _note_broken(self) except -1:
        """Turn the error side channel into the broken state (first reason wins)."""
        if not self.broken:
            self.broken = True
            self.broken_reason = _MESSAGES.get(self._err.code, "corrupted ring").format(
                e1=self._err.e1, e2=self._err.e2)
        return 0

    cdef int _fail(self) except -1:
        """Mark the queue broken from the error side channel and raise."""
        self._note_broken()
        raise QueueBrokenError(self.broken_reason)

    cdef int _seg(self, uint64_t addr, uint32_t ln, bint write, int n,
                  uint64_t *sum_r, uint64_t *sum_w) noexcept nogil:
        """Validate buffer descriptor n of a chain into scratch[n]; -1 with
        the error side channel set.  n < size bounds every chain walk."""
        cdef int w = -1
        cdef char *p
        if n >= <int>self.size:
            return vq_error(&self._err, E_LONG, self.size, 0)
        if addr + ln < addr:
            return vq_error(&self._err, E_OVERFLOW, addr, ln)
        if write:
            sum_w[0] += ln
            if sum_w[0] > U32_MAX:
                return vq_error(&self._err, E_OVERFLOW, addr, ln)
        else:
            if n != self._nread:
                return vq_error(&self._err, E_ORDER, n, 0)
            sum_r[0] += ln
            if sum_r[0] > U32_MAX:
                return vq_error(&self._err, E_OVERFLOW, addr, ln)
            self._nread += 1
        p = self._as.tr(addr, ln, write, &w)
        if p == NULL:
            return vq_error(&self._err, E_ADDR, addr, ln)
        self._scratch[n].ptr = p
        self._scratch[n].addr = addr
        self._scratch[n].len = ln
        self._scratch[n].win = w
        self._scratch[n].write = 1 if write else 0
        return 0

    cdef int _tr_table(self, uint64_t addr, uint32_t ln, char **out) noexcept nogil:
        """Translate an indirect table of ln bytes (at most `size` entries)."""
        cdef int w
        if not self.indirect:
            return vq_error(&self._err, E_IND_FEATURE, 0, 0)
        if ln == 0 or ln % 16 or ln // 16 > self.size:
            return vq_error(&self._err, E_IND_LEN, ln, self.size)
        out[0] = self._as.tr(addr, ln, False, &w)
        # descriptor words are loaded as aligned 64-bit atomics
        if out[0] == NULL or (<uintptr_t>out[0]) & 7:
            return vq_error(&self._err, E_IND_ADDR, addr, ln)
        return 0

    @property
    def aspace(self):
        return self._as

    def mark_broken(self, str reason):
        """Mark the queue broken from outside (e.g. the transport saw the
        peer misbehave)."""
        if not self.broken:
            self.broken = True
            self.broken_reason = reason


cdef class _DeviceQueue(_Virtqueue):
    """Device side, the part both ring formats share: pop, pop_batch and
    the unpacking of add_used_batch arguments, built on the format's two
    steps: ``_peek()`` validates the next available chain into scratch
    (segment count, 0 if none, -1 if corrupt; its id in ``_chain_id``) and
    ``_advance()`` takes it."""

    cdef int _peek(self) noexcept nogil:
        return 0

    cdef void _advance(self) noexcept nogil:
        pass

    def pop(self):
        """Next available chain, or None.  QueueBrokenError if the driver
        corrupted the ring (the queue stays broken)."""
        self._ready()
        cdef int n = self._peek()
        self._as.check_open()   # the walk read zeros because the object shrank: not a chain
        if n < 0:
            self._fail()
        if n == 0:
            return None
        c = vq_make_chain(self._as, self._chain_id, self._scratch, n, self._nread)
        self._advance()
        return c

    def pop_batch(self, ChainBatch batch not None):
        """Pop as many chains as are available and fit in ``batch`` (burst);
        returns the count (also ``batch.count``).  A corrupted chain stops
        the batch: the chains before it are returned, the queue is marked
        broken and the next call raises.  ValueError if the first chain
        alone has more segments than the batch holds."""
        self._ready()
        cdef int k = 0, err = 0
        batch.count = 0
        batch.nseg = 0
        batch._seg_start[0] = 0
        self._as.enter()
        try:
            with nogil:
                while batch.count < batch.max_chains:
                    k = self._peek()
                    if k <= 0:
                        err = k < 0
                        break
                    if vq_batch_put(batch, self._as, self._chain_id, self._scratch, k) < 0:
                        err = 2 if batch.count == 0 else 0
                        break
                    self._advance()
        finally:
            self._as.leave()
        self._as.check_open()   # the object shrank during the walk: these are not chains
        if err == 2:
            raise ValueError(f"chain of {k} segments does not fit in a batch of {batch.max_segments}")
        if err:
            if batch.count == 0:
                self._fail()
            self._note_broken()
        return batch.count

    cdef int _used_batch_args(self, ids, lengths, int count, const uint16_t **h,
                              const uint32_t **l) except -1:
        """Unpack add_used_batch arguments (a ChainBatch, or id and length
        arrays) into pointers; returns the count, checked against the
        arrays.  The pointers stay valid while the caller holds
        ``ids``/``lengths``."""
        cdef const uint16_t[::1] hv
        cdef const uint32_t[::1] lv
        cdef ChainBatch b
        cdef Py_ssize_t n
        if count < -1:
            raise ValueError(f"count {count} is negative")
        if isinstance(ids, ChainBatch):
            b = <ChainBatch>ids
            n = b.count if count == -1 else count
            if n < 0 or n > b.max_chains:
                raise ValueError(f"count {n} outside the batch of {b.max_chains}")
            if n:
                h[0] = b._heads
                l[0] = b._used_len
            return <int>n
        hv = ids
        lv = lengths
        n = hv.shape[0] if count == -1 else count
        if n > hv.shape[0] or n > lv.shape[0]:
            raise ValueError(f"count {n} larger than the arrays")
        if n > VIRTQ_MAX_SIZE:
            raise ValueError(f"count {n}: no queue has that many chains")
        if n:
            h[0] = &hv[0]
            l[0] = &lv[0]
        return <int>n
