# cython: freethreading_compatible = False
"""Split and packed virtqueues, device side and driver side.

Layouts live in csrc/virtq.h; every shared word is touched through
csrc/vmsgamp_io.h (one naturally aligned access, explicit order).  The peer is
hostile: every index read from shared memory is sanitized, every chain walk
is bounded by the queue size, every buffer address is translated through the
AddressSpace (bounds-checked).  A violation marks the queue broken with a
readable reason; calls on a broken queue raise QueueBrokenError.

Memory-ordering pairs (DPDK style; the comment at each access names its
partner):

  R1 driver publishes a chain   -> A1 device sees it
       split:  release store avail.idx      / acquire load avail.idx
       packed: release store head desc.flags / acquire load head desc.flags
  R2 device publishes a used entry -> A2 driver sees it
       split:  release store used.idx       / acquire load used.idx
       packed: release store used desc.flags / acquire load used desc.flags

Full fences (vm_fence_seq_cst) appear only where a store must be visible
before a later load of the peer's field (notification enable/suppress); each
names the lost wake-up it prevents.

The spec rules behind them (virtio 1.2, paraphrased; section names of
split-ring.tex / packed-ring.tex):
  R1 split, "Updating idx": the driver makes the descriptors and the ring
     entry visible before it updates avail->idx.
  R1 packed, "Making buffers available": the driver writes the flags of the
     first descriptor of a chain last, after the rest of the chain.
  R2 split, "The Virtqueue Used Ring": the device writes the used element
     before it updates used->idx.
  R2 packed, "Marking buffers used": the used descriptor's flags are written
     after its id and len.
  fences, "Notification suppression" / "Event suppression": the side that
     publishes reads the peer's suppression field only after its index or
     flags update is visible (Linux virtio_mb(), rust-vmm's SeqCst fence).

Shapes follow rust-vmm virtio-queue (device: pop / add_used /
needs_notification / enable_notification) and Linux virtio_ring.c (driver:
add / kick_prepare / get_used / enable_cb / disable_cb).

A queue object is used by one thread at a time (like a Linux virtqueue
under its lock); the batch calls release the GIL, so a second thread must
not call into the same queue meanwhile.
"""
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, uintptr_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy

cdef extern from "<stdint.h>" nogil:
    const uint64_t U32_MAX "UINT32_MAX"

from vmsgamp._core.io cimport (
    VM_RELAXED, VM_ACQUIRE, VM_RELEASE, VM_MEM_NORMAL,
    vm_load16, vm_load32, vm_load64, vm_store16, vm_store32, vm_store64,
    vm_fence_seq_cst, vm_copy_from_shared, vm_copy_to_shared, vm_zero_shared,
)
from vmsgamp._core.addrspace cimport AddressSpace, vm_window
from vmsgamp._core.region cimport Region

import dataclasses
import numpy as np

from vmsgamp.errors import LocalProtocolError, RemoteProtocolError

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


def split_area_sizes(unsigned size):
    """(descriptor table, driver area, device area) bytes of a split ring."""
    return (virtq_split_desc_bytes(size), virtq_split_avail_bytes(size),
            virtq_split_used_bytes(size))


def packed_area_sizes(unsigned size):
    """(descriptor ring, driver area, device area) bytes of a packed ring."""
    return (virtq_packed_desc_bytes(size), PVIRTQ_EVENT_SIZE, PVIRTQ_EVENT_SIZE)


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


def _check_state(state, fmt):
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


# ---- error codes of the nogil walks -------------------------------------

cdef enum:
    E_NONE = 0
    E_AVAIL_JUMP
    E_HEAD
    E_NEXT
    E_LONG
    E_ADDR
    E_OVERFLOW
    E_ORDER
    E_IND_FEATURE
    E_IND_NEXT
    E_IND_NESTED
    E_IND_LEN
    E_IND_ADDR
    E_WRAP
    E_ID
    E_ID_INFLIGHT
    E_TOO_MANY
    E_USED_JUMP
    E_USED_ID
    E_USED_LEN
    E_USED_NOTHING

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


cdef inline bint _is_pow2(unsigned x) noexcept nogil:
    return x != 0 and (x & (x - 1)) == 0


cdef inline bint _avail_ok(uint16_t flags, bint wrap) noexcept nogil:
    """Packed: made available for this lap (AVAIL == wrap, USED != wrap)."""
    return ((flags >> 7) & 1) == wrap and ((flags >> 15) & 1) != wrap


cdef inline bint _used_ok(uint16_t flags, bint wrap) noexcept nogil:
    """Packed: marked used for this lap (AVAIL == USED == wrap)."""
    return ((flags >> 7) & 1) == wrap and ((flags >> 15) & 1) == wrap


# ---- descriptor chains (device side) -------------------------------------

