# What every virtqueue shares, whatever its format and side: the error side
# channel of the GIL-free walks and the base class holding the mapped areas.
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int64_t
from vmsgamp._core.addrspace cimport AddressSpace
from vmsgamp._core.virtq._chain cimport vq_seg, ChainBatch

# What a GIL-free walk found wrong; the message table in _shared.pyx turns
# code + e1 + e2 into the broken_reason text.
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

ctypedef struct vq_err:
    int code
    int64_t e1
    int64_t e2


cdef inline int vq_error(vq_err *e, int code, int64_t e1, int64_t e2) noexcept nogil:
    """Record a corruption for the message table; returns -1, the walks'
    failure value, so a check reads ``return vq_error(&self._err, ...)``."""
    e.code = code
    e.e1 = e1
    e.e2 = e2
    return -1


cdef inline bint vq_is_pow2(unsigned x) noexcept nogil:
    return x != 0 and (x & (x - 1)) == 0


cdef class _Virtqueue:
    cdef AddressSpace _as
    cdef readonly unsigned size
    cdef unsigned _mask
    cdef readonly bint event_idx
    cdef readonly bint indirect
    cdef readonly bint broken
    cdef readonly object broken_reason
    cdef readonly uint64_t desc_addr
    cdef readonly uint64_t driver_addr
    cdef readonly uint64_t device_addr
    cdef char *_desc
    cdef char *_drv
    cdef char *_dev
    cdef vq_seg *_scratch
    cdef int _nread
    cdef vq_err _err
    cdef int _init_areas(self, AddressSpace aspace, unsigned size, uint64_t desc_addr,
                         uint64_t driver_addr, uint64_t device_addr, bint event_idx,
                         bint indirect, bint packed, bint device_side) except -1
    cdef int _ready(self) except -1
    cdef int _fail(self) except -1
    cdef int _note_broken(self) except -1
    cdef int _seg(self, uint64_t addr, uint32_t ln, bint write, int n,
                  uint64_t *sum_r, uint64_t *sum_w) noexcept nogil
    cdef int _tr_table(self, uint64_t addr, uint32_t ln, char **out) noexcept nogil


cdef class _DeviceQueue(_Virtqueue):
    cdef int _chain_id              # id of the chain _peek() validated (desc_idx / buffer_id)
    # format-specific steps
    cdef int _peek(self) noexcept nogil
    cdef void _advance(self) noexcept nogil
    # shared
    cdef int _used_batch_args(self, ids, lengths, int count, const uint16_t **h,
                              const uint32_t **l) except -1
