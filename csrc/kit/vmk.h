/*
 * vmk.h - the vmsgamp device kit: the device side of virtio-msg over a
 * virtio-msg-amp bus, for firmware (bare metal, an RTOS) and host programs.
 *
 * Portable C11, freestanding: <stdint.h>, <stddef.h>, <stdbool.h>, memcpy /
 * memset, the GCC/Clang __atomic builtins behind csrc/vmsgamp_io.h.  No
 * malloc, no OS, no global state: everything lives in a struct vmk_ctx the
 * integrator allocates (statically, usually) and passes to every call.
 *
 * What the kit does (device role only):
 *   - writes the Gen B layout (csrc/vmamp_shmem.h, magic last) and runs the
 *     queue-head handshake INIT -> READY -> RUN; the driver's queue leaving
 *     RUN resets every device, and the kit comes back READY for the next
 *     driver session;
 *   - answers the virtio-msg transport (8-byte "G2" header with token) and
 *     bus messages (GET_DEVICES with exactly the count asked, PING), sends
 *     EVENT_USED / EVENT_CONFIG / EVENT_DEVICE;
 *   - serves split virtqueues (csrc/virtq.h) with EVENT_IDX and INDIRECT_DESC;
 *     the packed ring is not implemented (RING_PACKED is never offered);
 *   - calls the device models through struct vmk_device_ops.
 *
 * The driver is untrusted.  Every ring and buffer address is translated
 * through the memory windows the integrator declares and refused when it
 * leaves them; every index it writes is range-checked; chain walks are
 * bounded by the queue size; vmk_poll() handles a bounded amount of work
 * and returns.  A corrupted virtqueue marks that device DEVICE_NEEDS_RESET;
 * a corrupted FIFO drops the session (the kit goes back to INIT and waits for
 * the driver to restart); neither stops the other devices from being served.
 *
 * Integration in four steps (see docs/coprocessor-kit.md):
 *   1. declare the windows: the FIFO window (layout at its start) and the
 *      window(s) where the driver puts rings and buffers;
 *   2. give a doorbell callback (or none: the driver polls);
 *   3. vmk_init(), vmk_add_device() for each model;
 *   4. call vmk_poll() from the main loop or a thread; before sleeping on
 *      the doorbell interrupt call vmk_prepare_sleep(), after it vmk_woken().
 */
#ifndef VMK_H
#define VMK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../vmsgamp_io.h"
#include "../vmamp_shmem.h"
#include "../virtq.h"

/* ---- sizing (override with -D) ------------------------------------------ */
#ifndef VMK_MAX_DEVICES
#define VMK_MAX_DEVICES 4        /* device slots; device numbers are 0..31 */
#endif
#ifndef VMK_MAX_QUEUES
#define VMK_MAX_QUEUES 2         /* virtqueues per device */
#endif
#ifndef VMK_MAX_WINDOWS
#define VMK_MAX_WINDOWS 4
#endif
#define VMK_BUS_DEVICES 32       /* device numbers a bus has (Linux and QEMU use 32) */
#define VMK_SLOT_SIZE 64u        /* FIFO element size written into the layout */
#define VMK_KICK_ROUNDS 8u       /* model calls per EVENT_AVAIL before rescheduling */
#define VMK_MODEL_BATCH 32u      /* chains a model takes per call (the kit calls again) */
#define VMK_MAX_MSGS_PER_POLL 32u

#define VMK_VENDOR_ID 0x47534D56u /* "VMSG", as vmsgamp's own models */

/* ---- memory windows --------------------------------------------------------
 * A bus address range the driver may use for rings and buffers, and where it
 * is in this CPU's address space.  On an M4 with the shared RAM at its
 * physical address `local` is simply (void *)bus_addr; a host program passes
 * its mmap() pointer. */
struct vmk_window {
    uint64_t bus_addr;
    uint64_t size;
    volatile uint8_t *local;
};

