# FifoRing: the ring mechanics (fifo_ring.pyx) on top of FifoSession; MsgFifo
# (fifo.pxd) adds the public calls.
from libc.stdint cimport uint32_t

from vmsgamp._core.fifo_session cimport FifoSession

cdef class FifoRing(FifoSession):
    cdef int _refresh_prod(self) except -1 nogil
    cdef int _refresh_cons(self) except -1 nogil
    cdef int _send_raw(self, const char *buf, size_t n) except -1 nogil
    cdef int _publish_tx(self) except -1 nogil
    cdef size_t _send_bulk(self, const char *p, size_t k) except? 0xFFFFFFFF nogil
    cdef size_t _recv_bulk(self, char *out, size_t k) except? 0xFFFFFFFF nogil
    cdef int _publish_rx(self) noexcept nogil
    cdef int _recv_raw(self, char *out, size_t cap) except -2 nogil
    cdef void _keep_bad(self, const char *slot, uint32_t msz) noexcept nogil
    cdef int _notify(self) except -1 nogil
    cdef int _wait_readable(self, long long timeout_ns) except -1 nogil
    cdef int _wait_writable(self, long long timeout_ns) except -1 nogil
