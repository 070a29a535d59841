/*
 * vmk_virtq.c - split virtqueue, device side, and memory-window translation.
 *
 * Layout: csrc/virtq.h.  Memory-order pairs (the comment at each access
 * names its partner):
 *   A1  acquire load of avail.idx  <- driver's release store of avail.idx
 *       after it wrote the descriptors and the ring entry (spec "Updating idx").
 *   R2  release store of used.idx  -> driver's acquire load of used.idx
 *       before it reads the used element (spec "The Virtqueue Used Ring").
 *   F1  full fence after publishing used.idx, before reading the driver's
 *       suppression field (used_event / NO_INTERRUPT): else the driver, having
 *       seen the old used.idx, re-enables interrupts and sleeps while we read
 *       its old suppression value and skip EVENT_USED (lost wake-up).
 *   F2  full fence after re-enabling kicks (avail_event / NO_NOTIFY), before
 *       re-reading avail.idx: else the driver adds a chain after our last
 *       look, reads the old suppression value and skips EVENT_AVAIL.
 *
 * The driver is hostile: avail.idx may only run `size` ahead of what we
 * returned, every head/next index is range-checked, a chain holds at most
 * `size` buffer descriptors (a loop ends there), one indirect table at most,
 * and every buffer lies inside one declared window.  A violation marks the
 * queue broken; nothing is read or written outside the windows.
 */
#include "vmk_internal.h"

volatile uint8_t *vmk_mem_translate(const struct vmk_mem *m, uint64_t addr, uint64_t len)
{
    for (unsigned i = 0; i < m->count; i++) {
        const struct vmk_window *w = &m->win[i];
        if (addr < w->bus_addr)
            continue;
        uint64_t off = addr - w->bus_addr;
        if (off > w->size || len > w->size - off)
            continue;
        return w->local + (uintptr_t)off;
    }
    return NULL;
}

static bool is_pow2(unsigned x) { return x && !(x & (x - 1)); }

static volatile uint8_t *area(const struct vmk_mem *mem, uint64_t addr, uint64_t len, unsigned align)
{
    if (addr & (align - 1))
        return NULL;
    volatile uint8_t *p = vmk_mem_translate(mem, addr, len);
    /* the local pointer must be aligned as well: index words are single
     * naturally aligned accesses */
    if (p == NULL || ((uintptr_t)p & (align - 1)))
        return NULL;
    return p;
}

int vmk_vq_setup(struct vmk_vq *vq, const struct vmk_mem *mem, unsigned size, uint64_t desc,
                 uint64_t driver, uint64_t device, bool event_idx, bool indirect)
{
    vmk_vq_forget(vq);
    if (!is_pow2(size) || size > VIRTQ_MAX_SIZE)
        return 1;
    volatile uint8_t *d = area(mem, desc, virtq_split_desc_bytes(size), VIRTQ_DESC_ALIGN);
    volatile uint8_t *a = area(mem, driver, virtq_split_avail_bytes(size), VIRTQ_AVAIL_ALIGN);
    volatile uint8_t *u = area(mem, device, virtq_split_used_bytes(size), VIRTQ_USED_ALIGN);
    if (d == NULL || a == NULL || u == NULL)
        return 3;
    vq->desc = d;
    vq->avail = a;
    vq->used = u;
    vq->desc_addr = desc;
    vq->driver_addr = driver;
    vq->device_addr = device;
    vq->event_idx = event_idx;
    vq->indirect = indirect;
    vq->mem = mem;
    vq->size = (uint16_t)size;
    return 0;
}

void vmk_vq_forget(struct vmk_vq *vq)
{
    memset(vq, 0, sizeof(*vq));
}

void vmk_vq_mark_broken(struct vmk_vq *vq, uint8_t error)
{
    if (!vq->broken) {
        vq->broken = true;
        vq->error = error;
    }
}

/* Chains available and not popped; -1 on a corrupt avail.idx. */
static int avail_count(struct vmk_vq *vq)
{
    uint16_t n = (uint16_t)(vq->avail_shadow - vq->next_avail);
    if (n == 0) {
        /* A1: acquire avail.idx; pairs with the driver's release store */
        uint16_t idx = vm_load16(vq->avail + VIRTQ_AVAIL_OFF_IDX, VM_ACQUIRE);
        /* the driver cannot be more than `size` chains ahead of what we
         * returned: it has no descriptors left */
        if ((uint16_t)(idx - vq->next_used) > vq->size) {
            vmk_vq_mark_broken(vq, VMK_VQ_E_AVAIL_JUMP);
            return -1;
        }
        vq->avail_shadow = idx;
        n = (uint16_t)(idx - vq->next_avail);
    }
    return n;
}

/* ---- chain walking ------------------------------------------------------------
 * One walker serves the validating pass of pop and every later read/write:
 * each call yields the next buffer descriptor.  Bounded: each step either
 * yields a descriptor (at most `size` of them) or enters the one allowed
 * indirect table. */
static void walk_start(struct vmk_walk *w, struct vmk_vq *vq, unsigned head)
{
    w->vq = vq;
    w->table = vq->desc;
    w->tsize = vq->size;
    w->i = head;
    w->count = 0;
    w->nested = false;
    w->done = false;
    w->first = true;
}