struct vmk_mem {
    struct vmk_window win[VMK_MAX_WINDOWS];
    unsigned count;
    int memtype;                 /* VM_MEM_NORMAL or VM_MEM_DEVICE (vmsgamp_io.h) */
};

/* Local address of [addr, addr+len) if it lies inside one window, else NULL. */
volatile uint8_t *vmk_mem_translate(const struct vmk_mem *m, uint64_t addr, uint64_t len);

/* ---- split virtqueue, device side ----------------------------------------- */
struct vmk_vq {
    uint16_t size;               /* 0: not set up */
    uint16_t next_avail;         /* shadow: next avail.idx entry to pop */
    uint16_t next_used;          /* shadow: our used.idx */
    uint16_t avail_shadow;       /* last avail.idx read */
    uint16_t signalled_used;     /* used.idx at the last notification (EVENT_IDX) */
    bool signalled_valid;
    bool event_idx;
    bool indirect;
    bool broken;
    uint8_t error;               /* VMK_VQ_E_* when broken */
    volatile uint8_t *desc;
    volatile uint8_t *avail;
    volatile uint8_t *used;
    uint64_t desc_addr, driver_addr, device_addr;
    const struct vmk_mem *mem;
};

enum vmk_vq_error {
    VMK_VQ_E_NONE = 0,
    VMK_VQ_E_AVAIL_JUMP,         /* avail.idx more than the queue size ahead */
    VMK_VQ_E_HEAD,               /* head index outside the table */
    VMK_VQ_E_NEXT,               /* next index outside the table */
    VMK_VQ_E_LONG,               /* chain longer than the queue size (a loop) */
    VMK_VQ_E_ADDR,               /* buffer outside every window */
    VMK_VQ_E_ORDER,              /* readable descriptor after a writable one */
    VMK_VQ_E_IND_FEATURE,        /* INDIRECT without VIRTIO_F_INDIRECT_DESC */
    VMK_VQ_E_IND_NEXT,           /* INDIRECT together with NEXT */
    VMK_VQ_E_IND_NESTED,         /* INDIRECT inside an indirect table */
    VMK_VQ_E_IND_LEN,            /* indirect table length bad */
    VMK_VQ_E_IND_ADDR,           /* indirect table outside every window */
    VMK_VQ_E_TOO_BIG,            /* chain byte counts overflow 32 bits */
    VMK_VQ_E_MODEL               /* the device model reported an error */
};

/* A walk over one chain's descriptors (kit-private; in the header only so
 * that a chain can carry one). */
struct vmk_walk {
    struct vmk_vq *vq;
    volatile uint8_t *table;
    unsigned tsize, i, count;
    bool nested, done, first;
};

/* One popped chain.  The kit does not copy the descriptors: reads and writes
 * walk the chain again, re-checking every address, so a driver that rewrites
 * descriptors after the pop gets wrong data at worst, never an access outside
 * the windows.  A cursor remembers where the last copy stopped, so copying a
 * chain piece by piece from front to back walks it once. */
struct vmk_chain {
    struct vmk_vq *vq;
    uint16_t head;               /* give back with vmk_vq_push(vq, head, len) */
    uint32_t readable_len;       /* device-readable bytes (they come first) */
    uint32_t writable_len;       /* device-writable bytes */
    /* cursor (private) */
    struct vmk_walk walk;
    uint64_t seg_addr;
    uint32_t seg_len;
    uint32_t seg_base;           /* offset of the segment within its part */
    bool seg_valid;
    bool cursor_writable;        /* which part the cursor walks */
};

/* 1: a chain was popped into *c; 0: nothing available; -1: the ring is
 * corrupt (the queue is now broken, vq->error says why). */
int vmk_vq_pop(struct vmk_vq *vq, struct vmk_chain *c);
/* Copy device-readable bytes [off, off+len) out / device-writable bytes in.
 * Return the bytes copied (less than len at the end of that part). */
