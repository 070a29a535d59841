# cython: freethreading_compatible = False
"""The packed ring: device side (PackedQueue) and driver side
(PackedQueueDriver) side by side, as Linux virtio_ring.c keeps its
``_packed`` functions together.

Memory-ordering pairs (the comment at each access names its partner):

  R1 driver publishes a chain      -> A1 device sees it
       release store of the chain's first desc.flags / acquire load of them
  R2 device publishes a used entry -> A2 driver sees it
       release store of the used desc.flags          / acquire load of them

The spec rules behind them (virtio 1.2, paraphrased): the driver writes the
flags of the first descriptor of a chain last, after the rest of the chain
("Making buffers available"); the used descriptor's flags are written after
its id and len ("Marking buffers used").  A full fence stands where a side
reads the peer's event suppression word after its own flags update
("Event suppression"); each names the lost wake-up it prevents.  Whether to
notify is one rule for both sides: virtq_packed_need_notify in csrc/virtq.h.

Names: a packed chain is known by its ``buffer_id`` (the id field of its
last descriptor), chosen by the driver; ring positions are offsets
(``pos``, ``next_avail``, ``next_used``, ``last_used``) with a wrap counter.
"""
cimport cython
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free

from vmsgamp._core.io cimport (
    VM_RELAXED, VM_ACQUIRE, VM_RELEASE,
    vm_load16, vm_load32, vm_load64, vm_store16, vm_store32, vm_store64, vm_fence_seq_cst,
)
from vmsgamp._core.addrspace cimport AddressSpace
from vmsgamp._core.virtq._layout cimport *
from vmsgamp._core.virtq._shared cimport (
    _DeviceQueue, vq_error,
    E_WRAP, E_IND_NEXT, E_IND_NESTED, E_LONG, E_ID, E_ID_INFLIGHT, E_TOO_MANY, E_USED_NOTHING,
)
from vmsgamp._core.virtq._driver cimport _Driver, vq_check_used

from vmsgamp._core.virtq._shared import PACKED, QueueState, alloc_line, check_state
from vmsgamp.errors import LocalProtocolError


cdef int _check_size(unsigned size) except -1:
    if size == 0 or size > VIRTQ_MAX_SIZE:
        raise ValueError(f"packed queue size {size} outside [1, 32768]")
    return 0


# ---- device side -------------------------------------------------------------

