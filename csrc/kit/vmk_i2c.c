/*
 * vmk_i2c.c - virtio-i2c with simulated targets.
 *
 * Each request is one chain (virtio spec "I2C Adapter Device"):
 *   out_hdr {le16 addr; le16 padding; le32 flags}   device-readable
 *   buf[len]                                         readable (write) / writable (read)
 *   in_hdr  {u8 status}                              the last device-writable byte
 * flags bit 0 FAIL_NEXT (set on every request of a group but the last), bit 1
 * M_RD; other bits reserved.  addr: a 7-bit address in bits 7..1, or the
 * 10-bit encoding 11110xx0 in the low byte (no simulated target has one: NACK).
 */
#include "vmk_models.h"
#include "vmk_internal.h"

#define OUT_HDR_SIZE 8u
#define CLEAR_LIMIT 0xFFFFu   /* failed reads up to this size are zeroed */

/* ---- simulated targets --------------------------------------------------------- */

static bool eeprom_write(struct vmk_i2c_target *t, const uint8_t *data, uint32_t len)
{
    struct vmk_eeprom *e = (struct vmk_eeprom *)t;
    if (len == 0)
        return true;   /* address-only (SMBus quick write): ACK */
    /* first byte: word address; data goes to that page, wrapping inside it */
    e->pointer = data[0];
    for (uint32_t i = 1; i < len; i++) {
        e->mem[e->pointer] = data[i];
        e->pointer = (uint8_t)((e->pointer & 0xF8u) | ((e->pointer + 1u) & 0x07u));
    }
    return true;
}

static void eeprom_read(struct vmk_i2c_target *t, uint8_t *data, uint32_t len)
{
    struct vmk_eeprom *e = (struct vmk_eeprom *)t;
    for (uint32_t i = 0; i < len; i++)
        data[i] = e->mem[e->pointer++];   /* rolls over at the end of the memory */
}

static const struct vmk_i2c_target_ops eeprom_ops = { eeprom_write, eeprom_read };

void vmk_eeprom_init(struct vmk_eeprom *e)
{
    memset(e, 0, sizeof(*e));
    e->t.ops = &eeprom_ops;
    memset(e->mem, 0xFF, sizeof(e->mem));
}

/* LM75: pointer register selects temperature (0, read-only), configuration
 * (1, one byte), T_hyst (2) and T_os (3): 9-bit two's complement in 0.5 degC
 * steps, MSB first.  Reads repeat the selected register. */
static uint16_t lm75_encode(int half)
{
    if (half < -110)
        half = -110;
    if (half > 250)
        half = 250;
    return (uint16_t)(((unsigned)half & 0x1FFu) << 7);
}

static bool lm75_write(struct vmk_i2c_target *t, const uint8_t *data, uint32_t len)
{
    struct vmk_lm75 *s = (struct vmk_lm75 *)t;
    if (len == 0)
        return true;
    if (data[0] > 3)
        return false;   /* no such register: NACK */
    s->pointer = data[0];
    if (len > 1) {
        if (s->pointer == 1) {
            s->config = data[len - 1];
        } else if (s->pointer >= 2 && len >= 3) {
            uint16_t raw = (uint16_t)(((data[1] << 8) | data[2]) & 0xFF80u);
            if (s->pointer == 2)
                s->thyst = raw;
            else
                s->tos = raw;
        }
    }
    return true;
}

static void lm75_read(struct vmk_i2c_target *t, uint8_t *data, uint32_t len)
{
    struct vmk_lm75 *s = (struct vmk_lm75 *)t;
    uint8_t reg[2];
    unsigned n = 2;
    uint16_t raw = s->pointer == 0 ? lm75_encode(s->half_degrees) : s->pointer == 2 ? s->thyst : s->tos;
    reg[0] = (uint8_t)(raw >> 8);
    reg[1] = (uint8_t)raw;
    if (s->pointer == 1) {
        reg[0] = s->config;
        n = 1;
    }
    for (uint32_t i = 0; i < len; i++)
        data[i] = reg[i % n];
}

static const struct vmk_i2c_target_ops lm75_ops = { lm75_write, lm75_read };

void vmk_lm75_init(struct vmk_lm75 *s, int16_t half_degrees)
{
    memset(s, 0, sizeof(*s));
    s->t.ops = &lm75_ops;
    s->half_degrees = half_degrees;
    s->thyst = lm75_encode(150);   /* 75 degC */
    s->tos = lm75_encode(160);     /* 80 degC */
}

int vmk_i2c_attach(struct vmk_i2c *i2c, struct vmk_i2c_target *t, uint8_t addr)
{
    if (addr > 0x7F || t == NULL || t->ops == NULL || i2c->num_targets >= VMK_I2C_MAX_TARGETS)
        return -1;
    for (unsigned i = 0; i < i2c->num_targets; i++)
        if (i2c->targets[i]->addr == addr)
            return -1;
    t->addr = addr;
    i2c->targets[i2c->num_targets++] = t;
    return 0;
}

/* ---- the device model ------------------------------------------------------------ */

struct request {
    struct vmk_chain c;
    bool fail_next, read, malformed;
    int addr;                    /* 7-bit address, or -1 (10-bit: no target) */
    uint32_t len;
};