uint32_t vmk_chain_read(struct vmk_chain *c, uint32_t off, void *buf, uint32_t len);
uint32_t vmk_chain_write(struct vmk_chain *c, uint32_t off, const void *buf, uint32_t len);
uint32_t vmk_chain_fill(struct vmk_chain *c, uint32_t off, uint8_t byte, uint32_t len);
/* Complete a chain: `len` bytes were written into its writable part. */
void vmk_vq_push(struct vmk_vq *vq, uint16_t head, uint32_t len);

/* ---- device models ------------------------------------------------------------ */
struct vmk_device;

struct vmk_device_ops {
    /* The driver made buffers available on queue `index`: pop chains with
     * vmk_vq_pop(), complete them with vmk_vq_push().  Return 1 if anything
     * was used, 0 if not, -1 if the model failed (the queue is marked broken
     * and the device DEVICE_NEEDS_RESET).  Take at most VMK_MODEL_BATCH
     * chains per call: the kit calls again while chains remain, and other
     * devices get their turn in between.  Required. */
    int (*queue_notify)(struct vmk_device *dev, unsigned index, struct vmk_vq *vq);
    /* Configuration space reads/writes (offset and length already checked
     * against config_size).  read: fill buf.  write: return true if applied.
     * Either may be NULL (reads give zeros, writes are refused). */
    void (*config_read)(struct vmk_device *dev, uint32_t offset, void *buf, uint32_t len);
    bool (*config_write)(struct vmk_device *dev, uint32_t offset, const void *buf, uint32_t len);
    /* FEATURES_OK with `features` (a subset of what was offered): return
     * false to refuse.  NULL accepts. */
    bool (*features_ok)(struct vmk_device *dev, uint64_t features);
    /* DRIVER_OK: the queues are set up.  NULL: nothing to do. */
    void (*activate)(struct vmk_device *dev, uint64_t features);
    /* Status 0, or the driver went away: back to the initial state. */
    void (*reset)(struct vmk_device *dev);
    /* RESET_VQUEUE: forget every chain held from queue `index`. */
    void (*queue_reset)(struct vmk_device *dev, unsigned index);
};

/* A device model: the integrator fills the description, the kit owns the rest. */
struct vmk_device {
    const struct vmk_device_ops *ops;
    const char *name;
    uint32_t device_id;          /* virtio device type (4 rng, 34 i2c, ...) */
    uint32_t vendor_id;          /* 0: VMK_VENDOR_ID */
    uint64_t features;           /* device-type feature bits offered */
    uint32_t config_size;
    uint32_t config_generation;  /* bump with vmk_config_changed() */
    uint16_t num_queues;         /* <= VMK_MAX_QUEUES */
    uint16_t queue_max_size;     /* power of two, <= 32768 */
    struct vmk_ctx *ctx;         /* set by vmk_add_device */
    uint8_t dev_num;             /* set by vmk_add_device */
};

/* ---- the context ----------------------------------------------------------------- */
typedef void (*vmk_ring_fn)(void *arg);
typedef void (*vmk_log_fn)(void *arg, const char *what, uint32_t a, uint32_t b);

struct vmk_config {
    volatile uint8_t *fifo;      /* the FIFO window: the Gen B layout goes at its start */
    uint32_t fifo_size;          /* bytes (8 KiB gives 63 slots each way) */
    int memtype;                 /* of the FIFO window and the ring windows */
    struct vmk_window windows[VMK_MAX_WINDOWS];  /* where rings/buffers may be */
    unsigned num_windows;
    vmk_ring_fn ring;            /* ring the driver's doorbell; NULL: it polls */
    void *ring_arg;
    vmk_log_fn log;              /* optional: rare events (session changes, broken queues) */
    void *log_arg;
    bool no_event_idx;           /* do not offer VIRTIO_F_EVENT_IDX */
    bool no_indirect;            /* do not offer VIRTIO_F_INDIRECT_DESC */
};