cdef class PackedQueue(_DeviceQueue):
    """Device side of a packed virtqueue (same API as SplitQueue; the
    ``head`` of a chain, which add_used() takes back, is its buffer id)."""

    def __cinit__(self, *args, **kwargs):
        self._ndesc = NULL

    def __dealloc__(self):
        free(self._ndesc)

    def __init__(self, AddressSpace aspace not None, unsigned size, uint64_t desc_addr,
                 uint64_t driver_addr, uint64_t device_addr, *, bint event_idx=False,
                 bint indirect=False):
        _check_size(size)
        self._init_areas(aspace, size, desc_addr, driver_addr, device_addr, event_idx, indirect,
                         True, True)
        self._ndesc = <uint16_t *>calloc(size, sizeof(uint16_t))
        if self._ndesc == NULL:
            raise MemoryError()
        self._next_avail = 0
        self._avail_wrap = True
        self._next_used = 0
        self._used_wrap = True
        self._signalled_valid = False
        self._signalled_used = 0
        # never signalled: to the notification rule, as if a full lap had passed
        self._used_since = size
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
        check_state(state, PACKED)
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
        q._used_since = q.size
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

    # -- nogil core --

    cdef int _walk(self, unsigned pos, bint wrap, uint16_t first_flags) noexcept nogil:
        """Validate the chain whose first descriptor (flags already loaded)
        is at ring offset pos; its segment count or -1.  Leaves the chain's
        buffer id and ring slots in _chain_id / _nring."""
        cdef char *d
        cdef char *table
        cdef unsigned i = pos, k, tn
        cdef int n = 0, nring = 0
        cdef bint w = wrap
        cdef uint64_t addr, sum_r = 0, sum_w = 0
        cdef uint32_t ln
        cdef uint16_t flags = first_flags, f2
        self._nread = 0
        while True:
            d = self._desc + PVIRTQ_DESC_SIZE * i
            if nring > 0:
                # relaxed: ordered after A1 on the first flags (the driver
                # writes those last, with R1)
                flags = vm_load16(d + PVIRTQ_DESC_OFF_FLAGS, VM_RELAXED)
                if not virtq_packed_avail_ok(flags, w):
                    return vq_error(&self._err, E_WRAP, i, w)
            addr = vm_load64(d + PVIRTQ_DESC_OFF_ADDR, VM_RELAXED)
            ln = vm_load32(d + PVIRTQ_DESC_OFF_LEN, VM_RELAXED)
            nring += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if flags & VIRTQ_DESC_F_NEXT:
                    return vq_error(&self._err, E_IND_NEXT, 0, 0)
                if self._tr_table(addr, ln, &table) < 0:
                    return -1
                tn = ln // 16
                for k in range(tn):
                    # packed indirect tables are sequential: NEXT is ignored
                    f2 = vm_load16(table + PVIRTQ_DESC_SIZE * k + PVIRTQ_DESC_OFF_FLAGS, VM_RELAXED)
                    if f2 & VIRTQ_DESC_F_INDIRECT:
                        return vq_error(&self._err, E_IND_NESTED, 0, 0)
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
                return vq_error(&self._err, E_LONG, self.size, 0)
            i += 1
            if i == self.size:
                i = 0
                w = not w
        # the buffer id sits in the last descriptor of the chain
        self._chain_id = vm_load16(d + PVIRTQ_DESC_OFF_ID, VM_RELAXED)
        self._nring = nring
        return n

    cdef int _peek(self) noexcept nogil:
        """Validate the chain at next_avail: segment count, 0 if none, -1."""
        cdef uint16_t flags
        cdef int n
        # A1: acquire the first descriptor's flags; pairs with R1 (driver's
        # release store of those flags, written after the whole chain).
        flags = vm_load16(self._desc + PVIRTQ_DESC_SIZE * self._next_avail + PVIRTQ_DESC_OFF_FLAGS,
                          VM_ACQUIRE)
        if not virtq_packed_avail_ok(flags, self._avail_wrap):
            # not made available for this lap (a previous lap's leftover)
            return 0
        n = self._walk(self._next_avail, self._avail_wrap, flags)
        if n < 0:
            return -1
        if self._chain_id >= <int>self.size:
            return vq_error(&self._err, E_ID, self._chain_id, self.size)
        if self._ndesc[self._chain_id]:
            return vq_error(&self._err, E_ID_INFLIGHT, self._chain_id, 0)
        if self._outstanding + self._nring > self.size:
            return vq_error(&self._err, E_TOO_MANY, self._outstanding + self._nring, self.size)
        return n

    cdef void _advance(self) noexcept nogil:
        """Take the chain _peek() validated."""
        self._ndesc[self._chain_id] = self._nring
        self._outstanding += self._nring
        self._next_avail += self._nring
        if self._next_avail >= self.size:
            self._next_avail -= self.size
            self._avail_wrap = not self._avail_wrap

    @cython.final
    cdef int _put_used(self, unsigned buffer_id, uint32_t ln) noexcept nogil:
        """Mark chain buffer_id (< size) used; -1 if it is not in flight."""
        cdef unsigned k = self._ndesc[buffer_id]
        cdef char *d = self._desc + PVIRTQ_DESC_SIZE * self._next_used
        cdef uint16_t flags
        if k == 0:
            return -1
        flags = (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) if self._used_wrap else 0
        if ln:
            flags |= VIRTQ_DESC_F_WRITE
        vm_store32(d + PVIRTQ_DESC_OFF_LEN, ln, VM_RELAXED)
        vm_store16(d + PVIRTQ_DESC_OFF_ID, buffer_id, VM_RELAXED)
        # R2: release the used descriptor's flags; pairs with A2 (driver's
        # acquire load of the flags before it reads id and len).
        vm_store16(d + PVIRTQ_DESC_OFF_FLAGS, flags, VM_RELEASE)
        self._ndesc[buffer_id] = 0
        self._outstanding -= k
        self._used_since += k
        self._next_used += k
        if self._next_used >= self.size:
            self._next_used -= self.size
            self._used_wrap = not self._used_wrap
        return 0

    # -- Python API --

    def add_used(self, unsigned buffer_id, uint32_t length, /):
        """Return the chain with ``buffer_id`` (``chain.head``) with ``length``
        bytes written."""
        self._ready()
        if buffer_id >= self.size or self._put_used(buffer_id, length) < 0:
            raise LocalProtocolError(f"buffer id {buffer_id} is not in flight")

    def add_used_batch(self, heads, lengths=None, int count=-1):
        """Return ``count`` chains (``heads``: buffer ids; arrays or a
        ChainBatch, as for SplitQueue.add_used_batch).  Each used descriptor
        is published with its own release store (the driver walks them in
        order).  LocalProtocolError at the first id not in flight (the ones
        before it are already returned)."""
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
        return virtq_packed_avail_ok(
            vm_load16(self._desc + PVIRTQ_DESC_SIZE * self._next_avail + PVIRTQ_DESC_OFF_FLAGS,
                      VM_ACQUIRE), self._avail_wrap)

    def needs_notification(self):
        """After add_used: should the device notify the driver?"""
        self._ready()
        cdef uint32_t ev
        cdef bint notify
        # Full fence: our used descriptors' flags must be visible before we
        # read the driver event suppression.  Else (lost wake-up) the driver
        # saw no used descriptor, enabled callbacks and sleeps while we read
        # its old DISABLE and skip the interrupt.
        vm_fence_seq_cst()
        # one 32-bit load: off_wrap and flags from the same driver write
        ev = vm_load32(self._drv, VM_RELAXED)
        notify = virtq_packed_need_notify(ev, self.event_idx, self._next_used, self._used_wrap,
                                          self._used_since, self.size)
        self._signalled_used = self._next_used
        self._signalled_valid = True
        self._used_since = 0
        return notify

    def enable_notification(self):
        """Ask the driver to kick; True if chains are already pending."""
        self._ready()
        cdef uint32_t v
        if self.event_idx:
            v = virtq_packed_event_word(VIRTQ_EVENT_F_DESC, self._next_avail, self._avail_wrap)
        else:
            v = virtq_packed_event_word(VIRTQ_EVENT_F_ENABLE, 0, False)
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
        vm_store32(self._dev, virtq_packed_event_word(VIRTQ_EVENT_F_DISABLE, 0, False), VM_RELAXED)

    def __repr__(self):
        return (f"<PackedQueue size={self.size} next_avail={self._next_avail}/{int(self._avail_wrap)} "
                f"next_used={self._next_used}/{int(self._used_wrap)}{' BROKEN' if self.broken else ''}>")