/* 1: addr, len and flags hold the next descriptor; 0: end of chain; -1: corrupt. */
static int walk_next(struct vmk_walk *w, uint64_t *addr, uint32_t *len, uint16_t *flags)
{
    struct vmk_vq *vq = w->vq;
    if (w->done)
        return 0;
    for (;;) {
        if (w->i >= w->tsize) {
            vmk_vq_mark_broken(vq, w->first ? VMK_VQ_E_HEAD : VMK_VQ_E_NEXT);
            return -1;
        }
        w->first = false;
        /* relaxed: ordered after A1 (the driver wrote them before avail.idx) */
        volatile uint8_t *d = w->table + (size_t)VIRTQ_DESC_SIZE * w->i;
        uint64_t a = vmk_load64(d + VIRTQ_DESC_OFF_ADDR);
        uint32_t l = vm_load32(d + VIRTQ_DESC_OFF_LEN, VM_RELAXED);
        uint16_t f = vm_load16(d + VIRTQ_DESC_OFF_FLAGS, VM_RELAXED);
        uint16_t next = vm_load16(d + VIRTQ_DESC_OFF_NEXT, VM_RELAXED);
        if (f & VIRTQ_DESC_F_INDIRECT) {
            if (!vq->indirect) {
                vmk_vq_mark_broken(vq, VMK_VQ_E_IND_FEATURE);
                return -1;
            }
            if (w->nested) {
                vmk_vq_mark_broken(vq, VMK_VQ_E_IND_NESTED);
                return -1;
            }
            if (f & VIRTQ_DESC_F_NEXT) {
                vmk_vq_mark_broken(vq, VMK_VQ_E_IND_NEXT);
                return -1;
            }
            if (l == 0 || l % VIRTQ_DESC_SIZE || l / VIRTQ_DESC_SIZE > vq->size) {
                vmk_vq_mark_broken(vq, VMK_VQ_E_IND_LEN);
                return -1;
            }
            volatile uint8_t *t = area(vq->mem, a, l, 8);
            if (t == NULL) {
                vmk_vq_mark_broken(vq, VMK_VQ_E_IND_ADDR);
                return -1;
            }
            w->table = t;
            w->tsize = l / VIRTQ_DESC_SIZE;
            w->i = 0;
            w->nested = true;
            continue;
        }
        if (++w->count > vq->size) {
            vmk_vq_mark_broken(vq, VMK_VQ_E_LONG);
            return -1;
        }
        *addr = a;
        *len = l;
        *flags = f;
        if (f & VIRTQ_DESC_F_NEXT)
            w->i = next;
        else
            w->done = true;
        return 1;
    }
}

int vmk_vq_pop(struct vmk_vq *vq, struct vmk_chain *c)
{
    if (vq->broken)
        return -1;
    if (vq->size == 0)
        return 0;
    int n = avail_count(vq);
    if (n <= 0)
        return n;
    /* ring entry: relaxed, ordered after A1 */
    unsigned head = vm_load16(vq->avail + VIRTQ_AVAIL_OFF_RING + 2u * (vq->next_avail & (vq->size - 1u)),
                              VM_RELAXED);
    struct vmk_walk w;
    uint64_t addr, readable = 0, writable = 0;
    uint32_t len;
    uint16_t flags;
    int k;
    walk_start(&w, vq, head);
    while ((k = walk_next(&w, &addr, &len, &flags)) > 0) {
        if (vmk_mem_translate(vq->mem, addr, len) == NULL) {
            vmk_vq_mark_broken(vq, VMK_VQ_E_ADDR);
            return -1;
        }
        if (flags & VIRTQ_DESC_F_WRITE) {
            writable += len;
        } else {
            if (writable) {
                vmk_vq_mark_broken(vq, VMK_VQ_E_ORDER);
                return -1;
            }
            readable += len;
        }
        if (readable > UINT32_MAX || writable > UINT32_MAX) {
            vmk_vq_mark_broken(vq, VMK_VQ_E_TOO_BIG);
            return -1;
        }
    }
    if (k < 0)
        return -1;
    c->vq = vq;
    c->head = (uint16_t)head;
    c->readable_len = (uint32_t)readable;
    c->writable_len = (uint32_t)writable;
    c->seg_valid = false;
    c->walk.vq = NULL;   /* no cursor yet */
    vq->next_avail++;
    return 1;
}

enum copy_mode { READ, WRITE, FILL };

/* Copy out of the chain's readable part (READ) or into its writable part
 * (WRITE from src, FILL with one byte), starting `off` bytes into that part.
 * Continues from the cursor when `off` is at or past it, else walks from the
 * head again. */