@cython.freelist(64)
cdef class DescriptorChain:
    """One chain popped by the device: ``head`` (split: head descriptor
    index, packed: buffer id), readable segments then writable segments, all
    validated at pop time.  Views are zero-copy windows of the peer's buffers.
    Hand ``head`` back with ``add_used(head, written)``.

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

    def read(self):
        """Gather every device-readable byte into one bytes object."""
        self._check()
        cdef uint64_t total = self.readable_len
        out = PyBytes_FromStringAndSize(NULL, total)
        cdef char *d = PyBytes_AS_STRING(out)
        cdef int i
        for i in range(self.readable_count):
            vm_copy_from_shared(d, self._segs[i].ptr, self._segs[i].len,
                                self._as._win[self._segs[i].win].memtype)
            d += self._segs[i].len
        return out

    def write(self, data, uint64_t offset=0):
        """Scatter ``data`` into the device-writable segments starting at byte
        ``offset`` of the writable part; returns the bytes written (pass
        ``offset + that`` to add_used).  ValueError if it does not fit."""
        self._check()
        cdef const unsigned char[::1] src = memoryview(data).cast("B")
        cdef uint64_t n = src.shape[0], done = 0, skip = offset, take
        if offset + n > self.writable_len:
            raise ValueError(f"{n} bytes at offset {offset} do not fit in {self.writable_len} writable bytes")
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
        return done

    def __repr__(self):
        return (f"<DescriptorChain head={self.head} readable={self.readable_count} "
                f"writable={self._n - self.readable_count}>")


cdef DescriptorChain _make_chain(AddressSpace a, int head, vq_seg *src, int n, int nread):
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
    c.head = head
    c._as = a
    return c


cdef class ChainBatch:
    """Preallocated chains for the batch APIs: numpy arrays whose buffers
    are acquired once, so a batch call costs no Python object per chain and
    no buffer acquisition per call.

    Device: after ``n = q.pop_batch(b)`` chain ``i`` has id ``heads[i]`` and
    segments ``seg_start[i]:seg_start[i+1]`` of ``addr`` / ``length`` /
    ``writable`` (readable ones first) / ``offset`` + ``window`` (offset inside
    ``aspace.windows[window]``'s region, for numpy views of the region); fill
    ``used_len[:n]`` and call ``q.add_used_batch(b)``.

    Driver: fill ``seg_start[:n+1]``, the segment arrays and ``tokens[:n]``,
    set ``count = n`` and call ``d.add_batch(b)``; ``d.get_used_batch(b)``
    fills ``tokens`` and ``used_len`` and sets ``count``."""

    def __init__(self, int max_chains=256, max_segments=None):
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
        self._tokens = self.tokens
        self._used_len = self.used_len
        self._heads = self.heads
        self._seg_start = self.seg_start
        self._addr = self.addr
        self._length = self.length
        self._writable = self.writable
        self._offset = self.offset
        self._window = self.window
        self.count = 0
        self.nseg = 0


cdef inline void _batch_put(ChainBatch b, AddressSpace a, int head, vq_seg *s, int n) noexcept nogil:
    cdef int j, k = b.nseg
    cdef vm_window *w
    b._heads[b.count] = head
    b._seg_start[b.count] = k
    for j in range(n):
        w = &a._win[s[j].win]
        b._addr[k + j] = s[j].addr
        b._length[k + j] = s[j].len
        b._writable[k + j] = s[j].write
        b._offset[k + j] = w.offset + <uint64_t>(s[j].ptr - w.ptr)
        b._window[k + j] = <uint16_t>s[j].win
    b.nseg = k + n
    b.count += 1
    b._seg_start[b.count] = b.nseg


# ---- common base ------------------------------------------------------------

cdef class _Virtqueue:
    """Shared plumbing: area translation, scratch segments, broken state."""

    def __cinit__(self, *args, **kwargs):
        self._scratch = NULL
        self.broken = False
        self.broken_reason = None
        self._err = E_NONE

    def __dealloc__(self):
        free(self._scratch)

    cdef int _map_areas(self, uint64_t dsz, uint64_t dal, uint64_t drsz, uint64_t dral,
                        uint64_t dvsz, uint64_t dval, bint device_side) except -1:
        """Translate the three areas once (they stay pinned with the
        AddressSpace) and check bus and local alignment."""
        cdef int w
        cdef char *p
        names = ("descriptor area", "driver area", "device area")
        addrs = (self.desc_addr, self.driver_addr, self.device_addr)
        sizes = (dsz, drsz, dvsz)
        aligns = (dal, dral, dval)
        # who writes what: driver writes desc + driver area; device writes
        # device area (and, packed, used descriptors into the desc ring)
        packed = isinstance(self, (PackedQueue, PackedQueueDriver))
        writes = ((not device_side) or packed, not device_side, device_side)
        ptrs = []
        for name, addr, sz, al, wr in zip(names, addrs, sizes, aligns, writes):
            if addr % al:
                raise ValueError(f"{name} at {addr:#x} is not {al}-byte aligned")
            p = self._as.tr(addr, sz, wr, &w)
            if p == NULL:
                raise ValueError(f"{name} [{addr:#x}, +{sz:#x}) is not inside one "
                                 f"{'writable ' if wr else ''}window of the address space")
            if (<uintptr_t>p) % al:
                raise ValueError(f"{name} maps to a local address that is not {al}-byte aligned")
            ptrs.append(<uintptr_t>p)
        self._desc = <char *><uintptr_t>ptrs[0]
        self._drv = <char *><uintptr_t>ptrs[1]
        self._dev = <char *><uintptr_t>ptrs[2]
        self._scratch = <vq_seg *>calloc(self.size, sizeof(vq_seg))
        if self._scratch == NULL:
            raise MemoryError()
        return 0

    cdef int _used_batch_args(self, heads, lengths, int count, const uint16_t **h,
                              const uint32_t **l) except -1:
        """Unpack add_used_batch arguments (a ChainBatch, or head and length
        arrays) into pointers; returns the count.  The pointers stay valid
        while the caller holds ``heads``/``lengths``."""
        cdef const uint16_t[::1] hv
        cdef const uint32_t[::1] lv
        cdef ChainBatch b
        cdef int n
        if isinstance(heads, ChainBatch):
            b = <ChainBatch>heads
            n = b.count if count < 0 else count
            if n > b.max_chains:
                raise ValueError("count larger than the batch")
            h[0] = &b._heads[0]
            l[0] = &b._used_len[0]
            return n
        hv = heads
        lv = lengths
        n = hv.shape[0] if count < 0 else count
        if n > hv.shape[0] or n > lv.shape[0]:
            raise ValueError("count larger than the arrays")
        if n:
            h[0] = &hv[0]
            l[0] = &lv[0]
        return n

    cdef int _batch_result(self, int err, int k, ChainBatch batch) except -1:
        """End of pop_batch: an oversized chain is the caller's error; a
        corrupted ring raises only when nothing was popped, else the chains
        popped so far are returned and the queue is marked broken."""
        if err == 2:
            raise ValueError(f"chain of {k} segments does not fit in a batch of {batch.max_segments}")
        if err:
            if batch.count == 0:
                self._fail()
            self.broken = True
            self.broken_reason = _MESSAGES.get(self._err, "corrupted ring").format(e1=self._e1, e2=self._e2)
        return batch.count

    cdef int _ready(self) except -1:
        if self.broken:
            raise QueueBrokenError(self.broken_reason)
        self._as.check_open()
        return 0

    cdef int _fail(self) except -1:
        """Turn the nogil error code into the broken state and raise."""
        if not self.broken:
            self.broken = True
            self.broken_reason = _MESSAGES.get(self._err, "corrupted ring").format(
                e1=self._e1, e2=self._e2)
        raise QueueBrokenError(self.broken_reason)

    cdef int _seg(self, uint64_t addr, uint32_t ln, bint write, int n,
                  uint64_t *sum_r, uint64_t *sum_w) noexcept nogil:
        """Validate one buffer descriptor into scratch[n]; -1 with _err set."""
        cdef int w = -1
        cdef char *p
        if n >= <int>self.size:
            self._err = E_LONG; self._e1 = self.size
            return -1
        if addr + ln < addr:
            self._err = E_OVERFLOW; self._e1 = addr; self._e2 = ln
            return -1
        if write:
            sum_w[0] += ln
            if sum_w[0] > U32_MAX:
                self._err = E_OVERFLOW; self._e1 = addr; self._e2 = ln
                return -1
        else:
            if n != self._nread:
                self._err = E_ORDER; self._e1 = n
                return -1
            sum_r[0] += ln
            if sum_r[0] > U32_MAX:
                self._err = E_OVERFLOW; self._e1 = addr; self._e2 = ln
                return -1
            self._nread += 1
        p = self._as.tr(addr, ln, write, &w)
        if p == NULL:
            self._err = E_ADDR; self._e1 = addr; self._e2 = ln
            return -1
        self._scratch[n].ptr = p
        self._scratch[n].addr = addr
        self._scratch[n].len = ln
        self._scratch[n].win = w
        self._scratch[n].write = 1 if write else 0
        return 0

    cdef int _tr_table(self, uint64_t addr, uint32_t ln, char **out) noexcept nogil:
        cdef int w
        if not self.indirect:
            self._err = E_IND_FEATURE
            return -1
        if ln == 0 or ln % 16 or ln // 16 > self.size:
            self._err = E_IND_LEN; self._e1 = ln; self._e2 = self.size
            return -1
        out[0] = self._as.tr(addr, ln, False, &w)
        # descriptor words are loaded as aligned 64-bit atomics
        if out[0] == NULL or (<uintptr_t>out[0]) & 7:
            self._err = E_IND_ADDR; self._e1 = addr; self._e2 = ln
            return -1
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


# ---- split ring, device side ------------------------------------------------

cdef class SplitQueue(_Virtqueue):
    """Device side of a split virtqueue.

    ``pop()`` returns the next DescriptorChain or None; ``add_used(head, len)``
    returns it; ``needs_notification()`` says whether to interrupt the driver
    after add_used; ``enable_notification()`` / ``disable_notification()``
    steer the driver's kicks."""

    def __init__(self, AddressSpace aspace not None, unsigned size, uint64_t desc_addr,
                 uint64_t driver_addr, uint64_t device_addr, *, bint event_idx=False,
                 bint indirect=False):
        if not _is_pow2(size) or size > VIRTQ_MAX_SIZE:
            raise ValueError(f"split queue size {size} is not a power of two in [1, 32768]")
        self._as = aspace
        aspace.check_open()
        self.size = size
        self._mask = size - 1
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self._map_areas(virtq_split_desc_bytes(size), VIRTQ_DESC_ALIGN,
                        virtq_split_avail_bytes(size), VIRTQ_AVAIL_ALIGN,
                        virtq_split_used_bytes(size), VIRTQ_USED_ALIGN, True)
        self._next_avail = 0
        self._next_used = 0
        self._avail_shadow = 0
        self._signalled_valid = False
        self._signalled_used = 0

    # -- state --

    def state(self):
        return QueueState(SPLIT, self.size, self.desc_addr, self.driver_addr, self.device_addr,
                          bool(self.event_idx), bool(self.indirect), self._next_avail,
                          self._next_used, True, True,
                          self._signalled_used if self._signalled_valid else None)

    @staticmethod
    def from_state(AddressSpace aspace not None, state):
        """Rebuild from (untrusted) QueueState; ValueError if inconsistent."""
        _check_state(state, SPLIT)
        if state.inflight:
            raise ValueError("split queue state carries no in-flight list")
        for f in ("next_avail", "next_used"):
            v = getattr(state, f)
            if not isinstance(v, int) or not 0 <= v <= 0xFFFF:
                raise ValueError(f"{f}={v!r} is not a u16")
        if ((state.next_avail - state.next_used) & 0xFFFF) > state.size:
            raise ValueError(f"next_avail {state.next_avail} is more than the queue size "
                             f"ahead of next_used {state.next_used}")
        su = state.signalled_used
        if su is not None and (not isinstance(su, int) or not 0 <= su <= 0xFFFF):
            raise ValueError(f"signalled_used={su!r} is not a u16")
        cdef SplitQueue q = SplitQueue(aspace, state.size, state.desc_addr, state.driver_addr,
                                       state.device_addr, event_idx=bool(state.event_idx),
                                       indirect=bool(state.indirect))
        q._next_avail = state.next_avail
        q._avail_shadow = state.next_avail
        q._next_used = state.next_used
        q._signalled_valid = su is not None
        q._signalled_used = su or 0
        return q

    @property
    def next_avail(self):
        return self._next_avail

    @property
    def next_used(self):
        return self._next_used

    # -- nogil core --

    cdef int _avail_count(self) noexcept nogil:
        """Chains available and not popped yet; -1 (E_AVAIL_JUMP) on a bad index."""
        cdef uint16_t n = self._avail_shadow - self._next_avail
        cdef uint16_t idx
        if n == 0:
            # A1: acquire avail.idx; pairs with R1 (driver's release store of
            # avail.idx after it wrote the descriptors and the ring entry).
            idx = vm_load16(self._drv + VIRTQ_AVAIL_OFF_IDX, VM_ACQUIRE)
            # a driver can never be more than `size` chains ahead of what we
            # returned (it has no free descriptors left)
            if <uint16_t>(idx - self._next_used) > self.size:
                self._err = E_AVAIL_JUMP; self._e1 = self._next_avail; self._e2 = idx
                return -1
            self._avail_shadow = idx
            n = idx - self._next_avail
        return n

    cdef int _walk(self, unsigned head) noexcept nogil:
        """Validate the chain at `head` into scratch; its segment count or -1."""
        cdef char *table = self._desc
        cdef char *d
        cdef unsigned tsize = self.size, i = head
        cdef int n = 0
        cdef bint nested = False
        cdef uint64_t addr, sum_r = 0, sum_w = 0
        cdef uint32_t ln
        cdef uint16_t flags, nxt
        self._nread = 0
        if head >= self.size:
            self._err = E_HEAD; self._e1 = head; self._e2 = self.size
            return -1
        while True:
            # relaxed: ordered after A1 (the driver wrote them before R1)
            d = table + VIRTQ_DESC_SIZE * i
            addr = vm_load64(d + VIRTQ_DESC_OFF_ADDR, VM_RELAXED)
            ln = vm_load32(d + VIRTQ_DESC_OFF_LEN, VM_RELAXED)
            flags = vm_load16(d + VIRTQ_DESC_OFF_FLAGS, VM_RELAXED)
            nxt = vm_load16(d + VIRTQ_DESC_OFF_NEXT, VM_RELAXED)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if nested:
                    self._err = E_IND_NESTED
                    return -1
                if flags & VIRTQ_DESC_F_NEXT:
                    self._err = E_IND_NEXT
                    return -1
                if self._tr_table(addr, ln, &table) < 0:
                    return -1
                nested = True
                tsize = ln // 16
                i = 0
                continue
            # every buffer descriptor grows n, which _seg bounds by the queue
            # size: a loop ends there
            if self._seg(addr, ln, flags & VIRTQ_DESC_F_WRITE, n, &sum_r, &sum_w) < 0:
                return -1
            n += 1
            if not (flags & VIRTQ_DESC_F_NEXT):
                return n
            i = nxt
            if i >= tsize:
                self._err = E_NEXT; self._e1 = i; self._e2 = tsize
                return -1

    cdef void _put_used(self, unsigned id, uint32_t ln) noexcept nogil:
        cdef char *e = self._dev + VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * (self._next_used & self._mask)
        # relaxed: published by R2 below (the used.idx release store)
        vm_store32(e, id, VM_RELAXED)
        vm_store32(e + 4, ln, VM_RELAXED)
        self._next_used += 1

    # -- Python API --

    def pop(self):
        """Next available chain, or None.  QueueBrokenError if the driver
        corrupted the ring (the queue stays broken)."""
        self._ready()
        cdef int n = self._avail_count()
        if n < 0:
            self._fail()
        if n == 0:
            return None
        # ring entry: relaxed, ordered after A1
        cdef unsigned head = vm_load16(self._drv + VIRTQ_AVAIL_OFF_RING + 2 * (self._next_avail & self._mask),
                                       VM_RELAXED)
        n = self._walk(head)
        if n < 0:
            self._fail()
        c = _make_chain(self._as, head, self._scratch, n, self._nread)
        self._next_avail += 1
        return c

    def pop_batch(self, ChainBatch batch not None):
        """Pop as many chains as are available and fit in ``batch`` (burst);
        returns the count (also ``batch.count``).  A corrupted chain stops
        the batch: the chains before it are returned and the next call raises."""
        self._ready()
        cdef int n, k = 0, err = 0
        cdef unsigned head
        batch.count = 0
        batch.nseg = 0
        batch._seg_start[0] = 0
        self._as.enter()
        try:
            with nogil:
                while batch.count < batch.max_chains:
                    n = self._avail_count()
                    if n <= 0:
                        err = n < 0
                        break
                    head = vm_load16(self._drv + VIRTQ_AVAIL_OFF_RING + 2 * (self._next_avail & self._mask),
                                     VM_RELAXED)
                    k = self._walk(head)
                    if k < 0:
                        err = 1
                        break
                    if batch.nseg + k > batch.max_segments:
                        err = 2 if batch.count == 0 else 0
                        break
                    _batch_put(batch, self._as, head, self._scratch, k)
                    self._next_avail += 1
        finally:
            self._as.leave()
        return self._batch_result(err, k, batch)

    def add_used(self, unsigned head, uint32_t length, /):
        """Return chain ``head`` with ``length`` bytes written to its writable part."""
        self._ready()
        if head >= self.size:
            raise ValueError(f"head {head} outside queue of size {self.size}")
        if self._next_avail == self._next_used:
            raise LocalProtocolError("add_used without a popped chain")
        self._put_used(head, length)
        # R2: release used.idx; pairs with A2 (driver's acquire load of
        # used.idx before it reads the used element).
        vm_store16(self._dev + VIRTQ_USED_OFF_IDX, self._next_used, VM_RELEASE)

    def add_used_batch(self, heads, lengths=None, int count=-1):
        """Return ``count`` chains with one publish: ``heads``/``lengths``
        arrays (uint16 / uint32; default count: all), or a ChainBatch
        (``heads`` and ``used_len``; default count: ``batch.count``)."""
        self._ready()
        cdef const uint16_t *h = NULL
        cdef const uint32_t *l = NULL
        cdef int i
        cdef int n = self._used_batch_args(heads, lengths, count, &h, &l)
        if n == 0:
            return 0
        if n > <uint16_t>(self._next_avail - self._next_used):
            raise LocalProtocolError(f"add_used_batch of {n} chains but only "
                                     f"{<uint16_t>(self._next_avail - self._next_used)} popped")
        for i in range(n):
            if h[i] >= self.size:
                raise ValueError(f"head {h[i]} outside queue of size {self.size}")
        for i in range(n):
            self._put_used(h[i], l[i])
        # R2: release used.idx; pairs with A2 (driver's acquire load).
        vm_store16(self._dev + VIRTQ_USED_OFF_IDX, self._next_used, VM_RELEASE)
        return n

    def has_available(self):
        """True if pop() would return a chain (or find corruption)."""
        self._ready()
        return self._avail_count() != 0

    def needs_notification(self):
        """After add_used: should the device notify the driver?  Updates the
        signalled position (EVENT_IDX), so call it once per batch."""
        self._ready()
        cdef uint16_t ev, old
        cdef bint valid
        # Full fence: our used.idx store must be visible before we read the
        # driver's suppression field.  Else (lost wake-up) the driver, having
        # seen the old used.idx, enables callbacks and sleeps while we read
        # its old NO_INTERRUPT / used_event and skip the interrupt.
        vm_fence_seq_cst()
        if self.event_idx:
            ev = vm_load16(self._drv + VIRTQ_AVAIL_OFF_RING + 2 * self.size, VM_RELAXED)
            old = self._signalled_used
            valid = self._signalled_valid
            self._signalled_used = self._next_used
            self._signalled_valid = True
            return (not valid) or bool(virtq_need_event(ev, self._next_used, old))
        return not (vm_load16(self._drv + VIRTQ_AVAIL_OFF_FLAGS, VM_RELAXED) & VIRTQ_AVAIL_F_NO_INTERRUPT)

    def enable_notification(self):
        """Ask the driver to kick on new chains.  Returns True if chains are
        already pending: process them instead of sleeping."""
        self._ready()
        if self.event_idx:
            vm_store16(self._dev + VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * self.size,
                       self._next_avail, VM_RELAXED)
        else:
            vm_store16(self._dev + VIRTQ_USED_OFF_FLAGS, 0, VM_RELAXED)
        # Full fence: the enable store must be visible before we re-read
        # avail.idx.  Else (lost wake-up) the driver adds a chain after our
        # last look, reads the old NO_NOTIFY / avail_event, skips the kick,
        # and we sleep on the doorbell forever.
        vm_fence_seq_cst()
        cdef int n = self._avail_count()
        if n < 0:
            self._fail()
        return n > 0

    def disable_notification(self):
        """Ask the driver not to kick (a hint; with EVENT_IDX a no-op: the
        driver kicks at most once past the last avail_event)."""
        self._ready()
        if not self.event_idx:
            # relaxed: only a hint; enable_notification's fence closes the race
            vm_store16(self._dev + VIRTQ_USED_OFF_FLAGS, VIRTQ_USED_F_NO_NOTIFY, VM_RELAXED)

    def __repr__(self):
        return (f"<SplitQueue size={self.size} next_avail={self._next_avail} "
                f"next_used={self._next_used}{' BROKEN' if self.broken else ''}>")


# ---- packed ring, device side -----------------------------------------------

cdef class PackedQueue(_Virtqueue):
    """Device side of a packed virtqueue (same API as SplitQueue; ``head`` of
    a chain is its buffer id)."""

    def __cinit__(self, *args, **kwargs):
        self._ndesc = NULL

    def __dealloc__(self):
        free(self._ndesc)

    def __init__(self, AddressSpace aspace not None, unsigned size, uint64_t desc_addr,
                 uint64_t driver_addr, uint64_t device_addr, *, bint event_idx=False,
                 bint indirect=False):
        if size == 0 or size > VIRTQ_MAX_SIZE:
            raise ValueError(f"packed queue size {size} outside [1, 32768]")
        self._as = aspace
        aspace.check_open()
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self._map_areas(virtq_packed_desc_bytes(size), PVIRTQ_DESC_ALIGN,
                        PVIRTQ_EVENT_SIZE, PVIRTQ_EVENT_ALIGN,
                        PVIRTQ_EVENT_SIZE, PVIRTQ_EVENT_ALIGN, True)
        self._ndesc = <uint16_t *>calloc(size, sizeof(uint16_t))
        if self._ndesc == NULL:
            raise MemoryError()
        self._next_avail = 0
        self._avail_wrap = True
        self._next_used = 0
        self._used_wrap = True
        self._signalled_valid = False
        self._signalled_used = 0
        self._used_since = 0
        self._outstanding = 0

    def state(self):
        inflight = tuple((i, self._ndesc[i]) for i in range(self.size) if self._ndesc[i])
        return QueueState(PACKED, self.size, self.desc_addr, self.driver_addr, self.device_addr,
                          bool(self.event_idx), bool(self.indirect), self._next_avail,
                          self._next_used, bool(self._avail_wrap), bool(self._used_wrap),
                          self._signalled_used if self._signalled_valid else None, inflight)

    @staticmethod
    def from_state(AddressSpace aspace not None, state):
        """Rebuild from (untrusted) QueueState; ValueError if inconsistent."""
        _check_state(state, PACKED)
        for f in ("next_avail", "next_used"):
            v = getattr(state, f)
            if not isinstance(v, int) or not 0 <= v < state.size:
                raise ValueError(f"{f}={v!r} outside [0, {state.size})")
        su = state.signalled_used
        if su is not None and (not isinstance(su, int) or not 0 <= su < state.size):
            raise ValueError(f"signalled_used={su!r} outside [0, {state.size})")
        # descriptors between next_used and next_avail belong to popped chains
        if bool(state.avail_wrap) == bool(state.used_wrap):
            if state.next_avail < state.next_used:
                raise ValueError("next_avail behind next_used in the same lap")
            span = state.next_avail - state.next_used
        else:
            if state.next_avail > state.next_used:
                raise ValueError("next_avail more than one lap ahead of next_used")
            span = state.size - state.next_used + state.next_avail
        seen = set()
        total = 0
        for item in state.inflight:
            bid, nd = item
            if not isinstance(bid, int) or not 0 <= bid < state.size or bid in seen:
                raise ValueError(f"in-flight buffer id {bid!r} invalid or repeated")
            if not isinstance(nd, int) or not 1 <= nd <= state.size:
                raise ValueError(f"in-flight chain {bid} has {nd!r} descriptors")
            seen.add(bid)
            total += nd
        if total != span:
            raise ValueError(f"in-flight chains hold {total} descriptors but next_used..next_avail "
                             f"spans {span}")
        cdef PackedQueue q = PackedQueue(aspace, state.size, state.desc_addr, state.driver_addr,
                                         state.device_addr, event_idx=bool(state.event_idx),
                                         indirect=bool(state.indirect))
        q._next_avail = state.next_avail
        q._avail_wrap = bool(state.avail_wrap)
        q._next_used = state.next_used
        q._used_wrap = bool(state.used_wrap)
        q._signalled_valid = su is not None
        q._signalled_used = su or 0
        # how far used moved since that signal is not in the state (it may
        # be a full lap): answer the next needs_notification() with True.  A
        # spurious interrupt is harmless, a lost one is not.
        q._used_since = q.size if su is not None else 0
        for bid, nd in state.inflight:
            q._ndesc[bid] = nd
        q._outstanding = span
        return q

    @property
    def next_avail(self):
        return self._next_avail

    @property
    def next_used(self):
        return self._next_used

    @property
    def avail_wrap(self):
        return self._avail_wrap

    @property
    def used_wrap(self):
        return self._used_wrap

    cdef int _walk(self, unsigned pos, bint wrap, uint16_t flags) noexcept nogil:
        """Validate the chain whose head (flags already loaded) is at `pos`."""
        cdef char *d
        cdef char *table
        cdef unsigned i = pos, k, tn
        cdef int n = 0, nring = 0
        cdef bint w = wrap
        cdef uint64_t addr, sum_r = 0, sum_w = 0
        cdef uint32_t ln
        cdef uint16_t f2
        self._nread = 0
        while True:
            d = self._desc + PVIRTQ_DESC_SIZE * i
            if nring > 0:
                # relaxed: ordered after A1 on the head flags (the driver
                # writes the head's flags last, with R1)
                flags = vm_load16(d + PVIRTQ_DESC_OFF_FLAGS, VM_RELAXED)
                if not _avail_ok(flags, w):
                    self._err = E_WRAP; self._e1 = i; self._e2 = w
                    return -1
            addr = vm_load64(d + PVIRTQ_DESC_OFF_ADDR, VM_RELAXED)
            ln = vm_load32(d + PVIRTQ_DESC_OFF_LEN, VM_RELAXED)
            nring += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if flags & VIRTQ_DESC_F_NEXT:
                    self._err = E_IND_NEXT
                    return -1
                if self._tr_table(addr, ln, &table) < 0:
                    return -1
                tn = ln // 16
                for k in range(tn):
                    # packed indirect tables are sequential: NEXT is ignored
                    f2 = vm_load16(table + PVIRTQ_DESC_SIZE * k + PVIRTQ_DESC_OFF_FLAGS, VM_RELAXED)
                    if f2 & VIRTQ_DESC_F_INDIRECT:
                        self._err = E_IND_NESTED
                        return -1
                    if self._seg(vm_load64(table + PVIRTQ_DESC_SIZE * k, VM_RELAXED),
                                 vm_load32(table + PVIRTQ_DESC_SIZE * k + PVIRTQ_DESC_OFF_LEN, VM_RELAXED),
                                 f2 & VIRTQ_DESC_F_WRITE, n, &sum_r, &sum_w) < 0:
                        return -1
                    n += 1
                break
            if self._seg(addr, ln, flags & VIRTQ_DESC_F_WRITE, n, &sum_r, &sum_w) < 0:
                return -1
            n += 1
            if not (flags & VIRTQ_DESC_F_NEXT):
                break
            if nring >= <int>self.size:
                self._err = E_LONG; self._e1 = self.size
                return -1
            i += 1
            if i == self.size:
                i = 0
                w = not w
        # the buffer id sits in the last descriptor of the chain
        self._id = vm_load16(d + PVIRTQ_DESC_OFF_ID, VM_RELAXED)
        self._nring = nring
        return n

    cdef int _peek(self) noexcept nogil:
        """Validate the chain at next_avail: segment count, 0 if none, -1."""
        cdef uint16_t flags
        cdef int n
        # A1: acquire the head descriptor's flags; pairs with R1 (driver's
        # release store of the head flags, written after the whole chain).
        flags = vm_load16(self._desc + PVIRTQ_DESC_SIZE * self._next_avail + PVIRTQ_DESC_OFF_FLAGS,
                          VM_ACQUIRE)
        if not _avail_ok(flags, self._avail_wrap):
            # not made available for this lap (a previous lap's leftover)
            return 0
        n = self._walk(self._next_avail, self._avail_wrap, flags)
        if n < 0:
            return -1
        if self._id >= <int>self.size:
            self._err = E_ID; self._e1 = self._id; self._e2 = self.size
            return -1
        if self._ndesc[self._id]:
            self._err = E_ID_INFLIGHT; self._e1 = self._id
            return -1
        if self._outstanding + self._nring > self.size:
            self._err = E_TOO_MANY; self._e1 = self._outstanding + self._nring; self._e2 = self.size
            return -1
        return n

    cdef void _advance(self) noexcept nogil:
        self._ndesc[self._id] = self._nring
        self._outstanding += self._nring
        self._next_avail += self._nring
        if self._next_avail >= self.size:
            self._next_avail -= self.size
            self._avail_wrap = not self._avail_wrap

    cdef int _put_used(self, unsigned id, uint32_t ln) noexcept nogil:
        cdef unsigned k = self._ndesc[id]
        cdef char *d = self._desc + PVIRTQ_DESC_SIZE * self._next_used
        cdef uint16_t flags
        if k == 0:
            return -1
        flags = (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) if self._used_wrap else 0
        if ln:
            flags |= VIRTQ_DESC_F_WRITE
        vm_store32(d + PVIRTQ_DESC_OFF_LEN, ln, VM_RELAXED)
        vm_store16(d + PVIRTQ_DESC_OFF_ID, id, VM_RELAXED)
        # R2: release the used descriptor's flags; pairs with A2 (driver's
        # acquire load of the flags before it reads id and len).
        vm_store16(d + PVIRTQ_DESC_OFF_FLAGS, flags, VM_RELEASE)
        self._ndesc[id] = 0
        self._outstanding -= k
        self._used_since += k
        self._next_used += k
        if self._next_used >= self.size:
            self._next_used -= self.size
            self._used_wrap = not self._used_wrap
        return 0

    def pop(self):
        """Next available chain, or None.  QueueBrokenError on corruption."""
        self._ready()
        cdef int n = self._peek()
        if n < 0:
            self._fail()
        if n == 0:
            return None
        c = _make_chain(self._as, self._id, self._scratch, n, self._nread)
        self._advance()
        return c

    def pop_batch(self, ChainBatch batch not None):
        """Burst pop into ``batch``; see SplitQueue.pop_batch."""
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
                    if batch.nseg + k > batch.max_segments:
                        err = 2 if batch.count == 0 else 0
                        break
                    _batch_put(batch, self._as, self._id, self._scratch, k)
                    self._advance()
        finally:
            self._as.leave()
        return self._batch_result(err, k, batch)

    def add_used(self, unsigned head, uint32_t length, /):
        """Return buffer ``head`` (its id) with ``length`` bytes written."""
        self._ready()
        if head >= self.size or self._put_used(head, length) < 0:
            raise LocalProtocolError(f"buffer id {head} is not in flight")

    def add_used_batch(self, heads, lengths=None, int count=-1):
        """Return ``count`` chains (arrays or a ChainBatch, as for
        SplitQueue.add_used_batch).  Each used descriptor is published with
        its own release store (the driver walks them in order).
        LocalProtocolError at the first id not in flight (the ones before it
        are already returned)."""
        self._ready()
        cdef const uint16_t *h = NULL
        cdef const uint32_t *l = NULL
        cdef int i, bad = -1
        cdef int n = self._used_batch_args(heads, lengths, count, &h, &l)
        if n == 0:
            return 0
        for i in range(n):
            if h[i] >= self.size or self._put_used(h[i], l[i]) < 0:
                bad = i
                break
        if bad >= 0:
            raise LocalProtocolError(f"buffer id {h[bad]} is not in flight")
        return n

    def has_available(self):
        self._ready()
        return _avail_ok(vm_load16(self._desc + PVIRTQ_DESC_SIZE * self._next_avail + PVIRTQ_DESC_OFF_FLAGS,
                                   VM_ACQUIRE), self._avail_wrap)

    def needs_notification(self):
        """After add_used: should the device notify the driver?"""
        self._ready()
        cdef uint32_t ev
        cdef uint16_t flags, off, old, new
        cdef bint notify
        # Full fence: our used descriptors' flags must be visible before we
        # read the driver event suppression.  Else (lost wake-up) the driver
        # saw no used descriptor, enabled callbacks and sleeps while we read
        # its old DISABLE and skip the interrupt.
        vm_fence_seq_cst()
        # one 32-bit load: off_wrap and flags from the same driver write
        ev = vm_load32(self._drv, VM_RELAXED)
        flags = (ev >> 16) & 3
        if flags == VIRTQ_EVENT_F_DISABLE:
            notify = False
        elif flags != VIRTQ_EVENT_F_DESC or not self.event_idx:
            notify = True
        elif not self._signalled_valid or self._used_since >= self.size:
            notify = True
        else:
            # coordinates relative to the current used lap: the old position
            # is in the previous lap when it is ahead of next_used
            new = self._next_used
            old = self._signalled_used
            if old > new or (old == new and self._used_since):
                old = <uint16_t>(old - self.size)
            off = ev & VIRTQ_EVENT_OFF_MASK
            if ((ev >> VIRTQ_EVENT_WRAP_SHIFT) & 1) != self._used_wrap:
                off = <uint16_t>(off - self.size)
            notify = virtq_need_event(off, new, old)
        self._signalled_used = self._next_used
        self._signalled_valid = True
        self._used_since = 0
        return notify

    def enable_notification(self):
        """Ask the driver to kick; True if chains are already pending."""
        self._ready()
        cdef uint32_t v
        if self.event_idx:
            v = (VIRTQ_EVENT_F_DESC << 16) | self._next_avail | (<uint32_t>self._avail_wrap << VIRTQ_EVENT_WRAP_SHIFT)
        else:
            v = VIRTQ_EVENT_F_ENABLE << 16
        vm_store32(self._dev, v, VM_RELAXED)
        # Full fence: the enable store must be visible before we re-read the
        # next descriptor.  Else (lost wake-up) the driver publishes a chain
        # after our last look, reads the old DISABLE, skips the kick, and we
        # sleep forever.
        vm_fence_seq_cst()
        return self.has_available()

    def disable_notification(self):
        """Ask the driver not to kick (relaxed: a hint; enable closes the race)."""
        self._ready()
        vm_store32(self._dev, VIRTQ_EVENT_F_DISABLE << 16, VM_RELAXED)

    def __repr__(self):
        return (f"<PackedQueue size={self.size} next_avail={self._next_avail}/{int(self._avail_wrap)} "
                f"next_used={self._next_used}/{int(self._used_wrap)}{' BROKEN' if self.broken else ''}>")


# ---- driver side --------------------------------------------------------------

cdef class _Driver(_Virtqueue):
    """Driver-side plumbing: tokens, scatter-list parsing, indirect pool."""

    def __cinit__(self, *args, **kwargs):
        self._ndesc = NULL
        self._in_len = NULL
        self._tok_kind = NULL
        self._tok_int = NULL
        self._next = NULL
        self._sg_addr = NULL
        self._sg_len = NULL
        self._ind_ptr = NULL

    def __dealloc__(self):
        free(self._ndesc); free(self._in_len); free(self._tok_kind); free(self._tok_int)
        free(self._next); free(self._sg_addr); free(self._sg_len)

    cdef _setup(self, AddressSpace aspace, unsigned size, uint64_t desc_addr, uint64_t driver_addr,
                uint64_t device_addr, bint event_idx, bint indirect, indirect_addr, unsigned indirect_max,
                bint packed):
        cdef int w
        self._as = aspace
        aspace.check_open()
        self.size = size
        self._mask = size - 1
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        if packed:
            self._map_areas(virtq_packed_desc_bytes(size), PVIRTQ_DESC_ALIGN,
                            PVIRTQ_EVENT_SIZE, PVIRTQ_EVENT_ALIGN,
                            PVIRTQ_EVENT_SIZE, PVIRTQ_EVENT_ALIGN, False)
        else:
            self._map_areas(virtq_split_desc_bytes(size), VIRTQ_DESC_ALIGN,
                            virtq_split_avail_bytes(size), VIRTQ_AVAIL_ALIGN,
                            virtq_split_used_bytes(size), VIRTQ_USED_ALIGN, False)
        self._ndesc = <uint16_t *>calloc(size, sizeof(uint16_t))
        self._in_len = <uint32_t *>calloc(size, sizeof(uint32_t))
        self._tok_kind = <uint8_t *>calloc(size, sizeof(uint8_t))
        self._tok_int = <uint64_t *>calloc(size, sizeof(uint64_t))
        self._next = <uint16_t *>calloc(size, sizeof(uint16_t))
        self._sg_addr = <uint64_t *>calloc(size, sizeof(uint64_t))
        self._sg_len = <uint32_t *>calloc(size, sizeof(uint32_t))
        if not (self._ndesc and self._in_len and self._tok_kind and self._tok_int and self._next
                and self._sg_addr and self._sg_len):
            raise MemoryError()
        self._tok_obj = [None] * size
        self._use_indirect = False
        self._ind_max = 0
        if indirect and indirect_addr is not None and indirect_max > 1:
            if indirect_addr % 16:
                raise ValueError(f"indirect pool at {indirect_addr:#x} is not 16-byte aligned")
            self._ind_max = min(indirect_max, size)
            self._ind_ptr = aspace.tr(indirect_addr, <uint64_t>size * self._ind_max * 16, True, &w)
            if self._ind_ptr == NULL or (<uintptr_t>self._ind_ptr) & 15:
                raise ValueError("indirect pool is not inside one writable window (or misaligned)")
            self._ind_bus = indirect_addr
            self._use_indirect = True
        self._num_free = size
        self._num_added = 0
        self._cb_disabled = False
        # the driver owns initialisation: zeroed rings (packed: no descriptor
        # looks available or used; split: idx 0, flags 0, events 0)
        regions = [aspace.translate(a, s, write=True) for a, s in
                   zip((desc_addr, driver_addr, device_addr),
                       (packed_area_sizes(size) if packed else split_area_sizes(size)))]
        for (r, off), s in zip(regions, (packed_area_sizes(size) if packed else split_area_sizes(size))):
            r.zero(off, s)

    cdef int _parse_sg(self, object out, object in_) except -1:
        """Scatter lists of (bus_addr, length) pairs into _sg; returns n and
        leaves the out count in _nread."""
        cdef int n = 0
        cdef uint64_t total_in = 0
        for a, l in out:
            if n >= <int>self.size:
                raise ValueError(f"chain longer than the queue size {self.size}")
            self._sg_addr[n] = a
            self._sg_len[n] = l
            n += 1
        self._nread = n
        for a, l in in_:
            if n >= <int>self.size:
                raise ValueError(f"chain longer than the queue size {self.size}")
            self._sg_addr[n] = a
            self._sg_len[n] = l
            total_in += self._sg_len[n]
            n += 1
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        if total_in > U32_MAX:
            raise ValueError("device-writable part longer than 4 GiB")
        return n

    cdef int _store_token(self, unsigned id, object token) except -1:
        if type(token) is int:
            try:
                self._tok_int[id] = token
                self._tok_kind[id] = 1
                return 0
            except OverflowError:
                pass
        self._tok_obj[id] = token
        self._tok_kind[id] = 2
        return 0

    cdef object _take_token(self, unsigned id):
        cdef uint8_t k = self._tok_kind[id]
        self._tok_kind[id] = 0
        if k == 1:
            return self._tok_int[id]
        t = self._tok_obj[id]
        self._tok_obj[id] = None
        return t

    cdef void _write_table(self, char *table, int n, int nout, bint split) noexcept nogil:
        cdef int k
        cdef char *d
        cdef uint16_t f
        for k in range(n):
            d = table + 16 * k
            f = VIRTQ_DESC_F_WRITE if k >= nout else 0
            vm_store64(d, self._sg_addr[k], VM_RELAXED)
            vm_store32(d + 8, self._sg_len[k], VM_RELAXED)
            if split:
                if k + 1 < n:
                    f |= VIRTQ_DESC_F_NEXT
                vm_store16(d + VIRTQ_DESC_OFF_FLAGS, f, VM_RELAXED)
                vm_store16(d + VIRTQ_DESC_OFF_NEXT, k + 1 if k + 1 < n else 0, VM_RELAXED)
            else:
                vm_store16(d + PVIRTQ_DESC_OFF_ID, 0, VM_RELAXED)
                vm_store16(d + PVIRTQ_DESC_OFF_FLAGS, f, VM_RELAXED)

    cdef int _add(self, int n, int nout) noexcept nogil:
        return -1

    cdef int _peek_used(self, unsigned *id, uint32_t *ln) noexcept nogil:
        return 0

    cdef void _consume(self, unsigned id) noexcept nogil:
        pass

    cdef void _publish(self) noexcept nogil:
        pass

    cdef void _after_get(self) noexcept nogil:
        pass

    @property
    def num_free(self):
        """Free descriptors (split: table entries, packed: ring slots)."""
        return self._num_free

    def add(self, out, in_=(), token=None):
        """Expose a chain: ``out`` (device-readable) and ``in_``
        (device-writable) are sequences of ``(bus_addr, length)``.  Returns
        False when there is no room (nothing was written).  ``token`` comes
        back from get_used()."""
        self._ready()
        cdef int n = self._parse_sg(out, in_)
        cdef int id = self._add(n, self._nread)
        if id < 0:
            return False
        self._store_token(id, token)
        self._publish()
        return True

    def add_buf(self, uint64_t addr, uint32_t length, bint device_writable=False, token=None):
        """One-buffer chain (the common fast path of add())."""
        self._ready()
        self._sg_addr[0] = addr
        self._sg_len[0] = length
        cdef int id = self._add(1, 0 if device_writable else 1)
        if id < 0:
            return False
        self._store_token(id, token)
        self._publish()
        return True

    cdef int _add_many(self, const uint64_t *addr, const uint32_t *length, const uint8_t *writable,
                       const uint64_t *tokens, const uint16_t *nseg, const uint32_t *seg_start,
                       int nchains, int nsegs, int *bad) noexcept nogil:
        """Add chains until one does not fit; publish once.  Chain c's
        segments: seg_start[c]:seg_start[c+1] if given, else the next nseg[c]
        (or 1) segments.  bad: 1 shape, 2 order, 3 length."""
        cdef int c, j = 0, k, s, nout, id, done = 0
        cdef uint64_t tin
        for c in range(nchains):
            if seg_start != NULL:
                j = seg_start[c]
                k = <int>seg_start[c + 1] - j
            else:
                k = nseg[c] if nseg != NULL else 1
            if k <= 0 or k > <int>self.size or j + k > nsegs:
                bad[0] = 1
                break
            nout = 0
            tin = 0
            for s in range(k):
                self._sg_addr[s] = addr[j + s]
                self._sg_len[s] = length[j + s]
                if writable[j + s]:
                    tin += length[j + s]
                elif nout == s:
                    nout += 1
                else:
                    bad[0] = 2
            if bad[0]:
                break
            if tin > U32_MAX:
                bad[0] = 3
                break
            id = self._add(k, nout)
            if id < 0:
                break
            self._tok_int[id] = tokens[c]
            self._tok_kind[id] = 1
            j += k
            done += 1
        if done:
            self._publish()
        return done

    def add_batch(self, addr, length=None, writable=None, tokens=None, nseg=None):
        """Burst add, returns the number of chains added (as many as fit).

        Either a ChainBatch (``count`` chains described by ``seg_start``,
        ``addr``, ``length``, ``writable``, ``tokens``: the fast path), or
        arrays: chain ``i`` takes the next ``nseg[i]`` (default 1) segments of
        addr/length/writable (readable ones first) and integer token
        ``tokens[i]``."""
        self._ready()
        cdef ChainBatch b
        cdef const uint64_t[::1] av
        cdef const uint32_t[::1] lv
        cdef const uint8_t[::1] wv
        cdef const uint64_t[::1] tv
        cdef const uint16_t[::1] ns
        cdef int bad = 0, done, nchains, nsegs
        if isinstance(addr, ChainBatch):
            b = <ChainBatch>addr
            nchains = b.count
            if nchains <= 0:
                return 0
            if nchains > b.max_chains:
                raise ValueError("batch count larger than the batch")
            done = self._add_many(&b._addr[0], &b._length[0], &b._writable[0], &b._tokens[0],
                                  NULL, &b._seg_start[0], nchains, b.max_segments, &bad)
        else:
            av = addr
            lv = length
            wv = writable
            tv = tokens
            nchains = tv.shape[0]
            nsegs = av.shape[0]
            if lv.shape[0] < nsegs or wv.shape[0] < nsegs:
                raise ValueError("addr, length and writable differ in length")
            if nchains == 0 or nsegs == 0:
                return 0
            if nseg is not None:
                ns = nseg
                if ns.shape[0] < nchains:
                    raise ValueError("nseg shorter than tokens")
                done = self._add_many(&av[0], &lv[0], &wv[0], &tv[0], &ns[0], NULL, nchains, nsegs, &bad)
            else:
                done = self._add_many(&av[0], &lv[0], &wv[0], &tv[0], NULL, NULL, nchains, nsegs, &bad)
        if bad == 1:
            raise ValueError(f"chain {done}: bad segment count (0, above the queue size, or past the arrays)")
        if bad == 2:
            raise ValueError(f"chain {done}: device-readable segment after a device-writable one")
        if bad == 3:
            raise ValueError(f"chain {done}: device-writable part longer than 4 GiB")
        return done

    def get_used(self):
        """``(token, length)`` of the next used chain, or None."""
        self._ready()
        cdef unsigned id
        cdef uint32_t ln
        cdef int r = self._peek_used(&id, &ln)
        if r == 0:
            return None
        if r < 0:
            self._fail()
        tok = self._take_token(id)
        self._consume(id)
        self._after_get()
        return tok, ln

    cdef int _get_many(self, uint64_t *tokens, uint32_t *lengths, int cap, int *r) noexcept nogil:
        cdef int n = 0
        cdef unsigned id
        cdef uint32_t ln
        r[0] = 0
        while n < cap:
            r[0] = self._peek_used(&id, &ln)
            if r[0] <= 0 or self._tok_kind[id] != 1:
                break
            tokens[n] = self._tok_int[id]
            lengths[n] = ln
            self._tok_kind[id] = 0
            self._consume(id)
            n += 1
        if n:
            self._after_get()
        return n

    def get_used_batch(self, tokens, lengths=None):
        """Burst: integer tokens and lengths of used chains into ``tokens`` /
        ``lengths`` arrays, or into a ChainBatch's ``tokens`` / ``used_len``
        (then ``batch.count`` is set too).  Returns the count.  Stops before a
        chain whose token is not an integer (fetch that one with get_used())."""
        self._ready()
        cdef ChainBatch b = None
        cdef uint64_t[::1] tv
        cdef uint32_t[::1] lv
        cdef int n, r = 0
        if isinstance(tokens, ChainBatch):
            b = <ChainBatch>tokens
            n = self._get_many(&b._tokens[0], &b._used_len[0], b.max_chains, &r)
            b.count = n
        else:
            tv = tokens
            lv = lengths
            n = min(tv.shape[0], lv.shape[0])
            if n == 0:
                return 0
            n = self._get_many(&tv[0], &lv[0], n, &r)
        if r < 0:
            if n == 0:
                self._fail()
            self.broken = True
            self.broken_reason = _MESSAGES.get(self._err, "corrupted ring").format(e1=self._e1, e2=self._e2)
        return n

    def has_used(self):
        """True if get_used() would return something (or find corruption)."""
        self._ready()
        cdef unsigned id
        cdef uint32_t ln
        return self._peek_used(&id, &ln) != 0

    @property
    def in_flight(self):
        """Chains added and not returned yet."""
        return sum(1 for i in range(self.size) if self._tok_kind[i])


cdef class SplitQueueDriver(_Driver):
    """Driver side of a split virtqueue (Linux virtio_ring.c semantics).

    ``indirect_addr`` is a pool of ``size * indirect_max`` 16-byte entries the
    driver owns (``create()`` allocates it); with INDIRECT negotiated, a chain
    of 2..indirect_max buffers takes one ring descriptor."""

    def __init__(self, AddressSpace aspace not None, unsigned size, uint64_t desc_addr,
                 uint64_t driver_addr, uint64_t device_addr, *, bint event_idx=False,
                 bint indirect=False, indirect_addr=None, unsigned indirect_max=8,
                 uint16_t start_index=0):
        if not _is_pow2(size) or size > VIRTQ_MAX_SIZE:
            raise ValueError(f"split queue size {size} is not a power of two in [1, 32768]")
        self._setup(aspace, size, desc_addr, driver_addr, device_addr, event_idx, indirect,
                    indirect_addr, indirect_max, False)
        cdef unsigned i
        for i in range(size):
            self._next[i] = i + 1
        self._free_head = 0
        # start_index: both indices start there (a device restored with
        # next_avail == next_used == start_index; tests use it to reach the
        # u16 wrap quickly).  Written before the device looks at the ring.
        self._avail_idx = start_index
        self._last_used = start_index
        self._used_shadow = start_index
        vm_store16(self._drv + VIRTQ_AVAIL_OFF_IDX, start_index, VM_RELAXED)
        vm_store16(self._dev + VIRTQ_USED_OFF_IDX, start_index, VM_RELAXED)

    @staticmethod
    def create(allocator, unsigned size, *, AddressSpace aspace=None, bint event_idx=False,
               bint indirect=False, unsigned indirect_max=8, uint16_t start_index=0):
        """Allocate the rings (and the indirect pool) from a RegionAllocator.
        ``aspace`` defaults to one window over the allocator's region."""
        d, dr, dv = split_area_sizes(size)
        da = allocator.alloc(d, VIRTQ_DESC_ALIGN)
        dra = allocator.alloc(dr, VIRTQ_AVAIL_ALIGN)
        dva = allocator.alloc(dv, 4096 if dv >= 4096 else VIRTQ_USED_ALIGN)
        ia = allocator.alloc(size * min(indirect_max, size) * 16, 16) if indirect and indirect_max > 1 else None
        if aspace is None:
            aspace = AddressSpace([(allocator.bus_base, allocator.region, 0, allocator.region.size)])
        return SplitQueueDriver(aspace, size, da, dra, dva, event_idx=event_idx, indirect=indirect,
                                indirect_addr=ia, indirect_max=indirect_max, start_index=start_index)

    @property
    def avail_idx(self):
        return self._avail_idx

    @property
    def next_offset_wrap(self):
        """virtio-msg EVENT_AVAIL ``next_offset_wrap`` (notification data):
        split ring: low 15 bits of avail.idx, wrap = bit 15, wrap in bit 31."""
        return ((<uint32_t>(self._avail_idx >> 15)) << 31) | (self._avail_idx & 0x7FFF)

    @property
    def last_used(self):
        return self._last_used

    cdef int _add(self, int n, int nout) noexcept nogil:
        """Write one chain from _sg; its head, or -1 when there is no room.
        Not yet visible to the device: _publish() does that."""
        cdef bint ind = self._use_indirect and n > 1 and n <= <int>self._ind_max
        cdef int need = 1 if ind else n
        cdef unsigned head, i, last, k
        cdef char *d
        cdef uint16_t f
        cdef uint32_t in_len = 0
        if self._num_free < need:
            return -1
        head = self._free_head
        for k in range(nout, n):
            in_len += self._sg_len[k]
        if ind:
            self._write_table(self._ind_ptr + <uint64_t>head * self._ind_max * 16, n, nout, True)
            d = self._desc + VIRTQ_DESC_SIZE * head
            vm_store64(d, self._ind_bus + <uint64_t>head * self._ind_max * 16, VM_RELAXED)
            vm_store32(d + 8, n * 16, VM_RELAXED)
            vm_store16(d + VIRTQ_DESC_OFF_FLAGS, VIRTQ_DESC_F_INDIRECT, VM_RELAXED)
            vm_store16(d + VIRTQ_DESC_OFF_NEXT, 0, VM_RELAXED)
            self._free_head = self._next[head]
        else:
            i = head
            for k in range(n):
                d = self._desc + VIRTQ_DESC_SIZE * i
                f = VIRTQ_DESC_F_WRITE if <int>k >= nout else 0
                if <int>k + 1 < n:
                    f |= VIRTQ_DESC_F_NEXT
                vm_store64(d, self._sg_addr[k], VM_RELAXED)
                vm_store32(d + 8, self._sg_len[k], VM_RELAXED)
                vm_store16(d + VIRTQ_DESC_OFF_FLAGS, f, VM_RELAXED)
                # next comes from our private free list, never from the ring
                vm_store16(d + VIRTQ_DESC_OFF_NEXT, self._next[i] if <int>k + 1 < n else 0, VM_RELAXED)
                i = self._next[i]
            self._free_head = i
        self._num_free -= need
        self._ndesc[head] = need
        self._in_len[head] = in_len
        vm_store16(self._drv + VIRTQ_AVAIL_OFF_RING + 2 * (self._avail_idx & self._mask), head, VM_RELAXED)
        self._avail_idx += 1
        if self._num_added < 0xFFFF:
            self._num_added += 1
        return head

    cdef void _publish(self) noexcept nogil:
        # R1: release avail.idx; pairs with A1 (device's acquire load of
        # avail.idx before it reads the ring entry and descriptors).
        vm_store16(self._drv + VIRTQ_AVAIL_OFF_IDX, self._avail_idx, VM_RELEASE)

    cdef int _peek_used(self, unsigned *id, uint32_t *ln) noexcept nogil:
        cdef uint16_t idx
        cdef char *e
        if self._last_used == self._used_shadow:
            # A2: acquire used.idx; pairs with R2 (device's release store of
            # used.idx after it wrote the used element).
            idx = vm_load16(self._dev + VIRTQ_USED_OFF_IDX, VM_ACQUIRE)
            if <uint16_t>(idx - self._last_used) > <uint16_t>(self._avail_idx - self._last_used):
                self._err = E_USED_JUMP; self._e1 = self._last_used; self._e2 = idx
                return -1
            self._used_shadow = idx
            if idx == self._last_used:
                return 0
        # relaxed: ordered after A2
        e = self._dev + VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * (self._last_used & self._mask)
        id[0] = vm_load32(e, VM_RELAXED)
        ln[0] = vm_load32(e + 4, VM_RELAXED)
        if id[0] >= self.size or self._tok_kind[id[0]] == 0:
            self._err = E_USED_ID; self._e1 = id[0]
            return -1
        if ln[0] > self._in_len[id[0]]:
            self._err = E_USED_LEN; self._e1 = ln[0]; self._e2 = self._in_len[id[0]]
            return -1
        return 1

    cdef void _consume(self, unsigned id) noexcept nogil:
        cdef unsigned k = self._ndesc[id], tail = id, j
        for j in range(k - 1):
            tail = self._next[tail]
        self._next[tail] = self._free_head
        self._free_head = id
        self._num_free += k
        self._ndesc[id] = 0
        self._last_used += 1

    cdef void _after_get(self) noexcept nogil:
        if self.event_idx and not self._cb_disabled:
            vm_store16(self._drv + VIRTQ_AVAIL_OFF_RING + 2 * self.size, self._last_used, VM_RELAXED)
            # Full fence: the new used_event must be visible before our next
            # read of used.idx.  Else (lost wake-up) the device adds a used
            # entry, reads the old used_event and skips the interrupt while
            # we see no new entry and go to sleep.
            vm_fence_seq_cst()

    def kick_prepare(self):
        """After add(): should the driver notify the device?"""
        self._ready()
        cdef bint need
        cdef uint16_t ev
        # Full fence: avail.idx must be visible before we read the device's
        # suppression.  Else (lost wake-up) the device, having seen the old
        # avail.idx, enables notifications and sleeps while we read its old
        # NO_NOTIFY / avail_event and skip the kick.
        vm_fence_seq_cst()
        if self.event_idx:
            ev = vm_load16(self._dev + VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * self.size, VM_RELAXED)
            need = self._num_added >= 0x8000 or virtq_need_event(
                ev, self._avail_idx, <uint16_t>(self._avail_idx - self._num_added))
        else:
            need = not (vm_load16(self._dev + VIRTQ_USED_OFF_FLAGS, VM_RELAXED) & VIRTQ_USED_F_NO_NOTIFY)
        self._num_added = 0
        return need

    def enable_callbacks(self):
        """Ask for used-buffer notifications.  Returns True if used chains are
        already pending: process them instead of sleeping."""
        self._ready()
        self._cb_disabled = False
        if self.event_idx:
            vm_store16(self._drv + VIRTQ_AVAIL_OFF_RING + 2 * self.size, self._last_used, VM_RELAXED)
        else:
            vm_store16(self._drv + VIRTQ_AVAIL_OFF_FLAGS, 0, VM_RELAXED)
        # Full fence: the enable store must be visible before we re-read
        # used.idx.  Else (lost wake-up) the device adds a used entry after
        # our look, reads the old NO_INTERRUPT / used_event and does not
        # interrupt while we sleep.
        vm_fence_seq_cst()
        return self.has_used()

    def disable_callbacks(self):
        """Ask the device not to interrupt (a hint; with EVENT_IDX we simply
        stop moving used_event)."""
        self._ready()
        self._cb_disabled = True
        if not self.event_idx:
            vm_store16(self._drv + VIRTQ_AVAIL_OFF_FLAGS, VIRTQ_AVAIL_F_NO_INTERRUPT, VM_RELAXED)

    def __repr__(self):
        return (f"<SplitQueueDriver size={self.size} avail_idx={self._avail_idx} "
                f"last_used={self._last_used} free={self._num_free}{' BROKEN' if self.broken else ''}>")


cdef class PackedQueueDriver(_Driver):
    """Driver side of a packed virtqueue (Linux virtio_ring.c semantics)."""

    def __init__(self, AddressSpace aspace not None, unsigned size, uint64_t desc_addr,
                 uint64_t driver_addr, uint64_t device_addr, *, bint event_idx=False,
                 bint indirect=False, indirect_addr=None, unsigned indirect_max=8):
        if size == 0 or size > VIRTQ_MAX_SIZE:
            raise ValueError(f"packed queue size {size} outside [1, 32768]")
        self._setup(aspace, size, desc_addr, driver_addr, device_addr, event_idx, indirect,
                    indirect_addr, indirect_max, True)
        cdef unsigned i
        for i in range(size):
            self._next[i] = i + 1
        self._free_id = 0
        self._next_avail = 0
        self._avail_wrap = True
        self._last_used = 0
        self._used_wrap = True

    @staticmethod
    def create(allocator, unsigned size, *, AddressSpace aspace=None, bint event_idx=False,
               bint indirect=False, unsigned indirect_max=8):
        """Allocate the ring, event areas (and indirect pool) from a RegionAllocator."""
        da = allocator.alloc(virtq_packed_desc_bytes(size), PVIRTQ_DESC_ALIGN)
        dra = allocator.alloc(PVIRTQ_EVENT_SIZE, 64)   # own cache line: written by the driver
        dva = allocator.alloc(PVIRTQ_EVENT_SIZE, 64)   # own cache line: written by the device
        ia = allocator.alloc(size * min(indirect_max, size) * 16, 16) if indirect and indirect_max > 1 else None
        if aspace is None:
            aspace = AddressSpace([(allocator.bus_base, allocator.region, 0, allocator.region.size)])
        return PackedQueueDriver(aspace, size, da, dra, dva, event_idx=event_idx, indirect=indirect,
                                 indirect_addr=ia, indirect_max=indirect_max)

    @property
    def next_avail(self):
        return self._next_avail

    @property
    def avail_wrap(self):
        return self._avail_wrap

    @property
    def next_offset_wrap(self):
        """virtio-msg EVENT_AVAIL ``next_offset_wrap`` (notification data):
        packed ring: the offset the next descriptor goes to, wrap counter in
        bit 31."""
        return ((<uint32_t>self._avail_wrap) << 31) | self._next_avail

    @property
    def last_used(self):
        return self._last_used

    @property
    def used_wrap(self):
        return self._used_wrap

    cdef int _add(self, int n, int nout) noexcept nogil:
        """Write one chain and publish it (head flags last, R1); its buffer
        id or -1 when there is no room."""
        cdef bint ind = self._use_indirect and n > 1 and n <= <int>self._ind_max
        cdef int need = 1 if ind else n
        cdef unsigned id, pos, k
        cdef bint w
        cdef char *d
        cdef uint16_t f, head_flags = 0
        cdef uint32_t in_len = 0
        if self._num_free < need or self._free_id >= self.size:
            return -1
        id = self._free_id
        self._free_id = self._next[id]
        for k in range(nout, n):
            in_len += self._sg_len[k]
        pos = self._next_avail
        w = self._avail_wrap
        if ind:
            self._write_table(self._ind_ptr + <uint64_t>id * self._ind_max * 16, n, nout, False)
            d = self._desc + PVIRTQ_DESC_SIZE * pos
            vm_store64(d, self._ind_bus + <uint64_t>id * self._ind_max * 16, VM_RELAXED)
            vm_store32(d + 8, n * 16, VM_RELAXED)
            vm_store16(d + PVIRTQ_DESC_OFF_ID, id, VM_RELAXED)
            head_flags = VIRTQ_DESC_F_INDIRECT | (VIRTQ_DESC_F_AVAIL if w else VIRTQ_DESC_F_USED)
            pos += 1
            if pos == self.size:
                pos = 0
                w = not w
        else:
            for k in range(n):
                d = self._desc + PVIRTQ_DESC_SIZE * pos
                f = VIRTQ_DESC_F_WRITE if <int>k >= nout else 0
                if <int>k + 1 < n:
                    f |= VIRTQ_DESC_F_NEXT
                # AVAIL = our wrap counter, USED = its inverse
                f |= VIRTQ_DESC_F_AVAIL if w else VIRTQ_DESC_F_USED
                vm_store64(d, self._sg_addr[k], VM_RELAXED)
                vm_store32(d + 8, self._sg_len[k], VM_RELAXED)
                vm_store16(d + PVIRTQ_DESC_OFF_ID, id, VM_RELAXED)
                if k == 0:
                    head_flags = f
                else:
                    # relaxed: published by R1 on the head flags below
                    vm_store16(d + PVIRTQ_DESC_OFF_FLAGS, f, VM_RELAXED)
                pos += 1
                if pos == self.size:
                    pos = 0
                    w = not w
        # R1: release the head descriptor's flags, written last; pairs with
        # A1 (device's acquire load of the head flags before it reads the chain).
        vm_store16(self._desc + PVIRTQ_DESC_SIZE * self._next_avail + PVIRTQ_DESC_OFF_FLAGS,
                   head_flags, VM_RELEASE)
        self._next_avail = pos
        self._avail_wrap = w
        self._num_free -= need
        self._ndesc[id] = need
        self._in_len[id] = in_len
        if self._num_added <= 0xFFFF - need:
            self._num_added += need
        else:
            self._num_added = 0xFFFF
        return id

    cdef int _peek_used(self, unsigned *id, uint32_t *ln) noexcept nogil:
        cdef char *d = self._desc + PVIRTQ_DESC_SIZE * self._last_used
        # A2: acquire the used descriptor's flags; pairs with R2 (device's
        # release store of the flags after id and len).
        cdef uint16_t flags = vm_load16(d + PVIRTQ_DESC_OFF_FLAGS, VM_ACQUIRE)
        if not _used_ok(flags, self._used_wrap):
            return 0
        if self._num_free == self.size:
            self._err = E_USED_NOTHING; self._e1 = self._last_used
            return -1
        id[0] = vm_load16(d + PVIRTQ_DESC_OFF_ID, VM_RELAXED)
        ln[0] = vm_load32(d + PVIRTQ_DESC_OFF_LEN, VM_RELAXED)
        if id[0] >= self.size or self._tok_kind[id[0]] == 0:
            self._err = E_USED_ID; self._e1 = id[0]
            return -1
        if ln[0] > self._in_len[id[0]]:
            self._err = E_USED_LEN; self._e1 = ln[0]; self._e2 = self._in_len[id[0]]
            return -1
        return 1

    cdef void _consume(self, unsigned id) noexcept nogil:
        cdef unsigned k = self._ndesc[id]
        self._last_used += k
        if self._last_used >= self.size:
            self._last_used -= self.size
            self._used_wrap = not self._used_wrap
        self._num_free += k
        self._ndesc[id] = 0
        self._next[id] = self._free_id
        self._free_id = id

    cdef void _after_get(self) noexcept nogil:
        if self.event_idx and not self._cb_disabled:
            vm_store32(self._drv, (VIRTQ_EVENT_F_DESC << 16) | self._last_used
                       | (<uint32_t>self._used_wrap << VIRTQ_EVENT_WRAP_SHIFT), VM_RELAXED)
            # Full fence: the new event offset must be visible before our
            # next look at the ring.  Else (lost wake-up) the device marks a
            # descriptor used, reads the old offset and skips the interrupt
            # while we see nothing and go to sleep.
            vm_fence_seq_cst()

    def kick_prepare(self):
        """After add(): should the driver notify the device?"""
        self._ready()
        cdef uint32_t ev
        cdef uint16_t flags, off, new, old
        cdef bint need
        # Full fence: the head flags must be visible before we read the
        # device event suppression.  Else (lost wake-up) the device, having
        # seen no new descriptor, enables notifications and sleeps while we
        # read its old DISABLE and skip the kick.
        vm_fence_seq_cst()
        ev = vm_load32(self._dev, VM_RELAXED)
        flags = (ev >> 16) & 3
        if flags == VIRTQ_EVENT_F_DISABLE:
            need = False
        elif flags != VIRTQ_EVENT_F_DESC or not self.event_idx or self._num_added >= self.size:
            need = True
        else:
            # coordinates relative to our current lap; old may be negative
            new = self._next_avail
            old = <uint16_t>(new - self._num_added)
            off = ev & VIRTQ_EVENT_OFF_MASK
            if ((ev >> VIRTQ_EVENT_WRAP_SHIFT) & 1) != self._avail_wrap:
                off = <uint16_t>(off - self.size)
            need = virtq_need_event(off, new, old)
        self._num_added = 0
        return need

    def enable_callbacks(self):
        """Ask for used-buffer notifications; True if used chains are pending."""
        self._ready()
        self._cb_disabled = False
        if self.event_idx:
            vm_store32(self._drv, (VIRTQ_EVENT_F_DESC << 16) | self._last_used
                       | (<uint32_t>self._used_wrap << VIRTQ_EVENT_WRAP_SHIFT), VM_RELAXED)
        else:
            vm_store32(self._drv, VIRTQ_EVENT_F_ENABLE << 16, VM_RELAXED)
        # Full fence: the enable store must be visible before we re-read the
        # ring.  Else (lost wake-up) the device marks a buffer used after our
        # look, reads the old DISABLE and does not interrupt while we sleep.
        vm_fence_seq_cst()
        return self.has_used()

    def disable_callbacks(self):
        """Ask the device not to interrupt (relaxed: a hint)."""
        self._ready()
        self._cb_disabled = True
        vm_store32(self._drv, VIRTQ_EVENT_F_DISABLE << 16, VM_RELAXED)

    def __repr__(self):
        return (f"<PackedQueueDriver size={self.size} next_avail={self._next_avail}/{int(self._avail_wrap)} "
                f"last_used={self._last_used}/{int(self._used_wrap)} free={self._num_free}"
                f"{' BROKEN' if self.broken else ''}>")
