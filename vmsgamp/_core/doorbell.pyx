"""Doorbells: how one side tells the other "look at the FIFO".

Interface: ring(), fileno(), wait(timeout), drain(), close().
* EventfdDoorbell: ring writes the peer's eventfd, wait polls our own.  The
  FIFO calls it at C level without the GIL.
* PollingDoorbell: for peers without interrupts (a bare shm: object); ring
  does nothing and waiting is done by polling the FIFO itself.
* Python subclasses (UIO, PCI registers, in later carriers) override ring()
  and wait(); the FIFO then calls them with the GIL held.

close() may run while another thread is inside ring() or wait() without
the GIL: the fds are closed only when the last such call has left, so no
call ever polls, reads or writes an fd number that was closed and reused.
"""
from libc.errno cimport errno, EINTR, EAGAIN
from libc.stdint cimport uint64_t
from posix.unistd cimport read, write, close as c_close
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.exc cimport PyErr_CheckSignals

from vmsgamp._core.io cimport VM_SEQ_CST, vm_int_add, vm_int_load, vm_int_store, vm_int_xchg

import os

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    int ppoll(pollfd *fds, unsigned long nfds, const timespec *tmo_p, const void *sigmask)
    enum:
        POLLIN

cdef inline long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int _check_signals_nogil() except -1 nogil:
    with gil:
        PyErr_CheckSignals()
    return 0


cdef int wait_fd_readable(int fd, long long timeout_ns) except -1 nogil:
    """Wait until fd is readable: 1 readable, 0 timeout.  timeout_ns < 0 waits
    forever.  Interruptible: a pending Python signal (Ctrl-C) raises.
    ppoll, not poll: a wait of 20 us must not become one of 1 ms."""
    cdef pollfd p
    cdef timespec ts
    cdef long long deadline = _now_ns() + timeout_ns if timeout_ns >= 0 else -1
    cdef long long left
    cdef int rc
    while True:
        p.fd = fd
        p.events = POLLIN
        p.revents = 0
        if deadline < 0:
            rc = ppoll(&p, 1, NULL, NULL)
        else:
            left = deadline - _now_ns()
            if left < 0:
                left = 0
            ts.tv_sec = left // 1000000000
            ts.tv_nsec = left % 1000000000
            rc = ppoll(&p, 1, &ts, NULL)
        if rc > 0:
            return 1
        if rc == 0:
            return 0
        if errno == EINTR:
            _check_signals_nogil()
            continue
        with gil:
            raise OSError(errno, "poll on doorbell fd failed")


cdef class Doorbell:
    """Base class.  Python subclasses override ring(), wait(), drain(),
    fileno() and close()."""

    def __cinit__(self, *args, **kwargs):
        self.kind = DB_KIND_PYTHON
        self.rx_fd = -1
        self.tx_fd = -1
        self._own_rx = False
        self._own_tx = False
        self.closed = False
        self._users = 0
        self._released = 0
        self.rings = 0
        self.wakeups = 0

    # C-level entry points used by the FIFO.  The base versions call the
    # Python-level methods so subclasses written in Python just work.
    cdef int c_ring(self) except -1 nogil:
        with gil:
            self.ring()
        return 0

    cdef int c_wait(self, long long timeout_ns) except -1 nogil:
        cdef bint r
        with gil:
            r = bool(self.wait(None if timeout_ns < 0 else timeout_ns / 1e9))
        return 1 if r else 0

    cdef int c_drain(self) except -1 nogil:
        with gil:
            self.drain()
        return 0

    cdef int c_interrupt(self) except -1:
        # Wake a thread waiting in wait() (close() of its FIFO).  Python
        # doorbells are waited on in slices of at most 100 ms, which bounds
        # the delay; nothing to do here.
        return 0

    def ring(self):
        """Notify the peer."""
        raise NotImplementedError

    def wait(self, timeout=None):
        """Block until the peer rings (True) or the timeout expires (False)."""
        raise NotImplementedError

    def drain(self):
        """Consume pending notifications without blocking."""

    def fileno(self):
        """An fd that becomes readable when the peer rings, for select/asyncio."""
        raise ValueError(f"{type(self).__name__} has no file descriptor to wait on")

    @property
    def can_wait(self):
        """False for doorbells without an interrupt source (waiters poll)."""
        return self.kind != DB_KIND_POLL

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


cdef class PollingDoorbell(Doorbell):
    """No interrupt source: ring() is a no-op and waiters poll the FIFO."""

    def __cinit__(self, *args, **kwargs):
        self.kind = DB_KIND_POLL

    cdef int c_ring(self) except -1 nogil:
        return 0

    cdef int c_wait(self, long long timeout_ns) except -1 nogil:
        return 0

    cdef int c_drain(self) except -1 nogil:
        return 0

    cdef int c_interrupt(self) except -1:
        return 0

    def ring(self):
        pass

    def wait(self, timeout=None):
        """Nothing can ring a polling doorbell: sleep for the timeout and say
        'not rung' so the caller re-checks its queue."""
        if timeout is None:
            raise ValueError("a PollingDoorbell cannot wait forever; poll the FIFO instead")
        import time
        time.sleep(timeout)
        return False

    def __repr__(self):
        return "<PollingDoorbell>"


