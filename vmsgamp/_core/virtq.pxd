# Split and packed virtqueues (layouts: csrc/virtq.h).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, int32_t
from vmsgamp._core.addrspace cimport AddressSpace

cdef extern from "virtq.h" nogil:
    enum:
        VIRTIO_F_INDIRECT_DESC
        VIRTIO_F_EVENT_IDX
        VIRTIO_F_RING_PACKED
        VIRTQ_DESC_F_NEXT
        VIRTQ_DESC_F_WRITE
        VIRTQ_DESC_F_INDIRECT
        VIRTQ_DESC_F_AVAIL
        VIRTQ_DESC_F_USED
        VIRTQ_AVAIL_F_NO_INTERRUPT
        VIRTQ_USED_F_NO_NOTIFY
        VIRTQ_EVENT_F_ENABLE
        VIRTQ_EVENT_F_DISABLE
        VIRTQ_EVENT_F_DESC
        VIRTQ_EVENT_WRAP_SHIFT
        VIRTQ_EVENT_OFF_MASK
        VIRTQ_MAX_SIZE
        VIRTQ_DESC_ALIGN
        VIRTQ_AVAIL_ALIGN
        VIRTQ_USED_ALIGN
        VIRTQ_DESC_OFF_ADDR
        VIRTQ_DESC_OFF_LEN
        VIRTQ_DESC_OFF_FLAGS
        VIRTQ_DESC_OFF_NEXT
        VIRTQ_DESC_SIZE
        VIRTQ_AVAIL_OFF_FLAGS
        VIRTQ_AVAIL_OFF_IDX
        VIRTQ_AVAIL_OFF_RING
        VIRTQ_USED_OFF_FLAGS
        VIRTQ_USED_OFF_IDX
        VIRTQ_USED_OFF_RING
        VIRTQ_USED_ELEM_SIZE
        PVIRTQ_DESC_ALIGN
        PVIRTQ_EVENT_ALIGN
        PVIRTQ_DESC_OFF_ADDR
        PVIRTQ_DESC_OFF_LEN
        PVIRTQ_DESC_OFF_ID
        PVIRTQ_DESC_OFF_FLAGS
        PVIRTQ_DESC_SIZE
        PVIRTQ_EVENT_OFF_OFF_WRAP
        PVIRTQ_EVENT_OFF_FLAGS
        PVIRTQ_EVENT_SIZE
    size_t VIRTQ_AVAIL_OFF_USED_EVENT(unsigned q)
    size_t VIRTQ_USED_OFF_AVAIL_EVENT(unsigned q)
    size_t virtq_split_desc_bytes(unsigned q)
    size_t virtq_split_avail_bytes(unsigned q)
    size_t virtq_split_used_bytes(unsigned q)
    size_t virtq_packed_desc_bytes(unsigned q)
    int virtq_need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
    ctypedef struct virtq_desc "struct virtq_desc":
        uint64_t addr
        uint32_t len
        uint16_t flags
        uint16_t next
    ctypedef struct pvirtq_desc "struct pvirtq_desc":
        uint64_t addr
        uint32_t len
        uint16_t id
        uint16_t flags

# One validated segment of a chain.
ctypedef struct vq_seg:
    char *ptr
    uint64_t addr
    uint32_t len
    int32_t win
    uint8_t write

cdef class DescriptorChain:
    cdef readonly int head
    cdef readonly int readable_count
    cdef int _n
    cdef vq_seg *_segs
    cdef vq_seg _inline[2]
    cdef AddressSpace _as
    cdef int _check(self) except -1
    cdef object _view(self, int i)

cdef class ChainBatch:
    cdef readonly object heads, seg_start, addr, length, writable, offset, window, tokens, used_len
    cdef uint64_t[::1] _tokens
    cdef uint32_t[::1] _used_len
    cdef uint16_t[::1] _heads
    cdef uint32_t[::1] _seg_start
    cdef uint64_t[::1] _addr
    cdef uint32_t[::1] _length
    cdef uint8_t[::1] _writable
    cdef uint64_t[::1] _offset
    cdef uint16_t[::1] _window
    cdef public int count
    cdef public int nseg
    cdef readonly int max_chains
    cdef readonly int max_segments

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
    cdef int _err
    cdef int64_t _e1
    cdef int64_t _e2
    cdef int _map_areas(self, uint64_t dsz, uint64_t dal, uint64_t drsz, uint64_t dral,
                        uint64_t dvsz, uint64_t dval, bint device_side) except -1
    cdef int _ready(self) except -1
    cdef int _batch_result(self, int err, int k, ChainBatch batch) except -1
    cdef int _used_batch_args(self, heads, lengths, int count, const uint16_t **h,
                              const uint32_t **l) except -1
    cdef int _fail(self) except -1
    cdef int _seg(self, uint64_t addr, uint32_t ln, bint write, int n,
                  uint64_t *sum_r, uint64_t *sum_w) noexcept nogil
    cdef int _tr_table(self, uint64_t addr, uint32_t ln, char **out) noexcept nogil

