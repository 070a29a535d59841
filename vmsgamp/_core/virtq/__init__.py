"""Split and packed virtqueues, device side and driver side.

The engine, one concern per file (each compiled module has its ``.pxd`` and
``.pyi`` beside it):

  _layout.pxd   declarations of csrc/virtq.h: ring layouts, the event-idx
                rule and the packed event-suppression rule, defined once in
                C and used by both sides
  _chain.pyx    DescriptorChain (what the device pops) and ChainBatch (the
                preallocated arrays of the batch calls)
  _shared.pyx   constants, QueueState, QueueBrokenError, the message table
                of the error side channel; _Virtqueue, the base that maps
                the areas and validates buffer descriptors; _DeviceQueue,
                pop and pop_batch for both formats
  _driver.pyx   driver-side plumbing both formats share (tokens, scatter
                lists, indirect pool, add/get loops, used-entry checks)
  _split.pyx    the split ring: SplitQueue (device) and SplitQueueDriver
  _packed.pyx   the packed ring: PackedQueue (device) and PackedQueueDriver

Every shared word is touched through csrc/vmsgamp_io.h (one naturally
aligned access with an explicit memory order); _split.pyx and _packed.pyx
each list their acquire/release pairs.  The peer is hostile: every index read
from shared memory is sanitized, every chain walk is bounded by the queue
size, every buffer address is translated through the AddressSpace
(bounds-checked).  A violation marks the queue broken with a readable
reason; calls on a broken queue raise QueueBrokenError.

Shapes follow rust-vmm virtio-queue on the device side (pop / add_used /
needs_notification / enable_notification) and Linux virtio_ring.c on the
driver side (add / kick_prepare / get_used / enable_cb / disable_cb).

Names: a chain's id, the one add_used() takes back, is the index of its
first descriptor in a split ring and the buffer id in a packed ring.  The
public API calls it ``head`` (``DescriptorChain.head``, ``ChainBatch.heads``,
the ``heads`` argument of add_used_batch) for compatibility; the code names
the two ``desc_idx`` and ``buffer_id``.

A queue object is used by one thread at a time (like a Linux virtqueue under
its lock); the batch calls release the GIL, so a second thread must not call
into the same queue meanwhile.
"""
from vmsgamp._core.virtq._chain import READ_LIMIT, ChainBatch, ChainTooLongError, DescriptorChain
from vmsgamp._core.virtq._packed import PackedQueue, PackedQueueDriver
from vmsgamp._core.virtq._shared import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    EVENT_F_DESC,
    EVENT_F_DISABLE,
    EVENT_F_ENABLE,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_RING_PACKED,
    LAYOUT,
    LINE,
    MAX_SIZE,
    PACKED,
    SPLIT,
    USED_F_NO_NOTIFY,
    QueueBrokenError,
    QueueState,
    need_event,
    packed_area_sizes,
    packed_need_notify,
    split_area_sizes,
)
from vmsgamp._core.virtq._split import SplitQueue, SplitQueueDriver

__all__ = [
    "AVAIL_F_NO_INTERRUPT", "DESC_F_AVAIL", "DESC_F_INDIRECT", "DESC_F_NEXT", "DESC_F_USED",
    "DESC_F_WRITE", "EVENT_F_DESC", "EVENT_F_DISABLE", "EVENT_F_ENABLE", "F_EVENT_IDX",
    "F_INDIRECT_DESC", "F_RING_PACKED", "LAYOUT", "LINE", "MAX_SIZE", "PACKED", "READ_LIMIT", "SPLIT",
    "USED_F_NO_NOTIFY", "ChainBatch", "ChainTooLongError", "DescriptorChain", "PackedQueue",
    "PackedQueueDriver", "QueueBrokenError", "QueueState", "SplitQueue", "SplitQueueDriver",
    "need_event", "packed_area_sizes", "packed_need_notify", "split_area_sizes",
]
