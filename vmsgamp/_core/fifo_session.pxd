# FifoSession: what MsgFifo keeps about one endpoint and its session
# (fifo_session.pyx); the data path is MsgFifo (fifo.pyx), a subclass.
from libc.stdint cimport uint16_t, uint32_t
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC, nanosleep

from vmsgamp._core.region cimport Region
from vmsgamp._core.doorbell cimport Doorbell

cdef enum:
    C_LAYOUT_B = 0
    C_LAYOUT_A = 1
    C_ROLE_DEVICE = 0
    C_ROLE_DRIVER = 1

cdef enum:
    FSTATE_NEW = 0
    FSTATE_RUNNING = 1
    FSTATE_STOPPED = 2
    FSTATE_BROKEN = 3

cdef enum:
    MAX_SLICE_NS = 100000000   # re-check the peer's state at least every 100 ms while asleep
    SIZE_POLL_NS = 100000000   # while idle, fstat the shared object at most every 100 ms


cdef inline long long now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void sleep_ns(long long ns) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = ns // 1000000000
    ts.tv_nsec = ns % 1000000000
    nanosleep(&ts, NULL)


cdef class FifoSession:
    cdef readonly Region region
    cdef readonly Doorbell doorbell
    cdef readonly int layout            # LAYOUT_B / LAYOUT_A
    cdef readonly int role              # ROLE_DEVICE / ROLE_DRIVER
    cdef readonly size_t offset         # window start inside the region
    cdef readonly size_t window
    cdef readonly uint32_t num_slots    # ring size N (N-1 messages in flight)
    cdef readonly uint32_t slot_size    # bytes per element
    cdef readonly uint32_t header_size  # 8 (G2) or 6 (G1)
    cdef uint32_t msg_size_off          # where msg_size sits in the header
    cdef int memtype

    # Gen B: queue heads; Gen A: the two 4 KiB blocks.
    cdef char *my_qh
    cdef char *peer_qh
    cdef char *tx_block
    cdef char *rx_block
    cdef char *tx_elems
    cdef char *rx_elems

    # Private shadows of the shared indices (never read back from memory).
    cdef uint32_t tx_idx                # my producer index
    cdef uint32_t rx_idx                # my consumer index
    cdef uint32_t peer_cons_cache       # last peer consumer index seen (A2)
    cdef uint32_t peer_prod_cache       # last peer producer index seen (A1)
    cdef uint16_t my_status             # what I last wrote to my status word (under _status_lock)
    cdef int _status_lock               # spin lock: my_status and its store (vmsgamp_io.h)
    cdef char *_scratch                 # private copy of one slot (msg_size is read from here)
    cdef char *_bad_slot                # private copy of the slot behind pending_bad
    cdef uint32_t _bad_len              # its length (the slot size when it was read)
    cdef int _closed                    # close() was called (read without the GIL by waiters)
    cdef int _active                    # calls in progress that may touch the mapping
    cdef long long _size_polled_ns      # last fstat of the shared object (idle waits)
    cdef long long _pause_ns            # next sleep of a start() wait (doubles up to a cap)
    cdef public uint16_t status_flags   # extension flags advertised from start() (VMAMP_STATUS_F_LOCKED)

    cdef int fstate                     # FSTATE_* (private)
    cdef bint peer_seen_run
    cdef readonly object broken_reason
    cdef int pending_bad                # a bad msg_size consumed (its slot in _bad_slot), reported next
    cdef public long long spin_ns       # spin before blocking in waits
    cdef bint _pinned

    cdef readonly unsigned long long sent
    cdef readonly unsigned long long received
    cdef readonly unsigned long long dropped
    cdef readonly unsigned long long rings
    cdef readonly unsigned long long sleeps

    cdef int _alloc_scratch(self) except -1
    cdef int _enter(self) except -1
    cdef int _raise_closed(self) except -1
    cdef void _leave(self) noexcept
    cdef void _release(self) noexcept
    cdef int _check_closed(self) except -1 nogil
    cdef int _check_lost(self) except -1 nogil
    cdef int _lost(self) except -1
    cdef int _poll_size(self, long long now) except -1 nogil
    cdef int _check_running(self) except -1
    cdef int _break(self, str reason) except -1
    cdef void _store_status(self, uint16_t keep, uint16_t setbits, int order) noexcept nogil
    cdef void _write_status(self, uint16_t state) noexcept nogil
    cdef int _set_waiting(self, bint on) noexcept nogil
    cdef int _peer_event(self, uint16_t st) except -1


# ---- the guards, inline ------------------------------------------------------------------
# Every call that touches the mapping is bracketed by these (GIL held).  They
# are inline so the per-message calls (fifo.pyx) pay no call through the
# vtable into another module; FifoSession._enter/_leave are the same code.

cdef inline int session_enter(FifoSession s) except -1:
    """Count a call in, so close() from another thread defers the release."""
    if s._closed:
        return s._raise_closed()
    s._active += 1
    return 0


cdef inline void session_leave(FifoSession s) noexcept:
    s._active -= 1
    if s._active == 0 and s._closed:
        s._release()
