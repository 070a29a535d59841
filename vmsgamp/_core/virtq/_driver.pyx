# cython: freethreading_compatible = False
"""Driver side, the part both ring formats share: tokens, scatter lists, the
indirect-table pool, and the add / get loops (single, batch) built on the
format's steps (``_add``, ``_publish``, ``_peek_used``, ``_consume``,
``_after_get``) that SplitQueueDriver and PackedQueueDriver define next to
their device sides.  Semantics follow Linux virtio_ring.c."""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free

cdef extern from "<stdint.h>" nogil:
    const uint64_t U32_MAX "UINT32_MAX"

from vmsgamp._core.io cimport VM_RELAXED, vm_store16, vm_store32, vm_store64
from vmsgamp._core.addrspace cimport AddressSpace
from vmsgamp._core.virtq._layout cimport *
from vmsgamp._core.virtq._chain cimport ChainBatch
from vmsgamp._core.virtq._shared cimport _Virtqueue

from vmsgamp._core.virtq._shared import packed_area_sizes, split_area_sizes


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
        self._init_areas(aspace, size, desc_addr, driver_addr, device_addr, event_idx, indirect,
                         packed, False)
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
        sizes = packed_area_sizes(size) if packed else split_area_sizes(size)
        for addr, s in zip((desc_addr, driver_addr, device_addr), sizes):
            r, off = aspace.translate(addr, s, write=True)
            r.zero(off, s)

    cdef int _parse_sg(self, object out, object in_, uint32_t *in_len) except -1:
        """Scatter lists of (bus_addr, length) pairs into _sg; returns n,
        leaves the out count in _nread and the device-writable bytes in
        in_len."""
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
        in_len[0] = <uint32_t>total_in
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
        return self._take_object_token(id)

    cdef object _take_object_token(self, unsigned id):
        # apart from _take_token: the list access would slow the integer path
        t = self._tok_obj[id]
        self._tok_obj[id] = None
        return t

    cdef void _write_table(self, char *table, int n, int nout, bint split) noexcept nogil:
        """Write _sg[:n] as an indirect table (split: linked by next;
        packed: sequential)."""
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

    # format-specific steps (overridden)

    cdef int _add(self, int n, int nout) noexcept nogil:
        """Write the chain in _sg[:n] (nout readable first) and record its
        descriptor count in _ndesc; its id or -1 when there is no room.  The
        caller records its writable bytes in _in_len."""
        return -1

    cdef void _publish(self) noexcept nogil:
        pass

    cdef int _peek_used(self, unsigned *id, uint32_t *ln) noexcept nogil:
        """1 with the next used chain's id and length (vq_check_used passed),
        0 if none, -1 if corrupt."""
        return 0

    cdef void _consume(self, unsigned id) noexcept nogil:
        pass

    cdef void _after_get(self) noexcept nogil:
        pass

    # Python API

    @property
    def num_free(self):
        """Free descriptors (split: table entries, packed: ring slots)."""
        return self._num_free

    @property
    def indirect_addr(self):
        """Bus address of the indirect-table pool, or None without one."""
        return self._ind_bus if self._use_indirect else None

    def add(self, out, in_=(), token=None):
        """Expose a chain: ``out`` (device-readable) and ``in_``
        (device-writable) are sequences of ``(bus_addr, length)``.  Returns
        False when there is no room (nothing was written).  ``token`` comes
        back from get_used()."""
        self._ready()
        cdef uint32_t in_len
        cdef int n = self._parse_sg(out, in_, &in_len)
        cdef int id = self._add(n, self._nread)
        if id < 0:
            return False
        self._in_len[id] = in_len
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
        self._in_len[id] = length if device_writable else 0
        self._store_token(id, token)
        self._publish()
        return True

    cdef Py_ssize_t _add_many(self, const uint64_t *addr, const uint32_t *length,
                              const uint8_t *writable, const uint64_t *tokens, const uint16_t *nseg,
                              const uint32_t *seg_start, Py_ssize_t nchains, Py_ssize_t nsegs,
                              int *bad) noexcept nogil:
        """Add chains until one does not fit; publish once.  Chain c's
        segments: seg_start[c]:seg_start[c+1] if given (seg_start holds
        nchains + 1 entries), else the next nseg[c] (or 1) segments; every
        segment array holds nsegs entries.  bad: 1 shape, 2 order, 3 length."""
        cdef Py_ssize_t c, j = 0, k, s, done = 0
        cdef int nout, id
        cdef uint64_t tin
        for c in range(nchains):
            if seg_start != NULL:
                # u32 entries widened to 64 bits: no sign to lose, no sum to wrap
                j = seg_start[c]
                k = <Py_ssize_t>seg_start[c + 1] - j
            else:
                k = nseg[c] if nseg != NULL else 1
            # j >= 0 here, so this keeps j .. j + k - 1 inside the arrays
            if k <= 0 or k > <Py_ssize_t>self.size or j > nsegs - k:
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
            id = self._add(<int>k, nout)
            if id < 0:
                break
            self._in_len[id] = <uint32_t>tin
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
        ``tokens[i]``.  ValueError, before anything is added, for a count
        outside the batch; at the first chain whose segments fall outside
        the arrays or are out of order (the chains before it are added)."""
        self._ready()
        cdef ChainBatch b
        cdef const uint64_t[::1] av
        cdef const uint32_t[::1] lv
        cdef const uint8_t[::1] wv
        cdef const uint64_t[::1] tv
        cdef const uint16_t[::1] ns
        cdef int bad = 0
        cdef Py_ssize_t done, nchains, nsegs
        if isinstance(addr, ChainBatch):
            b = <ChainBatch>addr
            nchains = b.count
            if nchains < 0 or nchains > b.max_chains:
                raise ValueError(f"batch count {nchains} outside [0, {b.max_chains}]")
            if nchains == 0:
                return 0
            done = self._add_many(b._addr, b._length, b._writable, b._tokens,
                                  NULL, b._seg_start, nchains, b.max_segments, &bad)
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
        self._as.check_open()   # zeros from a shrunk object are not a used entry
        if r == 0:
            return None
        if r < 0:
            self._fail()
        tok = self._take_token(id)
        self._consume(id)
        self._after_get()
        return tok, ln

    cdef int _get_many(self, uint64_t *tokens, uint32_t *lengths, int cap, int *r) noexcept nogil:
        """Up to cap integer-token used chains into tokens/lengths."""
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
            n = self._get_many(b._tokens, b._used_len, b.max_chains, &r)
            b.count = n
        else:
            tv = tokens
            lv = lengths
            # never more than `size` chains are in flight: the cap keeps the
            # count an int whatever the arrays' length
            n = <int>min(tv.shape[0], lv.shape[0], <Py_ssize_t>self.size)
            if n == 0:
                return 0
            n = self._get_many(&tv[0], &lv[0], n, &r)
        self._as.check_open()   # zeros from a shrunk object are not used entries
        if r < 0:
            if n == 0:
                self._fail()
            self._note_broken()
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
