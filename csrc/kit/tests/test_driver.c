/*
 * test_driver.c - the driver side the kit's unit tests play: the FIFO,
 * the probe sequence and split rings, written directly on the shared
 * memory the kit under test serves (same address space, no threads).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_driver.h"

/* ---- the shared memory -------------------------------------------------------- */
_Alignas(4096) uint8_t fifo_mem[FIFO_SIZE];
_Alignas(4096) uint8_t ram[RAM_SIZE];
uint32_t ram_cursor;

uint64_t ram_alloc(uint32_t size, uint32_t align)
{
    ram_cursor = (ram_cursor + align - 1) & ~(align - 1);
    uint64_t a = RAM_BUS + ram_cursor;
    ram_cursor += size;
    if (ram_cursor > RAM_SIZE) {
        printf("test arena exhausted\n");
        exit(2);
    }
    return a;
}
uint8_t *ram_ptr(uint64_t bus) { return ram + (bus - RAM_BUS); }

void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)v); put16(p + 2, (uint16_t)(v >> 16)); }
void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)v); put32(p + 4, (uint32_t)(v >> 32)); }
uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }
uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }

/* ---- the kit under test ----------------------------------------------------------- */
struct vmk_ctx ctx;
struct vmk_rng rng;
struct vmk_i2c i2c;
struct vmk_eeprom eeprom;
struct vmk_lm75 lm75;
unsigned rings_seen;

void ring_cb(void *arg) { (void)arg; rings_seen++; }

/* A device with a config space, to test GET/SET_CONFIG and generations. */
struct cfgdev cfgdev;
int cfg_notify(struct vmk_device *d, unsigned i, struct vmk_vq *q) { (void)d; (void)i; (void)q; return 0; }
void cfg_read(struct vmk_device *d, uint32_t off, void *buf, uint32_t len)
{
    memcpy(buf, ((struct cfgdev *)d)->cfg + off, len);
}
bool cfg_write(struct vmk_device *d, uint32_t off, const void *buf, uint32_t len)
{
    if (off < 8)
        return false;   /* the first half is read-only */
    memcpy(((struct cfgdev *)d)->cfg + off, buf, len);
    return true;
}
const struct vmk_device_ops cfg_ops = { .queue_notify = cfg_notify, .config_read = cfg_read,
                                               .config_write = cfg_write };

/* ---- driver side of the FIFO -------------------------------------------------------- */
uint16_t n_slots, drv_prod, drv_cons;
uint8_t *dev_qh, *drv_qh, *dev_el, *drv_el;
unsigned used_events[32], config_events[32];
uint8_t last_event_config[64];
uint16_t token = 1;

uint16_t qh_get(uint8_t *qh, unsigned off) { return vm_load16(qh + off, VM_ACQUIRE); }
void qh_set(uint8_t *qh, unsigned off, uint16_t v) { vm_store16(qh + off, v, VM_RELEASE); }

void poll_n(int n) { for (int i = 0; i < n; i++) vmk_poll(&ctx); }

void drv_send_raw(const uint8_t *msg64)
{
    memcpy(drv_el + (size_t)drv_prod * 64, msg64, 64);
    drv_prod = (uint16_t)((drv_prod + 1) % n_slots);
    qh_set(drv_qh, VMAMP_QH_OFF_PROD, drv_prod);
}

/* Next message from the device, or 0. */
int drv_recv(uint8_t *out)
{
    if (qh_get(dev_qh, VMAMP_QH_OFF_PROD) == drv_cons)
        return 0;
    memcpy(out, dev_el + (size_t)drv_cons * 64, 64);
    drv_cons = (uint16_t)((drv_cons + 1) % n_slots);
    qh_set(drv_qh, VMAMP_QH_OFF_CONS, drv_cons);
    return get16(out + 6);
}

void note_event(const uint8_t *m)
{
    uint16_t dev = get16(m + 2);
    if (m[0] == 0 && m[1] == VMK_EVENT_USED && dev < 32)
        used_events[dev]++;
    if (m[0] == 0 && m[1] == VMK_EVENT_CONFIG && dev < 32) {
        config_events[dev]++;
        memcpy(last_event_config, m, 64);
    }
}

/* Drain what the device sent, counting events. */
void drain(void)
{
    uint8_t m[64];
    poll_n(3);
    while (drv_recv(m))
        note_event(m);
}

