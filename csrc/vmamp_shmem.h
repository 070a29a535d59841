/*
 * vmamp_shmem.h - "Gen B" self-describing virtio-msg-amp shared-memory layout
 * (the vmamp_shmem layout shared by the 2026 QEMU and Linux AMP code).  Single definition of the
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

/* Alignment.  Every queue-head word is read and written with 16-bit atomics
 * and every slot is copied with word-sized accesses (device memory faults on
 * unaligned ones), so vmsgamp's driver side refuses a layout unless
 * size_queue_elements is a multiple of 8 and every queue head, element array
 * and notification area starts 8-byte aligned.  Real devices already do
 * this: the Linux and QEMU code writes 64-byte slots at 8-aligned offsets
 * (8 KiB window: heads at 64 and 72, element arrays at 80 and 4112). */
#define VMAMP_ALIGN               8u

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

/*
 * FIFO indices by role.  The two layouts give the same role opposite field
 * names, so vmsgamp code names indices only by role, through the *_PROD /
 * *_CONS offsets below; this is the one table that maps them:
 *
 *   role (per direction)          Gen B vmamp_shmem             Gen A spsc_queue
 *   ---------------------------   ---------------------------   ---------------------------
 *   producer index: next slot     `tail` (u16, +4) in the        `head` (u32, +0) of that
 *     the sender will fill;       SENDER's own queue head        direction's 4 KiB block
 *     written by the sender
 *   consumer index: next slot     `head` (u16, +6) in the        `tail` (u32, +64) of that
 *     the receiver will read;     RECEIVER's own queue head      direction's 4 KiB block
 *     written by the receiver
 *
 * In Gen B each side's queue head holds its own producer index (for the
 * direction it sends) and its own consumer index (for the direction it
 * receives); in Gen A both indices of one direction sit in that direction's
 * block.  Ring size N: Gen B num_queue_elements, Gen A 62; both keep one
 * slot free (N - 1 messages in flight) and indices run 0..N-1.
 */
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
    VMAMP_QH_OFF_PROD = VMAMP_QH_OFF_TAIL,  /* my producer index (role table above) */
    VMAMP_QH_OFF_CONS = VMAMP_QH_OFF_HEAD,  /* my consumer index */
    VMAMP_LAYOUT_SIZE = sizeof(struct vmamp_shmem_layout),
    VMAMP_QUEUE_HEAD_SIZE = sizeof(struct vmamp_shmem_queue_head)
};

#endif /* VMAMP_SHMEM_H */
