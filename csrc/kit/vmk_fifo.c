/*
 * vmk_fifo.c - the Gen B layout (csrc/vmamp_shmem.h) from the device side:
 * layout writer, queue-head handshake, message FIFO.
 *
 * Indices are named by role, never "head"/"tail" (the two layouts give the
 * same role opposite names), as in vmsgamp's Cython FIFO (fifo_ring.pyx):
 * our queue head holds our producer index (VMAMP_QH_OFF_PROD: next slot we
 * fill in our array) and our consumer index (VMAMP_QH_OFF_CONS: next slot we
 * read in the driver's array).  csrc/vmamp_shmem.h holds the one table that
 * maps the roles to the layout's field names.
 */
#include "vmk_internal.h"

/*
 * Memory-order pairs:
 *   R0  release store of the layout magic (after every field)  -> driver's acquire load
 *   R1  release store of our producer index after filling slots -> driver's acquire load
 *   A1  acquire load of the driver's producer index before reading its slots
 *   R2  release store of our consumer index after copying slots out -> driver's acquire
 *   A2  acquire load of the driver's consumer index before reusing our slots
 *   R3  release store of our status word (state change)   /  A3 acquire load of the driver's
 *   F1  full fence: our producer index visible before we read the driver's WAITING flag
 *   F2  full fence: our WAITING flag visible before we re-read the driver's producer index
 *       (with both, a message published while the other side goes to sleep always rings it)
 */

static uint16_t peer_status(struct vmk_ctx *ctx)
{
    return vm_load16(ctx->peer_qh + VMAMP_QH_OFF_STATUS, VM_ACQUIRE);   /* A3 */
}

static void write_status(struct vmk_ctx *ctx, uint16_t state)
{
    ctx->my_status = (uint16_t)((ctx->my_status & ~VMAMP_STATE_MASK) | state);
    vm_store16(ctx->my_qh + VMAMP_QH_OFF_STATUS, ctx->my_status, VM_RELEASE);   /* R3 */
}

int vmk_fifo_init(struct vmk_ctx *ctx)
{
    volatile uint8_t *base = ctx->cfg.fifo;
    uint32_t size = ctx->cfg.fifo_size;
    int mt = ctx->cfg.memtype;
    const uint32_t first = (VMAMP_LAYOUT_SIZE + 2u * VMAMP_QUEUE_HEAD_SIZE + 7u) & ~7u;
    if (base == NULL || ((uintptr_t)base & 7u) || size < first + 4u * VMK_SLOT_SIZE)
        return -1;
    uint32_t n = (size - first) / (2u * VMK_SLOT_SIZE);
    if (n > 0xFFFFu)
        n = 0xFFFFu;
    ctx->num_slots = (uint16_t)n;
    ctx->slot_size = VMK_SLOT_SIZE;
    ctx->my_qh = base + VMAMP_LAYOUT_SIZE;
    ctx->peer_qh = base + VMAMP_LAYOUT_SIZE + VMAMP_QUEUE_HEAD_SIZE;
    ctx->tx_elems = base + first;
    ctx->rx_elems = base + first + n * VMK_SLOT_SIZE;

    /* Invalidate first: a driver must not take a half-written layout. */
    vm_store16(base + VMAMP_OFF_MAGIC, 0, VM_RELEASE);
    vm_zero_shared(ctx->my_qh, VMAMP_QUEUE_HEAD_SIZE, mt);
    vm_store16(base + VMAMP_OFF_LENGTH, VMAMP_LAYOUT_LENGTH, VM_RELAXED);
    vm_store16(base + VMAMP_OFF_VERSION, VMAMP_LAYOUT_VERSION, VM_RELAXED);
    vm_store16(base + VMAMP_OFF_FEATURES, 0, VM_RELAXED);
    vm_store8(base + VMAMP_OFF_NUM_NOTIF, 0, VM_RELAXED);
    vm_store8(base + VMAMP_OFF_NUM_VQ_NOTIF, 0, VM_RELAXED);
    vm_store16(base + VMAMP_OFF_NUM_ELEMENTS, (uint16_t)n, VM_RELAXED);
    vm_store16(base + VMAMP_OFF_SIZE_ELEMENTS, VMK_SLOT_SIZE, VM_RELAXED);
    vm_store16(base + VMAMP_OFF_RESERVED, 0, VM_RELAXED);
    vmk_store64(base + VMAMP_OFF_DEV_NOTIF, 0);
    vmk_store64(base + VMAMP_OFF_DEV_HEAD, VMAMP_LAYOUT_SIZE);
    vmk_store64(base + VMAMP_OFF_DEV_ELEMENTS, first);
    vmk_store64(base + VMAMP_OFF_DRV_NOTIF, 0);
    vmk_store64(base + VMAMP_OFF_DRV_HEAD, VMAMP_LAYOUT_SIZE + VMAMP_QUEUE_HEAD_SIZE);
    vmk_store64(base + VMAMP_OFF_DRV_ELEMENTS, first + n * VMK_SLOT_SIZE);
    vm_zero_shared(ctx->tx_elems, (size_t)n * VMK_SLOT_SIZE, mt);
    /* R0: every layout field visible before the magic */
    vm_store16(base + VMAMP_OFF_MAGIC, VMAMP_LAYOUT_MAGIC, VM_RELEASE);

    /* Own head: INIT, then the magic.  F_SUPPRESS: we set F_WAITING before
     * we sleep, so a vmsgamp driver rings only then; Linux and QEMU ignore it
     * and ring after every message, which is also fine. */
    ctx->my_status = VMAMP_STATUS_F_SUPPRESS | VMAMP_STATE_INIT;
    vm_store16(ctx->my_qh + VMAMP_QH_OFF_STATUS, ctx->my_status, VM_RELEASE);
    vm_store16(ctx->my_qh + VMAMP_QH_OFF_MAGIC, VMAMP_QUEUE_MAGIC, VM_RELEASE);
    ctx->session = VMK_S_INIT;
    return 0;
}

