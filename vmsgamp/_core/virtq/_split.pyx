# cython: freethreading_compatible = False
"""The split ring: device side (SplitQueue) and driver side
(SplitQueueDriver) side by side, as Linux virtio_ring.c keeps its ``_split``
functions together.

Memory-ordering pairs (the comment at each access names its partner):

  R1 driver publishes a chain      -> A1 device sees it
       release store avail.idx      /  acquire load avail.idx
  R2 device publishes a used entry -> A2 driver sees it
       release store used.idx       /  acquire load used.idx

The spec rules behind them (virtio 1.2, paraphrased): the driver makes the
descriptors and the ring entry visible before it updates avail->idx
("Updating idx"); the device writes the used element before it updates
used->idx ("The Virtqueue Used Ring").  A full fence stands where a side
reads the peer's suppression field after its own index update
("Notification suppression"); each names the lost wake-up it prevents.

Names: a split chain is known by the index of its first descriptor
(``desc_idx``); that is the id the used ring carries back.
"""
cimport cython
from libc.stdint cimport uint16_t, uint32_t, uint64_t

from vmsgamp._core.io cimport (
    VM_RELAXED, VM_ACQUIRE, VM_RELEASE,
    vm_load16, vm_load32, vm_load64, vm_store16, vm_store32, vm_store64, vm_fence_seq_cst,
)
from vmsgamp._core.addrspace cimport AddressSpace
from vmsgamp._core.virtq._layout cimport *
from vmsgamp._core.virtq._shared cimport (
    _DeviceQueue, vq_error, vq_is_pow2,
    E_AVAIL_JUMP, E_HEAD, E_NEXT, E_IND_NESTED, E_IND_NEXT, E_USED_JUMP,
)
from vmsgamp._core.virtq._driver cimport _Driver, vq_check_used

from vmsgamp._core.virtq._shared import SPLIT, QueueState, alloc_line, check_state, split_area_sizes
from vmsgamp.errors import LocalProtocolError


cdef int _check_size(unsigned size) except -1:
    if not vq_is_pow2(size) or size > VIRTQ_MAX_SIZE:
        raise ValueError(f"split queue size {size} is not a power of two in [1, 32768]")
    return 0


# ---- device side -------------------------------------------------------------

