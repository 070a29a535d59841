cdef enum:
    DB_KIND_POLL = 0      # no interrupt source: the waiter polls
    DB_KIND_EVENTFD = 1   # eventfd counters: C-level fast path, no GIL needed
    DB_KIND_PYTHON = 2    # a Python subclass (UIO, PCI...): called with the GIL

cdef class Doorbell:
    cdef readonly int kind
    cdef int rx_fd            # fd that becomes readable when the peer rings us, or -1
    cdef int tx_fd            # fd we write to ring the peer, or -1
    cdef bint _own_rx, _own_tx
    cdef readonly bint closed
    cdef int _users           # C-level calls using rx_fd/tx_fd right now (atomic)
    cdef int _released        # the fds were closed (exactly once)
    cdef readonly unsigned long long rings
    cdef readonly unsigned long long wakeups

    cdef int c_ring(self) except -1 nogil
    cdef int c_wait(self, long long timeout_ns) except -1 nogil
    cdef int c_drain(self) except -1 nogil
    cdef int c_interrupt(self) except -1


cdef class EventfdDoorbell(Doorbell):
    cdef bint _use(self) noexcept nogil
    cdef void _unuse(self) noexcept nogil
    cdef void _release_fds(self) noexcept nogil
    cdef int _drain_fd(self) noexcept nogil
