"""FifoRing: the lock-free ring mechanics of MsgFifo, without the GIL.

Copying messages into and out of the slots, publishing and reloading the
indices, and waiting for the peer (spin, then sleep on the doorbell).
:class:`vmsgamp._core.fifo.MsgFifo` builds its public calls on these.

Indices are named by role, never "head"/"tail", because the two layouts give
the same role opposite names (the table is also in csrc/vmamp_shmem.h):

  role              written by     Gen B field                    Gen A field
  producer index    the sender     ``tail`` of the sender's       ``head`` (+0) of the
                                   queue head (+4, u16)           direction's block (u32)
  consumer index    the receiver   ``head`` of the receiver's     ``tail`` (+64) of the
                                   queue head (+6, u16)           direction's block (u32)

Memory-order pairs of the data path (every shared index access names its
partner; R0/A0 and R3/A3 are in fifo_layout.pyx and fifo_session.pyx):
  R1/A1  producer's release store of its index after filling slots
         /  consumer's acquire load of that index before reading slots.
  R2/A2  consumer's release store of its index after copying slots out
         /  producer's acquire load of that index before reusing slots.
  F1/F2  full fences of the notification-suppression handshake: the sender
         publishes its index then reads the receiver's WAITING flag (F1); the
         receiver sets WAITING then re-reads the sender's index (F2).  With
         both fences at least one side sees the other's store, so a message
         published while the receiver goes to sleep always rings it.

The peer is untrusted: every index it writes is range-checked, its consumer
index may only move forward through what we sent, and any impossible value
marks the FIFO broken (FifoBrokenError) instead of touching memory outside
the element arrays.  Each side keeps private shadows of its own indices and
never reads them back from shared memory; every message is copied into
private memory before its msg_size is looked at.  If the object behind the
region shrinks under us (region.pxd), every call raises SharedObjectLost.
"""
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy

from vmsgamp._core.io cimport (
    VM_RELAXED, VM_ACQUIRE, VM_RELEASE,
    vm_load16, vm_load32, vm_store16, vm_store32,
    vm_fence_seq_cst, vm_cpu_relax, vm_copy_to_shared, vm_copy_from_shared, vm_zero_shared,
)
from vmsgamp._core.doorbell cimport DB_KIND_POLL
from vmsgamp._core.fifo_layout cimport (
    VMAMP_STATE_MASK, VMAMP_STATE_READY, VMAMP_STATE_RUN, VMAMP_STATE_SHUTDOWN,
    VMAMP_STATE_PEER_DEAD, VMAMP_STATUS_F_WAITING, VMAMP_STATUS_F_SUPPRESS,
    VMAMP_QH_OFF_STATUS, VMAMP_QH_OFF_PROD, VMAMP_QH_OFF_CONS,
)
from vmsgamp._core.fifo_spsc cimport (
    SPSC_OFF_PROD, SPSC_OFF_CONS, SPSC_OFF_EXT_WAITING, SPSC_OFF_EXT_MAGIC, SPSC_EXT_MAGIC,
)
from vmsgamp._core.fifo_session cimport FifoSession, C_LAYOUT_B, MAX_SLICE_NS, now_ns, sleep_ns


