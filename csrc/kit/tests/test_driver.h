/*
 * test_driver.h - the in-process driver the kit's unit tests use
 * (test_driver.c): shared memory, the kit under test, FIFO and split-ring
 * helpers.
 */
#ifndef TEST_DRIVER_H
#define TEST_DRIVER_H

#include <stdbool.h>
#include <stdint.h>

#include "../vmk.h"
#include "../vmk_models.h"
#include "../vmk_wire.h"

#define FIFO_SIZE 8192u
#define RAM_BUS 0x40000000u
#define RAM_SIZE (256u * 1024u)
#define F_RING ((1ull << 32) | (1ull << 29) | (1ull << 28))

/* ---- the shared memory ---- */
extern uint8_t fifo_mem[FIFO_SIZE];
extern uint8_t ram[RAM_SIZE];
extern uint32_t ram_cursor;
uint64_t ram_alloc(uint32_t size, uint32_t align);
uint8_t *ram_ptr(uint64_t bus);
void put16(uint8_t *p, uint16_t v);
void put32(uint8_t *p, uint32_t v);
void put64(uint8_t *p, uint64_t v);
uint16_t get16(const uint8_t *p);
uint32_t get32(const uint8_t *p);
uint64_t get64(const uint8_t *p);

/* ---- the kit under test ---- */
struct cfgdev { struct vmk_device dev; uint8_t cfg[16]; };   /* a device with a config space */
extern struct vmk_ctx ctx;
extern struct vmk_rng rng;
extern struct vmk_i2c i2c;
extern struct vmk_eeprom eeprom;
extern struct vmk_lm75 lm75;
extern struct cfgdev cfgdev;
extern const struct vmk_device_ops cfg_ops;
extern unsigned rings_seen;
void ring_cb(void *arg);

/* ---- driver side of the FIFO ---- */
extern uint16_t n_slots, drv_prod, drv_cons;
extern uint8_t *dev_qh, *drv_qh, *dev_el, *drv_el;
extern unsigned used_events[32], config_events[32];
extern uint8_t last_event_config[64];
extern uint16_t token;
uint16_t qh_get(uint8_t *qh, unsigned off);
void qh_set(uint8_t *qh, unsigned off, uint16_t v);
void poll_n(int n);
void drv_send_raw(const uint8_t *msg64);
int drv_recv(uint8_t *out);                 /* next message from the device, or 0 */
void note_event(const uint8_t *m);
void drain(void);                           /* poll, then count what the device sent */
void build(uint8_t *m, uint8_t type, uint8_t id, uint16_t dev, const void *payload, unsigned len);
int request(uint8_t type, uint8_t id, uint16_t dev, const void *payload, unsigned len, uint8_t *resp);
void event(uint8_t id, uint16_t dev, const void *payload, unsigned len);
uint32_t req32(uint8_t id, uint16_t dev, uint32_t arg, unsigned off);
bool ping(uint32_t data);
bool drv_connect(void);                     /* driver-side handshake: true once both RUN */

/* ---- driver side of a split ring ---- */
struct dq {
    unsigned size, dev_num, index;
    uint64_t desc, avail, used;
    uint16_t avail_idx, last_used, next_free;
};
void dq_create(struct dq *q, unsigned dev_num, unsigned index, unsigned size);
void desc_set(struct dq *q, unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next);
unsigned dq_add(struct dq *q, unsigned n, const uint64_t *addr, const uint32_t *len, const bool *wr);
void dq_publish(struct dq *q, unsigned head);
void dq_kick(struct dq *q);
int dq_used(struct dq *q, uint32_t *id, uint32_t *len);
/* Probe as Linux does; the status after DRIVER_OK (or where it stopped). */
uint32_t probe(unsigned dev, uint64_t want, struct dq *queues, unsigned nq, unsigned qsize);

#endif /* TEST_DRIVER_H */
