/*
 * vmk_transport.c - the virtio-msg device side: bus messages, the transport
 * state machine of each device (features, status, config, virtqueues),
 * EVENT_AVAIL -> model -> EVENT_USED, and vmk_poll().
 *
 * Behaviour follows what the Linux virtio-msg driver needs and what
 * vmsgamp's Python device side does: num_feature_bits 64, VERSION_1 always
 * offered, NOTIFICATION_DATA and RING_PACKED never, RESET_VQUEUE always
 * answered, GET_DEVICES answered with exactly the count asked, the queue
 * size taken from SET_VQUEUE, token and dev_num echoed in every response.
 * Malformed or unexpected messages are counted and dropped (the protocol
 * has no error message); nothing the driver sends stops the loop.
 */
#include "vmk_internal.h"

/* ---- helpers -------------------------------------------------------------- */

static struct vmk_slot *slot_of(struct vmk_ctx *ctx, unsigned dev_num)
{
    for (unsigned i = 0; i < VMK_MAX_DEVICES; i++)
        if (ctx->slots[i].dev != NULL && ctx->slots[i].dev->dev_num == dev_num)
            return &ctx->slots[i];
    return NULL;
}

static uint64_t negotiated(const struct vmk_slot *s)
{
    return s->driver_features & s->offered;
}

/* Start a message in `out`: header with `payload` bytes of zeroed payload. */
static void msg_init(uint8_t *out, uint8_t type, uint8_t id, uint16_t dev_num, uint16_t token,
                     unsigned payload)
{
    memset(out, 0, VMK_MSG_MAX);
    out[VMK_HDR_TYPE] = type;
    out[VMK_HDR_MSG_ID] = id;
    vmk_put16(out + VMK_HDR_DEV_NUM, dev_num);
    vmk_put16(out + VMK_HDR_TOKEN, token);
    vmk_put16(out + VMK_HDR_MSG_SIZE, (uint16_t)(VMK_HDR_SIZE + payload));
}

/* A response to `req`: same kind and id, token and dev_num echoed. */
static void resp_init(uint8_t *out, const uint8_t *req, unsigned payload)
{
    msg_init(out, (uint8_t)((req[VMK_HDR_TYPE] & VMK_TYPE_BUS) | VMK_TYPE_RESPONSE),
             req[VMK_HDR_MSG_ID], vmk_get16(req + VMK_HDR_DEV_NUM), vmk_get16(req + VMK_HDR_TOKEN),
             payload);
}

static void send_event_config(struct vmk_ctx *ctx, struct vmk_slot *s)
{
    uint8_t m[VMK_MSG_MAX];
    msg_init(m, 0, VMK_EVENT_CONFIG, s->dev->dev_num, 0, 16);
    vmk_put32(m + VMK_EVCFG_STATUS, s->status);
    vmk_put32(m + VMK_EVCFG_GENERATION, s->dev->config_generation);
    vmk_fifo_send(ctx, m);
}

static void send_event_used(struct vmk_ctx *ctx, struct vmk_slot *s, unsigned index)
{
    uint8_t m[VMK_MSG_MAX];
    msg_init(m, 0, VMK_EVENT_USED, s->dev->dev_num, 0, 4);
    vmk_put32(m + VMK_VQ_INDEX, index);
    if (vmk_fifo_send(ctx, m))
        ctx->stats.used_notifications++;
}

static void send_event_device(struct vmk_ctx *ctx, unsigned dev_num, uint16_t state)
{
    uint8_t m[VMK_MSG_MAX];
    msg_init(m, VMK_TYPE_BUS, VMK_BUS_EVENT_DEVICE, 0, 0, 4);
    vmk_put16(m + VMK_EVDEV_NUMBER, (uint16_t)dev_num);
    vmk_put16(m + VMK_EVDEV_STATE, state);
    vmk_fifo_send(ctx, m);
}