void vmk_fifo_drop_session(struct vmk_ctx *ctx, const char *why, uint32_t a, uint32_t b)
{
    if (ctx->session != VMK_S_RUN && ctx->session != VMK_S_READY)
        return;
    vmk_log(ctx, why, a, b);
    /* Drop to INIT at once: a driver that re-registers then waits for us
     * instead of running against our stale indices. */
    ctx->my_status &= (uint16_t)~VMAMP_STATUS_F_WAITING;
    write_status(ctx, VMAMP_STATE_INIT);
    ctx->session = VMK_S_INIT;
    ctx->session_lost = true;
    ctx->unsignalled = false;
}

int vmk_fifo_step(struct vmk_ctx *ctx, bool *lost)
{
    uint16_t magic, st;
    *lost = false;
    if (ctx->session == VMK_S_SHUTDOWN || ctx->num_slots == 0)
        return 0;
    magic = vm_load16(ctx->peer_qh + VMAMP_QH_OFF_MAGIC, VM_ACQUIRE);
    st = peer_status(ctx) & VMAMP_STATE_MASK;
    switch (ctx->session) {
    case VMK_S_INIT:
        /* A driver still in RUN belongs to an old session (we restarted
         * under it): wait until it notices our INIT and starts over.  Any
         * other state (INIT, READY, SHUTDOWN, PEER_DEAD) lets us get READY
         * now, so a returning driver finds us READY and needs no retry. */
        if (magic != VMAMP_QUEUE_MAGIC || st == VMAMP_STATE_RUN || st > VMAMP_STATE_PEER_DEAD)
            return 0;
        vm_store16(ctx->my_qh + VMAMP_QH_OFF_PROD, 0, VM_RELAXED);   /* ordered by R3 below */
        vm_store16(ctx->my_qh + VMAMP_QH_OFF_CONS, 0, VM_RELAXED);
        ctx->tx_idx = ctx->rx_idx = ctx->peer_cons_cache = ctx->peer_prod_cache = 0;
        write_status(ctx, VMAMP_STATE_READY);
        ctx->session = VMK_S_READY;
        return 1;
    case VMK_S_READY:
        if (magic != VMAMP_QUEUE_MAGIC || (st != VMAMP_STATE_READY && st != VMAMP_STATE_RUN))
            return 0;   /* not there yet, or still showing its old SHUTDOWN */
        ctx->peer_seen_run = st == VMAMP_STATE_RUN;
        write_status(ctx, VMAMP_STATE_RUN);
        ctx->session = VMK_S_RUN;
        ctx->stats.sessions++;
        vmk_log(ctx, "driver connected", ctx->stats.sessions, ctx->num_slots);
        return 1;
    case VMK_S_RUN:
        if (magic == VMAMP_QUEUE_MAGIC && st == VMAMP_STATE_RUN) {
            ctx->peer_seen_run = true;
            return 0;
        }
        if (magic == VMAMP_QUEUE_MAGIC && st == VMAMP_STATE_READY && !ctx->peer_seen_run)
            return 0;   /* the driver is finishing its handshake */
        /* The driver left RUN (shutdown, restart, death): every device is
         * reset, as the Linux driver expects (it sends nothing else). */
        vmk_fifo_drop_session(ctx, "driver left RUN", st, magic);
        *lost = true;
        ctx->session_lost = false;
        return 1;
    default:
        return 0;
    }
}

