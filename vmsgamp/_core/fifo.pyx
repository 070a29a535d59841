"""MsgFifo: the virtio-msg-amp message queues (one per direction) in shared memory.

Two layouts (csrc/vmamp_shmem.h, csrc/spsc_queue.h; docs/virtio-msg.md):

* Gen B ``vmamp_shmem`` (default): a 64-byte self-describing layout written
  by the device side, one 8-byte queue head per side (magic, status, my
  producer index, my consumer index into the peer's array) and a handshake
  INIT -> READY -> RUN.
* Gen A ``spsc_queue``: two 4 KiB blocks (u32 producer / consumer index on
  separate 64-byte lines, 62 slots), no descriptor, no handshake.

One concern per file; this one is the public API and imports the public
names of the others, so ``vmsgamp._core.fifo`` is the one place to import:

  fifo_layout.pyx   the Gen B descriptor: write, read (twice), validate
  fifo_spsc.pyx     the Gen A blocks: placement, index pick-up
  fifo_session.pyx  FifoSession: the endpoint, its guards and status word,
                    the handshake, and how a session ends
  fifo_ring.pyx     FifoRing(FifoSession): slots, indices and their memory
                    order, doorbell, waits (without the GIL)
  fifo.pyx          MsgFifo(FifoRing): send/recv, bursts, blocking calls

Threads: one thread may send and one receive at a time; any thread may
close() (fifo_session.pyx says how).
"""
from cpython.bytes cimport PyBytes_CheckExact, PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.bytearray cimport PyByteArray_CheckExact, PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.stdint cimport uint8_t, uint32_t
cimport cython

from vmsgamp._core.io cimport vm_fence_seq_cst
from vmsgamp._core.fifo_session cimport FSTATE_RUNNING, session_enter, session_leave
from vmsgamp._core.fifo_ring cimport (
    FifoRing, ring_send_raw, ring_publish_tx, ring_publish_rx, ring_recv_raw, ring_notify,
)

from vmsgamp.errors import BadMessageSize

# The public names of the FIFO, wherever they are defined.
from vmsgamp._core.fifo_layout import (  # noqa: F401
    STATE_NAMES, default_layout, device_layout, read_layout, read_layout_stable, state_name,
    validate_layout,
)
from vmsgamp._core.fifo_spsc import PLACEMENTS  # noqa: F401
from vmsgamp._core.fifo_session import (  # noqa: F401
    DEFAULT_SPIN_NS, HEADERS, LAYOUT_A, LAYOUT_B, ROLE_DEVICE, ROLE_DRIVER, FifoSession,
    HeaderName, LayoutName, PlacementName, Role,
)
from vmsgamp._core.fifo_ring import FifoRing  # noqa: F401


# ---- the per-message steps (module-level, so they are direct C calls) -------------------

cdef int _bad_msg(MsgFifo f, const char *p, size_t n) except -1:
    cdef uint32_t msz
    if n > f.slot_size or n < f.header_size:
        raise ValueError(f"message of {n} bytes does not fit a {f.slot_size}-byte slot "
                         f"with a {f.header_size}-byte header")
    msz = (<uint8_t>p[f.msg_size_off]) | ((<uint8_t>p[f.msg_size_off + 1]) << 8)
    raise ValueError(f"message header says msg_size {msz} but {n} bytes were given")


cdef inline int _msg_ok(MsgFifo f, const char *p, size_t n) except -1:
    """A message the caller hands us must fit a slot and say its own size."""
    cdef uint32_t msz
    if n > f.slot_size or n < f.header_size:
        return _bad_msg(f, p, n)
    msz = (<uint8_t>p[f.msg_size_off]) | ((<uint8_t>p[f.msg_size_off + 1]) << 8)
    if msz < f.header_size or msz > n:
        return _bad_msg(f, p, n)
    return 0


cdef inline int _send_checked(MsgFifo f, const char *p, Py_ssize_t n) except -1:
    """Check, copy into the next slot, publish (R1), ring if needed: 1 sent, 0 full."""
    _msg_ok(f, p, n)
    if not ring_send_raw(f, p, n):
        return 0
    ring_publish_tx(f)
    f.sent += 1
    ring_notify(f)
    return 1


