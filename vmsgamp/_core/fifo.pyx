"""MsgFifo: the virtio-msg-amp message queues (one per direction) in shared memory.

Two layouts (csrc/vmamp_shmem.h, csrc/spsc_queue.h):

* Gen B ``vmamp_shmem`` (default): a 64-byte self-describing layout written
  by the device side, one 8-byte queue head per side (magic, status, my
  producer index, my consumer index into the peer's array) and a handshake
  INIT -> READY -> RUN.
* Gen A ``spsc_queue``: two 4 KiB blocks (u32 producer / consumer index on
  separate 64-byte lines, 62 slots), no descriptor, no handshake.

Indices are named by role, never "head"/"tail", because the two layouts give
the same role opposite names (the table is also in csrc/vmamp_shmem.h):

  role              written by     Gen B field                    Gen A field
  producer index    the sender     ``tail`` of the sender's       ``head`` (+0) of the
                                   queue head (+4, u16)           direction's block (u32)
  consumer index    the receiver   ``head`` of the receiver's     ``tail`` (+64) of the
                                   queue head (+6, u16)           direction's block (u32)

Memory-order pairs (every shared index access names its partner):
  R0/A0  device's release store of the layout magic  /  driver's acquire load.
  R1/A1  producer's release store of its index after filling slots
         /  consumer's acquire load of that index before reading slots.
  R2/A2  consumer's release store of its index after copying slots out
         /  producer's acquire load of that index before reusing slots.
  R3/A3  release store of a status word (state change)
         /  acquire load of the peer's status word.
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

Threads: one thread may send and one receive at a time; any thread may
close().  Our own status word carries the state (written by whichever thread
sees a peer event, or by start/shutdown) and the WAITING flag (written by the
receiver): both go through one spin-locked shadow, so neither update can
overwrite the other.  close() while another thread is inside a call (waiting
without the GIL, say) wakes it, lets it raise FifoClosedError and releases
the region only after the last such call has left.
"""
from cpython.bytes cimport PyBytes_CheckExact, PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.bytearray cimport PyByteArray_CheckExact, PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC, nanosleep

from vmsgamp._core.io cimport (
    VM_RELAXED, VM_ACQUIRE, VM_RELEASE,
    vm_load8, vm_load16, vm_load32, vm_load64, vm_store16, vm_store32, vm_store64,
    vm_fence_seq_cst, vm_fence_acquire, vm_fence_release, vm_cpu_relax,
    vm_copy_to_shared, vm_copy_from_shared, vm_zero_shared,
    vm_int_load, vm_int_store, vm_spin_lock, vm_spin_unlock,
)
from vmsgamp._core.region cimport Region, region_lost
from vmsgamp._core.doorbell cimport Doorbell, DB_KIND_POLL, DB_KIND_EVENTFD

from typing import Literal

from vmsgamp._core.doorbell import PollingDoorbell
from vmsgamp.errors import (
    BadMessageSize, FifoBrokenError, FifoClosedError, HandshakeTimeout, LayoutError,
    PeerRestarted, PeerShutdown,
)

cdef extern from "vmamp_shmem.h":
    enum:
        VMAMP_LAYOUT_MAGIC
        VMAMP_QUEUE_MAGIC
        VMAMP_LAYOUT_LENGTH
        VMAMP_LAYOUT_VERSION
        VMAMP_FEAT_KNOWN
        VMAMP_MAX_NUM_NOTIF
        VMAMP_DEFAULT_WINDOW
        VMAMP_STATE_MASK
        VMAMP_STATE_INIT
        VMAMP_STATE_READY
        VMAMP_STATE_RUN
        VMAMP_STATE_SHUTDOWN
        VMAMP_STATE_PEER_DEAD
        VMAMP_STATUS_F_WAITING
        VMAMP_STATUS_F_SUPPRESS
        VMAMP_STATUS_F_LOCKED
        VMAMP_FEAT_MASKED_NOTIF
        VMAMP_OFF_MAGIC
        VMAMP_OFF_LENGTH
        VMAMP_OFF_VERSION
        VMAMP_OFF_FEATURES
        VMAMP_OFF_NUM_NOTIF
        VMAMP_OFF_NUM_VQ_NOTIF
        VMAMP_OFF_NUM_ELEMENTS
        VMAMP_OFF_SIZE_ELEMENTS
        VMAMP_OFF_RESERVED
        VMAMP_OFF_DEV_NOTIF
        VMAMP_OFF_DEV_HEAD
        VMAMP_OFF_DEV_ELEMENTS
        VMAMP_OFF_DRV_NOTIF
        VMAMP_OFF_DRV_HEAD
        VMAMP_OFF_DRV_ELEMENTS
        VMAMP_QH_OFF_MAGIC
        VMAMP_QH_OFF_STATUS
        VMAMP_QH_OFF_PROD
        VMAMP_QH_OFF_CONS
        VMAMP_ALIGN
        VMAMP_LAYOUT_SIZE
        VMAMP_QUEUE_HEAD_SIZE