int vmk_fifo_recv(struct vmk_ctx *ctx, uint8_t *buf)
{
    if (ctx->session != VMK_S_RUN)
        return 0;
    if (ctx->rx_idx == ctx->peer_prod_cache) {
        uint16_t p = vm_load16(ctx->peer_qh + VMAMP_QH_OFF_PROD, VM_ACQUIRE);   /* A1 */
        if (p >= ctx->num_slots) {
            ctx->stats.fifo_errors++;
            vmk_fifo_drop_session(ctx, "driver producer index out of range", p, ctx->num_slots);
            return -1;
        }
        ctx->peer_prod_cache = p;
        if (p == ctx->rx_idx)
            return 0;
    }
    /* Copy the whole slot before looking at it: the driver may still write it. */
    vm_copy_from_shared(buf, ctx->rx_elems + (size_t)ctx->rx_idx * ctx->slot_size, ctx->slot_size,
                        ctx->cfg.memtype);
    ctx->rx_idx = (uint16_t)((ctx->rx_idx + 1u) % ctx->num_slots);
    vm_store16(ctx->my_qh + VMAMP_QH_OFF_CONS, ctx->rx_idx, VM_RELEASE);   /* R2 */
    return 1;
}

unsigned vmk_fifo_free(struct vmk_ctx *ctx)
{
    unsigned n = ctx->num_slots;
    if (ctx->session != VMK_S_RUN)
        return 0;
    uint16_t c = vm_load16(ctx->peer_qh + VMAMP_QH_OFF_CONS, VM_ACQUIRE);   /* A2 */
    unsigned adv = (c + n - ctx->peer_cons_cache) % n;
    unsigned outstanding = (ctx->tx_idx + n - ctx->peer_cons_cache) % n;
    if (c >= n || adv > outstanding) {
        /* It may only move forward through what we published. */
        ctx->stats.fifo_errors++;
        vmk_fifo_drop_session(ctx, "driver consumer index impossible", c, ctx->tx_idx);
        return 0;
    }
    ctx->peer_cons_cache = c;
    return (ctx->peer_cons_cache + n - 1u - ctx->tx_idx) % n;
}

bool vmk_fifo_send(struct vmk_ctx *ctx, const uint8_t *msg)
{
    uint16_t msz = vmk_get16(msg + VMK_HDR_MSG_SIZE);
    if (msz < VMK_HDR_SIZE || msz > ctx->slot_size || vmk_fifo_free(ctx) == 0) {
        ctx->stats.tx_full++;
        return false;
    }
    volatile uint8_t *slot = ctx->tx_elems + (size_t)ctx->tx_idx * ctx->slot_size;
    vm_copy_to_shared(slot, msg, msz, ctx->cfg.memtype);
    /* whole slots: stale bytes of an older message must not leak */
    if (msz < ctx->slot_size)
        vm_zero_shared(slot + msz, ctx->slot_size - msz, ctx->cfg.memtype);
    ctx->tx_idx = (uint16_t)((ctx->tx_idx + 1u) % ctx->num_slots);
    vm_store16(ctx->my_qh + VMAMP_QH_OFF_PROD, ctx->tx_idx, VM_RELEASE);   /* R1 */
    ctx->stats.tx_messages++;
    ctx->unsignalled = true;
    return true;
}

void vmk_fifo_notify(struct vmk_ctx *ctx)
{
    if (!ctx->unsignalled || ctx->session != VMK_S_RUN)
        return;
    ctx->unsignalled = false;
    if (ctx->cfg.ring == NULL)
        return;
    vm_fence_seq_cst();   /* F1 */
    uint16_t st = vm_load16(ctx->peer_qh + VMAMP_QH_OFF_STATUS, VM_RELAXED);
    if ((st & VMAMP_STATUS_F_SUPPRESS) && !(st & VMAMP_STATUS_F_WAITING))
        return;   /* a vmsgamp driver that is awake: it will see the message */
    ctx->cfg.ring(ctx->cfg.ring_arg);
    ctx->stats.rings++;
}

void vmk_fifo_set_waiting(struct vmk_ctx *ctx, bool on)
{
    if (ctx->session == VMK_S_SHUTDOWN || ctx->num_slots == 0)
        return;
    if (on)
        ctx->my_status |= VMAMP_STATUS_F_WAITING;
    else
        ctx->my_status &= (uint16_t)~VMAMP_STATUS_F_WAITING;
    /* relaxed: ordered against the re-check by F2 */
    vm_store16(ctx->my_qh + VMAMP_QH_OFF_STATUS, ctx->my_status, VM_RELAXED);
}

bool vmk_fifo_pending(struct vmk_ctx *ctx)
{
    if (ctx->session != VMK_S_RUN)
        return false;
    if ((peer_status(ctx) & VMAMP_STATE_MASK) != VMAMP_STATE_RUN)
        return true;   /* a state change to handle */
    return vm_load16(ctx->peer_qh + VMAMP_QH_OFF_PROD, VM_ACQUIRE) != ctx->rx_idx;   /* A1 */
}

void vmk_fifo_shutdown(struct vmk_ctx *ctx)
{
    if (ctx->num_slots == 0)
        return;
    write_status(ctx, VMAMP_STATE_SHUTDOWN);
    ctx->session = VMK_S_SHUTDOWN;
}