void build(uint8_t *m, uint8_t type, uint8_t id, uint16_t dev, const void *payload, unsigned len)
{
    memset(m, 0, 64);
    m[0] = type;
    m[1] = id;
    put16(m + 2, dev);
    put16(m + 4, (type & 1) || (id & 0x40) ? 0 : token);
    put16(m + 6, (uint16_t)(8 + len));
    if (len)
        memcpy(m + 8, payload, len);
}

/* Send a request and return the response size (0: none within a few polls). */
int request(uint8_t type, uint8_t id, uint16_t dev, const void *payload, unsigned len, uint8_t *resp)
{
    uint8_t m[64];
    token = (uint16_t)(token % 0xFFFF + 1);
    build(m, type, id, dev, payload, len);
    drv_send_raw(m);
    for (int i = 0; i < 8; i++) {
        vmk_poll(&ctx);
        int n;
        while ((n = drv_recv(resp)) > 0) {
            if (resp[0] == (type | 1) && resp[1] == id && get16(resp + 4) == token && get16(resp + 2) == dev)
                return n;
            note_event(resp);
        }
    }
    return 0;
}

void event(uint8_t id, uint16_t dev, const void *payload, unsigned len)
{
    uint8_t m[64];
    build(m, 0, id, dev, payload, len);
    drv_send_raw(m);
    drain();
}

uint32_t req32(uint8_t id, uint16_t dev, uint32_t arg, unsigned off)
{
    uint8_t r[64], p[4];
    put32(p, arg);
    int n = request(0, id, dev, p, 4, r);
    return n ? get32(r + off) : 0xDEADBEEFu;
}

bool ping(uint32_t data)
{
    uint8_t r[64], p[4];
    put32(p, data);
    return request(2, VMK_BUS_PING, 0, p, 4, r) == 12 && get32(r + 8) == data;
}

/* Driver-side handshake: returns true once both sides are RUN. */
bool drv_connect(void)
{
    uint8_t *lay = fifo_mem;
    if (vm_load16(lay + VMAMP_OFF_MAGIC, VM_ACQUIRE) != VMAMP_LAYOUT_MAGIC)
        return false;
    n_slots = get16(lay + VMAMP_OFF_NUM_ELEMENTS);
    dev_qh = lay + get64(lay + VMAMP_OFF_DEV_HEAD);
    drv_qh = lay + get64(lay + VMAMP_OFF_DRV_HEAD);
    dev_el = lay + get64(lay + VMAMP_OFF_DEV_ELEMENTS);
    drv_el = lay + get64(lay + VMAMP_OFF_DRV_ELEMENTS);
    /* F_SUPPRESS as vmsgamp's driver: ring me only while I say F_WAITING */
    qh_set(drv_qh, VMAMP_QH_OFF_STATUS, VMAMP_STATUS_F_SUPPRESS | VMAMP_STATE_INIT);
    qh_set(drv_qh, VMAMP_QH_OFF_MAGIC, VMAMP_QUEUE_MAGIC);
    drv_prod = drv_cons = 0;
    qh_set(drv_qh, VMAMP_QH_OFF_PROD, 0);
    qh_set(drv_qh, VMAMP_QH_OFF_CONS, 0);
    qh_set(drv_qh, VMAMP_QH_OFF_STATUS, VMAMP_STATUS_F_SUPPRESS | VMAMP_STATE_READY);
    for (int i = 0; i < 10 && (qh_get(dev_qh, VMAMP_QH_OFF_STATUS) & VMAMP_STATE_MASK) == VMAMP_STATE_INIT; i++)
        vmk_poll(&ctx);
    qh_set(drv_qh, VMAMP_QH_OFF_STATUS, VMAMP_STATUS_F_SUPPRESS | VMAMP_STATE_RUN);
    poll_n(3);
    return (qh_get(dev_qh, VMAMP_QH_OFF_STATUS) & VMAMP_STATE_MASK) == VMAMP_STATE_RUN
           && ctx.session == VMK_S_RUN;
}

/* ---- driver side of a split ring -------------------------------------------------------- */

void dq_create(struct dq *q, unsigned dev_num, unsigned index, unsigned size)
{
    memset(q, 0, sizeof(*q));
    q->size = size;
    q->dev_num = dev_num;
    q->index = index;
    q->desc = ram_alloc(16 * size, 16);
    q->avail = ram_alloc(6 + 2 * size, 2);
    q->used = ram_alloc(6 + 8 * size, 4);
    memset(ram_ptr(q->desc), 0, 16 * size);
    memset(ram_ptr(q->avail), 0, 6 + 2 * size);
    memset(ram_ptr(q->used), 0, 6 + 8 * size);
}