cdef extern from "spsc_queue.h":
    enum:
        SPSC_PACKET_SIZE
        SPSC_BLOCK_SIZE
        SPSC_OFF_PROD
        SPSC_OFF_CONS
        SPSC_OFF_PACKETS
        SPSC_CAPACITY
        SPSC_OFF_EXT_WAITING
        SPSC_OFF_EXT_MAGIC
        SPSC_EXT_MAGIC

cdef enum:
    C_LAYOUT_B = 0
    C_LAYOUT_A = 1
    C_ROLE_DEVICE = 0
    C_ROLE_DRIVER = 1

# Names the keyword arguments accept (the .pyi uses the same Literal types).
Role = Literal["device", "driver"]
LayoutName = Literal["b", "a"]
HeaderName = Literal["g2", "g1"]
PlacementName = Literal["0/4k", "4k/8k"]

LAYOUT_B = C_LAYOUT_B
LAYOUT_A = C_LAYOUT_A
ROLE_DEVICE = C_ROLE_DEVICE
ROLE_DRIVER = C_ROLE_DRIVER

cdef enum:
    FSTATE_NEW = 0
    FSTATE_RUNNING = 1
    FSTATE_STOPPED = 2
    FSTATE_BROKEN = 3

_FSTATE_NAMES = {FSTATE_NEW: "new", FSTATE_RUNNING: "running",
                 FSTATE_STOPPED: "stopped", FSTATE_BROKEN: "broken"}
STATE_NAMES = {VMAMP_STATE_INIT: "INIT", VMAMP_STATE_READY: "READY", VMAMP_STATE_RUN: "RUN",
               VMAMP_STATE_SHUTDOWN: "SHUTDOWN", VMAMP_STATE_PEER_DEAD: "PEER_DEAD"}

# Gen A block placements: (driver->device block, device->driver block).
PLACEMENTS = {"0/4k": (0, 4096), "4k/8k": (4096, 8192)}
# Header profiles: (header size, offset of msg_size).
HEADERS = {"g2": (8, 6), "g1": (6, 4)}

DEFAULT_SPIN_NS = 20000   # spin 20 us before sleeping: a busy peer answers well within it
cdef long long _MAX_SLICE_NS = 100000000 # re-check the peer's state at least every 100 ms while asleep
cdef long long _SIZE_POLL_NS = 100000000 # while idle, fstat the shared object at most every 100 ms


cdef inline long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void _sleep_ns(long long ns) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = ns // 1000000000
    ts.tv_nsec = ns % 1000000000
    nanosleep(&ts, NULL)


cdef inline uint64_t _align(uint64_t v, uint64_t a) noexcept:
    return (v + a - 1) & ~(a - 1)


cdef void _zero_block_a(char *blk, int memtype) noexcept nogil:
    # The index lines word by word (a peer may be polling them: no memset
    # over a live index), then the slots.
    cdef size_t w = 0
    while w < SPSC_OFF_PACKETS:
        vm_store32(blk + w, 0, VM_RELAXED)
        w += 4
    vm_zero_shared(blk + SPSC_OFF_PACKETS, SPSC_BLOCK_SIZE - SPSC_OFF_PACKETS, memtype)


def state_name(int status):
    cdef int st = status & VMAMP_STATE_MASK
    return STATE_NAMES.get(st, f"UNKNOWN({st})")


def default_layout(size_t window, uint32_t slot_size=64):
    """The Gen B layout a device writes for a window: offsets and N, as the
    2026 QEMU device does (8 KiB -> elements at 80, N = 63)."""
    cdef uint64_t first = _align(VMAMP_LAYOUT_SIZE + 2 * VMAMP_QUEUE_HEAD_SIZE, VMAMP_ALIGN)
    if slot_size < 8 or slot_size % VMAMP_ALIGN or slot_size > 0xFFFF:
        raise LayoutError("size_queue_elements", f"{slot_size}: a slot size must be a multiple of "
                                                 f"{VMAMP_ALIGN} between 8 and 65528")
    if window < first + 4 * slot_size:
        raise ValueError(f"window of {window} bytes is too small for a Gen B FIFO "
                         f"(need at least {first + 4 * slot_size})")
    n = (window - first) // (2 * slot_size)
    n = min(n, 0xFFFF)
    return {
        "num_queue_elements": n,
        "size_queue_elements": slot_size,
        "dev_queue_head_offset": VMAMP_LAYOUT_SIZE,
        "drv_queue_head_offset": VMAMP_LAYOUT_SIZE + VMAMP_QUEUE_HEAD_SIZE,
        "dev_queue_elements_offset": first,
        "drv_queue_elements_offset": first + n * slot_size,
    }