/* A queue broke (or a request could not be honoured): DEVICE_NEEDS_RESET,
 * and tell the driver. */
static void needs_reset(struct vmk_ctx *ctx, struct vmk_slot *s, const char *why, uint32_t a)
{
    vmk_log(ctx, why, s->dev->dev_num, a);
    s->status |= VMK_ST_NEEDS_RESET;
    ctx->stats.needs_reset++;
    send_event_config(ctx, s);
}

static void reset_slot(struct vmk_slot *s)
{
    s->status = 0;
    s->driver_features = 0;
    s->rescan = 0;
    for (unsigned q = 0; q < VMK_MAX_QUEUES; q++)
        vmk_vq_forget(&s->vq[q]);
    if (s->dev->ops->reset)
        s->dev->ops->reset(s->dev);
}

static void reset_all(struct vmk_ctx *ctx)
{
    for (unsigned i = 0; i < VMK_MAX_DEVICES; i++)
        if (ctx->slots[i].dev != NULL)
            reset_slot(&ctx->slots[i]);
}

/* ---- virtqueue notifications ---------------------------------------------------- */

static void kick(struct vmk_ctx *ctx, struct vmk_slot *s, unsigned index)
{
    struct vmk_vq *vq = &s->vq[index];
    int used = 0, more = 0;
    s->rescan &= ~(1u << index);
    if (vq->size == 0 || vq->broken)
        return;
    /* vhost-style: process with kicks suppressed, re-enable, look again.
     * Bounded, so a driver that keeps the queue full cannot monopolise the
     * loop; what is left is picked up by the next vmk_poll(). */
    for (unsigned round = 0; round < VMK_KICK_ROUNDS; round++) {
        vmk_vq_disable_notify(vq);
        int r = s->dev->ops->queue_notify(s->dev, index, vq);
        if (r < 0)
            vmk_vq_mark_broken(vq, VMK_VQ_E_MODEL);
        if (vq->broken) {
            needs_reset(ctx, s, "virtqueue broken", (uint32_t)vq->error << 8 | index);
            return;
        }
        used |= r > 0;
        more = vmk_vq_enable_notify(vq);
        if (more < 0) {
            needs_reset(ctx, s, "virtqueue broken", (uint32_t)vq->error << 8 | index);
            return;
        }
        if (!more)
            break;
    }
    if (more)
        s->rescan |= 1u << index;
    if (used && vmk_vq_needs_notify(vq))
        send_event_used(ctx, s, index);
}

static void on_avail(struct vmk_ctx *ctx, struct vmk_slot *s, uint32_t index)
{
    ctx->stats.kicks++;
    if (!(s->status & VMK_ST_DRIVER_OK) || (s->status & VMK_ST_NEEDS_RESET)) {
        /* As QEMU does: tell a driver that kicks too early what the status is. */
        send_event_config(ctx, s);
        return;
    }
    if (index < s->dev->num_queues)
        kick(ctx, s, index);
}

/* ---- transport requests -------------------------------------------------------------- */

static uint8_t set_status(struct vmk_slot *s, uint32_t requested)
{
    const struct vmk_device_ops *ops = s->dev->ops;
    requested &= 0xFFu;
    if (requested == 0) {
        reset_slot(s);
        return 0;
    }
    uint8_t old = s->status;
    uint8_t result = (uint8_t)requested;
    if ((requested & VMK_ST_FEATURES_OK) && !(old & VMK_ST_FEATURES_OK)) {
        uint64_t feats = s->driver_features;
        bool ok = (feats & ~s->offered) == 0;
        if (ok && ops->features_ok)
            ok = ops->features_ok(s->dev, feats & s->offered);
        if (!ok)
            result &= (uint8_t)~VMK_ST_FEATURES_OK;
    }
    result |= old & VMK_ST_NEEDS_RESET;   /* sticks until a reset */
    s->status = result;
    if ((result & VMK_ST_DRIVER_OK) && !(old & VMK_ST_DRIVER_OK) && ops->activate)
        ops->activate(s->dev, negotiated(s));
    return result;
}

