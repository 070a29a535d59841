/*
 * vmk_internal.h - what the kit's .c files share and integrators do not need.
 */
#ifndef VMK_INTERNAL_H
#define VMK_INTERNAL_H

#include "vmk.h"
#include "vmk_wire.h"

/* 64-bit fields (ring addresses, layout offsets) are accessed as two 32-bit
 * words: a 32-bit CPU has no single-copy-atomic 64-bit access (GCC would call
 * libatomic), and the value is ordered by an acquire on an index word before
 * it anyway (the descriptor was published by avail.idx). */
static inline uint64_t vmk_load64(const volatile uint8_t *p)
{
    uint32_t lo = vm_load32(p, VM_RELAXED);
    uint32_t hi = vm_load32(p + 4, VM_RELAXED);
    return ((uint64_t)hi << 32) | lo;
}

static inline void vmk_store64(volatile uint8_t *p, uint64_t v)
{
    vm_store32(p, (uint32_t)v, VM_RELAXED);
    vm_store32(p + 4, (uint32_t)(v >> 32), VM_RELAXED);
}

/* Little-endian helpers for private message buffers (never shared memory). */
static inline uint16_t vmk_get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t vmk_get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t vmk_get64(const uint8_t *p)
{
    return (uint64_t)vmk_get32(p) | (uint64_t)vmk_get32(p + 4) << 32;
}
static inline void vmk_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void vmk_put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline void vmk_put64(uint8_t *p, uint64_t v)
{
    vmk_put32(p, (uint32_t)v);
    vmk_put32(p + 4, (uint32_t)(v >> 32));
}

/* ---- virtqueue internals (vmk_virtq.c) ---- */
/* 0, or a VMK_VQ_E_* style reason (1 size, 2 alignment, 3 outside windows). */
int vmk_vq_setup(struct vmk_vq *vq, const struct vmk_mem *mem, unsigned size, uint64_t desc,
                 uint64_t driver, uint64_t device, bool event_idx, bool indirect);
void vmk_vq_forget(struct vmk_vq *vq);
void vmk_vq_mark_broken(struct vmk_vq *vq, uint8_t error);
/* After pushes: should the driver get EVENT_USED?  (Updates the signalled
 * position with EVENT_IDX, so call once per batch.) */
bool vmk_vq_needs_notify(struct vmk_vq *vq);
/* Ask for kicks again; returns 1 if chains are already waiting, 0 if not,
 * -1 if the ring turned out corrupt. */
int vmk_vq_enable_notify(struct vmk_vq *vq);
void vmk_vq_disable_notify(struct vmk_vq *vq);

/* ---- FIFO internals (vmk_fifo.c) ---- */
#define VMK_MSG_MAX VMK_SLOT_SIZE
/* Write the layout, own head INIT.  0 or -1 (window too small/misaligned). */
int vmk_fifo_init(struct vmk_ctx *ctx);
/* Advance the handshake.  Returns >0 when the session state changed; sets
 * *lost when a running session ended (the caller resets the devices). */
int vmk_fifo_step(struct vmk_ctx *ctx, bool *lost);
/* Next message into buf (VMK_MSG_MAX bytes): its msg_size, 0 if none, -1 if
 * the driver broke the FIFO (the session is dropped). */
int vmk_fifo_recv(struct vmk_ctx *ctx, uint8_t *buf);
/* Free slots towards the driver (0 when the session is not running). */
unsigned vmk_fifo_free(struct vmk_ctx *ctx);
/* Queue one message (msg_size from its header).  false if full / not running. */
bool vmk_fifo_send(struct vmk_ctx *ctx, const uint8_t *msg);
/* Ring the driver if it may be asleep (after a batch of sends). */
void vmk_fifo_notify(struct vmk_ctx *ctx);
void vmk_fifo_drop_session(struct vmk_ctx *ctx, const char *why, uint32_t a, uint32_t b);
void vmk_fifo_set_waiting(struct vmk_ctx *ctx, bool on);
bool vmk_fifo_pending(struct vmk_ctx *ctx);
void vmk_fifo_shutdown(struct vmk_ctx *ctx);

static inline void vmk_log(struct vmk_ctx *ctx, const char *what, uint32_t a, uint32_t b)
{
    if (ctx->cfg.log)
        ctx->cfg.log(ctx->cfg.log_arg, what, a, b);
}

#endif /* VMK_INTERNAL_H */
