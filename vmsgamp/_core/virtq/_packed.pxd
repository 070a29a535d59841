# The packed ring, device side and driver side (csrc/virtq.h "packed layout").
cimport cython
from libc.stdint cimport uint16_t, uint32_t
from vmsgamp._core.virtq._shared cimport _DeviceQueue
from vmsgamp._core.virtq._driver cimport _Driver

cdef class PackedQueue(_DeviceQueue):
    cdef uint16_t _next_avail       # ring offset of the next chain to pop
    cdef bint _avail_wrap
    cdef uint16_t _next_used        # ring offset of the next used descriptor
    cdef bint _used_wrap
    cdef uint16_t _signalled_used   # next_used at the last needs_notification()
    cdef bint _signalled_valid
    cdef unsigned _used_since       # descriptors marked used since then (size before any signal)
    cdef unsigned _outstanding      # ring slots of popped, unused chains
    cdef uint16_t *_ndesc           # per buffer id: ring slots of its chain, 0 if not in flight
    cdef int _nring                 # ring slots of the chain _peek() validated
    cdef int _walk(self, unsigned pos, bint wrap, uint16_t first_flags) noexcept nogil
    # final: called directly (no vtable), so the C compiler may inline it
    @cython.final
    cdef int _put_used(self, unsigned buffer_id, uint32_t ln) noexcept nogil
    cdef int _peek(self) noexcept nogil
    cdef void _advance(self) noexcept nogil

cdef class PackedQueueDriver(_Driver):
    cdef uint16_t _free_id          # first buffer id of the free list
    cdef uint16_t _next_avail       # ring offset the next chain goes to
    cdef bint _avail_wrap
    cdef uint16_t _last_used        # ring offset of the next used descriptor
    cdef bint _used_wrap
    cdef int _add(self, int n, int nout) noexcept nogil
    cdef int _peek_used(self, unsigned *id, uint32_t *ln) noexcept nogil
    cdef void _consume(self, unsigned id) noexcept nogil
    cdef void _after_get(self) noexcept nogil
    @cython.final
    cdef void _write_event(self, uint16_t flags) noexcept nogil