static void set_vqueue(struct vmk_ctx *ctx, struct vmk_slot *s, const uint8_t *m)
{
    uint32_t index = vmk_get32(m + VMK_VQ_INDEX);
    uint32_t size = vmk_get32(m + VMK_SETVQ_SIZE);
    uint64_t feats = negotiated(s);
    if (index >= s->dev->num_queues) {
        needs_reset(ctx, s, "SET_VQUEUE for a queue the device does not have", index);
        return;
    }
    if (size == 0 || size > s->dev->queue_max_size) {
        needs_reset(ctx, s, "SET_VQUEUE size out of range", size);
        return;
    }
    s->rescan &= ~(1u << index);
    int r = vmk_vq_setup(&s->vq[index], &ctx->mem, size, vmk_get64(m + VMK_SETVQ_DESC),
                         vmk_get64(m + VMK_SETVQ_DRIVER), vmk_get64(m + VMK_SETVQ_DEVICE),
                         (feats >> VIRTIO_F_EVENT_IDX) & 1u, (feats >> VIRTIO_F_INDIRECT_DESC) & 1u);
    if (r)   /* addresses outside every window are refused, never followed */
        needs_reset(ctx, s, r == 1 ? "SET_VQUEUE size not a power of two" : "SET_VQUEUE rings outside the windows",
                    index);
}