enum vmk_session {
    VMK_S_INIT = 0,              /* layout written, waiting for a driver */
    VMK_S_READY,                 /* indices zero, waiting for the driver's READY/RUN */
    VMK_S_RUN,                   /* traffic */
    VMK_S_SHUTDOWN               /* vmk_shutdown() was called */
};

struct vmk_stats {
    uint32_t rx_messages, tx_messages, rx_malformed, rx_unexpected;
    uint32_t pings_answered, kicks, used_notifications, needs_reset;
    uint32_t sessions, fifo_errors, rings, tx_full;
};

struct vmk_slot {                /* transport state of one device */
    struct vmk_device *dev;
    uint8_t status;
    uint64_t offered;
    uint64_t driver_features;
    uint32_t rescan;             /* bit q: chains left on queue q after a kick */
    struct vmk_vq vq[VMK_MAX_QUEUES];
};

struct vmk_ctx {
    struct vmk_config cfg;
    struct vmk_mem mem;
    /* FIFO (device role): our queue is the device queue, the driver's the driver queue */
    volatile uint8_t *my_qh, *peer_qh, *tx_elems, *rx_elems;
    uint16_t num_slots, slot_size;
    uint16_t tx_idx, rx_idx;     /* shadows of our producer / consumer index */
    uint16_t peer_cons_cache;    /* last validated driver consumer index */
    uint16_t peer_prod_cache;    /* last validated driver producer index */
    uint16_t my_status;
    bool peer_seen_run;
    bool session_lost;           /* the FIFO dropped the session: devices need a reset */
    bool unsignalled;            /* sent since the last doorbell decision */
    enum vmk_session session;
    uint32_t layout_errors;      /* vmk_init refused the window */
    uint16_t ping_token;
    struct vmk_slot slots[VMK_MAX_DEVICES];
    struct vmk_stats stats;
};

/* Write the layout and start waiting for a driver.  0, or -1 when the FIFO
 * window is too small or misaligned or there are too many windows. */
int vmk_init(struct vmk_ctx *ctx, const struct vmk_config *cfg);
/* Attach a model as device number `dev_num` (0..31).  Announced with
 * EVENT_DEVICE READY if a driver is connected.  0, or -1 (number taken,
 * out of range, no slot left, bad description). */
int vmk_add_device(struct vmk_ctx *ctx, unsigned dev_num, struct vmk_device *dev);
/* Detach (reset first) and announce EVENT_DEVICE REMOVED. */
int vmk_remove_device(struct vmk_ctx *ctx, unsigned dev_num);
/* Do a bounded amount of work: handshake steps, received messages, pending
 * kicks.  Returns >0 if anything happened (call again soon), 0 if idle. */
int vmk_poll(struct vmk_ctx *ctx);
/* Before sleeping on the doorbell: tell the driver we may sleep (so it
 * rings) and re-check.  Returns false if work is already waiting: do not
 * sleep.  After waking (or when not sleeping after all) call vmk_woken(). */
bool vmk_prepare_sleep(struct vmk_ctx *ctx);
void vmk_woken(struct vmk_ctx *ctx);
/* The model completed chains on its own (input arrived): notify if needed. */
void vmk_queue_notify_driver(struct vmk_device *dev, unsigned index);
/* The model changed its configuration space: bump the generation, tell the driver. */
void vmk_config_changed(struct vmk_device *dev);
/* Send a bus PING (the response is counted, not matched). */
int vmk_ping(struct vmk_ctx *ctx, uint32_t data);
/* The carrier knows the driver went away (an ivshmem peer disconnected, a
 * remote processor was stopped): end the session as if its queue head had
 * left RUN.  Needed because the handshake does not wake a sleeping device,
 * and a driver that restarts quickly may otherwise never be seen leaving. */
void vmk_driver_gone(struct vmk_ctx *ctx);
/* Tell the driver we are going away (own queue state SHUTDOWN). */
void vmk_shutdown(struct vmk_ctx *ctx);

#endif /* VMK_H */
