/*
 * virtq.h - virtqueue layouts (split and packed rings), the single definition.
 *
 * OASIS virtio 1.2/1.3 "Split Virtqueues" and "Packed Virtqueues" (the
 * virtio-msg transport uses them unchanged).  Every field is
 * little-endian and is read or written only through vmsgamp_io.h helpers
 * (one naturally aligned access with an explicit order), never through these
 * structs directly: the structs exist to pin down sizes and offsets, which
 * the _Static_asserts check and the Python side (tests) compares against.
 *
 * Plain C11, no Python: firmware on the peer may compile this header.
 */
#ifndef VMSGAMP_VIRTQ_H
#define VMSGAMP_VIRTQ_H

#include <stddef.h>
#include <stdint.h>

/* ---- feature bits (content.tex "Reserved Feature Bits") ---------------- */
#define VIRTIO_F_INDIRECT_DESC      28
#define VIRTIO_F_EVENT_IDX          29
#define VIRTIO_F_RING_PACKED        34

/* ---- descriptor flags (both formats) ------------------------------------ */
#define VIRTQ_DESC_F_NEXT           1u
#define VIRTQ_DESC_F_WRITE          2u   /* device-writable buffer */
#define VIRTQ_DESC_F_INDIRECT       4u
/* packed only */
#define VIRTQ_DESC_F_AVAIL_SHIFT    7
#define VIRTQ_DESC_F_USED_SHIFT     15
#define VIRTQ_DESC_F_AVAIL          (1u << VIRTQ_DESC_F_AVAIL_SHIFT)  /* 0x0080 */
#define VIRTQ_DESC_F_USED           (1u << VIRTQ_DESC_F_USED_SHIFT)   /* 0x8000 */

/* ---- split ring suppression flags ---------------------------------------- */
#define VIRTQ_AVAIL_F_NO_INTERRUPT  1u   /* driver -> device: do not interrupt me */
#define VIRTQ_USED_F_NO_NOTIFY      1u   /* device -> driver: do not kick me */

/* ---- packed event suppression -------------------------------------------- */
#define VIRTQ_EVENT_F_ENABLE        0u
#define VIRTQ_EVENT_F_DISABLE       1u
#define VIRTQ_EVENT_F_DESC          2u   /* only with VIRTIO_F_EVENT_IDX */
#define VIRTQ_EVENT_WRAP_SHIFT      15
#define VIRTQ_EVENT_OFF_MASK        0x7fffu

#define VIRTQ_MAX_SIZE              32768u

/* Areas written by different sides start on their own line of this many
 * bytes, so the driver's and the device's stores never share a cache line
 * (Linux's modern virtio-pci aligns the used ring to SMP_CACHE_BYTES; a
 * layout constant, not taken from the host CPU). */
#define VIRTQ_LINE                  64u

/* ---- split layout -------------------------------------------------------- */

/* Descriptor table entry (16 bytes, table aligned to 16). */
struct virtq_desc {
    uint64_t addr;   /* bus address of the buffer */
    uint32_t len;
    uint16_t flags;
    uint16_t next;   /* valid when flags & NEXT */
};

/* Available ring header (driver area, aligned to 2).  Followed by
 * uint16_t ring[Q] and, with EVENT_IDX, uint16_t used_event. */
struct virtq_avail {
    uint16_t flags;
    uint16_t idx;    /* free-running, slot = idx % Q */
};

/* Used ring element and header (device area, aligned to 4).  The header is
 * followed by struct virtq_used_elem ring[Q] and, with EVENT_IDX, uint16_t
 * avail_event. */
struct virtq_used_elem {
    uint32_t id;     /* head descriptor index of the chain */
    uint32_t len;    /* bytes written into device-writable buffers */
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
};

#define VIRTQ_DESC_ALIGN            16u
#define VIRTQ_AVAIL_ALIGN           2u
#define VIRTQ_USED_ALIGN            4u