/* Answer a transport request for an existing device; false = malformed (dropped). */
static bool transport_request(struct vmk_ctx *ctx, struct vmk_slot *s, const uint8_t *m, uint16_t msz,
                              uint8_t *out)
{
    struct vmk_device *d = s->dev;
    uint8_t id = m[VMK_HDR_MSG_ID];
    switch (id) {
    case VMK_GET_DEVICE_INFO:
        resp_init(out, m, 24);
        vmk_put32(out + VMK_INFO_DEVICE_ID, d->device_id);
        vmk_put32(out + VMK_INFO_VENDOR_ID, d->vendor_id ? d->vendor_id : VMK_VENDOR_ID);
        vmk_put32(out + VMK_INFO_FEATURE_BITS, VMK_NUM_FEATURE_BITS);
        vmk_put32(out + VMK_INFO_CONFIG_SIZE, d->config_size);
        vmk_put32(out + VMK_INFO_MAX_VQS, d->num_queues);
        return true;
    case VMK_GET_DEVICE_FEATURES: {
        uint32_t block = vmk_get32(m + VMK_FEAT_BLOCK_INDEX);
        uint32_t want = vmk_get32(m + VMK_FEAT_NUM_BLOCKS);
        uint32_t fit = (ctx->slot_size - VMK_FEAT_WORDS) / 4u;
        uint32_t n = want < fit ? want : fit;
        resp_init(out, m, 8u + 4u * n);
        vmk_put32(out + VMK_FEAT_BLOCK_INDEX, block);
        vmk_put32(out + VMK_FEAT_NUM_BLOCKS, n);
        for (uint32_t i = 0; i < n; i++) {
            uint64_t b = (uint64_t)block + i;
            uint32_t w = b < VMK_NUM_FEATURE_BITS / 32u ? (uint32_t)(s->offered >> (32u * b)) : 0;
            vmk_put32(out + VMK_FEAT_WORDS + 4u * i, w);
        }
        return true;
    }
    case VMK_SET_DRIVER_FEATURES: {
        uint32_t block = vmk_get32(m + VMK_FEAT_BLOCK_INDEX);
        uint32_t n = vmk_get32(m + VMK_FEAT_NUM_BLOCKS);
        if ((uint64_t)VMK_FEAT_WORDS + 4u * (uint64_t)n > msz)
            return false;   /* more blocks announced than the message holds */
        if (!(s->status & VMK_ST_FEATURES_OK)) {
            for (uint32_t i = 0; i < n; i++) {
                uint64_t b = (uint64_t)block + i;
                if (b >= VMK_NUM_FEATURE_BITS / 32u)
                    continue;
                unsigned shift = 32u * (unsigned)b;
                uint64_t w = vmk_get32(m + VMK_FEAT_WORDS + 4u * i);
                s->driver_features = (s->driver_features & ~((uint64_t)0xFFFFFFFFu << shift)) | w << shift;
            }
        }
        resp_init(out, m, 0);
        return true;
    }
    case VMK_GET_CONFIG: {
        uint32_t off = vmk_get32(m + VMK_GETCFG_OFFSET), len = vmk_get32(m + VMK_GETCFG_LENGTH);
        uint32_t fit = ctx->slot_size - VMK_CFG_DATA;
        uint32_t n = 0;
        if ((uint64_t)off + len <= d->config_size)
            n = len < fit ? len : fit;
        resp_init(out, m, 12u + n);
        vmk_put32(out + VMK_CFG_GENERATION, d->config_generation);
        vmk_put32(out + VMK_CFG_OFFSET, off);
        vmk_put32(out + VMK_CFG_LENGTH, n);
        if (n && d->ops->config_read)
            d->ops->config_read(d, off, out + VMK_CFG_DATA, n);
        return true;
    }
    case VMK_SET_CONFIG: {
        uint32_t gen = vmk_get32(m + VMK_CFG_GENERATION), off = vmk_get32(m + VMK_CFG_OFFSET);
        uint32_t len = vmk_get32(m + VMK_CFG_LENGTH), applied = 0;
        if ((uint64_t)VMK_CFG_DATA + len > msz)
            return false;   /* data shorter than its length */
        if (gen == d->config_generation && (uint64_t)off + len <= d->config_size && d->ops->config_write
            && d->ops->config_write(d, off, m + VMK_CFG_DATA, len))
            applied = len;
        resp_init(out, m, 12);
        vmk_put32(out + VMK_CFG_GENERATION, d->config_generation);
        vmk_put32(out + VMK_CFG_OFFSET, off);
        vmk_put32(out + VMK_CFG_LENGTH, applied);
        return true;
    }
    case VMK_GET_DEVICE_STATUS:
        resp_init(out, m, 4);
        vmk_put32(out + VMK_STATUS, s->status);
        return true;
    case VMK_SET_DEVICE_STATUS: {
        uint8_t st = set_status(s, vmk_get32(m + VMK_STATUS));
        resp_init(out, m, 4);
        vmk_put32(out + VMK_STATUS, st);
        return true;
    }
    case VMK_GET_VQUEUE: {
        uint32_t index = vmk_get32(m + VMK_VQ_INDEX);
        resp_init(out, m, 40);
        vmk_put32(out + VMK_VQ_INDEX, index);
        if (index < d->num_queues) {
            const struct vmk_vq *vq = &s->vq[index];
            vmk_put32(out + VMK_GETVQ_MAX_SIZE, d->queue_max_size);
            vmk_put32(out + VMK_GETVQ_CUR_SIZE, vq->size);
            vmk_put64(out + VMK_GETVQ_DESC, vq->desc_addr);
            vmk_put64(out + VMK_GETVQ_DRIVER, vq->driver_addr);
            vmk_put64(out + VMK_GETVQ_DEVICE, vq->device_addr);
        }
        return true;
    }
    case VMK_SET_VQUEUE:
        set_vqueue(ctx, s, m);
        resp_init(out, m, 0);
        return true;
    case VMK_RESET_VQUEUE: {
        /* Always answered, with or without RING_RESET: Linux waits for it. */
        uint32_t index = vmk_get32(m + VMK_VQ_INDEX);
        if (index < d->num_queues && index < VMK_MAX_QUEUES) {
            bool was = s->vq[index].size != 0;
            vmk_vq_forget(&s->vq[index]);
            s->rescan &= ~(1u << index);
            if (was && d->ops->queue_reset)
                d->ops->queue_reset(d, index);
        }
        resp_init(out, m, 0);
        return true;
    }
    case VMK_GET_SHM:   /* no shared memory regions */
        resp_init(out, m, 12);
        vmk_put32(out + VMK_VQ_INDEX, vmk_get32(m + VMK_VQ_INDEX));
        return true;
    default:
        return false;
    }
}

