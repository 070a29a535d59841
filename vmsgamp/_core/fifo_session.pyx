"""FifoSession: one endpoint of a FIFO pair and the life of its session.

:class:`vmsgamp._core.fifo.MsgFifo` is this class plus the data path; this
half holds what the data path relies on: the endpoint's geometry and private
index shadows, the guards every call goes through (closed, lost mapping,
broken), our own status word, the Gen B handshake and the way a session ends
(start, rearm, shutdown, close, peer events).

Gen B handshake (docs/virtio-msg.md), the same on both sides:

  1. own status INIT, then own queue magic "QO";
  2. wait for the peer's magic and a live state (the driver: not RUN,
     which is a device still in an earlier session);
  3. own indices zero, then READY;
  4. wait while the peer is INIT;
  5. RUN: traffic may start.

A peer seen leaving RUN ends the session: we drop to INIT at once (so a
re-registering peer waits for us instead of running against our stale
indices) and raise PeerRestarted or PeerShutdown.

Memory-order pairs used here (the rest are in fifo.pyx):
  R0/A0  device's release store of the layout magic / driver's acquire load
         (fifo_layout.pyx).
  R3/A3  release store of a status word (state change) / acquire load of the
         peer's status word.

Threads: our status word carries the state (written by whichever thread sees
a peer event, or by start/shutdown) and the WAITING flag (written by the
receiver): both go through one spin-locked shadow, so neither update can
overwrite the other.  close() while another thread is inside a call (waiting
without the GIL, say) wakes it, lets it raise FifoClosedError and releases
the region only after the last such call has left.
"""
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint16_t, uint32_t
from libc.stdlib cimport malloc, free

from vmsgamp._core.io cimport (
    VM_RELAXED, VM_ACQUIRE, VM_RELEASE,
    vm_load16, vm_store16, vm_store32, vm_fence_release, vm_zero_shared,
    vm_int_load, vm_int_store, vm_spin_lock, vm_spin_unlock,
)
from vmsgamp._core.region cimport Region, region_lost
from vmsgamp._core.doorbell cimport Doorbell
from vmsgamp._core.fifo_layout cimport (
    VMAMP_LAYOUT_MAGIC, VMAMP_QUEUE_MAGIC, VMAMP_DEFAULT_WINDOW, VMAMP_ALIGN,
    VMAMP_STATE_MASK, VMAMP_STATE_INIT, VMAMP_STATE_READY, VMAMP_STATE_RUN,
    VMAMP_STATE_SHUTDOWN, VMAMP_STATE_PEER_DEAD,
    VMAMP_STATUS_F_WAITING, VMAMP_STATUS_F_SUPPRESS, VMAMP_STATUS_F_LOCKED,
    VMAMP_OFF_MAGIC, VMAMP_QH_OFF_MAGIC, VMAMP_QH_OFF_STATUS, VMAMP_QH_OFF_PROD, VMAMP_QH_OFF_CONS,
    VMAMP_QUEUE_HEAD_SIZE,
    layout_invalidate, layout_write_fields, layout_publish,
)
from vmsgamp._core.fifo_spsc cimport (
    SPSC_PACKET_SIZE, SPSC_BLOCK_SIZE, SPSC_OFF_PACKETS, SPSC_CAPACITY, SPSC_OFF_EXT_WAITING,
    spsc_zero_block, spsc_pick_up, spsc_advertise_suppress,
)

from typing import Literal

from vmsgamp._core.doorbell import PollingDoorbell
from vmsgamp._core.fifo_layout import device_layout, read_layout_stable, state_name, validate_layout
from vmsgamp._core.fifo_spsc import PLACEMENTS, placement_window
from vmsgamp.errors import (
    FifoBrokenError, FifoClosedError, HandshakeTimeout, LayoutError, PeerRestarted, PeerShutdown,
)

# Names the keyword arguments accept (the .pyi uses the same Literal types).
Role = Literal["device", "driver"]
LayoutName = Literal["b", "a"]
HeaderName = Literal["g2", "g1"]
PlacementName = Literal["0/4k", "4k/8k"]

LAYOUT_B = C_LAYOUT_B
LAYOUT_A = C_LAYOUT_A
ROLE_DEVICE = C_ROLE_DEVICE
ROLE_DRIVER = C_ROLE_DRIVER