cdef class SplitQueue(_DeviceQueue):
    """Device side of a split virtqueue.

    ``pop()`` returns the next DescriptorChain or None; ``add_used(chain.head,
    len)`` returns it (``head`` is the chain's first descriptor index);
    ``needs_notification()`` says whether to
    interrupt the driver after add_used; ``enable_notification()`` /
    ``disable_notification()`` steer the driver's kicks."""

    def __init__(self, AddressSpace aspace not None, unsigned size, uint64_t desc_addr,
                 uint64_t driver_addr, uint64_t device_addr, *, bint event_idx=False,
                 bint indirect=False):
        _check_size(size)
        self._init_areas(aspace, size, desc_addr, driver_addr, device_addr, event_idx, indirect,
                         False, True)
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
        check_state(state, SPLIT)
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

    @cython.final
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
                return vq_error(&self._err, E_AVAIL_JUMP, self._next_avail, idx)
            self._avail_shadow = idx
            n = idx - self._next_avail
        return n

    cdef int _walk(self, unsigned desc_idx) noexcept nogil:
        """Validate the chain starting at descriptor desc_idx into scratch;
        its segment count or -1."""
        cdef char *table = self._desc
        cdef char *d
        cdef unsigned tsize = self.size, i = desc_idx
        cdef int n = 0
        cdef bint nested = False
        cdef uint64_t addr, sum_r = 0, sum_w = 0
        cdef uint32_t ln
        cdef uint16_t flags, nxt
        self._nread = 0
        if desc_idx >= self.size:
            return vq_error(&self._err, E_HEAD, desc_idx, self.size)
        while True:
            # relaxed: ordered after A1 (the driver wrote them before R1)
            d = table + VIRTQ_DESC_SIZE * i
            addr = vm_load64(d + VIRTQ_DESC_OFF_ADDR, VM_RELAXED)
            ln = vm_load32(d + VIRTQ_DESC_OFF_LEN, VM_RELAXED)
            flags = vm_load16(d + VIRTQ_DESC_OFF_FLAGS, VM_RELAXED)
            nxt = vm_load16(d + VIRTQ_DESC_OFF_NEXT, VM_RELAXED)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if nested:
                    return vq_error(&self._err, E_IND_NESTED, 0, 0)
                if flags & VIRTQ_DESC_F_NEXT:
                    return vq_error(&self._err, E_IND_NEXT, 0, 0)
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
                return vq_error(&self._err, E_NEXT, i, tsize)

    cdef int _peek(self) noexcept nogil:
        """Validate the next available chain: segment count, 0 if none, -1."""
        cdef int n = self._avail_count()
        cdef unsigned desc_idx
        if n <= 0:
            return n
        # the ring entry: relaxed, ordered after A1; _walk checks its range
        desc_idx = vm_load16(self._drv + VIRTQ_AVAIL_OFF_RING + 2 * (self._next_avail & self._mask),
                             VM_RELAXED)
        n = self._walk(desc_idx)
        self._chain_id = desc_idx
        return n

    cdef void _advance(self) noexcept nogil:
        self._next_avail += 1

    @cython.final
    cdef void _put_used(self, unsigned desc_idx, uint32_t ln) noexcept nogil:
        cdef char *e = self._dev + VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * (self._next_used & self._mask)
        # relaxed: published by R2 (the used.idx release store after it)
        vm_store32(e, desc_idx, VM_RELAXED)
        vm_store32(e + 4, ln, VM_RELAXED)
        self._next_used += 1

    # -- Python API --

    def add_used(self, unsigned desc_idx, uint32_t length, /):
        """Return the chain starting at descriptor ``desc_idx`` (``chain.head``)
        with ``length`` bytes written to its writable part."""
        self._ready()
        if desc_idx >= self.size:
            raise ValueError(f"descriptor index {desc_idx} outside queue of size {self.size}")
        if self._next_avail == self._next_used:
            raise LocalProtocolError("add_used without a popped chain")
        self._put_used(desc_idx, length)
        # R2: release used.idx; pairs with A2 (driver's acquire load of
        # used.idx before it reads the used element).
        vm_store16(self._dev + VIRTQ_USED_OFF_IDX, self._next_used, VM_RELEASE)

    def add_used_batch(self, heads, lengths=None, int count=-1):
        """Return ``count`` chains with one publish: ``heads`` (descriptor
        indices, uint16) / ``lengths`` (uint32) arrays (default count: all),
        or a ChainBatch (``heads`` and ``used_len``; default count:
        ``batch.count``).  ValueError, before anything is returned, for a
        count outside the arrays or an index outside the queue."""
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
                raise ValueError(f"descriptor index {h[i]} outside queue of size {self.size}")
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
            ev = vm_load16(self._drv + VIRTQ_AVAIL_OFF_USED_EVENT(self.size), VM_RELAXED)
            old = self._signalled_used
            valid = self._signalled_valid
            self._signalled_used = self._next_used
            self._signalled_valid = True
            return (not valid) or virtq_need_event(ev, self._next_used, old)
        return not (vm_load16(self._drv + VIRTQ_AVAIL_OFF_FLAGS, VM_RELAXED) & VIRTQ_AVAIL_F_NO_INTERRUPT)

    def enable_notification(self):
        """Ask the driver to kick on new chains.  Returns True if chains are
        already pending: process them instead of sleeping."""
        self._ready()
        if self.event_idx:
            vm_store16(self._dev + VIRTQ_USED_OFF_AVAIL_EVENT(self.size), self._next_avail, VM_RELAXED)
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


# ---- driver side -------------------------------------------------------------