/* Harmless zeros for a device number with no device, so a driver probing a
 * gap fails fast (device_id 0 = no device) instead of timing out. */
static bool absent_request(const uint8_t *m, uint16_t msz, uint8_t *out)
{
    uint8_t id = m[VMK_HDR_MSG_ID];
    switch (id) {
    case VMK_GET_DEVICE_INFO:
        resp_init(out, m, 24);
        vmk_put32(out + VMK_INFO_FEATURE_BITS, VMK_NUM_FEATURE_BITS);
        return true;
    case VMK_GET_DEVICE_FEATURES: {
        uint32_t want = vmk_get32(m + VMK_FEAT_NUM_BLOCKS), n = want < 8u ? want : 8u;
        resp_init(out, m, 8u + 4u * n);
        vmk_put32(out + VMK_FEAT_BLOCK_INDEX, vmk_get32(m + VMK_FEAT_BLOCK_INDEX));
        vmk_put32(out + VMK_FEAT_NUM_BLOCKS, n);
        return true;
    }
    case VMK_SET_DRIVER_FEATURES:
        if ((uint64_t)VMK_FEAT_WORDS + 4u * (uint64_t)vmk_get32(m + VMK_FEAT_NUM_BLOCKS) > msz)
            return false;
        resp_init(out, m, 0);
        return true;
    case VMK_GET_CONFIG:
        resp_init(out, m, 12);
        vmk_put32(out + VMK_CFG_OFFSET, vmk_get32(m + VMK_GETCFG_OFFSET));
        return true;
    case VMK_SET_CONFIG:
        if ((uint64_t)VMK_CFG_DATA + vmk_get32(m + VMK_CFG_LENGTH) > msz)
            return false;
        resp_init(out, m, 12);
        vmk_put32(out + VMK_CFG_OFFSET, vmk_get32(m + VMK_CFG_OFFSET));
        return true;
    case VMK_GET_DEVICE_STATUS:
    case VMK_SET_DEVICE_STATUS:
        resp_init(out, m, 4);
        return true;
    case VMK_GET_VQUEUE:
        resp_init(out, m, 40);
        vmk_put32(out + VMK_VQ_INDEX, vmk_get32(m + VMK_VQ_INDEX));
        return true;
    case VMK_GET_SHM:
        resp_init(out, m, 12);
        vmk_put32(out + VMK_VQ_INDEX, vmk_get32(m + VMK_VQ_INDEX));
        return true;
    case VMK_SET_VQUEUE:
    case VMK_RESET_VQUEUE:
        resp_init(out, m, 0);
        return true;
    default:
        return false;
    }
}

/* Smallest msg_size of each transport request, 0 for ids we do not know. */
static uint16_t transport_min_size(uint8_t id)
{
    switch (id) {
    case VMK_GET_DEVICE_INFO:
    case VMK_GET_DEVICE_STATUS: return VMK_HDR_SIZE;
    case VMK_GET_DEVICE_FEATURES: return VMK_MIN_GET_DEVICE_FEATURES;
    case VMK_SET_DRIVER_FEATURES: return VMK_MIN_SET_DRIVER_FEATURES;
    case VMK_GET_CONFIG: return VMK_MIN_GET_CONFIG;
    case VMK_SET_CONFIG: return VMK_MIN_SET_CONFIG;
    case VMK_SET_DEVICE_STATUS: return VMK_MIN_SET_DEVICE_STATUS;
    case VMK_GET_VQUEUE:
    case VMK_RESET_VQUEUE:
    case VMK_GET_SHM: return VMK_MIN_INDEX;
    case VMK_SET_VQUEUE: return VMK_MIN_SET_VQUEUE;
    case VMK_EVENT_AVAIL: return VMK_MIN_EVENT_AVAIL;
    default: return 0;
    }
}

