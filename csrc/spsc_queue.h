/*
 * spsc_queue.h - "Gen A" virtio-msg-amp FIFO (the spsc_queue of the 2025 QEMU
 * and Linux AMP code).
 * One 4 KiB block per direction; no in-memory descriptor, no handshake.
 *
 * Line sizes are fixed by the layout (64 bytes across heterogeneous
 * clusters), never taken from the host CPU.
 */
#ifndef VMSGAMP_SPSC_QUEUE_H
#define VMSGAMP_SPSC_QUEUE_H

#include <stddef.h>
#include <stdint.h>

#define SPSC_LINE            64u
#define SPSC_PACKET_SIZE     64u
#define SPSC_BLOCK_SIZE      4096u
#define SPSC_OFF_HEAD        0u   /* u32, written by the producer */
#define SPSC_OFF_TAIL        64u  /* u32, written by the consumer */
/* By role (the table in vmamp_shmem.h): Gen A's head is the producer index
 * and its tail the consumer index, the opposite of Gen B's field names. */
#define SPSC_OFF_PROD        SPSC_OFF_HEAD
#define SPSC_OFF_CONS        SPSC_OFF_TAIL
#define SPSC_OFF_PACKETS     128u
#define SPSC_CAPACITY        ((SPSC_BLOCK_SIZE - SPSC_OFF_PACKETS) / SPSC_PACKET_SIZE) /* 62 */

/* vmsgamp extension in the consumer's padding line (peers never touch the
 * padding; QEMU zeroes whole blocks on reset-queues):
 *   +72 u32 ext_magic  = SPSC_EXT_MAGIC when the consumer suppresses
 *                        notifications (sets +68 before sleeping);
 *   +68 u32 waiting    = 1 while the consumer may be asleep on its doorbell.
 * A consumer without the magic (QEMU, Linux) is rung after every send. */
#define SPSC_OFF_EXT_WAITING 68u
#define SPSC_OFF_EXT_MAGIC   72u
#define SPSC_EXT_MAGIC       0x4E534D56u /* "VMSN" */

/* Placement of the two blocks (driver->device, device->driver) inside the
 * window, per carrier. */
#define SPSC_PLACEMENT_0_4K_DRV 0u      /* ivshmem, 10ee:9038 card */
#define SPSC_PLACEMENT_0_4K_DEV 4096u
#define SPSC_PLACEMENT_4K_8K_DRV 4096u  /* 10ee:9039 RFC card, FIFO window */
#define SPSC_PLACEMENT_4K_8K_DEV 8192u

_Static_assert(SPSC_CAPACITY == 62, "62 slots in a 4 KiB block");

#endif /* VMSGAMP_SPSC_QUEUE_H */
