# The split ring, device side and driver side (csrc/virtq.h "split layout").
cimport cython
from libc.stdint cimport uint16_t, uint32_t
from vmsgamp._core.virtq._shared cimport _DeviceQueue
from vmsgamp._core.virtq._driver cimport _Driver

cdef class SplitQueue(_DeviceQueue):
    cdef uint16_t _next_avail       # free-running avail index of the next chain to pop
    cdef uint16_t _next_used        # free-running used index, published as used.idx
    cdef uint16_t _avail_shadow     # last avail.idx read (chains known available)
    cdef uint16_t _signalled_used   # used index at the last needs_notification()
    cdef bint _signalled_valid
    # final (_avail_count, _put_used): called directly, not through the
    # vtable, so the C compiler may inline them
    @cython.final
    cdef int _avail_count(self) noexcept nogil
    cdef int _walk(self, unsigned desc_idx) noexcept nogil
    @cython.final
    cdef void _put_used(self, unsigned desc_idx, uint32_t ln) noexcept nogil
    cdef int _peek(self) noexcept nogil
    cdef void _advance(self) noexcept nogil

cdef class SplitQueueDriver(_Driver):
    cdef uint16_t _free_desc        # first descriptor index of the free list
    cdef uint16_t _avail_idx        # free-running, published as avail.idx
    cdef uint16_t _last_used        # free-running used index of the next chain to get
    cdef uint16_t _used_shadow      # last used.idx read
    cdef int _add(self, int n, int nout) noexcept nogil
    cdef void _publish(self) noexcept nogil
    cdef int _peek_used(self, unsigned *id, uint32_t *ln) noexcept nogil
    cdef void _consume(self, unsigned id) noexcept nogil
    cdef void _after_get(self) noexcept nogil