static void bus_message(struct vmk_ctx *ctx, const uint8_t *m, uint16_t msz, uint8_t *out)
{
    uint8_t id = m[VMK_HDR_MSG_ID];
    if (m[VMK_HDR_TYPE] & VMK_TYPE_RESPONSE) {
        if (id != VMK_BUS_PING)   /* the answer to our own PING is all we expect */
            ctx->stats.rx_unexpected++;
        return;
    }
    if (id == VMK_BUS_PING) {
        if (msz < VMK_MIN_PING) {
            ctx->stats.rx_malformed++;
            return;
        }
        /* Both sides answer PING; echo data and token. */
        resp_init(out, m, 4);
        vmk_put32(out + VMK_PING_DATA, vmk_get32(m + VMK_PING_DATA));
        if (vmk_fifo_send(ctx, out))
            ctx->stats.pings_answered++;
        return;
    }
    if (id == VMK_BUS_GET_DEVICES) {
        uint16_t first = vmk_get16(m + VMK_GETDEV_OFFSET), count = vmk_get16(m + VMK_GETDEV_COUNT);
        unsigned bytes = count / 8u;
        /* count must be a multiple of 8 and the answer, with exactly that
         * count (Linux insists), must fit one message */
        if (msz < VMK_MIN_GET_DEVICES || count % 8u || VMK_GETDEV_BITMAP + bytes > ctx->slot_size) {
            ctx->stats.rx_malformed++;
            return;
        }
        resp_init(out, m, 6u + bytes);
        vmk_put16(out + VMK_GETDEV_OFFSET, first);
        vmk_put16(out + VMK_GETDEV_COUNT, count);
        /* next_offset = offset + count as QEMU sends it (0 = no more once it wraps) */
        vmk_put16(out + VMK_GETDEV_NEXT, (uint16_t)(first + count));
        for (unsigned i = 0; i < VMK_MAX_DEVICES; i++) {
            const struct vmk_device *d = ctx->slots[i].dev;
            if (d != NULL && d->dev_num >= first && d->dev_num - first < count) {
                unsigned rel = d->dev_num - first;
                out[VMK_GETDEV_BITMAP + rel / 8u] |= (uint8_t)(1u << (rel % 8u));
            }
        }
        vmk_fifo_send(ctx, out);
        return;
    }
    ctx->stats.rx_unexpected++;   /* EVENT_DEVICE from a driver, unknown ids */
}

static void handle_message(struct vmk_ctx *ctx, uint8_t *m)
{
    uint8_t out[VMK_MSG_MAX];
    uint16_t msz = vmk_get16(m + VMK_HDR_MSG_SIZE);
    uint8_t type = m[VMK_HDR_TYPE], id = m[VMK_HDR_MSG_ID];
    ctx->stats.rx_messages++;
    if (msz < VMK_HDR_SIZE || msz > ctx->slot_size) {
        ctx->stats.rx_malformed++;
        return;
    }
    /* Bytes past msg_size are leftovers of older messages: never read them. */
    memset(m + msz, 0, VMK_MSG_MAX - msz);
    if (type & VMK_TYPE_BUS) {
        bus_message(ctx, m, msz, out);
        return;
    }
    uint16_t min = transport_min_size(id);
    if (min == 0 || msz < min) {
        ctx->stats.rx_malformed++;
        return;
    }
    if ((type & VMK_TYPE_RESPONSE) || ((id & VMK_MSG_ID_EVENT) && id != VMK_EVENT_AVAIL)) {
        ctx->stats.rx_unexpected++;   /* a driver answers nothing of ours on the transport */
        return;
    }
    struct vmk_slot *s = slot_of(ctx, vmk_get16(m + VMK_HDR_DEV_NUM));
    if (id == VMK_EVENT_AVAIL) {
        if (s != NULL)
            on_avail(ctx, s, vmk_get32(m + VMK_VQ_INDEX));
        return;
    }
    bool ok = s != NULL ? transport_request(ctx, s, m, msz, out) : absent_request(m, msz, out);
    if (!ok) {
        ctx->stats.rx_malformed++;
        return;
    }
    vmk_fifo_send(ctx, out);
}