/* Parse and check the byte layout; the descriptor layout is not assumed. */
static void parse(struct request *r)
{
    uint8_t hdr[OUT_HDR_SIZE];
    uint32_t rlen = r->c.readable_len, wlen = r->c.writable_len;
    r->malformed = true;
    r->fail_next = false;
    if (rlen < OUT_HDR_SIZE || vmk_chain_read(&r->c, 0, hdr, OUT_HDR_SIZE) != OUT_HDR_SIZE)
        return;
    uint16_t field = vmk_get16(hdr);
    uint32_t flags = vmk_get32(hdr + 4);
    r->fail_next = (flags & VMK_I2C_FLAGS_FAIL_NEXT) != 0;
    r->read = (flags & VMK_I2C_FLAGS_M_RD) != 0;
    if (wlen == 0 || (flags & ~(VMK_I2C_FLAGS_FAIL_NEXT | VMK_I2C_FLAGS_M_RD))
        || (r->read && rlen != OUT_HDR_SIZE) || (!r->read && wlen != 1))
        return;
    r->len = r->read ? wlen - 1u : rlen - OUT_HDR_SIZE;
    if (r->len > VMK_I2C_MAX_LEN || (field & 1u))
        return;
    uint8_t low = (uint8_t)field;
    if ((low & 0xF9u) == 0xF0u)
        r->addr = -1;            /* a valid 10-bit encoding */
    else if (field >> 8)
        return;
    else
        r->addr = low >> 1;
    r->malformed = false;
}

static struct vmk_i2c_target *target(struct vmk_i2c *i2c, int addr)
{
    for (unsigned i = 0; i < i2c->num_targets; i++)
        if (i2c->targets[i]->addr == addr)
            return i2c->targets[i];
    return NULL;
}

/* Execute one well-formed request; true on ACK all the way. */
static bool execute(struct vmk_i2c *i2c, struct request *r)
{
    struct vmk_i2c_target *t = r->addr < 0 ? NULL : target(i2c, r->addr);
    if (t == NULL)
        return false;            /* address NACK */
    if (r->read) {
        memset(i2c->buf, 0xFF, r->len);
        t->ops->read(t, i2c->buf, r->len);
        return true;
    }
    if (vmk_chain_read(&r->c, OUT_HDR_SIZE, i2c->buf, r->len) != r->len)
        return false;
    return t->ops->write(t, i2c->buf, r->len);
}

static void complete(struct vmk_i2c *i2c, struct vmk_vq *vq, struct request *r, bool ok)
{
    const uint8_t okb = VMK_I2C_MSG_OK, errb = VMK_I2C_MSG_ERR;
    uint32_t wlen = r->c.writable_len;
    i2c->requests++;
    if (ok) {
        uint32_t n = 0;
        if (r->read)
            n = vmk_chain_write(&r->c, 0, i2c->buf, r->len);
        n += vmk_chain_write(&r->c, n, &okb, 1);
        vmk_vq_push(vq, r->c.head, n);
        return;
    }
    i2c->errors++;
    if (wlen == 0) {
        vmk_vq_push(vq, r->c.head, 0);   /* nowhere to put a status */
    } else if (wlen - 1u <= CLEAR_LIMIT) {
        /* zero what precedes the status so the used length is honest */
        uint32_t n = vmk_chain_fill(&r->c, 0, 0, wlen - 1u);
        n += vmk_chain_write(&r->c, wlen - 1u, &errb, 1);
        vmk_vq_push(vq, r->c.head, n);
    } else {
        /* too big to clear: status only, used length 0 */
        vmk_chain_write(&r->c, wlen - 1u, &errb, 1);
        vmk_vq_push(vq, r->c.head, 0);
    }
}

static int i2c_queue_notify(struct vmk_device *dev, unsigned index, struct vmk_vq *vq)
{
    struct vmk_i2c *i2c = (struct vmk_i2c *)dev;
    struct request r;
    int used = 0;
    (void)index;
    for (unsigned n = 0; n < VMK_MODEL_BATCH; n++) {
        int k = vmk_vq_pop(vq, &r.c);
        if (k <= 0)
            return k < 0 ? -1 : used;
        parse(&r);
        bool ok = false;
        if (i2c->fail_next || r.malformed) {
            /* FAIL_NEXT: after a failure the rest of the group fails unexecuted */
            if (r.malformed && !i2c->fail_next)
                i2c->malformed++;
            i2c->fail_next = r.fail_next;
        } else {
            ok = execute(i2c, &r);
            i2c->fail_next = ok ? false : r.fail_next;
        }
        complete(i2c, vq, &r, ok);
        used = 1;
    }
    return used;
}

static bool i2c_features_ok(struct vmk_device *dev, uint64_t features)
{
    (void)dev;
    /* "A device ... MUST reject any driver that doesn't negotiate this feature." */
    return (features >> VMK_I2C_F_ZERO_LENGTH_REQUEST) & 1u;
}

static void i2c_reset(struct vmk_device *dev)
{
    ((struct vmk_i2c *)dev)->fail_next = false;
}

static void i2c_activate(struct vmk_device *dev, uint64_t features)
{
    (void)features;
    ((struct vmk_i2c *)dev)->fail_next = false;
}

static const struct vmk_device_ops i2c_ops = {
    .queue_notify = i2c_queue_notify,
    .features_ok = i2c_features_ok,
    .activate = i2c_activate,
    .reset = i2c_reset,
};

void vmk_i2c_init(struct vmk_i2c *i2c)
{
    memset(i2c, 0, sizeof(*i2c));
    i2c->dev.ops = &i2c_ops;
    i2c->dev.name = "i2c";
    i2c->dev.device_id = VMK_VIRTIO_ID_I2C;
    i2c->dev.features = (uint64_t)1 << VMK_I2C_F_ZERO_LENGTH_REQUEST;
    i2c->dev.num_queues = 1;
    i2c->dev.queue_max_size = 256;
}