void desc_set(struct dq *q, unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    uint8_t *d = ram_ptr(q->desc) + 16 * i;
    put64(d, addr);
    put32(d + 8, len);
    put16(d + 12, flags);
    put16(d + 14, next);
}

/* A chain of `n` segments at the next free descriptors; returns its head. */
unsigned dq_add(struct dq *q, unsigned n, const uint64_t *addr, const uint32_t *len, const bool *wr)
{
    unsigned head = q->next_free;
    for (unsigned k = 0; k < n; k++) {
        unsigned i = (head + k) % q->size;
        desc_set(q, i, addr[k], len[k], (uint16_t)((wr[k] ? VIRTQ_DESC_F_WRITE : 0) | (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0)),
                 (uint16_t)((i + 1) % q->size));
    }
    q->next_free = (uint16_t)((head + n) % q->size);
    return head;
}

void dq_publish(struct dq *q, unsigned head)
{
    put16(ram_ptr(q->avail) + 4 + 2 * (q->avail_idx % q->size), (uint16_t)head);
    q->avail_idx++;
    vm_store16(ram_ptr(q->avail) + 2, q->avail_idx, VM_RELEASE);
}

void dq_kick(struct dq *q)
{
    uint8_t p[8] = {0};
    put32(p, q->index);
    event(VMK_EVENT_AVAIL, (uint16_t)q->dev_num, p, 8);
}

/* Next used element: 1 with id/len, 0 if none. */
int dq_used(struct dq *q, uint32_t *id, uint32_t *len)
{
    uint16_t idx = vm_load16(ram_ptr(q->used) + 2, VM_ACQUIRE);
    if (idx == q->last_used)
        return 0;
    uint8_t *e = ram_ptr(q->used) + 4 + 8 * (q->last_used % q->size);
    *id = get32(e);
    *len = get32(e + 4);
    q->last_used++;
    /* as Linux: interrupt me at the next used entry (EVENT_IDX) */
    vm_store16(ram_ptr(q->avail) + 4 + 2 * q->size, q->last_used, VM_RELAXED);
    return 1;
}

/* Probe a device as Linux does; returns the status after DRIVER_OK. */
uint32_t probe(unsigned dev, uint64_t want, struct dq *queues, unsigned nq, unsigned qsize)
{
    uint8_t r[64], p[48];
    if (request(0, VMK_GET_DEVICE_INFO, (uint16_t)dev, NULL, 0, r) != 32 || get32(r + 8) == 0)
        return 0xFFFFFFFFu;
    req32(VMK_SET_DEVICE_STATUS, (uint16_t)dev, 0, 8);
    req32(VMK_SET_DEVICE_STATUS, (uint16_t)dev, 1, 8);
    req32(VMK_SET_DEVICE_STATUS, (uint16_t)dev, 3, 8);
    put32(p, 0);
    put32(p + 4, 2);
    request(0, VMK_GET_DEVICE_FEATURES, (uint16_t)dev, p, 8, r);
    uint64_t offered = get64(r + 16);
    uint64_t feats = offered & want;
    put32(p, 0);
    put32(p + 4, 2);
    put64(p + 8, feats);
    request(0, VMK_SET_DRIVER_FEATURES, (uint16_t)dev, p, 16, r);
    uint32_t st = req32(VMK_SET_DEVICE_STATUS, (uint16_t)dev, 0x0b, 8);
    if (!(st & VMK_ST_FEATURES_OK))
        return st;
    for (unsigned i = 0; i < nq; i++) {
        if (req32(VMK_GET_VQUEUE, (uint16_t)dev, i, 12) == 0)
            return 0xFFFFFFFEu;
        dq_create(&queues[i], dev, i, qsize);
        memset(p, 0, sizeof(p));
        put32(p, i);
        put32(p + 8, qsize);
        put64(p + 16, queues[i].desc);
        put64(p + 24, queues[i].avail);
        put64(p + 32, queues[i].used);
        request(0, VMK_SET_VQUEUE, (uint16_t)dev, p, 40, r);
    }
    return req32(VMK_SET_DEVICE_STATUS, (uint16_t)dev, 0x0f, 8);
}