/* ---- public API ------------------------------------------------------------------------- */

int vmk_init(struct vmk_ctx *ctx, const struct vmk_config *cfg)
{
    memset(ctx, 0, sizeof(*ctx));
    ctx->cfg = *cfg;
    if (cfg->num_windows > VMK_MAX_WINDOWS)
        return -1;
    for (unsigned i = 0; i < cfg->num_windows; i++)
        ctx->mem.win[i] = cfg->windows[i];
    ctx->mem.count = cfg->num_windows;
    ctx->mem.memtype = cfg->memtype;
    if (vmk_fifo_init(ctx) < 0) {
        ctx->layout_errors++;
        return -1;
    }
    return 0;
}

int vmk_add_device(struct vmk_ctx *ctx, unsigned dev_num, struct vmk_device *dev)
{
    struct vmk_slot *free_slot = NULL;
    if (dev_num >= VMK_BUS_DEVICES || dev == NULL || dev->ops == NULL || dev->ops->queue_notify == NULL
        || dev->num_queues > VMK_MAX_QUEUES || dev->queue_max_size == 0
        || (dev->queue_max_size & (dev->queue_max_size - 1u)) || dev->queue_max_size > VIRTQ_MAX_SIZE
        || slot_of(ctx, dev_num) != NULL)
        return -1;
    for (unsigned i = 0; i < VMK_MAX_DEVICES && free_slot == NULL; i++)
        if (ctx->slots[i].dev == NULL)
            free_slot = &ctx->slots[i];
    if (free_slot == NULL)
        return -1;
    memset(free_slot, 0, sizeof(*free_slot));
    dev->ctx = ctx;
    dev->dev_num = (uint8_t)dev_num;
    free_slot->dev = dev;
    free_slot->offered = dev->features | (uint64_t)1 << VMK_F_VERSION_1;
    if (!ctx->cfg.no_event_idx)
        free_slot->offered |= (uint64_t)1 << VIRTIO_F_EVENT_IDX;
    if (!ctx->cfg.no_indirect)
        free_slot->offered |= (uint64_t)1 << VIRTIO_F_INDIRECT_DESC;
    if (ctx->session == VMK_S_RUN) {
        send_event_device(ctx, dev_num, VMK_DEVICE_READY);
        vmk_fifo_notify(ctx);
    }
    return 0;
}

int vmk_remove_device(struct vmk_ctx *ctx, unsigned dev_num)
{
    struct vmk_slot *s = slot_of(ctx, dev_num);
    if (s == NULL)
        return -1;
    reset_slot(s);
    s->dev = NULL;
    if (ctx->session == VMK_S_RUN) {
        send_event_device(ctx, dev_num, VMK_DEVICE_REMOVED);
        vmk_fifo_notify(ctx);
    }
    return 0;
}

static bool check_lost(struct vmk_ctx *ctx)
{
    if (!ctx->session_lost)
        return false;
    ctx->session_lost = false;
    reset_all(ctx);
    return true;
}