cdef int _send_view(MsgFifo f, object buf) except -1:
    # Any other buffer: exported for the copy only.
    cdef Py_buffer view
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        return _send_checked(f, <const char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


cdef int _try_send(MsgFifo f, object buf) except -1:
    """MsgFifo.try_send: 1 sent, 0 full."""
    session_enter(f)
    try:
        if f.fstate != FSTATE_RUNNING:
            f._check_running()
        # bytes and bytearray straight from their storage (no buffer export);
        # the GIL stays held, so a bytearray cannot be resized under the copy.
        if PyByteArray_CheckExact(buf):
            return _send_checked(f, PyByteArray_AS_STRING(buf), PyByteArray_GET_SIZE(buf))
        if PyBytes_CheckExact(buf):
            return _send_checked(f, PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf))
        return _send_view(f, buf)
    finally:
        session_leave(f)


cdef inline int _recv_finish(MsgFifo f, int n) except -2:
    # Consumed slots go back to the producer (R2) also for a bad message: its
    # size was read from our private copy before the slot was released.
    if n > 0:
        ring_publish_rx(f)
        f.received += 1
        return n
    if n < 0:
        ring_publish_rx(f)
        f._raise_bad()
    return 0


cdef int _recv_view(MsgFifo f, object into) except -2:
    cdef Py_buffer view
    cdef int n
    PyObject_GetBuffer(into, &view, PyBUF_WRITABLE)
    try:
        n = ring_recv_raw(f, <char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return _recv_finish(f, n)


cdef int _try_recv(MsgFifo f, object into) except -2:
    """MsgFifo.try_recv: the message's size, or 0 when empty."""
    session_enter(f)
    try:
        if f.fstate != FSTATE_RUNNING:
            f._check_running()
        if f.pending_bad >= 0:
            f._raise_bad()
        if PyByteArray_CheckExact(into):
            return _recv_finish(f, ring_recv_raw(f, PyByteArray_AS_STRING(into),
                                                 PyByteArray_GET_SIZE(into)))
        return _recv_view(f, into)
    finally:
        session_leave(f)


cdef class MsgFifo(FifoRing):
    """One endpoint of a virtio-msg-amp FIFO pair.

    ``MsgFifo(region, role="device"|"driver", layout="b"|"a", offset=0,
    window=8192, doorbell=None, header="g2", placement="0/4k")``, then
    ``start(timeout)`` (Gen B handshake; Gen A picks up the indices).

    Per message: ``try_send(buf) -> bool``, ``try_recv(into) -> int`` (0 when
    empty).  Bursts: ``send_burst(buf, msg_len)`` / ``recv_burst(into)`` move
    as many messages as fit in one call (one index store, at most one
    doorbell).  Blocking: ``send(buf, timeout)``, ``recv(into, timeout)``
    spin for ``spin_ns`` then sleep on the doorbell (GIL released,
    Ctrl-C works).  Receivers get the message's own ``msg_size`` bytes.

    One thread may send and one thread may receive at a time; any thread may
    close() (a waiter then raises FifoClosedError).
    """

    # ---- introspection of the queues ---------------------------------------------------

    def pending(self):
        """Messages ready to receive now."""
        self._enter()
        try:
            self._check_running()
            with nogil:
                self._refresh_prod()
            return (self.peer_prod_cache + self.num_slots - self.rx_idx) % self.num_slots
        finally:
            self._leave()

    def free_slots(self):
        """Messages that can be sent now without blocking."""
        self._enter()
        try:
            self._check_running()
            with nogil:
                self._refresh_cons()
            return (self.peer_cons_cache + self.num_slots - 1 - self.tx_idx) % self.num_slots
        finally:
            self._leave()

    # ---- per-message API -----------------------------------------------------------
    # try_send/try_recv are the hot path of every Python caller: one METH_O
    # call each (no keyword parsing, and CPython calls it without building
    # an argument array), with the guards and the ring steps inline
    # (session_enter/leave, ring_* in fifo_ring.pxd): nothing on the common
    # path is a call through the vtable.  send/recv use the same code.

    cdef int _check_msg(self, const char *p, size_t n) except -1:
        return _msg_ok(self, p, n)

    @cython.binding(False)
    @cython.always_allow_keywords(False)
    def try_send(self, buf):
        """Queue one message if there is room; True if sent.  The peer is rung
        if it may be asleep."""
        return True if _try_send(self, buf) else False

    @cython.binding(False)
    @cython.always_allow_keywords(False)
    def try_recv(self, into):
        """Copy the next message into ``into`` (a writable buffer of at least
        the message size); returns its size, or 0 when the FIFO is empty.
        Raises BadMessageSize for a message whose msg_size is impossible (it
        is dropped; the next call continues with the following message)."""
        return _try_recv(self, into)

    def _raise_bad(self):
        bad = self.pending_bad
        self.pending_bad = -1
        raise BadMessageSize(bad, self.header_size, self.slot_size,
                             PyBytes_FromStringAndSize(self._bad_slot, self._bad_len))

    def send(self, buf, timeout=None):
        """Send one message, waiting up to ``timeout`` seconds (None: forever)
        for room.  Raises TimeoutError."""
        cdef long long t = -1 if timeout is None else <long long>(timeout * 1e9)
        cdef int ok
        session_enter(self)
        try:
            while not _try_send(self, buf):
                with nogil:
                    ok = self._wait_writable(t)
                if not ok:
                    raise TimeoutError(f"FIFO full for {timeout} s: the peer is not consuming")
            return True
        finally:
            session_leave(self)

    def recv(self, into, timeout=None):
        """Receive one message into ``into``, waiting up to ``timeout`` seconds
        (None: forever).  Returns its size; raises TimeoutError."""
        cdef long long t
        cdef int ok, n
        session_enter(self)
        try:
            n = _try_recv(self, into)
            if n:
                return n   # the common case of a busy peer: no wait set up at all
            t = -1 if timeout is None else <long long>(timeout * 1e9)
            while True:
                with nogil:
                    ok = self._wait_readable(t)
                if not ok:
                    raise TimeoutError(f"no message within {timeout} s")
                n = _try_recv(self, into)
                if n:
                    return n
        finally:
            session_leave(self)

    def recv_bytes(self, timeout=None):
        """Receive one message and return it as bytes."""
        buf = bytearray(self.slot_size)
        n = self.recv(buf, timeout)
        return bytes(buf[:n])

    def wait_readable(self, timeout=None):
        """Block until a message is ready (True) or the timeout expires."""
        cdef long long t = -1 if timeout is None else <long long>(timeout * 1e9)
        cdef int ok
        self._enter()
        try:
            self._check_running()
            with nogil:
                ok = self._wait_readable(t)
            return bool(ok)
        finally:
            self._leave()

    def arm_wait(self):
        """For event loops that wait on ``doorbell.fileno()`` themselves:
        advertise that we are about to sleep, so the sender rings.  Returns
        True when a message is already ready (then do not sleep).  Call
        ``disarm_wait()`` after waking."""
        self._enter()
        try:
            self._check_running()
            self._set_waiting(True)
            vm_fence_seq_cst()  # F2, as in _wait_readable
            with nogil:
                self._refresh_prod()
            if self.rx_idx != self.peer_prod_cache:
                self._set_waiting(False)
                return True
            self.sleeps += 1
            return False
        finally:
            self._leave()

    def disarm_wait(self):
        if self._closed:
            return
        if self.fstate == FSTATE_RUNNING:
            self._set_waiting(False)

    def kick(self):
        """Ring the peer unconditionally."""
        self.doorbell.c_ring()
        self.rings += 1

    # ---- bursts ----------------------------------------------------------------------

    def send_burst(self, buf, size_t msg_len, timeout=0):
        """Send the messages packed back to back in ``buf`` (each ``msg_len``
        bytes).  Sends as many as fit with one index store and at most one
        doorbell; with a timeout (None: forever) keeps waiting for room until
        all are sent.  Returns the number sent."""
        cdef Py_buffer view
        cdef size_t i, k, sent = 0
        cdef const char *p
        cdef long long t = -1 if timeout is None else <long long>(timeout * 1e9)
        cdef int ok
        self._enter()
        try:
            self._check_running()
            PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
            try:
                if msg_len == 0 or view.len % msg_len:
                    raise ValueError(f"buffer of {view.len} bytes is not a whole number of "
                                     f"{msg_len}-byte messages")
                k = view.len // msg_len
                p = <const char *>view.buf
                for i in range(k):
                    self._check_msg(p + i * msg_len, msg_len)
                while True:
                    # The copy is short and never blocks: keep the GIL (releasing
                    # and re-taking it costs more than a 2 KiB memcpy).
                    if msg_len == self.slot_size:
                        sent += self._send_bulk(p + sent * msg_len, k - sent)
                    else:
                        while sent < k and self._send_raw(p + sent * msg_len, msg_len):
                            sent += 1
                    self._publish_tx()
                    self._notify()
                    if sent == k or t == 0:
                        break
                    with nogil:
                        ok = self._wait_writable(t)
                    if not ok:
                        break
            finally:
                PyBuffer_Release(&view)
            self.sent += sent
            return sent
        finally:
            self._leave()

    def recv_burst(self, into, max_count=None, timeout=0):
        """Receive up to ``max_count`` messages into ``into``: message i lands
        at ``i * slot_size`` and carries its own msg_size.  With a timeout
        (None: forever) waits for at least one message.  Returns the count."""
        cdef Py_buffer view
        cdef size_t cap, got = 0
        cdef char *p
        cdef long long t = -1 if timeout is None else <long long>(timeout * 1e9)
        cdef int ok
        self._enter()
        try:
            self._check_running()
            if self.pending_bad >= 0:
                self._raise_bad()
            PyObject_GetBuffer(into, &view, PyBUF_WRITABLE)
            try:
                cap = view.len // self.slot_size
                if max_count is not None:
                    cap = min(cap, <size_t>max_count)
                p = <char *>view.buf
                while True:
                    got = self._recv_bulk(p, cap)   # short, non-blocking: GIL kept
                    self._publish_rx()
                    if self.pending_bad >= 0:
                        if got == 0:
                            self._raise_bad()
                        break
                    if got or t == 0 or cap == 0:
                        break
                    with nogil:
                        ok = self._wait_readable(t)
                    if not ok:
                        break
            finally:
                PyBuffer_Release(&view)
            self.received += got
            return got
        finally:
            self._leave()

    def send_many(self, msgs):
        """Send messages from an iterable of buffers until the FIFO is full;
        one index store and at most one doorbell.  Returns the count sent."""
        cdef Py_buffer view
        cdef size_t sent = 0
        cdef int r
        self._enter()
        try:
            self._check_running()
            for m in msgs:
                PyObject_GetBuffer(m, &view, PyBUF_SIMPLE)
                try:
                    self._check_msg(<const char *>view.buf, view.len)
                    r = self._send_raw(<const char *>view.buf, view.len)
                finally:
                    PyBuffer_Release(&view)
                if not r:
                    break
                sent += 1
            self._publish_tx()
            self._notify()
            self.sent += sent
            return sent
        finally:
            self._leave()

    def recv_many(self, max_count=None):
        """Receive the ready messages as a list of bytes."""
        cdef char tmp[65536]
        cdef int n = 0
        out = []
        self._enter()
        try:
            self._check_running()
            if self.pending_bad >= 0:
                self._raise_bad()
            while max_count is None or len(out) < max_count:
                n = self._recv_raw(tmp, sizeof(tmp))
                if n <= 0:
                    break
                out.append(PyBytes_FromStringAndSize(tmp, n))
            self._publish_rx()
            self.received += len(out)
            if n < 0 and not out:
                self._raise_bad()   # else pending_bad is reported by the next call
            return out
        finally:
            self._leave()
