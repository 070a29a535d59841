# Driver-side plumbing both ring formats share (tokens, scatter lists,
# the indirect pool, the add/get loops); the format-specific steps are the
# cdef methods _split.pyx and _packed.pyx override.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from vmsgamp._core.addrspace cimport AddressSpace
from vmsgamp._core.virtq._shared cimport _Virtqueue, vq_error, E_USED_ID, E_USED_LEN

cdef class _Driver(_Virtqueue):
    # Per chain, indexed by its id (split: first descriptor index, packed:
    # buffer id).
    cdef uint16_t *_ndesc         # descriptors (split) / ring slots (packed) it holds; 0: free
    cdef uint32_t *_in_len        # device-writable bytes: a used len above it is a lie
    cdef uint8_t *_tok_kind       # 0 none, 1 integer in _tok_int, 2 object in _tok_obj
    cdef uint64_t *_tok_int
    cdef list _tok_obj
    # Free list (split: descriptor indices, also linking a chain's
    # descriptors; packed: buffer ids).
    cdef uint16_t *_next
    cdef uint16_t _num_free
    cdef uint16_t _num_added      # published since the last kick_prepare (saturating)
    cdef bint _cb_disabled
    cdef uint64_t _ind_bus
    cdef char *_ind_ptr
    cdef unsigned _ind_max
    cdef bint _use_indirect
    cdef uint64_t *_sg_addr       # the chain being added: size entries
    cdef uint32_t *_sg_len
    cdef _setup(self, AddressSpace aspace, unsigned size, uint64_t desc_addr, uint64_t driver_addr,
                uint64_t device_addr, bint event_idx, bint indirect, indirect_addr, unsigned indirect_max,
                bint packed)
    cdef int _parse_sg(self, object out, object in_, uint32_t *in_len) except -1
    cdef int _store_token(self, unsigned id, object token) except -1
    cdef object _take_token(self, unsigned id)
    cdef object _take_object_token(self, unsigned id)
    cdef void _write_table(self, char *table, int n, int nout, bint split) noexcept nogil
    cdef Py_ssize_t _add_many(self, const uint64_t *addr, const uint32_t *length,
                              const uint8_t *writable, const uint64_t *tokens, const uint16_t *nseg,
                              const uint32_t *seg_start, Py_ssize_t nchains, Py_ssize_t nsegs,
                              int *bad) noexcept nogil
    cdef int _get_many(self, uint64_t *tokens, uint32_t *lengths, int cap, int *r) noexcept nogil
    # format-specific steps
    cdef int _add(self, int n, int nout) noexcept nogil
    cdef void _publish(self) noexcept nogil
    cdef int _peek_used(self, unsigned *id, uint32_t *ln) noexcept nogil
    cdef void _consume(self, unsigned id) noexcept nogil
    cdef void _after_get(self) noexcept nogil


cdef inline int vq_check_used(_Driver d, unsigned id, uint32_t ln) noexcept nogil:
    """A used entry the device wrote (id, len): 1 if it names a chain in
    flight and stays within its writable bytes, else -1 with the error side
    channel set."""
    if id >= d.size or d._tok_kind[id] == 0:
        return vq_error(&d._err, E_USED_ID, id, 0)
    if ln > d._in_len[id]:
        return vq_error(&d._err, E_USED_LEN, ln, d._in_len[id])
    return 1
