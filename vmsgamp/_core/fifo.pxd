# MsgFifo: the public calls (fifo.pyx) on top of FifoRing (fifo_ring.pxd),
# which sits on FifoSession (fifo_session.pxd: the fields and the handshake).
from vmsgamp._core.fifo_ring cimport FifoRing

cdef class MsgFifo(FifoRing):
    cdef int _check_msg(self, const char *p, size_t n) except -1