_FSTATE_NAMES = {FSTATE_NEW: "new", FSTATE_RUNNING: "running",
                 FSTATE_STOPPED: "stopped", FSTATE_BROKEN: "broken"}

# Header profiles: (header size, offset of msg_size).
HEADERS = {"g2": (8, 6), "g1": (6, 4)}

DEFAULT_SPIN_NS = 20000   # spin 20 us before sleeping: a busy peer answers well within it
# start() waits for a peer that may take hours to come: look after 20 us,
# then twice as late each time up to 4 ms (an idle device side then costs
# about 1% of a CPU, and a peer that comes is seen within 4 ms).
cdef enum:
    PAUSE_MIN_NS = 20000
    PAUSE_MAX_NS = 4000000


cdef class FifoSession:
    """The endpoint and session half of :class:`MsgFifo` (its base class;
    not useful alone).  See MsgFifo for the constructor's arguments."""

    def __cinit__(self):
        self.fstate = FSTATE_NEW
        self.status_flags = 0
        self._pinned = False
        self.pending_bad = -1
        self.broken_reason = None
        self._scratch = NULL
        self._closed = 0
        self._active = 0
        self._status_lock = 0
        self._size_polled_ns = 0

    def __init__(self, Region region not None, *, role="device", layout="b", size_t offset=0,
                 window=None, Doorbell doorbell=None, header="g2", placement="0/4k",
                 uint32_t slot_size=64, spin_us=None):
        if role not in ("device", "driver"):
            raise ValueError(f"role must be 'device' or 'driver', not {role!r}")
        if layout not in ("a", "b"):
            raise ValueError(f"layout must be 'b' (vmamp_shmem) or 'a' (spsc_queue), not {layout!r}")
        if header not in HEADERS:
            raise ValueError(f"header must be one of {sorted(HEADERS)}, not {header!r}")
        if offset % VMAMP_ALIGN:
            raise ValueError(f"FIFO offset {offset:#x} is not {VMAMP_ALIGN}-byte aligned "
                             f"(every index word would be misaligned)")
        self.region = region
        self.doorbell = doorbell if doorbell is not None else PollingDoorbell()
        self.role = C_ROLE_DEVICE if role == "device" else C_ROLE_DRIVER
        self.layout = C_LAYOUT_B if layout == "b" else C_LAYOUT_A
        self.offset = offset
        self.header_size, self.msg_size_off = HEADERS[header]
        self.memtype = region.memtype
        self.spin_ns = DEFAULT_SPIN_NS if spin_us is None else <long long>(spin_us * 1000)
        if self.layout == C_LAYOUT_B:
            self.window = VMAMP_DEFAULT_WINDOW if window is None else window
            if self.role == C_ROLE_DEVICE and (slot_size < 8 or slot_size % VMAMP_ALIGN
                                               or slot_size > 0xFFFF):
                raise LayoutError("size_queue_elements", f"{slot_size}: a slot size must be a "
                                                         f"multiple of {VMAMP_ALIGN} between 8 and 65528")
            self.slot_size = slot_size
        else:
            need = placement_window(placement)
            drv_off, dev_off = PLACEMENTS[placement]
            self.window = need if window is None else window
            self.slot_size = SPSC_PACKET_SIZE
            self.num_slots = SPSC_CAPACITY
            if need > self.window:
                raise ValueError(f"placement {placement} needs a window of at least {need} bytes")
            drv = region.ptr(offset + drv_off, SPSC_BLOCK_SIZE)
            dev = region.ptr(offset + dev_off, SPSC_BLOCK_SIZE)
            # The driver block carries driver->device traffic.
            self.tx_block = dev if self.role == C_ROLE_DEVICE else drv
            self.rx_block = drv if self.role == C_ROLE_DEVICE else dev
            self.tx_elems = self.tx_block + SPSC_OFF_PACKETS
            self.rx_elems = self.rx_block + SPSC_OFF_PACKETS
        region.ptr(offset, self.window)   # the whole window must be mapped
        self._alloc_scratch()
        region.pin()
        self._pinned = True

    cdef int _alloc_scratch(self) except -1:
        # Private copy of one slot: msg_size is read from here, never from
        # shared memory, so one value decides both the check and the length.
        # Room for the largest slot a layout can describe, allocated once, so
        # a later start() with another geometry never frees it under a user.
        # The second half keeps the last malformed slot until it is reported.
        if self._scratch == NULL:
            self._scratch = <char *>malloc(2 * 0x10000)
            if self._scratch == NULL:
                raise MemoryError()
            self._bad_slot = self._scratch + 0x10000
            self._bad_len = 0
        return 0

    # ---- guards: every call that touches the mapping -----------------------------

    cdef int _enter(self) except -1:
        # Every call that touches the mapping counts itself in (GIL held), so
        # close() from another thread defers the release until it has left.
        return session_enter(self)

    cdef int _raise_closed(self) except -1:
        raise FifoClosedError("FIFO is closed")

    cdef void _leave(self) noexcept:
        session_leave(self)

    cdef void _release(self) noexcept:
        if not self._pinned:
            return
        self._pinned = False
        self.my_qh = self.peer_qh = self.tx_elems = self.rx_elems = NULL
        self.tx_block = self.rx_block = NULL
        self.region.unpin()

    cdef int _check_closed(self) except -1 nogil:
        # close() from another thread while we wait without the GIL: leave.
        if vm_int_load(&self._closed, VM_ACQUIRE):
            with gil:
                raise FifoClosedError("FIFO closed by another thread while this one was using it")
        return 0

    cdef int _check_lost(self) except -1 nogil:
        # After reading shared memory: zeros from a lost mapping are not data.
        if region_lost(self.region):
            with gil:
                self._lost()
        return 0

    cdef int _poll_size(self, long long now) except -1 nogil:
        # Idle waits touch only the queue heads: an object shrunk below the
        # rest of the window would go unnoticed until the next message.
        if now - self._size_polled_ns >= SIZE_POLL_NS:
            self._size_polled_ns = now
            if self.region.poll_size_c():
                with gil:
                    self._lost()
        return 0

    cdef int _lost(self) except -1:
        self.fstate = FSTATE_BROKEN
        self.broken_reason = "the shared object shrank"
        self.region._raise_lost()
        return -1

    cdef int _check_running(self) except -1:
        if region_lost(self.region):
            self._lost()
        if self.fstate == FSTATE_RUNNING:
            return 0
        if self.fstate == FSTATE_BROKEN:
            raise FifoBrokenError(self.broken_reason)
        if self.fstate == FSTATE_NEW:
            raise RuntimeError("FIFO not started: call start() first")
        raise RuntimeError("FIFO stopped: call start() to run the handshake again")

    cdef int _break(self, str reason) except -1:
        self.fstate = FSTATE_BROKEN
        self.broken_reason = reason
        raise FifoBrokenError(reason)

    # ---- our status word -------------------------------------------------------------
    # State bits (written by whichever thread sees a peer event, or by
    # start/shutdown) and the WAITING flag (written by the receiving thread).
    # Each update changes the private shadow and stores the whole word under
    # one spin lock, so the stores reach shared memory in the order of the
    # shadow updates and neither thread can put back a value the other has
    # already replaced (RUN|WAITING over INIT, say).  A read-modify-write
    # atomic on the shared word itself would not do: device memory (UIO, PCI
    # BARs) does not support atomic RMW.

    cdef void _store_status(self, uint16_t keep, uint16_t setbits, int order) noexcept nogil:
        vm_spin_lock(&self._status_lock)
        self.my_status = (self.my_status & keep) | setbits
        vm_store16(self.my_qh + VMAMP_QH_OFF_STATUS, self.my_status, order)
        vm_spin_unlock(&self._status_lock)

    cdef void _write_status(self, uint16_t state) noexcept nogil:
        # R3: a state change must be visible after everything written before it.
        self._store_status(<uint16_t>~VMAMP_STATE_MASK, state, VM_RELEASE)

    cdef int _set_waiting(self, bint on) noexcept nogil:
        # relaxed: ordered against the index re-check by the F2 fence (fifo.pyx)
        if self.layout == C_LAYOUT_B:
            if on:
                self._store_status(0xFFFF, VMAMP_STATUS_F_WAITING, VM_RELAXED)
            else:
                self._store_status(<uint16_t>~VMAMP_STATUS_F_WAITING, 0, VM_RELAXED)
        else:
            vm_store32(self.rx_block + SPSC_OFF_EXT_WAITING, 1 if on else 0, VM_RELAXED)
        return 0

    cdef int _peer_event(self, uint16_t st) except -1:
        cdef int s = st & VMAMP_STATE_MASK
        # Drop to INIT at once so a re-registering peer waits for us instead
        # of running against our stale indices
        # (docs/virtio-msg.md#teardown-and-re-registration).
        self._write_status(VMAMP_STATE_INIT)
        self.fstate = FSTATE_STOPPED
        if s in (VMAMP_STATE_INIT, VMAMP_STATE_READY):
            raise PeerRestarted("restart", state_name(st))
        if s == VMAMP_STATE_SHUTDOWN:
            raise PeerShutdown("shutdown", state_name(st))
        if s == VMAMP_STATE_PEER_DEAD:
            raise PeerShutdown("dead", state_name(st))
        self.fstate = FSTATE_BROKEN
        self.broken_reason = f"peer queue head has invalid state {s}"
        raise FifoBrokenError(self.broken_reason)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, timeout=10.0, *, bint reset=False, bint fresh=False):
        """Bring the FIFO up.

        Gen B: the device writes the layout (magic last), both sides run the
        INIT -> READY -> RUN handshake; the driver validates every layout field
        first.  Raises HandshakeTimeout if the peer does not arrive in time.
        ``fresh`` waits for a peer that starts its handshake anew (INIT or
        READY): one still in RUN is the session that broke or died.  The
        driver side always does so: a device still in RUN has not yet seen
        the driver's previous session end.
        Gen A: no handshake; the indices in memory are picked up (``reset``
        zeroes both blocks first: only when the peer is known to be idle).
        """
        cdef long long deadline = now_ns() + <long long>(timeout * 1e9)
        self._enter()
        try:
            if region_lost(self.region):
                self._lost()
            if self.fstate == FSTATE_BROKEN:
                raise FifoBrokenError(self.broken_reason)
            self.pending_bad = -1
            if self.layout == C_LAYOUT_A:
                self._start_a(reset)
            else:
                self._start_b(deadline, timeout, fresh)
            self._check_lost()
            self.fstate = FSTATE_RUNNING
        finally:
            self._leave()
        return self

    def _start_a(self, bint reset):
        if reset:
            spsc_zero_block(self.tx_block, self.memtype)
            spsc_zero_block(self.rx_block, self.memtype)
            vm_fence_release()
        # Pick up where we left off; the peer's words are untrusted.
        tx, rx, pc, pp = spsc_pick_up(self.tx_block, self.rx_block)
        self._check_lost()
        self.tx_idx, self.rx_idx = tx, rx
        self.peer_cons_cache, self.peer_prod_cache = pc, pp
        spsc_advertise_suppress(self.rx_block)

    def _attach_b(self, dict lay):
        cdef size_t o = self.offset
        n = lay["num_queue_elements"]
        sz = lay["size_queue_elements"]
        dev_qh = self.region.ptr(o + lay["dev_queue_head_offset"], VMAMP_QUEUE_HEAD_SIZE)
        drv_qh = self.region.ptr(o + lay["drv_queue_head_offset"], VMAMP_QUEUE_HEAD_SIZE)
        dev_el = self.region.ptr(o + lay["dev_queue_elements_offset"], n * sz)
        drv_el = self.region.ptr(o + lay["drv_queue_elements_offset"], n * sz)
        self.num_slots = n
        self.slot_size = sz
        if self.role == C_ROLE_DEVICE:
            self.my_qh, self.peer_qh, self.tx_elems, self.rx_elems = dev_qh, drv_qh, dev_el, drv_el
        else:
            self.my_qh, self.peer_qh, self.tx_elems, self.rx_elems = drv_qh, dev_qh, drv_el, dev_el

    def _write_layout(self):
        """Device side: write the layout for our window and clear our queue
        head, invalidating both before any field changes."""
        cdef char *base = self.region.ptr(self.offset, self.window)
        lay = device_layout(self.window, self.slot_size)
        self._attach_b(lay)
        # Every word with a single store (the peer polls them), then a
        # release fence, so no field written below becomes visible before
        # the cleared magic (the driver's second read pairs with it).
        layout_invalidate(base)
        vm_store16(self.my_qh + VMAMP_QH_OFF_MAGIC, 0, VM_RELAXED)
        self._store_status(0, 0, VM_RELAXED)
        vm_store16(self.my_qh + VMAMP_QH_OFF_PROD, 0, VM_RELAXED)
        vm_store16(self.my_qh + VMAMP_QH_OFF_CONS, 0, VM_RELAXED)
        vm_fence_release()
        layout_write_fields(base, lay)
        vm_zero_shared(self.tx_elems, <size_t>self.num_slots * self.slot_size, self.memtype)
        layout_publish(base)   # R0

    def _read_layout(self, long long deadline, timeout):
        """Driver side: wait for the device's layout, validate it, attach."""
        cdef char *base = self.region.ptr(self.offset, self.window)
        self._pause_ns = PAUSE_MIN_NS
        while True:
            if vm_load16(base + VMAMP_OFF_MAGIC, VM_ACQUIRE) == VMAMP_LAYOUT_MAGIC:  # A0 <- R0
                lay = read_layout_stable(self.region, self.offset)
                if lay is not None:
                    break
            self._pause(deadline, lambda: HandshakeTimeout(
                f"no virtio-msg-amp layout at offset {self.offset:#x} after {timeout} s "
                f"(magic {vm_load16(base, VM_RELAXED):#06x}): is the device side running?"))
        validate_layout(lay, self.window)
        self._attach_b(lay)

    def _start_b(self, long long deadline, timeout, bint fresh=False):
        cdef uint16_t st, pm
        if self.role == C_ROLE_DEVICE:
            self._write_layout()
        else:
            self._read_layout(deadline, timeout)
            vm_zero_shared(self.tx_elems, <size_t>self.num_slots * self.slot_size, self.memtype)
        # 1. own status INIT, then own magic (R3).
        self._store_status(0, VMAMP_STATUS_F_SUPPRESS | (self.status_flags & VMAMP_STATUS_F_LOCKED)
                           | VMAMP_STATE_INIT, VM_RELEASE)
        vm_store16(self.my_qh + VMAMP_QH_OFF_MAGIC, VMAMP_QUEUE_MAGIC, VM_RELEASE)
        # 2. wait for the peer's magic and a live state.  A peer still showing
        # SHUTDOWN/PEER_DEAD is an old session: wait for it to come back.
        # The driver also waits out a device still in RUN: that device holds
        # the old session's indices and has not yet seen us leave, so going
        # RUN now would have it read our new ring from its old position.  It
        # drops to INIT as soon as it looks (our INIT above is a peer event
        # for it).  A device never goes RUN before we are READY, so RUN here
        # is always an earlier session.
        fresh = fresh or self.role == C_ROLE_DRIVER
        self._pause_ns = PAUSE_MIN_NS
        while True:
            pm = vm_load16(self.peer_qh + VMAMP_QH_OFF_MAGIC, VM_ACQUIRE)
            st = vm_load16(self.peer_qh + VMAMP_QH_OFF_STATUS, VM_ACQUIRE)  # A3 <- peer R3
            if pm == VMAMP_QUEUE_MAGIC and (st & VMAMP_STATE_MASK) <= (
                    VMAMP_STATE_READY if fresh else VMAMP_STATE_RUN):
                break
            self._pause(deadline, lambda: HandshakeTimeout(self._not_up_reason(pm, st, timeout)))
        # 3. own indices zero, then READY.
        vm_store16(self.my_qh + VMAMP_QH_OFF_PROD, 0, VM_RELAXED)
        vm_store16(self.my_qh + VMAMP_QH_OFF_CONS, 0, VM_RELAXED)
        self.tx_idx = self.rx_idx = self.peer_cons_cache = self.peer_prod_cache = 0
        self._write_status(VMAMP_STATE_READY)
        # 4. wait while the peer is INIT.
        self._pause_ns = PAUSE_MIN_NS
        while True:
            st = vm_load16(self.peer_qh + VMAMP_QH_OFF_STATUS, VM_ACQUIRE)  # A3 <- peer R3
            self._check_lost()
            if (st & VMAMP_STATE_MASK) in (VMAMP_STATE_READY, VMAMP_STATE_RUN):
                break
            if (st & VMAMP_STATE_MASK) > VMAMP_STATE_RUN:
                self._write_status(VMAMP_STATE_INIT)
                raise PeerShutdown("shutdown", state_name(st))
            self._pause(deadline, lambda: HandshakeTimeout(
                f"peer stayed in {state_name(st)} for {timeout} s"))
        # 5. RUN: traffic may start.
        self.peer_seen_run = (st & VMAMP_STATE_MASK) == VMAMP_STATE_RUN
        self._write_status(VMAMP_STATE_RUN)

    def _not_up_reason(self, uint16_t pm, uint16_t st, timeout):
        if pm != VMAMP_QUEUE_MAGIC:
            why = "no queue magic"
        elif (st & VMAMP_STATE_MASK) == VMAMP_STATE_RUN:
            why = ("it still shows RUN from an earlier session and has not noticed "
                   "that session end")
        else:
            why = "its queue head is " + state_name(st)
        return f"peer never came up ({why}) within {timeout} s"

    def _pause(self, long long deadline, make_error):
        # Zeros from a lost mapping look like a peer that is not there yet.
        self._check_lost()
        self._poll_size(now_ns())
        if self._closed:
            raise FifoClosedError("FIFO closed by another thread during start()")
        cdef long long now = now_ns()
        if now >= deadline:
            if self.layout == C_LAYOUT_B and self.my_qh != NULL:
                self._write_status(VMAMP_STATE_INIT)
            raise make_error()
        cdef long long ns = min(self._pause_ns, deadline - now)
        self._pause_ns = min(self._pause_ns * 2, PAUSE_MAX_NS)
        with nogil:
            sleep_ns(ns)
        PyErr_CheckSignals()

    def rearm(self):
        """End the session from our side so that ``start()`` can run a new
        handshake, also after FifoBrokenError (a peer index out of range):
        Gen B own state INIT, so the peer sees us leave RUN; FIFO stopped.
        Pair with ``start(fresh=True)`` to wait for the peer to restart too."""
        if not self._pinned:
            return
        if (self.layout == C_LAYOUT_B and self.my_qh != NULL and self.region.mapped
                and not region_lost(self.region)):
            self._write_status(VMAMP_STATE_INIT)
        self.fstate = FSTATE_STOPPED
        self.pending_bad = -1

    def shutdown(self):
        """Tell the peer we are going away (Gen B: own state SHUTDOWN)."""
        if (self.layout == C_LAYOUT_B and self.my_qh != NULL and self.region.mapped
                and not region_lost(self.region)):
            self._write_status(VMAMP_STATE_SHUTDOWN)
        if self.fstate == FSTATE_RUNNING:
            self.fstate = FSTATE_STOPPED

    def close(self):
        """Shut down (Gen B) and release the region.  Idempotent.  Safe while
        another thread is inside a call on this FIFO (waiting in recv(), say):
        that thread is woken, raises FifoClosedError, and the region is
        released once it has left."""
        if self._closed:
            return
        if self._pinned and self.fstate == FSTATE_RUNNING:
            self.shutdown()
        vm_int_store(&self._closed, 1, VM_RELEASE)
        if self.fstate != FSTATE_BROKEN:
            self.fstate = FSTATE_STOPPED
        if self._active:
            self.doorbell.c_interrupt()   # a waiter asleep on the doorbell wakes now
        else:
            self._release()

    def __dealloc__(self):
        if self._pinned and self.region is not None:
            self.region.unpin()
        free(self._scratch)
        self._scratch = self._bad_slot = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- introspection -----------------------------------------------------------

    @property
    def state(self):
        """'new', 'running', 'stopped' or 'broken'."""
        return _FSTATE_NAMES[self.fstate]

    @property
    def closed(self):
        return bool(self._closed)

    @property
    def max_msg_size(self):
        return self.slot_size

    def peer_state(self):
        """The peer's queue-head state name (Gen B), or None (Gen A)."""
        if self.layout != C_LAYOUT_B or self.peer_qh == NULL:
            return None
        st = vm_load16(self.peer_qh + VMAMP_QH_OFF_STATUS, VM_ACQUIRE)
        self.region.check_alive()
        return state_name(st)

    def my_state(self):
        if self.layout != C_LAYOUT_B or self.my_qh == NULL:
            return None
        return state_name(self.my_status)

    def stats(self):
        return {"sent": self.sent, "received": self.received, "dropped": self.dropped,
                "rings": self.rings, "sleeps": self.sleeps, "state": self.state,
                "broken_reason": self.broken_reason}

    def __repr__(self):
        return (f"<{type(self).__name__} {'B' if self.layout == C_LAYOUT_B else 'A'} "
                f"{'device' if self.role == C_ROLE_DEVICE else 'driver'} slots={self.num_slots}x"
                f"{self.slot_size} {'closed' if self._closed else self.state}>")