def read_layout(Region region, size_t offset=0):
    """Read the Gen B layout descriptor fields (no validation)."""
    cdef char *p = region.ptr(offset, VMAMP_LAYOUT_SIZE)
    return {
        "magic": vm_load16(p + VMAMP_OFF_MAGIC, VM_ACQUIRE),  # A0
        "length": vm_load16(p + VMAMP_OFF_LENGTH, VM_RELAXED),
        "version": vm_load16(p + VMAMP_OFF_VERSION, VM_RELAXED),
        "features": vm_load16(p + VMAMP_OFF_FEATURES, VM_RELAXED),
        "num_notif": vm_load8(p + VMAMP_OFF_NUM_NOTIF, VM_RELAXED),
        "num_vq_notif_per_device": vm_load8(p + VMAMP_OFF_NUM_VQ_NOTIF, VM_RELAXED),
        "num_queue_elements": vm_load16(p + VMAMP_OFF_NUM_ELEMENTS, VM_RELAXED),
        "size_queue_elements": vm_load16(p + VMAMP_OFF_SIZE_ELEMENTS, VM_RELAXED),
        "reserved": vm_load16(p + VMAMP_OFF_RESERVED, VM_RELAXED),
        "dev_notif_offset": vm_load64(p + VMAMP_OFF_DEV_NOTIF, VM_RELAXED),
        "dev_queue_head_offset": vm_load64(p + VMAMP_OFF_DEV_HEAD, VM_RELAXED),
        "dev_queue_elements_offset": vm_load64(p + VMAMP_OFF_DEV_ELEMENTS, VM_RELAXED),
        "drv_notif_offset": vm_load64(p + VMAMP_OFF_DRV_NOTIF, VM_RELAXED),
        "drv_queue_head_offset": vm_load64(p + VMAMP_OFF_DRV_HEAD, VM_RELAXED),
        "drv_queue_elements_offset": vm_load64(p + VMAMP_OFF_DRV_ELEMENTS, VM_RELAXED),
    }


def validate_layout(dict lay, size_t window, uint32_t min_slot=8):
    """Check a Gen B layout as the driver side must: every field in range,
    every area aligned, inside the window and not overlapping any other.
    Raises LayoutError naming the field.

    Alignment (csrc/vmamp_shmem.h, VMAMP_ALIGN): the slot size is a multiple
    of 8 and every queue head, element array and notification area starts
    8-byte aligned, so every 16-bit index access and every word-sized slot
    copy is naturally aligned (an unaligned atomic is undefined behaviour,
    and faults on arm64 device memory).  Real devices follow this: Linux and
    QEMU write 64-byte slots at 8-aligned offsets."""
    if lay["magic"] != VMAMP_LAYOUT_MAGIC:
        raise LayoutError("magic", f"{lay['magic']:#06x}, expected {VMAMP_LAYOUT_MAGIC:#06x} ('LO')")
    if lay["length"] != VMAMP_LAYOUT_LENGTH:
        raise LayoutError("length", f"{lay['length']}, expected {VMAMP_LAYOUT_LENGTH}")
    if lay["version"] != VMAMP_LAYOUT_VERSION:
        raise LayoutError("version", f"{lay['version']}, only version {VMAMP_LAYOUT_VERSION} is known")
    if lay["features"] & ~VMAMP_FEAT_KNOWN:
        raise LayoutError("features", f"unknown feature bits {lay['features'] & ~VMAMP_FEAT_KNOWN:#x}")
    if lay["reserved"] != 0:
        raise LayoutError("reserved", f"{lay['reserved']:#x}, must be 0")
    nn = lay["num_notif"]
    if nn > VMAMP_MAX_NUM_NOTIF:
        raise LayoutError("num_notif", f"{nn} > {VMAMP_MAX_NUM_NOTIF}")
    if nn and lay["num_vq_notif_per_device"] not in (1, 2, 4, 8, 16):
        raise LayoutError("num_vq_notif_per_device",
                          f"{lay['num_vq_notif_per_device']}, must be 1, 2, 4, 8 or 16")
    n = lay["num_queue_elements"]
    if n < 2:
        raise LayoutError("num_queue_elements", f"{n}, must be at least 2")
    sz = lay["size_queue_elements"]
    if sz < min_slot:
        raise LayoutError("size_queue_elements", f"{sz}, must be at least {min_slot}")
    if sz % VMAMP_ALIGN:
        raise LayoutError("size_queue_elements", f"{sz} is not a multiple of {VMAMP_ALIGN} "
                                                 f"(slots would start misaligned)")
    areas = [("layout", 0, VMAMP_LAYOUT_SIZE)]
    notif_len = nn * 8 * (3 if lay["features"] & VMAMP_FEAT_MASKED_NOTIF else 2)
    for side in ("dev", "drv"):
        areas.append((f"{side}_queue_head_offset", lay[f"{side}_queue_head_offset"],
                      VMAMP_QUEUE_HEAD_SIZE, VMAMP_ALIGN))
        areas.append((f"{side}_queue_elements_offset", lay[f"{side}_queue_elements_offset"],
                      n * sz, VMAMP_ALIGN))
        if nn:
            areas.append((f"{side}_notif_offset", lay[f"{side}_notif_offset"], notif_len, VMAMP_ALIGN))
        elif lay[f"{side}_notif_offset"] != 0:
            raise LayoutError(f"{side}_notif_offset", "must be 0 when num_notif is 0")
    checked = [("layout", 0, VMAMP_LAYOUT_SIZE)]
    for name, off, ln, align in areas[1:]:
        if off == 0:
            raise LayoutError(name, "is 0 (overlaps the layout descriptor)")
        if off % align:
            raise LayoutError(name, f"{off:#x} is not {align}-byte aligned")
        if off + ln > window:
            raise LayoutError(name, f"area [{off:#x}, {off + ln:#x}) ends outside the {window:#x}-byte window")
        for oname, ooff, oln in checked:
            if off < ooff + oln and ooff < off + ln:
                raise LayoutError(name, f"area [{off:#x}, {off + ln:#x}) overlaps {oname} "
                                        f"[{ooff:#x}, {ooff + oln:#x})")
        checked.append((name, off, ln))
    return lay