int vmk_poll(struct vmk_ctx *ctx)
{
    uint8_t m[VMK_MSG_MAX];
    bool lost;
    int work = vmk_fifo_step(ctx, &lost);
    if (lost)
        reset_all(ctx);
    check_lost(ctx);
    if (ctx->session != VMK_S_RUN)
        return work;
    /* Chains left over by the kick bound. */
    for (unsigned i = 0; i < VMK_MAX_DEVICES; i++) {
        struct vmk_slot *s = &ctx->slots[i];
        for (unsigned q = 0; s->dev != NULL && s->rescan && q < VMK_MAX_QUEUES; q++) {
            if (!(s->rescan & (1u << q)))
                continue;
            if (vmk_fifo_free(ctx) < 2u)
                break;
            kick(ctx, s, q);
            work++;
        }
    }
    /* Each message may cause a response and one event: take one only when
     * two slots are free (back-pressure on a driver that does not read). */
    for (unsigned i = 0; i < VMK_MAX_MSGS_PER_POLL; i++) {
        if (vmk_fifo_free(ctx) < 2u) {
            if (ctx->session == VMK_S_RUN)
                ctx->stats.tx_full++;
            break;
        }
        int r = vmk_fifo_recv(ctx, m);
        if (r <= 0)
            break;
        handle_message(ctx, m);
        work++;
    }
    if (check_lost(ctx))
        return work + 1;
    vmk_fifo_notify(ctx);
    return work;
}

bool vmk_prepare_sleep(struct vmk_ctx *ctx)
{
    for (unsigned i = 0; i < VMK_MAX_DEVICES; i++)
        if (ctx->slots[i].dev != NULL && ctx->slots[i].rescan)
            return false;
    if (ctx->session != VMK_S_RUN)
        return true;   /* handshake steps are not rung: sleep with a timeout */
    vmk_fifo_set_waiting(ctx, true);
    vm_fence_seq_cst();   /* F2 (pairs with the driver's F1) */
    if (vmk_fifo_pending(ctx)) {
        vmk_fifo_set_waiting(ctx, false);
        return false;
    }
    return true;
}

void vmk_woken(struct vmk_ctx *ctx)
{
    if (ctx->my_status & VMAMP_STATUS_F_WAITING)
        vmk_fifo_set_waiting(ctx, false);
}

void vmk_queue_notify_driver(struct vmk_device *dev, unsigned index)
{
    struct vmk_ctx *ctx = dev->ctx;
    struct vmk_slot *s = ctx ? slot_of(ctx, dev->dev_num) : NULL;
    if (s == NULL || index >= dev->num_queues || !(s->status & VMK_ST_DRIVER_OK))
        return;
    if (vmk_vq_needs_notify(&s->vq[index])) {
        send_event_used(ctx, s, index);
        vmk_fifo_notify(ctx);
    }
}

void vmk_config_changed(struct vmk_device *dev)
{
    struct vmk_ctx *ctx = dev->ctx;
    dev->config_generation++;
    struct vmk_slot *s = ctx ? slot_of(ctx, dev->dev_num) : NULL;
    if (s != NULL && (s->status & VMK_ST_DRIVER_OK)) {
        send_event_config(ctx, s);
        vmk_fifo_notify(ctx);
    }
}

int vmk_ping(struct vmk_ctx *ctx, uint32_t data)
{
    uint8_t m[VMK_MSG_MAX];
    ctx->ping_token = (uint16_t)(ctx->ping_token % 0xFFFFu + 1u);   /* non-zero */
    msg_init(m, VMK_TYPE_BUS, VMK_BUS_PING, 0, ctx->ping_token, 4);
    vmk_put32(m + VMK_PING_DATA, data);
    if (!vmk_fifo_send(ctx, m))
        return -1;
    vmk_fifo_notify(ctx);
    return 0;
}

void vmk_driver_gone(struct vmk_ctx *ctx)
{
    if (ctx->session == VMK_S_RUN) {
        vmk_fifo_drop_session(ctx, "driver gone", 0, 0);
        check_lost(ctx);
    }
}

void vmk_shutdown(struct vmk_ctx *ctx)
{
    reset_all(ctx);
    vmk_fifo_shutdown(ctx);
}