cdef class SplitQueueDriver(_Driver):
    """Driver side of a split virtqueue (Linux virtio_ring.c semantics).

    ``indirect_addr`` is a pool of ``size * indirect_max`` 16-byte entries the
    driver owns (``create()`` allocates it); with INDIRECT negotiated, a chain
    of 2..indirect_max buffers takes one ring descriptor."""

    def __init__(self, AddressSpace aspace not None, unsigned size, uint64_t desc_addr,
                 uint64_t driver_addr, uint64_t device_addr, *, bint event_idx=False,
                 bint indirect=False, indirect_addr=None, unsigned indirect_max=8,
                 uint16_t start_index=0):
        _check_size(size)
        self._setup(aspace, size, desc_addr, driver_addr, device_addr, event_idx, indirect,
                    indirect_addr, indirect_max, False)
        cdef unsigned i
        for i in range(size):
            self._next[i] = i + 1
        self._free_desc = 0
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
        ``aspace`` defaults to one window over the allocator's region.

        Layout as Linux lays out a split ring: descriptor table, then the
        avail ring, then the used ring on its own cache lines (4 KiB-aligned
        when it is that large): the device writes used.idx, the driver
        writes used_event at the end of the avail ring, and the two must
        not share a line.  Nothing that follows shares the used ring's last
        line either.  Devices take the addresses from SET_VQUEUE, never from
        this layout."""
        _check_size(size)
        d, dr, dv = split_area_sizes(size)
        da = allocator.alloc(d, VIRTQ_DESC_ALIGN)
        dra = allocator.alloc(dr, VIRTQ_AVAIL_ALIGN)
        dva = alloc_line(allocator, dv, 4096 if dv >= 4096 else VIRTQ_USED_ALIGN)
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
        """Write one chain from _sg; its first descriptor index, or -1 when
        there is no room.  Not yet visible to the device: _publish() does that."""
        cdef bint ind = self._use_indirect and n > 1 and n <= <int>self._ind_max
        cdef int need = 1 if ind else n
        cdef unsigned desc_idx, i
        cdef int k
        cdef char *d
        cdef uint16_t f
        if self._num_free < need:
            return -1
        desc_idx = self._free_desc
        if ind:
            self._write_table(self._ind_ptr + <uint64_t>desc_idx * self._ind_max * 16, n, nout, True)
            d = self._desc + VIRTQ_DESC_SIZE * desc_idx
            vm_store64(d, self._ind_bus + <uint64_t>desc_idx * self._ind_max * 16, VM_RELAXED)
            vm_store32(d + 8, n * 16, VM_RELAXED)
            vm_store16(d + VIRTQ_DESC_OFF_FLAGS, VIRTQ_DESC_F_INDIRECT, VM_RELAXED)
            vm_store16(d + VIRTQ_DESC_OFF_NEXT, 0, VM_RELAXED)
            self._free_desc = self._next[desc_idx]
        else:
            i = desc_idx
            for k in range(n):
                d = self._desc + VIRTQ_DESC_SIZE * i
                f = VIRTQ_DESC_F_WRITE if k >= nout else 0
                if k + 1 < n:
                    f |= VIRTQ_DESC_F_NEXT
                vm_store64(d, self._sg_addr[k], VM_RELAXED)
                vm_store32(d + 8, self._sg_len[k], VM_RELAXED)
                vm_store16(d + VIRTQ_DESC_OFF_FLAGS, f, VM_RELAXED)
                # next comes from our private free list, never from the ring
                vm_store16(d + VIRTQ_DESC_OFF_NEXT, self._next[i] if k + 1 < n else 0, VM_RELAXED)
                i = self._next[i]
            self._free_desc = i
        self._num_free -= need
        self._ndesc[desc_idx] = need
        vm_store16(self._drv + VIRTQ_AVAIL_OFF_RING + 2 * (self._avail_idx & self._mask), desc_idx, VM_RELAXED)
        self._avail_idx += 1
        if self._num_added < 0xFFFF:
            self._num_added += 1
        return desc_idx

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
                return vq_error(&self._err, E_USED_JUMP, self._last_used, idx)
            self._used_shadow = idx
            if idx == self._last_used:
                return 0
        # relaxed: ordered after A2
        e = self._dev + VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * (self._last_used & self._mask)
        id[0] = vm_load32(e, VM_RELAXED)
        ln[0] = vm_load32(e + 4, VM_RELAXED)
        return vq_check_used(self, id[0], ln[0])

    cdef void _consume(self, unsigned id) noexcept nogil:
        """Return chain id's descriptors to the free list."""
        cdef unsigned k = self._ndesc[id], last = id, j
        for j in range(k - 1):
            last = self._next[last]
        self._next[last] = self._free_desc
        self._free_desc = id
        self._num_free += k
        self._ndesc[id] = 0
        self._last_used += 1

    cdef void _after_get(self) noexcept nogil:
        if self.event_idx and not self._cb_disabled:
            vm_store16(self._drv + VIRTQ_AVAIL_OFF_USED_EVENT(self.size), self._last_used, VM_RELAXED)
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
            ev = vm_load16(self._dev + VIRTQ_USED_OFF_AVAIL_EVENT(self.size), VM_RELAXED)
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
            vm_store16(self._drv + VIRTQ_AVAIL_OFF_USED_EVENT(self.size), self._last_used, VM_RELAXED)
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