cdef class MsgFifo:
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
            if placement not in PLACEMENTS:
                raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, not {placement!r}")
            drv_off, dev_off = PLACEMENTS[placement]
            self.window = max(drv_off, dev_off) + SPSC_BLOCK_SIZE if window is None else window
            self.slot_size = SPSC_PACKET_SIZE
            self.num_slots = SPSC_CAPACITY
            if max(drv_off, dev_off) + SPSC_BLOCK_SIZE > self.window:
                raise ValueError(f"placement {placement} needs a window of at least "
                                 f"{max(drv_off, dev_off) + SPSC_BLOCK_SIZE} bytes")
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

    # ---- small helpers -------------------------------------------------------

    cdef int _alloc_scratch(self) except -1:
        # Private copy of one slot: msg_size is read from here, never from
        # shared memory, so one value decides both the check and the length.
        # Room for the largest slot a layout can describe, allocated once, so
        # a later start() with another geometry never frees it under a user.
        if self._scratch == NULL:
            self._scratch = <char *>malloc(0x10000)
            if self._scratch == NULL:
                raise MemoryError()
        return 0

    cdef int _enter(self) except -1:
        # Every call that touches the mapping counts itself in (GIL held), so
        # close() from another thread defers the release until it has left.
        if self._closed:
            raise FifoClosedError("FIFO is closed")
        self._active += 1
        return 0

    cdef void _leave(self) noexcept:
        self._active -= 1
        if self._active == 0 and self._closed:
            self._release()

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
        if now - self._size_polled_ns >= _SIZE_POLL_NS:
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

    # Our status word: state bits (written by whichever thread sees a peer
    # event, or by start/shutdown) and the WAITING flag (written by the
    # receiving thread).  Each update changes the private shadow and stores
    # the whole word under one spin lock, so the stores reach shared memory
    # in the order of the shadow updates and neither thread can put back a
    # value the other has already replaced (RUN|WAITING over INIT, say).  A
    # read-modify-write atomic on the shared word itself would not do:
    # device memory (UIO, PCI BARs) does not support atomic RMW.

    cdef void _store_status(self, uint16_t keep, uint16_t setbits, int order) noexcept nogil:
        vm_spin_lock(&self._status_lock)
        self.my_status = (self.my_status & keep) | setbits
        vm_store16(self.my_qh + VMAMP_QH_OFF_STATUS, self.my_status, order)
        vm_spin_unlock(&self._status_lock)

    cdef void _write_status(self, uint16_t state) noexcept nogil:
        # R3: a state change must be visible after everything written before it.
        self._store_status(<uint16_t>~VMAMP_STATE_MASK, state, VM_RELEASE)

    cdef int _peer_event(self, uint16_t st) except -1:
        cdef int s = st & VMAMP_STATE_MASK
        # Drop to INIT at once so a re-registering peer waits for us instead of
        # running against our stale indices (docs/virtio-msg.md#teardown-and-re-registration).
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
        cdef uint32_t nxt = self.tx_idx + 1
        cdef char *slot
        if nxt == self.num_slots:
            nxt = 0
        if nxt == self.peer_cons_cache:
            self._refresh_cons()
            if nxt == self.peer_cons_cache:
                return 0
        slot = self.tx_elems + <size_t>self.tx_idx * self.slot_size
        vm_copy_to_shared(slot, buf, n, self.memtype)
        if n < self.slot_size:
            # Peers see whole slots; stale bytes of an older message must not leak.
            vm_zero_shared(slot + n, self.slot_size - n, self.memtype)
        self.tx_idx = nxt
        return 1

    cdef int _publish_tx(self) except -1 nogil:
        # R1 -> peer A1: slot contents must be visible before the index that publishes them.
        if self.layout == C_LAYOUT_B:
            vm_store16(self.my_qh + VMAMP_QH_OFF_PROD, <uint16_t>self.tx_idx, VM_RELEASE)
        else:
            vm_store32(self.tx_block + SPSC_OFF_PROD, self.tx_idx, VM_RELEASE)
        # A copy that found the object shrunk went into zero pages: say so.
        self._check_lost()
        return 0

    cdef int _publish_rx(self) noexcept nogil:
        # R2 -> peer A2: we finished copying the slots out before the producer may reuse them.
        if self.layout == C_LAYOUT_B:
            vm_store16(self.my_qh + VMAMP_QH_OFF_CONS, <uint16_t>self.rx_idx, VM_RELEASE)
        else:
            vm_store32(self.rx_block + SPSC_OFF_CONS, self.rx_idx, VM_RELEASE)
        return 0

    cdef int _recv_raw(self, char *out, size_t cap) except -2 nogil:
        """Copy the next message out (not yet published).  Returns its size,
        0 when empty, -1 when it had a bad msg_size (consumed, dropped, the
        size left in pending_bad)."""
        cdef const uint8_t *h
        cdef uint32_t msz, nxt
        if self.rx_idx == self.peer_prod_cache:
            self._refresh_prod()
            if self.rx_idx == self.peer_prod_cache:
                return 0
        # The whole slot into private memory first (ordered by A1 in
        # _refresh_prod), then msg_size from the copy: the peer may rewrite
        # the slot at any moment, so one read must decide both the check and
        # the length handed out, as in _recv_bulk.
        vm_copy_from_shared(self._scratch, self.rx_elems + <size_t>self.rx_idx * self.slot_size,
                            self.slot_size, self.memtype)
        self._check_lost()
        h = <const uint8_t *>(self._scratch + self.msg_size_off)
        msz = h[0] | (<uint32_t>h[1] << 8)
        nxt = self.rx_idx + 1
        if nxt == self.num_slots:
            nxt = 0
        if msz < self.header_size or msz > self.slot_size:
            self.rx_idx = nxt
            self.dropped += 1
            self.pending_bad = msz
            return -1
        if msz > cap:
            with gil:
                raise ValueError(f"receive buffer of {cap} bytes is smaller than the "
                                 f"{msz}-byte message waiting")
        memcpy(out, self._scratch, msz)
        self.rx_idx = nxt
        return <int>msz

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
                self.pending_bad = msz
                self.dropped += 1
                self.rx_idx = (self.rx_idx + i + 1) % n
                return i
        self.rx_idx = first
        return k

    cdef int _set_waiting(self, bint on) noexcept nogil:
        # relaxed: ordered against the index re-check by the F2 fence
        if self.layout == C_LAYOUT_B:
            if on:
                self._store_status(0xFFFF, VMAMP_STATUS_F_WAITING, VM_RELAXED)
            else:
                self._store_status(<uint16_t>~VMAMP_STATUS_F_WAITING, 0, VM_RELAXED)
        else:
            vm_store32(self.rx_block + SPSC_OFF_EXT_WAITING, 1 if on else 0, VM_RELAXED)
        return 0

    cdef int _notify(self) except -1 nogil:
        """Ring the peer if it may be asleep."""
        cdef uint16_t st
        if self.doorbell.kind == DB_KIND_POLL:
            return 0
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
        cdef long long start = _now_ns()
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
                now = _now_ns()
                if now >= spin_end or (deadline >= 0 and now >= deadline):
                    break
            vm_cpu_relax()
        while True:
            self._check_closed()
            now = _now_ns()
            self._poll_size(now)
            if deadline >= 0 and now >= deadline:
                return 0
            left = deadline - now if deadline >= 0 else _MAX_SLICE_NS
            if self.doorbell.kind != DB_KIND_POLL:
                slice_ns = left if left < _MAX_SLICE_NS else _MAX_SLICE_NS
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
                _sleep_ns(backoff if backoff < left else left)
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
        cdef long long start = _now_ns()
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
            now = _now_ns()
            if deadline >= 0 and now >= deadline:
                return 0
            if now - start > self.spin_ns:
                self._poll_size(now)
                _sleep_ns(backoff)
                if backoff < 1000000:
                    backoff *= 2
            else:
                vm_cpu_relax()
            if now - last_sig > 20000000:
                last_sig = now
                with gil:
                    PyErr_CheckSignals()

    # ---- lifecycle -------------------------------------------------------------

    def start(self, timeout=10.0, *, bint reset=False, bint fresh=False):
        """Bring the FIFO up.

        Gen B: the device writes the layout (magic last), both sides run the
        INIT -> READY -> RUN handshake; the driver validates every layout field
        first.  Raises HandshakeTimeout if the peer does not arrive in time.
        ``fresh`` waits for a peer that starts its handshake anew (INIT or
        READY): one still in RUN is the session that broke or died.
        Gen A: no handshake; the indices in memory are picked up (``reset``
        zeroes both blocks first: only when the peer is known to be idle).
        """
        cdef long long deadline = _now_ns() + <long long>(timeout * 1e9)
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
        cdef uint32_t cap = SPSC_CAPACITY
        if reset:
            _zero_block_a(self.tx_block, self.memtype)
            _zero_block_a(self.rx_block, self.memtype)
            vm_fence_release()
        # Pick up where we left off; the peer's words are untrusted.
        tx = vm_load32(self.tx_block + SPSC_OFF_PROD, VM_ACQUIRE)
        rx = vm_load32(self.rx_block + SPSC_OFF_CONS, VM_ACQUIRE)
        pc = vm_load32(self.tx_block + SPSC_OFF_CONS, VM_ACQUIRE)
        pp = vm_load32(self.rx_block + SPSC_OFF_PROD, VM_ACQUIRE)
        self._check_lost()
        for name, v in (("my producer index (head of the block we send in)", tx),
                        ("my consumer index (tail of the block we receive in)", rx),
                        ("peer consumer index (tail of the block we send in)", pc),
                        ("peer producer index (head of the block we receive in)", pp)):
            if v >= cap:
                raise LayoutError(name, f"index {v} out of range (62 slots)")
        self.tx_idx, self.rx_idx = tx, rx
        self.peer_cons_cache, self.peer_prod_cache = pc, pp
        # Advertise notification suppression to a vmsgamp producer (F2 protocol).
        vm_store32(self.rx_block + SPSC_OFF_EXT_WAITING, 0, VM_RELAXED)
        vm_store32(self.rx_block + SPSC_OFF_EXT_MAGIC, SPSC_EXT_MAGIC, VM_RELEASE)

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

    def _read_layout_stable(self):
        """The device's layout, or None while it is absent or being rewritten.
        Read twice with an acquire fence between, and taken only when both
        reads agree and carry the magic: the device clears the magic (then a
        release fence) before it rewrites any field, so a read that saw a new
        field value sees the cleared magic or the final one on the second
        pass, and a mix of old and new fields cannot match both times."""
        first = read_layout(self.region, self.offset)
        vm_fence_acquire()
        second = read_layout(self.region, self.offset)
        self.region.check_alive()
        if first["magic"] != VMAMP_LAYOUT_MAGIC or first != second:
            return None
        return first

    def _start_b(self, long long deadline, timeout, bint fresh=False):
        cdef char *base = self.region.ptr(self.offset, self.window)
        cdef uint16_t st
        if self.role == C_ROLE_DEVICE:
            lay = default_layout(self.window, self.slot_size)
            lay.update(magic=VMAMP_LAYOUT_MAGIC, length=VMAMP_LAYOUT_LENGTH,
                       version=VMAMP_LAYOUT_VERSION, features=0, num_notif=0,
                       num_vq_notif_per_device=0, reserved=0,
                       dev_notif_offset=0, drv_notif_offset=0)
            self._attach_b(lay)
            # Invalidate the old layout and our queue head before rewriting
            # them: every word with a single store (the peer polls them), then
            # a release fence, so no field written below becomes visible
            # before the cleared magic (the driver's second read pairs with it).
            vm_store16(base + VMAMP_OFF_MAGIC, 0, VM_RELAXED)
            vm_store16(self.my_qh + VMAMP_QH_OFF_MAGIC, 0, VM_RELAXED)
            self._store_status(0, 0, VM_RELAXED)
            vm_store16(self.my_qh + VMAMP_QH_OFF_PROD, 0, VM_RELAXED)
            vm_store16(self.my_qh + VMAMP_QH_OFF_CONS, 0, VM_RELAXED)
            vm_fence_release()
            vm_store16(base + VMAMP_OFF_LENGTH, VMAMP_LAYOUT_LENGTH, VM_RELAXED)
            vm_store16(base + VMAMP_OFF_VERSION, VMAMP_LAYOUT_VERSION, VM_RELAXED)
            vm_store16(base + VMAMP_OFF_FEATURES, 0, VM_RELAXED)
            vm_store16(base + VMAMP_OFF_NUM_NOTIF, 0, VM_RELAXED)  # num_notif and num_vq_notif
            vm_store16(base + VMAMP_OFF_NUM_ELEMENTS, lay["num_queue_elements"], VM_RELAXED)
            vm_store16(base + VMAMP_OFF_SIZE_ELEMENTS, lay["size_queue_elements"], VM_RELAXED)
            vm_store16(base + VMAMP_OFF_RESERVED, 0, VM_RELAXED)
            vm_store64(base + VMAMP_OFF_DEV_NOTIF, 0, VM_RELAXED)
            vm_store64(base + VMAMP_OFF_DEV_HEAD, lay["dev_queue_head_offset"], VM_RELAXED)
            vm_store64(base + VMAMP_OFF_DEV_ELEMENTS, lay["dev_queue_elements_offset"], VM_RELAXED)
            vm_store64(base + VMAMP_OFF_DRV_NOTIF, 0, VM_RELAXED)
            vm_store64(base + VMAMP_OFF_DRV_HEAD, lay["drv_queue_head_offset"], VM_RELAXED)
            vm_store64(base + VMAMP_OFF_DRV_ELEMENTS, lay["drv_queue_elements_offset"], VM_RELAXED)
            vm_zero_shared(self.tx_elems, <size_t>self.num_slots * self.slot_size, self.memtype)
            # R0 -> driver A0: every layout field must be visible before the magic.
            vm_store16(base + VMAMP_OFF_MAGIC, VMAMP_LAYOUT_MAGIC, VM_RELEASE)
        else:
            while True:
                if vm_load16(base + VMAMP_OFF_MAGIC, VM_ACQUIRE) == VMAMP_LAYOUT_MAGIC:  # A0 <- R0
                    lay = self._read_layout_stable()
                    if lay is not None:
                        break
                self._pause(deadline, lambda: HandshakeTimeout(
                    f"no virtio-msg-amp layout at offset {self.offset:#x} after {timeout} s "
                    f"(magic {vm_load16(base, VM_RELAXED):#06x}): is the device side running?"))
            validate_layout(lay, self.window)
            self._attach_b(lay)
            vm_zero_shared(self.tx_elems, <size_t>self.num_slots * self.slot_size, self.memtype)
        # 1. own status INIT, then own magic (R3).
        self._store_status(0, VMAMP_STATUS_F_SUPPRESS | (self.status_flags & VMAMP_STATUS_F_LOCKED)
                           | VMAMP_STATE_INIT, VM_RELEASE)
        vm_store16(self.my_qh + VMAMP_QH_OFF_MAGIC, VMAMP_QUEUE_MAGIC, VM_RELEASE)
        # 2. wait for the peer's magic and a live state.  A peer still showing
        # SHUTDOWN/PEER_DEAD is an old session: wait for it to come back.
        while True:
            pm = vm_load16(self.peer_qh + VMAMP_QH_OFF_MAGIC, VM_ACQUIRE)
            st = vm_load16(self.peer_qh + VMAMP_QH_OFF_STATUS, VM_ACQUIRE)  # A3
            if pm == VMAMP_QUEUE_MAGIC and (st & VMAMP_STATE_MASK) <= (
                    VMAMP_STATE_READY if fresh else VMAMP_STATE_RUN):
                break
            self._pause(deadline, lambda: HandshakeTimeout(
                f"peer never came up ({'no queue magic' if pm != VMAMP_QUEUE_MAGIC else 'its queue head is ' + state_name(st)}) "
                f"within {timeout} s"))
        # 3. own indices zero, then READY.
        vm_store16(self.my_qh + VMAMP_QH_OFF_PROD, 0, VM_RELAXED)
        vm_store16(self.my_qh + VMAMP_QH_OFF_CONS, 0, VM_RELAXED)
        self.tx_idx = self.rx_idx = self.peer_cons_cache = self.peer_prod_cache = 0
        self._write_status(VMAMP_STATE_READY)
        # 4. wait while the peer is INIT.
        while True:
            st = vm_load16(self.peer_qh + VMAMP_QH_OFF_STATUS, VM_ACQUIRE)  # A3
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

    def _pause(self, long long deadline, make_error):
        # Zeros from a lost mapping look like a peer that is not there yet.
        self._check_lost()
        self._poll_size(_now_ns())
        if self._closed:
            raise FifoClosedError("FIFO closed by another thread during start()")
        if _now_ns() >= deadline:
            if self.layout == C_LAYOUT_B and self.my_qh != NULL:
                self._write_status(VMAMP_STATE_INIT)
            raise make_error()
        with nogil:
            _sleep_ns(1000000)
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
        self._scratch = NULL

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

    def stats(self):
        return {"sent": self.sent, "received": self.received, "dropped": self.dropped,
                "rings": self.rings, "sleeps": self.sleeps, "state": self.state,
                "broken_reason": self.broken_reason}

    def __repr__(self):
        return (f"<MsgFifo {'B' if self.layout == C_LAYOUT_B else 'A'} "
                f"{'device' if self.role == C_ROLE_DEVICE else 'driver'} slots={self.num_slots}x"
                f"{self.slot_size} {'closed' if self._closed else self.state}>")

    # ---- per-message API -----------------------------------------------------------

    cdef int _check_msg(self, const char *p, size_t n) except -1:
        cdef uint32_t msz
        if n > self.slot_size or n < self.header_size:
            raise ValueError(f"message of {n} bytes does not fit a {self.slot_size}-byte slot "
                             f"with a {self.header_size}-byte header")
        msz = (<uint8_t>p[self.msg_size_off]) | ((<uint8_t>p[self.msg_size_off + 1]) << 8)
        if msz < self.header_size or msz > n:
            raise ValueError(f"message header says msg_size {msz} but {n} bytes were given")
        return 0

    def try_send(self, buf):
        """Queue one message if there is room; True if sent.  The peer is rung
        if it may be asleep."""
        cdef Py_buffer view
        cdef const char *p
        cdef Py_ssize_t n
        cdef int r
        self._enter()
        try:
            if self.fstate != FSTATE_RUNNING:
                self._check_running()
            if PyBytes_CheckExact(buf):
                p = PyBytes_AS_STRING(buf)
                n = PyBytes_GET_SIZE(buf)
                self._check_msg(p, n)
                r = self._send_raw(p, n)
            else:
                PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
                try:
                    self._check_msg(<const char *>view.buf, view.len)
                    r = self._send_raw(<const char *>view.buf, view.len)
                finally:
                    PyBuffer_Release(&view)
            if r:
                self._publish_tx()
                self.sent += 1
                self._notify()
                return True
            return False
        finally:
            self._leave()

    def try_recv(self, into):
        """Copy the next message into ``into`` (a writable buffer of at least
        the message size); returns its size, or 0 when the FIFO is empty.
        Raises BadMessageSize for a message whose msg_size is impossible (it
        is dropped; the next call continues with the following message)."""
        cdef Py_buffer view
        cdef int n
        self._enter()
        try:
            if self.fstate != FSTATE_RUNNING:
                self._check_running()
            if self.pending_bad >= 0:
                self._raise_bad()
            if PyByteArray_CheckExact(into):
                n = self._recv_raw(PyByteArray_AS_STRING(into), PyByteArray_GET_SIZE(into))
            else:
                PyObject_GetBuffer(into, &view, PyBUF_WRITABLE)
                try:
                    n = self._recv_raw(<char *>view.buf, view.len)
                finally:
                    PyBuffer_Release(&view)
            if n > 0:
                self._publish_rx()
                self.received += 1
                return n
            if n < 0:
                # The bad size was read from our private copy before the
                # slot went back to the producer (_recv_raw).
                self._publish_rx()
                self._raise_bad()
            return 0
        finally:
            self._leave()

    def _raise_bad(self):
        bad = self.pending_bad
        self.pending_bad = -1
        raise BadMessageSize(bad, self.header_size, self.slot_size)

    def send(self, buf, timeout=None):
        """Send one message, waiting up to ``timeout`` seconds (None: forever)
        for room.  Raises TimeoutError."""
        cdef long long t = -1 if timeout is None else <long long>(timeout * 1e9)
        cdef int ok
        self._enter()
        try:
            while not self.try_send(buf):
                with nogil:
                    ok = self._wait_writable(t)
                if not ok:
                    raise TimeoutError(f"FIFO full for {timeout} s: the peer is not consuming")
            return True
        finally:
            self._leave()

    def recv(self, into, timeout=None):
        """Receive one message into ``into``, waiting up to ``timeout`` seconds
        (None: forever).  Returns its size; raises TimeoutError."""
        cdef long long t = -1 if timeout is None else <long long>(timeout * 1e9)
        cdef int ok
        self._enter()
        try:
            while True:
                n = self.try_recv(into)
                if n:
                    return n
                with nogil:
                    ok = self._wait_readable(t)
                if not ok:
                    raise TimeoutError(f"no message within {timeout} s")
        finally:
            self._leave()

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
