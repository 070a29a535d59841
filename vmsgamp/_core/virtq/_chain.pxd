# Descriptor chains as the device sees them, and preallocated batches.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from vmsgamp._core.addrspace cimport AddressSpace, vm_window

# One validated segment of a chain (a private copy: never re-read from the ring).
ctypedef struct vq_seg:
    char *ptr          # local address of the buffer, inside window `win`
    uint64_t addr      # bus address the driver wrote
    uint32_t len
    int32_t win        # index into the AddressSpace's windows
    uint8_t write      # device-writable


cdef class DescriptorChain:
    # `head` is public API: what add_used() takes back (split: index of the
    # chain's first descriptor; packed: the buffer id).
    cdef readonly int head
    cdef readonly int readable_count
    cdef int _n
    cdef vq_seg *_segs
    cdef vq_seg _inline[2]
    cdef AddressSpace _as
    cdef int _check(self) except -1
    cdef object _view(self, int i)


cdef class ChainBatch:
    # `heads` is public API: per chain, the id add_used() takes back (split:
    # descriptor index, packed: buffer id).
    cdef readonly object heads, seg_start, addr, length, writable, offset, window, tokens, used_len
    # The views hold buffer exports of the arrays, so numpy can neither
    # resize nor free them; the raw pointers into them are taken once, in
    # __cinit__, and every user checks its indices against max_chains /
    # max_segments first.
    cdef uint16_t[::1] _heads_v
    cdef uint32_t[::1] _seg_start_v
    cdef uint64_t[::1] _addr_v
    cdef uint32_t[::1] _length_v
    cdef uint8_t[::1] _writable_v
    cdef uint64_t[::1] _offset_v
    cdef uint16_t[::1] _window_v
    cdef uint64_t[::1] _tokens_v
    cdef uint32_t[::1] _used_len_v
    cdef uint16_t *_heads          # max_chains entries
    cdef uint32_t *_seg_start      # max_chains + 1
    cdef uint64_t *_addr           # max_segments
    cdef uint32_t *_length         # max_segments
    cdef uint8_t *_writable        # max_segments
    cdef uint64_t *_offset         # max_segments
    cdef uint16_t *_window         # max_segments
    cdef uint64_t *_tokens         # max_chains
    cdef uint32_t *_used_len       # max_chains
    cdef public int count
    cdef public int nseg
    cdef readonly int max_chains
    cdef readonly int max_segments


cdef DescriptorChain vq_make_chain(AddressSpace a, int id, const vq_seg *src, int n, int nread)


cdef inline int vq_batch_put(ChainBatch b, AddressSpace a, int id, const vq_seg *s,
                             int n) noexcept nogil:
    """Append one validated chain (id `id`, segments s[:n]) to `b`; -1, with
    nothing written, if it does not fit."""
    # count and nseg are public: read each once and check that copy.  As
    # unsigned, a negative value is huge, so each test also refuses it:
    # 0 <= c < max_chains (heads[c] and seg_start[c + 1] exist) and
    # 0 <= k, 0 <= n, k + n <= max_segments (the segment arrays hold k .. k + n - 1)
    cdef int c = b.count, k = b.nseg, j
    cdef const vm_window *w
    if (<unsigned>c >= <unsigned>b.max_chains or <unsigned>k > <unsigned>b.max_segments
            or <unsigned>n > <unsigned>(b.max_segments - k)):
        return -1
    b._heads[c] = <uint16_t>id
    b._seg_start[c] = k
    for j in range(n):
        w = &a._win[s[j].win]
        b._addr[k + j] = s[j].addr
        b._length[k + j] = s[j].len
        b._writable[k + j] = s[j].write
        b._offset[k + j] = w.offset + <uint64_t>(s[j].ptr - w.ptr)
        b._window[k + j] = <uint16_t>s[j].win
    b._seg_start[c + 1] = k + n
    b.nseg = k + n
    b.count = c + 1
    return 0
