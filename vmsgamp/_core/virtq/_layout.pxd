# Declarations of csrc/virtq.h: the split and packed ring layouts and the
# event arithmetic both sides share.  Nothing here is defined twice.
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "virtq.h" nogil:
    enum:
        VIRTIO_F_INDIRECT_DESC
        VIRTIO_F_EVENT_IDX
        VIRTIO_F_RING_PACKED
        VIRTQ_DESC_F_NEXT
        VIRTQ_DESC_F_WRITE
        VIRTQ_DESC_F_INDIRECT
        VIRTQ_DESC_F_AVAIL
        VIRTQ_DESC_F_USED
        VIRTQ_AVAIL_F_NO_INTERRUPT
        VIRTQ_USED_F_NO_NOTIFY
        VIRTQ_EVENT_F_ENABLE
        VIRTQ_EVENT_F_DISABLE
        VIRTQ_EVENT_F_DESC
        VIRTQ_EVENT_WRAP_SHIFT
        VIRTQ_EVENT_OFF_MASK
        VIRTQ_MAX_SIZE
        VIRTQ_LINE
        VIRTQ_DESC_ALIGN
        VIRTQ_AVAIL_ALIGN
        VIRTQ_USED_ALIGN
        VIRTQ_DESC_OFF_ADDR
        VIRTQ_DESC_OFF_LEN
        VIRTQ_DESC_OFF_FLAGS
        VIRTQ_DESC_OFF_NEXT
        VIRTQ_DESC_SIZE
        VIRTQ_AVAIL_OFF_FLAGS
        VIRTQ_AVAIL_OFF_IDX
        VIRTQ_AVAIL_OFF_RING
        VIRTQ_USED_OFF_FLAGS
        VIRTQ_USED_OFF_IDX
        VIRTQ_USED_OFF_RING
        VIRTQ_USED_ELEM_SIZE
        PVIRTQ_DESC_ALIGN
        PVIRTQ_EVENT_ALIGN
        PVIRTQ_DESC_OFF_ADDR
        PVIRTQ_DESC_OFF_LEN
        PVIRTQ_DESC_OFF_ID
        PVIRTQ_DESC_OFF_FLAGS
        PVIRTQ_DESC_SIZE
        PVIRTQ_EVENT_OFF_OFF_WRAP
        PVIRTQ_EVENT_OFF_FLAGS
        PVIRTQ_EVENT_SIZE
    size_t VIRTQ_AVAIL_OFF_USED_EVENT(unsigned q)
    size_t VIRTQ_USED_OFF_AVAIL_EVENT(unsigned q)
    size_t virtq_split_desc_bytes(unsigned q)
    size_t virtq_split_avail_bytes(unsigned q)
    size_t virtq_split_used_bytes(unsigned q)
    size_t virtq_packed_desc_bytes(unsigned q)
    bint virtq_need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
    bint virtq_packed_avail_ok(uint16_t flags, bint wrap)
    bint virtq_packed_used_ok(uint16_t flags, bint wrap)
    uint32_t virtq_packed_event_word(uint16_t flags, uint16_t off, bint wrap)
    bint virtq_packed_need_notify(uint32_t ev, bint event_idx, uint16_t new_off, bint wrap,
                                  unsigned moved, unsigned q)
    ctypedef struct virtq_desc "struct virtq_desc":
        uint64_t addr
        uint32_t len
        uint16_t flags
        uint16_t next
    ctypedef struct pvirtq_desc "struct pvirtq_desc":
        uint64_t addr
        uint32_t len
        uint16_t id
        uint16_t flags
