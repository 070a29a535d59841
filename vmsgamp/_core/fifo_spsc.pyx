"""The Gen A FIFO (``spsc_queue``, csrc/spsc_queue.h): where its two blocks
sit in a window, and the indices a (re)starting endpoint picks up.

Each direction has one 4 KiB block: the producer index at +0, the consumer
index at +64 (separate 64-byte lines), 62 slots of 64 bytes from +128.
There is no descriptor and no handshake, so an endpoint that starts picks up
the indices it finds, range-checked (the peer wrote half of them).
docs/virtio-msg.md describes both layouts.
"""
from libc.stdint cimport uint32_t

from vmsgamp._core.io cimport VM_RELAXED, VM_ACQUIRE, VM_RELEASE, vm_load32, vm_store32, vm_zero_shared

from vmsgamp.errors import LayoutError

# Block placements per carrier: (driver->device block, device->driver block)
# offsets inside the FIFO window.
PLACEMENTS = {"0/4k": (0, 4096), "4k/8k": (4096, 8192)}


def placement_window(placement):
    """The smallest window that holds both blocks of ``placement``."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, not {placement!r}")
    return max(PLACEMENTS[placement]) + SPSC_BLOCK_SIZE


cdef void spsc_zero_block(char *blk, int memtype) noexcept nogil:
    # The index lines word by word (a peer may be polling them: no memset
    # over a live index), then the slots.
    cdef size_t w = 0
    while w < SPSC_OFF_PACKETS:
        vm_store32(blk + w, 0, VM_RELAXED)
        w += 4
    vm_zero_shared(blk + SPSC_OFF_PACKETS, SPSC_BLOCK_SIZE - SPSC_OFF_PACKETS, memtype)


cdef tuple spsc_pick_up(char *tx_block, char *rx_block):
    """The four indices of a pair of blocks, as (my producer, my consumer,
    peer consumer, peer producer).  Each must name a slot: LayoutError
    (naming which) otherwise.  The caller checks the region is still alive."""
    cdef uint32_t v
    cdef int i
    cdef uint32_t got[4]
    got[0] = vm_load32(tx_block + SPSC_OFF_PROD, VM_ACQUIRE)
    got[1] = vm_load32(rx_block + SPSC_OFF_CONS, VM_ACQUIRE)
    got[2] = vm_load32(tx_block + SPSC_OFF_CONS, VM_ACQUIRE)
    got[3] = vm_load32(rx_block + SPSC_OFF_PROD, VM_ACQUIRE)
    names = ("my producer index (head of the block we send in)",
             "my consumer index (tail of the block we receive in)",
             "peer consumer index (tail of the block we send in)",
             "peer producer index (head of the block we receive in)")
    for i in range(4):
        v = got[i]
        if v >= SPSC_CAPACITY:
            raise LayoutError(names[i], f"index {v} out of range ({SPSC_CAPACITY} slots)")
    return got[0], got[1], got[2], got[3]


cdef void spsc_advertise_suppress(char *rx_block) noexcept nogil:
    # Tell a vmsgamp producer that we set WAITING before we sleep, so it may
    # skip the doorbell while WAITING is clear (the F1/F2 protocol in fifo.pyx).
    vm_store32(rx_block + SPSC_OFF_EXT_WAITING, 0, VM_RELAXED)
    vm_store32(rx_block + SPSC_OFF_EXT_MAGIC, SPSC_EXT_MAGIC, VM_RELEASE)
