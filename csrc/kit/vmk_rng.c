/*
 * vmk_rng.c - virtio-rng: the driver posts device-writable buffers, the
 * device fills them and reports the bytes written as the used length.
 */
#include "vmk_models.h"

static void pattern_fill(struct vmk_rng *r, uint8_t *buf, uint32_t len)
{
    for (uint32_t i = 0; i < len; i++) {
        if (r->word_used == 4) {
            uint32_t x = r->pattern;
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            r->pattern = x;
            r->word[0] = (uint8_t)x;
            r->word[1] = (uint8_t)(x >> 8);
            r->word[2] = (uint8_t)(x >> 16);
            r->word[3] = (uint8_t)(x >> 24);
            r->word_used = 0;
        }
        buf[i] = r->word[r->word_used++];
    }
}

static int rng_queue_notify(struct vmk_device *dev, unsigned index, struct vmk_vq *vq)
{
    struct vmk_rng *r = (struct vmk_rng *)dev;
    struct vmk_chain c;
    uint8_t chunk[64];
    int used = 0;
    (void)index;
    /* a bounded batch per call: a driver refilling as fast as we drain must
     * not keep us here (the transport calls again) */
    for (unsigned n = 0; n < VMK_MODEL_BATCH; n++) {
        int k = vmk_vq_pop(vq, &c);
        if (k <= 0)
            return k < 0 ? -1 : used;
        uint32_t want = c.writable_len < r->max_request ? c.writable_len : r->max_request;
        uint32_t done = 0;
        while (done < want) {
            uint32_t take = want - done < sizeof(chunk) ? want - done : (uint32_t)sizeof(chunk);
            if (r->source)
                r->source(r->source_arg, chunk, take);
            else
                pattern_fill(r, chunk, take);
            uint32_t w = vmk_chain_write(&c, done, chunk, take);
            done += w;
            if (w < take)
                break;   /* the driver changed the chain under us: the queue is broken */
        }
        vmk_vq_push(vq, c.head, done);
        r->bytes_served += done;
        r->requests++;
        used = 1;
    }
    return used;
}

static void rng_reset(struct vmk_device *dev)
{
    (void)dev;   /* the pattern keeps running: a source does not rewind on reset */
}

static const struct vmk_device_ops rng_ops = {
    .queue_notify = rng_queue_notify,
    .reset = rng_reset,
};

void vmk_rng_init(struct vmk_rng *r, vmk_rng_source source, void *arg)
{
    memset(r, 0, sizeof(*r));
    r->dev.ops = &rng_ops;
    r->dev.name = "rng";
    r->dev.device_id = VMK_VIRTIO_ID_RNG;
    r->dev.num_queues = 1;
    r->dev.queue_max_size = 256;
    r->source = source;
    r->source_arg = arg;
    r->max_request = 64u << 10;   /* more than enough per request; bounds the work per chain */
    r->pattern = VMK_RNG_PATTERN_SEED;
    r->word_used = 4;
}