cdef class FifoRing(FifoSession):
    """The ring mechanics of :class:`MsgFifo` (its base class; not useful
    alone)."""

    # ---- indices and slots -------------------------------------------------------------

    cdef int _refresh_prod(self) except -1 nogil:
        """Reload the peer's producer index (consumer side)."""
        cdef uint32_t p
        cdef uint16_t st
        if self.layout == C_LAYOUT_B:
            st = vm_load16(self.peer_qh + VMAMP_QH_OFF_STATUS, VM_ACQUIRE)  # A3 <- peer R3
            p = vm_load16(self.peer_qh + VMAMP_QH_OFF_PROD, VM_ACQUIRE)  # A1 <- peer R1
            self._check_lost()
            if (st & VMAMP_STATE_MASK) != VMAMP_STATE_RUN:
                if (st & VMAMP_STATE_MASK) == VMAMP_STATE_READY and not self.peer_seen_run:
                    return 0  # peer finishing its handshake: nothing to read yet
                if (st & VMAMP_STATE_MASK) in (VMAMP_STATE_SHUTDOWN, VMAMP_STATE_PEER_DEAD):
                    # A peer that shuts down keeps its indices: deliver what it
                    # published before leaving (Linux's last SET_DEVICE_STATUS 0
                    # comes right before SHUTDOWN), report once drained.
                    if p < self.num_slots and p != self.rx_idx:
                        self.peer_prod_cache = p
                        return 0
                with gil:
                    self._peer_event(st)
            self.peer_seen_run = True
        else:
            p = vm_load32(self.rx_block + SPSC_OFF_PROD, VM_ACQUIRE)  # A1 <- peer R1
            self._check_lost()
        if p >= self.num_slots:
            with gil:
                self._break(f"peer producer index {p} out of range (ring of {self.num_slots})")
        self.peer_prod_cache = p
        return 0

    cdef int _refresh_cons(self) except -1 nogil:
        """Reload the peer's consumer index (producer side).  It may only
        advance through what we have published."""
        cdef uint32_t c, adv, outstanding, n = self.num_slots
        cdef uint16_t st
        if self.layout == C_LAYOUT_B:
            st = vm_load16(self.peer_qh + VMAMP_QH_OFF_STATUS, VM_ACQUIRE)  # A3 <- peer R3
            c = vm_load16(self.peer_qh + VMAMP_QH_OFF_CONS, VM_ACQUIRE)  # A2 <- peer R2
            self._check_lost()
            if (st & VMAMP_STATE_MASK) != VMAMP_STATE_RUN and (
                    self.peer_seen_run or (st & VMAMP_STATE_MASK) != VMAMP_STATE_READY):
                with gil:
                    self._peer_event(st)
        else:
            c = vm_load32(self.tx_block + SPSC_OFF_CONS, VM_ACQUIRE)  # A2 <- peer R2
            self._check_lost()
        if c >= n:
            with gil:
                self._break(f"peer consumer index {c} out of range (ring of {n})")
        adv = (c + n - self.peer_cons_cache) % n
        outstanding = (self.tx_idx + n - self.peer_cons_cache) % n
        if adv > outstanding:
            with gil:
                self._break(f"peer consumer index jumped from {self.peer_cons_cache} to {c}, "
                            f"beyond our producer index {self.tx_idx}")
        self.peer_cons_cache = c
        return 0

    cdef int _send_raw(self, const char *buf, size_t n) except -1 nogil:
        """Fill the next slot (not yet published).  1 sent, 0 full."""
        return ring_send_raw(self, buf, n)

    cdef int _publish_tx(self) except -1 nogil:
        return ring_publish_tx(self)   # R1 (fifo_ring.pxd)

    cdef int _publish_rx(self) noexcept nogil:
        return ring_publish_rx(self)   # R2 (fifo_ring.pxd)

    cdef int _recv_raw(self, char *out, size_t cap) except -2 nogil:
        """Copy the next message out (not yet published).  Returns its size,
        0 when empty, -1 when it had a bad msg_size (consumed, dropped, the
        size left in pending_bad)."""
        return ring_recv_raw(self, out, cap)

    cdef int _too_small(self, size_t cap, uint32_t msz) except -1 nogil:
        # The message stays queued: the caller may retry with a larger buffer.
        with gil:
            raise ValueError(f"receive buffer of {cap} bytes is smaller than the "
                             f"{msz}-byte message waiting")

    cdef void _keep_bad(self, const char *slot, uint32_t msz) noexcept nogil:
        # A malformed message is dropped, but what was read (one whole slot,
        # already in private memory) goes with its report, for the tracer.
        memcpy(self._bad_slot, slot, self.slot_size)
        self._bad_len = self.slot_size
        self.pending_bad = msz
        self.dropped += 1

    cdef size_t _send_bulk(self, const char *p, size_t k) except? 0xFFFFFFFF nogil:
        """Copy up to k whole-slot messages with one memcpy per contiguous
        run of slots (at most two: the ring wraps once).  Not yet published."""
        cdef uint32_t n = self.num_slots
        cdef size_t free_, run, done = 0, sz = self.slot_size
        free_ = (self.peer_cons_cache + n - 1 - self.tx_idx) % n
        if free_ < k:
            self._refresh_cons()
            free_ = (self.peer_cons_cache + n - 1 - self.tx_idx) % n
        if k > free_:
            k = free_
        while done < k:
            run = n - self.tx_idx
            if run > k - done:
                run = k - done
            vm_copy_to_shared(self.tx_elems + self.tx_idx * sz, p + done * sz, run * sz, self.memtype)
            self.tx_idx += run
            if self.tx_idx == n:
                self.tx_idx = 0
            done += run
        return done

    cdef size_t _recv_bulk(self, char *out, size_t k) except? 0xFFFFFFFF nogil:
        """Copy up to k slots out with one memcpy per contiguous run, then
        check each message's msg_size in the private copy.  Stops before the
        first bad one (which is consumed and left in pending_bad) and returns
        the count of good messages.  Not yet published."""
        cdef uint32_t n = self.num_slots, msz
        cdef size_t avail, run, done = 0, i, sz = self.slot_size
        cdef const uint8_t *h
        avail = (self.peer_prod_cache + n - self.rx_idx) % n
        if avail < k:
            self._refresh_prod()
            avail = (self.peer_prod_cache + n - self.rx_idx) % n
        if k > avail:
            k = avail
        cdef uint32_t first = self.rx_idx
        while done < k:
            run = n - first
            if run > k - done:
                run = k - done
            vm_copy_from_shared(out + done * sz, self.rx_elems + first * sz, run * sz, self.memtype)
            first += run
            if first == n:
                first = 0
            done += run
        self._check_lost()
        for i in range(k):
            h = <const uint8_t *>(out + i * sz + self.msg_size_off)
            msz = h[0] | (<uint32_t>h[1] << 8)
            if msz < self.header_size or msz > sz:
                self._keep_bad(out + i * sz, msz)
                self.rx_idx = (self.rx_idx + i + 1) % n
                return i
        self.rx_idx = first
        return k

    # ---- doorbell and waits --------------------------------------------------------------

    cdef int _notify(self) except -1 nogil:
        """Ring the peer if it may be asleep."""
        return ring_notify(self)

    cdef int _ring_peer(self) except -1 nogil:
        """_notify with a doorbell that can interrupt the peer."""
        cdef uint16_t st
        # F1 (pairs with F2): our published index must be visible before we
        # read the peer's WAITING flag, else the peer could check an empty
        # queue, sleep, and miss this message.
        vm_fence_seq_cst()
        if self.layout == C_LAYOUT_B:
            st = vm_load16(self.peer_qh + VMAMP_QH_OFF_STATUS, VM_RELAXED)
            if (st & VMAMP_STATUS_F_SUPPRESS) and not (st & VMAMP_STATUS_F_WAITING):
                return 0
        else:
            if (vm_load32(self.tx_block + SPSC_OFF_EXT_MAGIC, VM_RELAXED) == SPSC_EXT_MAGIC
                    and vm_load32(self.tx_block + SPSC_OFF_EXT_WAITING, VM_RELAXED) == 0):
                return 0
        self.doorbell.c_ring()
        self.rings += 1
        return 0

    cdef int _wait_readable(self, long long timeout_ns) except -1 nogil:
        """Wait until a message is ready: 1 ready, 0 timeout (<0: forever).
        Raises FifoClosedError if another thread closes the FIFO meanwhile."""
        cdef long long start = now_ns()
        cdef long long deadline = start + timeout_ns if timeout_ns >= 0 else -1
        cdef long long spin_end = start + self.spin_ns
        cdef long long now, left, slice_ns, backoff = 5000, last_sig = start
        cdef int i = 0, rc
        # Spin: a peer answering within the window costs no syscall at all.
        while True:
            if self.rx_idx != self.peer_prod_cache:
                return 1
            self._check_closed()
            self._refresh_prod()
            if self.rx_idx != self.peer_prod_cache:
                return 1
            i += 1
            if (i & 63) == 0:
                now = now_ns()
                if now >= spin_end or (deadline >= 0 and now >= deadline):
                    break
            vm_cpu_relax()
        while True:
            self._check_closed()
            now = now_ns()
            self._poll_size(now)
            if deadline >= 0 and now >= deadline:
                return 0
            left = deadline - now if deadline >= 0 else MAX_SLICE_NS
            if self.doorbell.kind != DB_KIND_POLL:
                slice_ns = left if left < MAX_SLICE_NS else MAX_SLICE_NS
                self._set_waiting(True)
                # F2 (pairs with F1): WAITING must be visible before we re-read
                # the producer index, else a message sent in between is missed.
                vm_fence_seq_cst()
                rc = self._refresh_prod()
                if self.rx_idx != self.peer_prod_cache:
                    self._set_waiting(False)
                    return 1
                self.sleeps += 1
                rc = self.doorbell.c_wait(slice_ns)
                self._set_waiting(False)
            else:
                # No interrupt source: poll with a growing pause.
                sleep_ns(backoff if backoff < left else left)
                if backoff < 1000000:
                    backoff *= 2
                if now - last_sig > 20000000:
                    last_sig = now
                    with gil:
                        PyErr_CheckSignals()
            self._check_closed()
            self._refresh_prod()
            if self.rx_idx != self.peer_prod_cache:
                return 1

    cdef int _wait_writable(self, long long timeout_ns) except -1 nogil:
        """Wait for a free slot.  Consumers do not ring when they free slots,
        so poll with a growing pause.  1 ready, 0 timeout."""
        cdef long long start = now_ns()
        cdef long long deadline = start + timeout_ns if timeout_ns >= 0 else -1
        cdef long long now, backoff = 1000, last_sig = start
        cdef uint32_t nxt
        while True:
            self._check_closed()
            nxt = self.tx_idx + 1
            if nxt == self.num_slots:
                nxt = 0
            self._refresh_cons()
            if nxt != self.peer_cons_cache:
                return 1
            now = now_ns()
            if deadline >= 0 and now >= deadline:
                return 0
            if now - start > self.spin_ns:
                self._poll_size(now)
                sleep_ns(backoff)
                if backoff < 1000000:
                    backoff *= 2
            else:
                vm_cpu_relax()
            if now - last_sig > 20000000:
                last_sig = now
                with gil:
                    PyErr_CheckSignals()