# ---- driver side -------------------------------------------------------------

cdef class PackedQueueDriver(_Driver):
    """Driver side of a packed virtqueue (Linux virtio_ring.c semantics)."""

    def __init__(self, AddressSpace aspace not None, unsigned size, uint64_t desc_addr,
                 uint64_t driver_addr, uint64_t device_addr, *, bint event_idx=False,
                 bint indirect=False, indirect_addr=None, unsigned indirect_max=8):
        _check_size(size)
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
        """Allocate the ring, event areas (and indirect pool) from a
        RegionAllocator.  Each event area sits alone on its own cache line:
        the driver writes one, the device the other, and whatever follows
        is written by the driver.  Devices take the addresses from
        SET_VQUEUE, never from this layout."""
        _check_size(size)
        da = allocator.alloc(virtq_packed_desc_bytes(size), PVIRTQ_DESC_ALIGN)
        dra = alloc_line(allocator, PVIRTQ_EVENT_SIZE, PVIRTQ_EVENT_ALIGN)
        dva = alloc_line(allocator, PVIRTQ_EVENT_SIZE, PVIRTQ_EVENT_ALIGN)
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
        """Write one chain and publish it (first flags last, R1); its buffer
        id or -1 when there is no room."""
        cdef bint ind = self._use_indirect and n > 1 and n <= <int>self._ind_max
        cdef int need = 1 if ind else n
        cdef unsigned buffer_id, pos
        cdef int k
        cdef bint w
        cdef char *d
        cdef uint16_t f, first_flags = 0
        if self._num_free < need or self._free_id >= self.size:
            return -1
        buffer_id = self._free_id
        self._free_id = self._next[buffer_id]
        pos = self._next_avail
        w = self._avail_wrap
        if ind:
            self._write_table(self._ind_ptr + <uint64_t>buffer_id * self._ind_max * 16, n, nout, False)
            d = self._desc + PVIRTQ_DESC_SIZE * pos
            vm_store64(d, self._ind_bus + <uint64_t>buffer_id * self._ind_max * 16, VM_RELAXED)
            vm_store32(d + 8, n * 16, VM_RELAXED)
            vm_store16(d + PVIRTQ_DESC_OFF_ID, buffer_id, VM_RELAXED)
            first_flags = VIRTQ_DESC_F_INDIRECT | (VIRTQ_DESC_F_AVAIL if w else VIRTQ_DESC_F_USED)
            pos += 1
            if pos == self.size:
                pos = 0
                w = not w
        else:
            for k in range(n):
                d = self._desc + PVIRTQ_DESC_SIZE * pos
                f = VIRTQ_DESC_F_WRITE if k >= nout else 0
                if k + 1 < n:
                    f |= VIRTQ_DESC_F_NEXT
                # AVAIL = our wrap counter, USED = its inverse
                f |= VIRTQ_DESC_F_AVAIL if w else VIRTQ_DESC_F_USED
                vm_store64(d, self._sg_addr[k], VM_RELAXED)
                vm_store32(d + 8, self._sg_len[k], VM_RELAXED)
                vm_store16(d + PVIRTQ_DESC_OFF_ID, buffer_id, VM_RELAXED)
                if k == 0:
                    first_flags = f
                else:
                    # relaxed: published by R1 on the first flags below
                    vm_store16(d + PVIRTQ_DESC_OFF_FLAGS, f, VM_RELAXED)
                pos += 1
                if pos == self.size:
                    pos = 0
                    w = not w
        # R1: release the first descriptor's flags, written last; pairs with
        # A1 (device's acquire load of those flags before it reads the chain).
        vm_store16(self._desc + PVIRTQ_DESC_SIZE * self._next_avail + PVIRTQ_DESC_OFF_FLAGS,
                   first_flags, VM_RELEASE)
        self._next_avail = pos
        self._avail_wrap = w
        self._num_free -= need
        self._ndesc[buffer_id] = need
        if self._num_added <= 0xFFFF - need:
            self._num_added += need
        else:
            self._num_added = 0xFFFF
        return buffer_id

    cdef int _peek_used(self, unsigned *id, uint32_t *ln) noexcept nogil:
        cdef char *d = self._desc + PVIRTQ_DESC_SIZE * self._last_used
        # A2: acquire the used descriptor's flags; pairs with R2 (device's
        # release store of the flags after id and len).
        cdef uint16_t flags = vm_load16(d + PVIRTQ_DESC_OFF_FLAGS, VM_ACQUIRE)
        if not virtq_packed_used_ok(flags, self._used_wrap):
            return 0
        if self._num_free == self.size:
            return vq_error(&self._err, E_USED_NOTHING, self._last_used, 0)
        id[0] = vm_load16(d + PVIRTQ_DESC_OFF_ID, VM_RELAXED)
        ln[0] = vm_load32(d + PVIRTQ_DESC_OFF_LEN, VM_RELAXED)
        return vq_check_used(self, id[0], ln[0])

    cdef void _consume(self, unsigned id) noexcept nogil:
        """Skip chain id's ring slots and free its buffer id."""
        cdef unsigned k = self._ndesc[id]
        self._last_used += k
        if self._last_used >= self.size:
            self._last_used -= self.size
            self._used_wrap = not self._used_wrap
        self._num_free += k
        self._ndesc[id] = 0
        self._next[id] = self._free_id
        self._free_id = id

    @cython.final
    cdef void _write_event(self, uint16_t flags) noexcept nogil:
        """Our event suppression word (relaxed: each caller says what orders it)."""
        if flags == VIRTQ_EVENT_F_DESC:
            vm_store32(self._drv, virtq_packed_event_word(flags, self._last_used, self._used_wrap),
                       VM_RELAXED)
        else:
            vm_store32(self._drv, virtq_packed_event_word(flags, 0, False), VM_RELAXED)

    cdef void _after_get(self) noexcept nogil:
        if self.event_idx and not self._cb_disabled:
            self._write_event(VIRTQ_EVENT_F_DESC)
            # Full fence: the new event offset must be visible before our
            # next look at the ring.  Else (lost wake-up) the device marks a
            # descriptor used, reads the old offset and skips the interrupt
            # while we see nothing and go to sleep.
            vm_fence_seq_cst()

    def kick_prepare(self):
        """After add(): should the driver notify the device?"""
        self._ready()
        cdef uint32_t ev
        cdef bint need
        # Full fence: the first flags must be visible before we read the
        # device event suppression.  Else (lost wake-up) the device, having
        # seen no new descriptor, enables notifications and sleeps while we
        # read its old DISABLE and skip the kick.
        vm_fence_seq_cst()
        ev = vm_load32(self._dev, VM_RELAXED)
        need = virtq_packed_need_notify(ev, self.event_idx, self._next_avail, self._avail_wrap,
                                        self._num_added, self.size)
        self._num_added = 0
        return need

    def enable_callbacks(self):
        """Ask for used-buffer notifications; True if used chains are pending."""
        self._ready()
        self._cb_disabled = False
        self._write_event(VIRTQ_EVENT_F_DESC if self.event_idx else VIRTQ_EVENT_F_ENABLE)
        # Full fence: the enable store must be visible before we re-read the
        # ring.  Else (lost wake-up) the device marks a buffer used after our
        # look, reads the old DISABLE and does not interrupt while we sleep.
        vm_fence_seq_cst()
        return self.has_used()

    def disable_callbacks(self):
        """Ask the device not to interrupt (relaxed: a hint)."""
        self._ready()
        self._cb_disabled = True
        self._write_event(VIRTQ_EVENT_F_DISABLE)

    def __repr__(self):
        return (f"<PackedQueueDriver size={self.size} next_avail={self._next_avail}/{int(self._avail_wrap)} "
                f"last_used={self._last_used}/{int(self._used_wrap)} free={self._num_free}"
                f"{' BROKEN' if self.broken else ''}>")