#define VIRTQ_DESC_OFF_ADDR         0u
#define VIRTQ_DESC_OFF_LEN          8u
#define VIRTQ_DESC_OFF_FLAGS        12u
#define VIRTQ_DESC_OFF_NEXT         14u
#define VIRTQ_DESC_SIZE             16u

#define VIRTQ_AVAIL_OFF_FLAGS       0u
#define VIRTQ_AVAIL_OFF_IDX         2u
#define VIRTQ_AVAIL_OFF_RING        4u
#define VIRTQ_AVAIL_OFF_USED_EVENT(q)  (4u + 2u * (q))

#define VIRTQ_USED_OFF_FLAGS        0u
#define VIRTQ_USED_OFF_IDX          2u
#define VIRTQ_USED_OFF_RING         4u
#define VIRTQ_USED_ELEM_SIZE        8u
#define VIRTQ_USED_OFF_AVAIL_EVENT(q)  (4u + 8u * (q))

/* Bytes of each split area for a queue of q entries (EVENT_IDX words always
 * included: 2 bytes cost nothing and the layout no longer depends on it). */
static inline size_t virtq_split_desc_bytes(unsigned q)  { return (size_t)VIRTQ_DESC_SIZE * q; }
static inline size_t virtq_split_avail_bytes(unsigned q) { return 6u + 2u * (size_t)q; }
static inline size_t virtq_split_used_bytes(unsigned q)  { return 6u + 8u * (size_t)q; }

_Static_assert(sizeof(struct virtq_desc) == 16, "virtq_desc is 16 bytes");
_Static_assert(offsetof(struct virtq_desc, addr) == VIRTQ_DESC_OFF_ADDR, "desc.addr");
_Static_assert(offsetof(struct virtq_desc, len) == VIRTQ_DESC_OFF_LEN, "desc.len");
_Static_assert(offsetof(struct virtq_desc, flags) == VIRTQ_DESC_OFF_FLAGS, "desc.flags");
_Static_assert(offsetof(struct virtq_desc, next) == VIRTQ_DESC_OFF_NEXT, "desc.next");
_Static_assert(sizeof(struct virtq_avail) == VIRTQ_AVAIL_OFF_RING, "avail header");
_Static_assert(offsetof(struct virtq_avail, idx) == VIRTQ_AVAIL_OFF_IDX, "avail.idx");
_Static_assert(sizeof(struct virtq_used_elem) == VIRTQ_USED_ELEM_SIZE, "used elem");
_Static_assert(offsetof(struct virtq_used_elem, len) == 4, "used_elem.len");
_Static_assert(sizeof(struct virtq_used) == VIRTQ_USED_OFF_RING, "used header");
_Static_assert(offsetof(struct virtq_used, idx) == VIRTQ_USED_OFF_IDX, "used.idx");

/* ---- packed layout ------------------------------------------------------- */

/* Descriptor ring entry (16 bytes, ring aligned to 16). */
struct pvirtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;     /* buffer id */
    uint16_t flags;
};

/* Event suppression area (driver area and device area, 4 bytes, aligned 4). */
struct pvirtq_event_suppress {
    uint16_t off_wrap;   /* bits 0-14 descriptor offset, bit 15 wrap counter */
    uint16_t flags;      /* bits 0-1: ENABLE / DISABLE / DESC */
};

#define PVIRTQ_DESC_ALIGN           16u
#define PVIRTQ_EVENT_ALIGN          4u
#define PVIRTQ_DESC_OFF_ADDR        0u
#define PVIRTQ_DESC_OFF_LEN         8u
#define PVIRTQ_DESC_OFF_ID          12u
#define PVIRTQ_DESC_OFF_FLAGS       14u
#define PVIRTQ_DESC_SIZE            16u
#define PVIRTQ_EVENT_OFF_OFF_WRAP   0u
#define PVIRTQ_EVENT_OFF_FLAGS      2u
#define PVIRTQ_EVENT_SIZE           4u

static inline size_t virtq_packed_desc_bytes(unsigned q) { return (size_t)PVIRTQ_DESC_SIZE * q; }

