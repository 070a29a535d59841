/*
 * vmamp_shmem.h - "Gen B" self-describing virtio-msg-amp shared-memory layout
 * (the vmamp_shmem layout shared by the 2026 QEMU and Linux AMP code; see
 * shared/docs/virtio-msg-reference.md section 2.3).  Single definition of the
 * layout for vmsgamp; .pxd files extern these names.
 *
 * All fields are little-endian and must be accessed through vmsgamp_io.h.
 */
#ifndef VMAMP_SHMEM_H
#define VMAMP_SHMEM_H

#include <stddef.h>
#include <stdint.h>

#define VMAMP_LAYOUT_MAGIC        0x4C4Fu /* "LO": bytes 4F 4C, written last */
#define VMAMP_QUEUE_MAGIC         0x514Fu /* "QO": bytes 4F 51 */
#define VMAMP_LAYOUT_LENGTH       64u
#define VMAMP_LAYOUT_VERSION      1u
#define VMAMP_FEAT_MASKED_NOTIF   0x0001u
#define VMAMP_FEAT_KNOWN          VMAMP_FEAT_MASKED_NOTIF
#define VMAMP_MAX_NUM_NOTIF       64u
#define VMAMP_DEFAULT_WINDOW      8192u
#define VMAMP_DEFAULT_ELEMENT     64u

/* Queue-head status word: bits 0..4 state, bits 12..15 flags.  Peers mask
 * the state with VMAMP_STATE_MASK, so the flag bits carry extensions. */
#define VMAMP_STATE_MASK          0x001Fu
#define VMAMP_STATE_INIT          0u
#define VMAMP_STATE_READY         1u
#define VMAMP_STATE_RUN           2u
#define VMAMP_STATE_SHUTDOWN      3u
#define VMAMP_STATE_PEER_DEAD     4u
#define VMAMP_STATUS_F_DEBUGGABLE 0x8000u
/* vmsgamp extension, ignored by peers that mask the state:
 *  F_WAITING:  the owner of this head may be asleep on its doorbell; a sender
 *              that sees it must ring.
 *  F_SUPPRESS: the owner sets F_WAITING before it sleeps, so a sender may
 *              skip the doorbell while F_WAITING is clear.  A peer without
 *              F_SUPPRESS (Linux, QEMU) is rung after every send. */
#define VMAMP_STATUS_F_WAITING    0x4000u
#define VMAMP_STATUS_F_SUPPRESS   0x2000u
/*  F_LOCKED:   the owner holds the host lock of this FIFO window for as long
 *              as it runs (a lock the kernel drops when the process dies), so
 *              a head showing F_LOCKED whose lock is free belongs to a dead
 *              process.  Set by vmsgamp device sides on lockable regions. */
#define VMAMP_STATUS_F_LOCKED     0x1000u

struct __attribute__((packed)) vmamp_shmem_layout {
    uint16_t magic;                     /* 0  */
    uint16_t length;                    /* 2  */
    uint16_t version;                   /* 4  */
    uint16_t features;                  /* 6  */
    uint8_t  num_notif;                 /* 8  */
    uint8_t  num_vq_notif_per_device;   /* 9  */
    uint16_t num_queue_elements;        /* 10 */
    uint16_t size_queue_elements;       /* 12 */
    uint16_t reserved;                  /* 14 */
    uint64_t dev_notif_offset;          /* 16 */
    uint64_t dev_queue_head_offset;     /* 24 */
    uint64_t dev_queue_elements_offset; /* 32 */
    uint64_t drv_notif_offset;          /* 40 */
    uint64_t drv_queue_head_offset;     /* 48 */
    uint64_t drv_queue_elements_offset; /* 56 */
};

struct __attribute__((packed)) vmamp_shmem_queue_head {
    uint16_t magic;  /* 0: "QO" */
    uint16_t status; /* 2: state | flags */
    uint16_t tail;   /* 4: producer index into the owner's element array */
    uint16_t head;   /* 6: consumer index into the peer's element array */
};

_Static_assert(sizeof(struct vmamp_shmem_layout) == 64, "layout is 64 bytes");
_Static_assert(offsetof(struct vmamp_shmem_layout, num_queue_elements) == 10, "layout");
_Static_assert(offsetof(struct vmamp_shmem_layout, dev_queue_head_offset) == 24, "layout");
_Static_assert(offsetof(struct vmamp_shmem_layout, drv_queue_elements_offset) == 56, "layout");
_Static_assert(sizeof(struct vmamp_shmem_queue_head) == 8, "queue head is 8 bytes");
_Static_assert(offsetof(struct vmamp_shmem_queue_head, tail) == 4, "queue head");
_Static_assert(offsetof(struct vmamp_shmem_queue_head, head) == 6, "queue head");

enum {
    VMAMP_OFF_MAGIC = offsetof(struct vmamp_shmem_layout, magic),
    VMAMP_OFF_LENGTH = offsetof(struct vmamp_shmem_layout, length),
    VMAMP_OFF_VERSION = offsetof(struct vmamp_shmem_layout, version),
    VMAMP_OFF_FEATURES = offsetof(struct vmamp_shmem_layout, features),
    VMAMP_OFF_NUM_NOTIF = offsetof(struct vmamp_shmem_layout, num_notif),
    VMAMP_OFF_NUM_VQ_NOTIF = offsetof(struct vmamp_shmem_layout, num_vq_notif_per_device),
    VMAMP_OFF_NUM_ELEMENTS = offsetof(struct vmamp_shmem_layout, num_queue_elements),
    VMAMP_OFF_SIZE_ELEMENTS = offsetof(struct vmamp_shmem_layout, size_queue_elements),
    VMAMP_OFF_RESERVED = offsetof(struct vmamp_shmem_layout, reserved),
    VMAMP_OFF_DEV_NOTIF = offsetof(struct vmamp_shmem_layout, dev_notif_offset),
    VMAMP_OFF_DEV_HEAD = offsetof(struct vmamp_shmem_layout, dev_queue_head_offset),
    VMAMP_OFF_DEV_ELEMENTS = offsetof(struct vmamp_shmem_layout, dev_queue_elements_offset),
    VMAMP_OFF_DRV_NOTIF = offsetof(struct vmamp_shmem_layout, drv_notif_offset),
    VMAMP_OFF_DRV_HEAD = offsetof(struct vmamp_shmem_layout, drv_queue_head_offset),
    VMAMP_OFF_DRV_ELEMENTS = offsetof(struct vmamp_shmem_layout, drv_queue_elements_offset),
    VMAMP_QH_OFF_MAGIC = offsetof(struct vmamp_shmem_queue_head, magic),
    VMAMP_QH_OFF_STATUS = offsetof(struct vmamp_shmem_queue_head, status),
    VMAMP_QH_OFF_TAIL = offsetof(struct vmamp_shmem_queue_head, tail),
    VMAMP_QH_OFF_HEAD = offsetof(struct vmamp_shmem_queue_head, head),
    VMAMP_LAYOUT_SIZE = sizeof(struct vmamp_shmem_layout),
    VMAMP_QUEUE_HEAD_SIZE = sizeof(struct vmamp_shmem_queue_head)
};

#endif /* VMAMP_SHMEM_H */