static uint32_t chain_copy(struct vmk_chain *c, uint32_t off, void *buf, const void *src,
                           uint8_t fill, enum copy_mode mode, uint32_t len)
{
    struct vmk_vq *vq = c->vq;
    bool writable = mode != READ;
    uint32_t done = 0;
    int memtype = vq->mem->memtype;
    if (vq->broken)
        return 0;
    if (c->walk.vq == NULL || c->cursor_writable != writable || off < c->seg_base) {
        walk_start(&c->walk, vq, c->head);
        c->seg_valid = false;
        c->seg_base = 0;
        c->cursor_writable = writable;
    }
    while (done < len) {
        if (!c->seg_valid) {
            uint64_t addr;
            uint32_t dlen;
            uint16_t flags;
            if (walk_next(&c->walk, &addr, &dlen, &flags) <= 0)
                break;
            bool wr = (flags & VIRTQ_DESC_F_WRITE) != 0;
            if (wr != writable) {
                if (!writable)
                    break;   /* the readable part ended */
                continue;    /* still in the readable part */
            }
            c->seg_addr = addr;
            c->seg_len = dlen;
            c->seg_valid = true;
        }
        uint32_t rel = off - c->seg_base;
        if (rel >= c->seg_len) {
            c->seg_base += c->seg_len;
            c->seg_valid = false;
            continue;
        }
        uint32_t take = c->seg_len - rel;
        if (take > len - done)
            take = len - done;
        /* re-checked: the driver may have rewritten the descriptor since pop */
        volatile uint8_t *p = vmk_mem_translate(vq->mem, c->seg_addr + rel, take);
        if (p == NULL) {
            vmk_vq_mark_broken(vq, VMK_VQ_E_ADDR);
            break;
        }
        if (mode == READ) {
            vm_copy_from_shared((uint8_t *)buf + done, p, take, memtype);
        } else if (mode == WRITE) {
            vm_copy_to_shared(p, (const uint8_t *)src + done, take, memtype);
        } else if (fill == 0) {
            vm_zero_shared(p, take, memtype);
        } else {
            for (uint32_t i = 0; i < take; i++)
                vm_store8(p + i, fill, VM_RELAXED);
        }
        done += take;
        off += take;
    }
    return done;
}

uint32_t vmk_chain_read(struct vmk_chain *c, uint32_t off, void *buf, uint32_t len)
{
    return chain_copy(c, off, buf, NULL, 0, READ, len);
}

uint32_t vmk_chain_write(struct vmk_chain *c, uint32_t off, const void *buf, uint32_t len)
{
    return chain_copy(c, off, NULL, buf, 0, WRITE, len);
}

uint32_t vmk_chain_fill(struct vmk_chain *c, uint32_t off, uint8_t byte, uint32_t len)
{
    return chain_copy(c, off, NULL, NULL, byte, FILL, len);
}

void vmk_vq_push(struct vmk_vq *vq, uint16_t head, uint32_t len)
{
    if (vq->broken || vq->size == 0 || vq->next_used == vq->next_avail || head >= vq->size)
        return;      /* nothing popped, or a model bug: never write a bogus entry */
    volatile uint8_t *e = vq->used + VIRTQ_USED_OFF_RING
                          + (size_t)VIRTQ_USED_ELEM_SIZE * (vq->next_used & (vq->size - 1u));
    /* relaxed: published by R2 below */
    vm_store32(e, head, VM_RELAXED);
    vm_store32(e + 4, len, VM_RELAXED);
    vq->next_used++;
    /* R2: release used.idx; pairs with the driver's acquire load */
    vm_store16(vq->used + VIRTQ_USED_OFF_IDX, vq->next_used, VM_RELEASE);
}

bool vmk_vq_needs_notify(struct vmk_vq *vq)
{
    if (vq->broken || vq->size == 0)
        return false;
    vm_fence_seq_cst();  /* F1 */
    if (vq->event_idx) {
        uint16_t ev = vm_load16(vq->avail + VIRTQ_AVAIL_OFF_USED_EVENT(vq->size), VM_RELAXED);
        uint16_t old = vq->signalled_used;
        bool valid = vq->signalled_valid;
        vq->signalled_used = vq->next_used;
        vq->signalled_valid = true;
        return !valid || virtq_need_event(ev, vq->next_used, old);
    }
    return !(vm_load16(vq->avail + VIRTQ_AVAIL_OFF_FLAGS, VM_RELAXED) & VIRTQ_AVAIL_F_NO_INTERRUPT);
}

int vmk_vq_enable_notify(struct vmk_vq *vq)
{
    if (vq->broken)
        return -1;
    if (vq->size == 0)
        return 0;
    if (vq->event_idx)
        vm_store16(vq->used + VIRTQ_USED_OFF_AVAIL_EVENT(vq->size), vq->next_avail, VM_RELAXED);
    else
        vm_store16(vq->used + VIRTQ_USED_OFF_FLAGS, 0, VM_RELAXED);
    vm_fence_seq_cst();  /* F2 */
    int n = avail_count(vq);
    return n < 0 ? -1 : n > 0;
}

void vmk_vq_disable_notify(struct vmk_vq *vq)
{
    /* relaxed: only a hint; enable's F2 closes the race.  With EVENT_IDX a
     * no-op: the driver kicks at most once past avail_event. */
    if (!vq->broken && vq->size && !vq->event_idx)
        vm_store16(vq->used + VIRTQ_USED_OFF_FLAGS, VIRTQ_USED_F_NO_NOTIFY, VM_RELAXED);
}
