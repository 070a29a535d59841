/*
 * vmk_models.h - device models that come with the kit:
 *
 *   virtio-rng (device id 4): one request queue; each device-writable buffer
 *   is filled from a caller-supplied source, or from a test pattern (an
 *   xorshift32 stream, seed VMK_RNG_PATTERN_SEED, each 32-bit state written
 *   little-endian, one continuous stream across requests) when there is none.
 *
 *   virtio-i2c (device id 34): one request queue; requests go to simulated
 *   targets: a 24C02-like EEPROM (256 bytes, 8-byte pages) and an LM75-like
 *   temperature sensor, or targets of your own (struct vmk_i2c_target).
 *   VIRTIO_I2C_F_ZERO_LENGTH_REQUEST is offered and required.
 *
 * Both behave like vmsgamp's Python models (vmsgamp/devices/rng.py, i2c.py):
 * a malformed I2C request completes with VIRTIO_I2C_MSG_ERR in its last
 * device-writable byte, FAIL_NEXT fails the rest of a group, a corrupt ring
 * is the queue's business.  Requests are executed one by one as they are
 * popped (the simulated targets make a combined transfer and its messages
 * one after the other indistinguishable); messages are limited to
 * VMK_I2C_MAX_LEN bytes (the Python model's default is 8192).
 */
#ifndef VMK_MODELS_H
#define VMK_MODELS_H

#include "vmk.h"

/* ---- virtio-rng ------------------------------------------------------------ */
#define VMK_VIRTIO_ID_RNG 4u
#define VMK_RNG_PATTERN_SEED 0x2545F491u

typedef void (*vmk_rng_source)(void *arg, uint8_t *buf, uint32_t len);

struct vmk_rng {
    struct vmk_device dev;       /* first: the kit hands back &dev */
    vmk_rng_source source;       /* NULL: the pattern */
    void *source_arg;
    uint32_t max_request;        /* bytes per request at most (default 64 KiB) */
    uint32_t pattern;            /* xorshift32 state */
    uint8_t word[4];             /* bytes of the current pattern word */
    uint8_t word_used;           /* how many of them were handed out */
    uint32_t requests;
    uint64_t bytes_served;
};

void vmk_rng_init(struct vmk_rng *rng, vmk_rng_source source, void *arg);

/* ---- virtio-i2c ------------------------------------------------------------- */
#define VMK_VIRTIO_ID_I2C 34u
#define VMK_I2C_F_ZERO_LENGTH_REQUEST 0
#define VMK_I2C_FLAGS_FAIL_NEXT 1u
#define VMK_I2C_FLAGS_M_RD 2u
#define VMK_I2C_MSG_OK 0u
#define VMK_I2C_MSG_ERR 1u
#ifndef VMK_I2C_MAX_LEN
#define VMK_I2C_MAX_LEN 256u
#endif
#ifndef VMK_I2C_MAX_TARGETS
#define VMK_I2C_MAX_TARGETS 4u
#endif

struct vmk_i2c_target;
struct vmk_i2c_target_ops {
    /* One write message (after START or repeated START); false = NACK. */
    bool (*write)(struct vmk_i2c_target *t, const uint8_t *data, uint32_t len);
    /* One read message: fill `len` bytes. */
    void (*read)(struct vmk_i2c_target *t, uint8_t *data, uint32_t len);
};

struct vmk_i2c_target {
    const struct vmk_i2c_target_ops *ops;
    uint8_t addr;                /* 7-bit address */
};

struct vmk_eeprom {              /* 24C02-like */
    struct vmk_i2c_target t;
    uint8_t mem[256];
    uint8_t pointer;
};

struct vmk_lm75 {                /* LM75-like */
    struct vmk_i2c_target t;
    int16_t half_degrees;        /* temperature in 0.5 degC steps */
    uint8_t pointer, config;
    uint16_t thyst, tos;
};

struct vmk_i2c {
    struct vmk_device dev;       /* first: the kit hands back &dev */
    struct vmk_i2c_target *targets[VMK_I2C_MAX_TARGETS];
    unsigned num_targets;
    bool fail_next;              /* a failing group continues in the next kick */
    uint8_t buf[VMK_I2C_MAX_LEN];
    uint32_t requests, errors, malformed;
};

void vmk_i2c_init(struct vmk_i2c *i2c);
int vmk_i2c_attach(struct vmk_i2c *i2c, struct vmk_i2c_target *t, uint8_t addr);
void vmk_eeprom_init(struct vmk_eeprom *e);
void vmk_lm75_init(struct vmk_lm75 *s, int16_t half_degrees);

#endif /* VMK_MODELS_H */