cdef class SplitQueue(_Virtqueue):
    cdef uint16_t _next_avail
    cdef uint16_t _next_used
    cdef uint16_t _avail_shadow
    cdef uint16_t _signalled_used
    cdef bint _signalled_valid
    cdef int _walk(self, unsigned head) noexcept nogil
    cdef int _avail_count(self) noexcept nogil
    cdef void _put_used(self, unsigned id, uint32_t ln) noexcept nogil

cdef class PackedQueue(_Virtqueue):
    cdef uint16_t _next_avail
    cdef bint _avail_wrap
    cdef uint16_t _next_used
    cdef bint _used_wrap
    cdef uint16_t _signalled_used
    cdef bint _signalled_valid
    cdef unsigned _used_since
    cdef unsigned _outstanding
    cdef uint16_t *_ndesc
    cdef int _id
    cdef int _nring
    cdef int _walk(self, unsigned pos, bint wrap, uint16_t head_flags) noexcept nogil
    cdef int _peek(self) noexcept nogil
    cdef void _advance(self) noexcept nogil
    cdef int _put_used(self, unsigned id, uint32_t ln) noexcept nogil

cdef class _Driver(_Virtqueue):
    cdef uint16_t _num_free
    cdef uint16_t _num_added
    cdef bint _cb_disabled
    cdef uint16_t *_ndesc
    cdef uint32_t *_in_len
    cdef uint8_t *_tok_kind
    cdef uint64_t *_tok_int
    cdef list _tok_obj
    cdef uint16_t *_next
    cdef uint64_t _ind_bus
    cdef char *_ind_ptr
    cdef unsigned _ind_max
    cdef bint _use_indirect
    cdef uint64_t *_sg_addr
    cdef uint32_t *_sg_len
    cdef _setup(self, AddressSpace aspace, unsigned size, uint64_t desc_addr, uint64_t driver_addr,
                uint64_t device_addr, bint event_idx, bint indirect, indirect_addr, unsigned indirect_max,
                bint packed)
    cdef int _parse_sg(self, object out, object in_) except -1
    cdef int _add(self, int n, int nout) noexcept nogil
    cdef int _peek_used(self, unsigned *id, uint32_t *ln) noexcept nogil
    cdef void _consume(self, unsigned id) noexcept nogil
    cdef void _publish(self) noexcept nogil
    cdef void _after_get(self) noexcept nogil
    cdef int _add_many(self, const uint64_t *addr, const uint32_t *length, const uint8_t *writable,
                       const uint64_t *tokens, const uint16_t *nseg, const uint32_t *seg_start,
                       int nchains, int nsegs, int *bad) noexcept nogil
    cdef int _get_many(self, uint64_t *tokens, uint32_t *lengths, int cap, int *r) noexcept nogil
    cdef int _store_token(self, unsigned id, object token) except -1
    cdef object _take_token(self, unsigned id)
    cdef void _write_table(self, char *table, int n, int nout, bint split) noexcept nogil

cdef class SplitQueueDriver(_Driver):
    cdef uint16_t _free_head
    cdef uint16_t _avail_idx
    cdef uint16_t _last_used
    cdef uint16_t _used_shadow
    cdef int _add(self, int n, int nout) noexcept nogil
    cdef int _peek_used(self, unsigned *id, uint32_t *ln) noexcept nogil
    cdef void _consume(self, unsigned id) noexcept nogil

cdef class PackedQueueDriver(_Driver):
    cdef uint16_t _free_id
    cdef uint16_t _next_avail
    cdef bint _avail_wrap
    cdef uint16_t _last_used
    cdef bint _used_wrap
    cdef int _add(self, int n, int nout) noexcept nogil
    cdef int _peek_used(self, unsigned *id, uint32_t *ln) noexcept nogil
    cdef void _consume(self, unsigned id) noexcept nogil