_Static_assert(sizeof(struct pvirtq_desc) == 16, "pvirtq_desc is 16 bytes");
_Static_assert(offsetof(struct pvirtq_desc, len) == PVIRTQ_DESC_OFF_LEN, "pdesc.len");
_Static_assert(offsetof(struct pvirtq_desc, id) == PVIRTQ_DESC_OFF_ID, "pdesc.id");
_Static_assert(offsetof(struct pvirtq_desc, flags) == PVIRTQ_DESC_OFF_FLAGS, "pdesc.flags");
_Static_assert(sizeof(struct pvirtq_event_suppress) == 4, "event suppress is 4 bytes");
_Static_assert(offsetof(struct pvirtq_event_suppress, flags) == PVIRTQ_EVENT_OFF_FLAGS, "event.flags");

/* ---- the event-idx rule ----------------------------------------------------
 * Notify when the index moved from `old` to `new` passed `event`, i.e. when
 * event lies in [old, new) modulo 2^16 (spec "Event Suppression", Linux
 * vring_need_event): the peer asked to hear about entry `event`. */
static inline int virtq_need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* ---- packed ring: flags and event suppression, for both sides ------------ */

/* A descriptor made available in lap `wrap` (the wrap counter, 0 or 1):
 * AVAIL == wrap, USED != wrap. */
static inline int virtq_packed_avail_ok(uint16_t flags, unsigned wrap)
{
    return ((flags >> VIRTQ_DESC_F_AVAIL_SHIFT) & 1u) == wrap
        && ((flags >> VIRTQ_DESC_F_USED_SHIFT) & 1u) != wrap;
}

/* A descriptor marked used in lap `wrap` (0 or 1): AVAIL == USED == wrap. */
static inline int virtq_packed_used_ok(uint16_t flags, unsigned wrap)
{
    return ((flags >> VIRTQ_DESC_F_AVAIL_SHIFT) & 1u) == wrap
        && ((flags >> VIRTQ_DESC_F_USED_SHIFT) & 1u) == wrap;
}

/* The 32-bit event suppression word (off_wrap in bits 0-15, flags in 16-17),
 * read and written as one access so offset and flags always match. */
static inline uint32_t virtq_packed_event_word(uint16_t flags, uint16_t off, unsigned wrap)
{
    return ((uint32_t)flags << 16) | (uint32_t)off | ((uint32_t)wrap << VIRTQ_EVENT_WRAP_SHIFT);
}

/* Should a side that has published `moved` descriptors since it last
 * decided (driver: made available, device: marked used), its next ring
 * offset now `new_off` in lap `wrap` (0 or 1), notify the peer whose event
 * suppression word is `ev`?  `event_idx`: VIRTIO_F_EVENT_IDX negotiated.
 * Both sides of the packed ring use this one rule (spec "Event Suppression
 * Structure Format"; Linux virtqueue_kick_prepare_packed and vhost).
 *
 * The peer's offset is taken relative to our current lap: an offset tagged
 * with the other wrap counter lies one lap back (subtract q, modulo 2^16),
 * and the old position new_off - moved may likewise be negative.  After a
 * full lap or more (`moved` >= q) the position is ambiguous: notify. */
static inline int virtq_packed_need_notify(uint32_t ev, int event_idx, uint16_t new_off,
                                           unsigned wrap, unsigned moved, unsigned q)
{
    unsigned flags = (ev >> 16) & 3u;
    uint16_t off;

    if (flags == VIRTQ_EVENT_F_DISABLE)
        return 0;
    if (flags != VIRTQ_EVENT_F_DESC || !event_idx || moved >= q)
        return 1;
    off = (uint16_t)(ev & VIRTQ_EVENT_OFF_MASK);
    if (((ev >> VIRTQ_EVENT_WRAP_SHIFT) & 1u) != wrap)
        off = (uint16_t)(off - q);
    return virtq_need_event(off, new_off, (uint16_t)(new_off - moved));
}

#endif /* VMSGAMP_VIRTQ_H */
