# FifoRing: the ring mechanics (fifo_ring.pyx) on top of FifoSession; MsgFifo
# (fifo.pxd) adds the public calls.
#
# The per-message steps (fill a slot, publish, copy a slot out, ring) are
# inline functions here, so the public per-message calls in fifo.pyx run
# them without a call through the vtable into another module; the
# FifoRing methods of the same names are these same functions.  Anything
# rare (the peer's index, a full or empty ring, a bad message, a lost
# mapping) is a method call on the slow path.
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy

from vmsgamp._core.io cimport (
    VM_RELEASE, vm_store16, vm_store32, vm_copy_to_shared, vm_copy_from_shared, vm_zero_shared,
    vm_prefetch_read, vm_prefetch_write,
)
from vmsgamp._core.region cimport region_lost
from vmsgamp._core.doorbell cimport DB_KIND_POLL
from vmsgamp._core.fifo_layout cimport VMAMP_QH_OFF_PROD, VMAMP_QH_OFF_CONS
from vmsgamp._core.fifo_spsc cimport SPSC_OFF_PROD, SPSC_OFF_CONS
from vmsgamp._core.fifo_session cimport FifoSession, C_LAYOUT_B

cdef class FifoRing(FifoSession):
    cdef int _refresh_prod(self) except -1 nogil
    cdef int _refresh_cons(self) except -1 nogil
    cdef int _send_raw(self, const char *buf, size_t n) except -1 nogil
    cdef int _publish_tx(self) except -1 nogil
    cdef size_t _send_bulk(self, const char *p, size_t k) except? 0xFFFFFFFF nogil
    cdef size_t _recv_bulk(self, char *out, size_t k) except? 0xFFFFFFFF nogil
    cdef int _publish_rx(self) noexcept nogil
    cdef int _recv_raw(self, char *out, size_t cap) except -2 nogil
    cdef int _too_small(self, size_t cap, uint32_t msz) except -1 nogil
    cdef void _keep_bad(self, const char *slot, uint32_t msz) noexcept nogil
    cdef int _notify(self) except -1 nogil
    cdef int _ring_peer(self) except -1 nogil
    cdef int _wait_readable(self, long long timeout_ns) except -1 nogil
    cdef int _wait_writable(self, long long timeout_ns) except -1 nogil


cdef inline int ring_send_raw(FifoRing r, const char *buf, size_t n) except -1 nogil:
    """Fill the next slot (not yet published).  1 sent, 0 full."""
    cdef uint32_t nxt = r.tx_idx + 1
    cdef char *slot
    if nxt == r.num_slots:
        nxt = 0
    if nxt == r.peer_cons_cache:
        # The cached consumer index says full: only now look at the peer's.
        r._refresh_cons()
        if nxt == r.peer_cons_cache:
            return 0
    slot = r.tx_elems + <size_t>r.tx_idx * r.slot_size
    vm_copy_to_shared(slot, buf, n, r.memtype)
    if n < r.slot_size:
        # Peers see whole slots; stale bytes of an older message must not leak.
        vm_zero_shared(slot + n, r.slot_size - n, r.memtype)
    r.tx_idx = nxt
    # The slot after this one, first and last byte (a slot may straddle
    # two lines): its lines come over from the consumer while our caller
    # gets the next message ready.
    slot = r.tx_elems + <size_t>nxt * r.slot_size
    vm_prefetch_write(slot)
    vm_prefetch_write(slot + r.slot_size - 1)
    return 1


cdef inline int ring_publish_tx(FifoRing r) except -1 nogil:
    # R1 -> peer A1: slot contents must be visible before the index that publishes them.
    if r.layout == C_LAYOUT_B:
        vm_store16(r.my_qh + VMAMP_QH_OFF_PROD, <uint16_t>r.tx_idx, VM_RELEASE)
    else:
        vm_store32(r.tx_block + SPSC_OFF_PROD, r.tx_idx, VM_RELEASE)
    # A copy that found the object shrunk went into zero pages: say so.
    if region_lost(r.region):
        r._check_lost()
    return 0


cdef inline int ring_publish_rx(FifoRing r) noexcept nogil:
    # R2 -> peer A2: we finished copying the slots out before the producer may reuse them.
    if r.layout == C_LAYOUT_B:
        vm_store16(r.my_qh + VMAMP_QH_OFF_CONS, <uint16_t>r.rx_idx, VM_RELEASE)
    else:
        vm_store32(r.rx_block + SPSC_OFF_CONS, r.rx_idx, VM_RELEASE)
    return 0


cdef inline int ring_recv_raw(FifoRing r, char *out, size_t cap) except -2 nogil:
    """Copy the next message out (not yet published).  Returns its size,
    0 when empty, -1 when it had a bad msg_size (consumed, dropped, the
    size left in pending_bad)."""
    cdef const uint8_t *h
    cdef const char *slot
    cdef uint32_t msz, nxt
    if r.rx_idx == r.peer_prod_cache:
        # The cached producer index says empty: only now look at the peer's
        # (A1 in _refresh_prod orders the slot reads below after it).
        r._refresh_prod()
        if r.rx_idx == r.peer_prod_cache:
            return 0
    # The whole slot into private memory first, then msg_size from the copy:
    # the peer may rewrite the slot at any moment, so one read must decide
    # both the check and the length handed out, as in _recv_bulk.
    vm_copy_from_shared(r._scratch, r.rx_elems + <size_t>r.rx_idx * r.slot_size,
                        r.slot_size, r.memtype)
    # Zeros from a lost mapping are not data (one fenced load: region.pxd).
    if region_lost(r.region):
        r._check_lost()
    h = <const uint8_t *>(r._scratch + r.msg_size_off)
    msz = h[0] | (<uint32_t>h[1] << 8)
    nxt = r.rx_idx + 1
    if nxt == r.num_slots:
        nxt = 0
    if msz < r.header_size or msz > r.slot_size:
        r.rx_idx = nxt
        r._keep_bad(r._scratch, msz)
        return -1
    if msz > cap:
        return r._too_small(cap, msz)
    if msz == 64:
        memcpy(out, r._scratch, 64)   # constant size: inline moves, no libc call
    else:
        memcpy(out, r._scratch, msz)
    r.rx_idx = nxt
    # The next slot's lines, while our caller handles this message (a hint:
    # what is read from it later is still ordered by A1 and copied first).
    slot = r.rx_elems + <size_t>nxt * r.slot_size
    vm_prefetch_read(slot)
    vm_prefetch_read(slot + r.slot_size - 1)
    return <int>msz


cdef inline int ring_notify(FifoRing r) except -1 nogil:
    """Ring the peer if it may be asleep (_ring_peer decides)."""
    if r.doorbell.kind == DB_KIND_POLL:
        return 0
    return r._ring_peer()