cdef class EventfdDoorbell(Doorbell):
    """Eventfd doorbell: ``rx_fd`` is ours (the peer writes it to wake us),
    ``tx_fd`` is the peer's (we write 1 to it to ring).  Either may be -1
    (receive-only or send-only).  With ``own=True`` both fds are closed by
    close()."""

    def __cinit__(self, *args, **kwargs):
        self.kind = DB_KIND_EVENTFD

    def __init__(self, int rx_fd=-1, int tx_fd=-1, *, bint own=True):
        self.rx_fd = rx_fd
        self.tx_fd = tx_fd
        self._own_rx = own and rx_fd >= 0
        self._own_tx = own and tx_fd >= 0 and tx_fd != rx_fd

    @staticmethod
    def pair():
        """Two cross-wired doorbells (a rings b, b rings a), e.g. for two
        processes created by fork or passed over a UNIX socket."""
        a_rx = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        b_rx = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        a = EventfdDoorbell(a_rx, b_rx, own=True)
        b = EventfdDoorbell(b_rx, a_rx, own=False)
        return a, b

    @property
    def rx(self):
        return self.rx_fd

    @property
    def tx(self):
        return self.tx_fd

    # ---- fd lifetime: close() never pulls an fd from under a call using it ----

    cdef bint _use(self) noexcept nogil:
        # Count ourselves in, then look at closed; close() sets closed, then
        # looks at _users (both seq_cst): one of us always sees the other.
        vm_int_add(&self._users, 1)
        if vm_int_load(<int *>&self.closed, VM_SEQ_CST):
            self._unuse()
            return False
        return True

    cdef void _unuse(self) noexcept nogil:
        if vm_int_add(&self._users, -1) == 0 and vm_int_load(<int *>&self.closed, VM_SEQ_CST):
            self._release_fds()

    cdef void _release_fds(self) noexcept nogil:
        if vm_int_xchg(&self._released, 1):
            return
        if self._own_rx and self.rx_fd >= 0:
            c_close(self.rx_fd)
        if self._own_tx and self.tx_fd >= 0:
            c_close(self.tx_fd)
        self.rx_fd = -1
        self.tx_fd = -1

    cdef int c_ring(self) except -1 nogil:
        cdef uint64_t one = 1
        cdef long rc
        cdef int err = 0
        if not self._use():
            with gil:
                raise ValueError("the doorbell is closed")
        if self.tx_fd < 0:
            self._unuse()
            with gil:
                raise ValueError("this doorbell has no peer eventfd to ring")
        while True:
            rc = write(self.tx_fd, &one, 8)
            if rc == 8:
                self.rings += 1
                break
            # EAGAIN: the counter is saturated, so the peer is already due
            # to wake up; ringing again adds nothing.
            if rc < 0 and errno == EAGAIN:
                break
            if rc < 0 and errno == EINTR:
                continue
            err = errno
            break
        self._unuse()
        if err:
            with gil:
                raise OSError(err, "ringing the peer's eventfd failed")
        return 0

    cdef int _drain_fd(self) noexcept nogil:
        cdef uint64_t v
        cdef long rc
        if self.rx_fd < 0:
            return 0
        while True:
            rc = read(self.rx_fd, &v, 8)
            if rc == 8:
                self.wakeups += 1
                continue  # a non-EFD_SEMAPHORE read empties it; loop ends on EAGAIN
            if rc < 0 and errno == EINTR:
                continue
            return 0

    cdef int c_drain(self) except -1 nogil:
        if self._use():
            self._drain_fd()
            self._unuse()
        return 0

    cdef int c_wait(self, long long timeout_ns) except -1 nogil:
        cdef int r
        if not self._use():
            with gil:
                raise ValueError("the doorbell is closed")
        try:
            if self.rx_fd < 0:
                with gil:
                    raise ValueError("this doorbell has no eventfd to wait on")
            r = wait_fd_readable(self.rx_fd, timeout_ns)
            if r:
                self._drain_fd()
        finally:
            self._unuse()
        return r

    cdef int c_interrupt(self) except -1:
        # Make our own eventfd readable: a thread polling it in c_wait wakes
        # (the wake-up is drained like any ring and the waiter re-checks).
        cdef uint64_t one = 1
        if self._use():
            if self.rx_fd >= 0:
                write(self.rx_fd, &one, 8)
            self._unuse()
        return 0

    def ring(self):
        with nogil:
            self.c_ring()

    def wait(self, timeout=None):
        cdef long long t = -1 if timeout is None else <long long>(timeout * 1e9)
        cdef int r
        with nogil:
            r = self.c_wait(t)
        return bool(r)

    def drain(self):
        with nogil:
            self.c_drain()

    def fileno(self):
        if self.closed:
            raise ValueError("the doorbell is closed")
        if self.rx_fd < 0:
            raise ValueError("this doorbell has no eventfd to wait on")
        return self.rx_fd

    def close(self):
        """Idempotent.  A call still using the fds in another thread keeps
        them open until it returns; new calls raise ValueError."""
        if self.closed:
            return
        vm_int_store(<int *>&self.closed, 1, VM_SEQ_CST)
        if vm_int_load(&self._users, VM_SEQ_CST) == 0:
            self._release_fds()

    def __dealloc__(self):
        self._release_fds()

    def __repr__(self):
        return f"<EventfdDoorbell rx={self.rx_fd} tx={self.tx_fd}{' closed' if self.closed else ''}>"
