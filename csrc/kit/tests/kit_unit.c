/*
 * kit_unit.c - unit tests of the device kit, with a small driver
 * (test_driver.c) playing the other side in the same address space.  Built
 * by tests/test_kit_c.py with -Wall -Wextra -Werror, and again with
 * -fsanitize=address,undefined: every hostile case below must end without a
 * sanitizer report, with the kit still answering PING and still serving the
 * other device.
 *
 * Output: one line per failed check, then "kit_unit: N checks, M failed".
 * Exit status 0 only when nothing failed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_driver.h"

static int checks, failures;
#define CHECK(cond) do { checks++; if (!(cond)) { failures++; \
    printf("FAIL %s:%d: %s\n", __func__, __LINE__, #cond); } } while (0)

/* ---- expected data ------------------------------------------------------------------------ */
static uint32_t pat_state = VMK_RNG_PATTERN_SEED;
static uint8_t pat_word[4];
static unsigned pat_used = 4;
static uint8_t pattern_next(void)
{
    if (pat_used == 4) {
        uint32_t x = pat_state;
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        pat_state = x;
        put32(pat_word, x);
        pat_used = 0;
    }
    return pat_word[pat_used++];
}

/* ---- device operations used by several tests ---------------------------------------------------- */
static struct dq rngq, i2cq;

static bool rng_read(unsigned len, bool check_pattern)
{
    uint64_t buf = ram_alloc(len, 16);
    uint64_t a[1] = {buf};
    uint32_t l[1] = {len};
    bool w[1] = {true};
    uint32_t id, got;
    memset(ram_ptr(buf), 0, len);
    unsigned head = dq_add(&rngq, 1, a, l, w);
    dq_publish(&rngq, head);
    dq_kick(&rngq);
    if (!dq_used(&rngq, &id, &got) || id != head || got != len)
        return false;
    if (check_pattern)
        for (unsigned i = 0; i < len; i++)
            if (ram_ptr(buf)[i] != pattern_next())
                return false;
    return true;
}

/* One I2C request; returns the status byte (0xEE when not completed). */
static uint8_t i2c_xfer(uint8_t addr7, bool rd, uint32_t flags_extra, uint8_t *data, uint32_t len)
{
    uint64_t hdr = ram_alloc(8, 8), buf = ram_alloc(len ? len : 1, 8), st = ram_alloc(1, 1);
    uint8_t *h = ram_ptr(hdr);
    put16(h, (uint16_t)(addr7 << 1));
    put16(h + 2, 0);
    put32(h + 4, (rd ? VMK_I2C_FLAGS_M_RD : 0) | flags_extra);
    if (!rd && len)
        memcpy(ram_ptr(buf), data, len);
    ram_ptr(st)[0] = 0xEE;
    uint64_t a[3] = {hdr, buf, st};
    uint32_t l[3] = {8, len, 1};
    bool w[3] = {false, rd, true};
    unsigned head;
    if (len) {
        head = dq_add(&i2cq, 3, a, l, w);
    } else {
        uint64_t a2[2] = {hdr, st};
        uint32_t l2[2] = {8, 1};
        bool w2[2] = {false, true};
        head = dq_add(&i2cq, 2, a2, l2, w2);
    }
    dq_publish(&i2cq, head);
    dq_kick(&i2cq);
    uint32_t id, used;
    while (dq_used(&i2cq, &id, &used))
        ;
    if (rd && len)
        memcpy(data, ram_ptr(buf), len);
    return ram_ptr(st)[0];
}

static bool eeprom_roundtrip(uint8_t at, uint8_t seed)
{
    uint8_t wr[9], back[8];
    wr[0] = at;
    for (int i = 0; i < 8; i++)
        wr[1 + i] = (uint8_t)(seed + i * 7);
    if (i2c_xfer(0x50, false, 0, wr, 9) != VMK_I2C_MSG_OK)
        return false;
    if (i2c_xfer(0x50, false, 0, &at, 1) != VMK_I2C_MSG_OK)
        return false;
    if (i2c_xfer(0x50, true, 0, back, 8) != VMK_I2C_MSG_OK)
        return false;
    return memcmp(back, wr + 1, 8) == 0;
}

/* What must hold after every hostile case. */
static void still_serving(const char *after)
{
    bool ok_ping = ping(0x1234abcd);
    bool ok_i2c = eeprom_roundtrip(0x20, 0x31);
    if (!ok_ping || !ok_i2c)
        printf("  after %s: ping %d, i2c %d\n", after, ok_ping, ok_i2c);
    CHECK(ok_ping);
    CHECK(ok_i2c);
}

static void setup(bool with_ring)
{
    struct vmk_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    memset(fifo_mem, 0xA5, sizeof(fifo_mem));   /* stale garbage from an earlier life */
    ram_cursor = 0;
    cfg.fifo = fifo_mem;
    cfg.fifo_size = FIFO_SIZE;
    cfg.memtype = VM_MEM_NORMAL;
    cfg.windows[0] = (struct vmk_window){RAM_BUS, RAM_SIZE, ram};
    cfg.num_windows = 1;
    cfg.ring = with_ring ? ring_cb : NULL;
    if (vmk_init(&ctx, &cfg) != 0) {
        printf("vmk_init failed\n");
        exit(2);
    }
    vmk_rng_init(&rng, NULL, NULL);
    vmk_i2c_init(&i2c);
    vmk_eeprom_init(&eeprom);
    vmk_lm75_init(&lm75, 50);
    vmk_i2c_attach(&i2c, &eeprom.t, 0x50);
    vmk_i2c_attach(&i2c, &lm75.t, 0x48);
    memset(&cfgdev, 0, sizeof(cfgdev));
    cfgdev.dev = (struct vmk_device){.ops = &cfg_ops, .name = "cfg", .device_id = 99, .config_size = 16,
                                     .num_queues = 1, .queue_max_size = 8};
    for (int i = 0; i < 16; i++)
        cfgdev.cfg[i] = (uint8_t)i;
    CHECK(vmk_add_device(&ctx, 0, &rng.dev) == 0);
    CHECK(vmk_add_device(&ctx, 1, &i2c.dev) == 0);
    CHECK(vmk_add_device(&ctx, 2, &cfgdev.dev) == 0);
    memset(used_events, 0, sizeof(used_events));
    memset(config_events, 0, sizeof(config_events));
    pat_state = VMK_RNG_PATTERN_SEED;
    pat_used = 4;
}

static void bring_up(void)
{
    CHECK(drv_connect());
    CHECK(probe(0, F_RING, &rngq, 1, 16) == 0x0f);
    CHECK(probe(1, F_RING | 1, &i2cq, 1, 32) == 0x0f);
}

/* ---- tests ------------------------------------------------------------------------------------- */

static void test_layout_and_handshake(void)
{
    setup(false);
    uint8_t *lay = fifo_mem;
    CHECK(get16(lay) == VMAMP_LAYOUT_MAGIC);
    CHECK(get16(lay + 2) == 64 && get16(lay + 4) == 1 && get16(lay + 6) == 0);
    CHECK(get16(lay + VMAMP_OFF_NUM_ELEMENTS) == 63 && get16(lay + VMAMP_OFF_SIZE_ELEMENTS) == 64);
    CHECK(get64(lay + VMAMP_OFF_DEV_HEAD) == 64 && get64(lay + VMAMP_OFF_DRV_HEAD) == 72);
    CHECK(get64(lay + VMAMP_OFF_DEV_ELEMENTS) == 80 && get64(lay + VMAMP_OFF_DRV_ELEMENTS) == 80 + 63 * 64);
    CHECK(get64(lay + VMAMP_OFF_DEV_NOTIF) == 0 && get64(lay + VMAMP_OFF_DRV_NOTIF) == 0);
    CHECK(get16(lay + 64) == VMAMP_QUEUE_MAGIC);
    CHECK(get16(lay + 66) == (VMAMP_STATUS_F_SUPPRESS | VMAMP_STATE_INIT));
    /* garbage in the driver's head (magic A5A5): the device must wait */
    poll_n(5);
    CHECK(ctx.session == VMK_S_INIT);
    CHECK(drv_connect());
    CHECK(ctx.stats.sessions == 1);
    /* too small / misaligned windows are refused */
    struct vmk_ctx c2;
    struct vmk_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.fifo = fifo_mem;
    cfg.fifo_size = 64;
    CHECK(vmk_init(&c2, &cfg) == -1);
    cfg.fifo = fifo_mem + 2;
    cfg.fifo_size = FIFO_SIZE - 8;
    CHECK(vmk_init(&c2, &cfg) == -1);
}

static void test_bus_messages(void)
{
    uint8_t r[64], p[4];
    setup(false);
    CHECK(drv_connect());
    put16(p, 0);
    put16(p + 2, 32);
    CHECK(request(2, VMK_BUS_GET_DEVICES, 0, p, 4, r) == 18);
    CHECK(get16(r + 8) == 0 && get16(r + 10) == 32 && get16(r + 12) == 32);
    CHECK(r[14] == 0x07 && r[15] == 0 && r[16] == 0 && r[17] == 0);
    put16(p, 2);
    put16(p + 2, 8);     /* window [2, 10): devices 2 only */
    CHECK(request(2, VMK_BUS_GET_DEVICES, 0, p, 4, r) == 15 && r[14] == 0x01);
    put16(p, 65528);
    put16(p + 2, 16);    /* next_offset wraps to 8 */
    CHECK(request(2, VMK_BUS_GET_DEVICES, 0, p, 4, r) == 16 && get16(r + 12) == 8);
    uint32_t bad = ctx.stats.rx_malformed;
    put16(p, 0);
    put16(p + 2, 7);     /* not a multiple of 8 */
    CHECK(request(2, VMK_BUS_GET_DEVICES, 0, p, 4, r) == 0);
    put16(p + 2, 400 + 8);  /* an answer that does not fit a slot */
    CHECK(request(2, VMK_BUS_GET_DEVICES, 0, p, 4, r) == 0);
    CHECK(ctx.stats.rx_malformed == bad + 2);
    CHECK(ping(0xfeedf00d));
    /* absent device: harmless zeros */
    CHECK(request(0, VMK_GET_DEVICE_INFO, 7, NULL, 0, r) == 32 && get32(r + 8) == 0 && get32(r + 16) == 64);
    CHECK(req32(VMK_GET_VQUEUE, 7, 0, 12) == 0);
}

static void test_rng(void)
{
    setup(true);
    bring_up();
    uint8_t r[64];
    CHECK(request(0, VMK_GET_DEVICE_INFO, 0, NULL, 0, r) == 32);
    CHECK(get32(r + 8) == 4 && get32(r + 12) == VMK_VENDOR_ID && get32(r + 16) == 64 && get32(r + 24) == 1);
    unsigned before = used_events[0];
    CHECK(rng_read(100, true));
    CHECK(rng_read(4096, true));
    CHECK(rng_read(3, true));
    CHECK(used_events[0] == before + 3);
    CHECK(rings_seen == 0);  /* the driver never said it sleeps: no doorbell */
    /* the driver says it sleeps: the device rings */
    vm_store16(drv_qh + VMAMP_QH_OFF_STATUS, VMAMP_STATE_RUN | VMAMP_STATUS_F_SUPPRESS | VMAMP_STATUS_F_WAITING,
               VM_RELEASE);
    CHECK(rng_read(16, true));
    CHECK(rings_seen > 0);
    /* a driver without F_SUPPRESS (Linux, QEMU) is rung after every batch */
    vm_store16(drv_qh + VMAMP_QH_OFF_STATUS, VMAMP_STATE_RUN, VM_RELEASE);
    unsigned rings = rings_seen;
    CHECK(rng_read(16, true));
    CHECK(rings_seen > rings);
    /* several chains, one kick, indirect table */
    uint64_t table = ram_alloc(3 * 16, 16), b1 = ram_alloc(10, 1), b2 = ram_alloc(20, 1);
    uint8_t *t = ram_ptr(table);
    memset(t, 0, 48);
    put64(t, b1); put32(t + 8, 10); put16(t + 12, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT); put16(t + 14, 1);
    put64(t + 16, b2); put32(t + 24, 20); put16(t + 28, VIRTQ_DESC_F_WRITE);
    unsigned head = rngq.next_free;
    desc_set(&rngq, head, table, 32, VIRTQ_DESC_F_INDIRECT, 0);
    rngq.next_free = (uint16_t)((head + 1) % rngq.size);
    dq_publish(&rngq, head);
    dq_kick(&rngq);
    uint32_t id, len;
    CHECK(dq_used(&rngq, &id, &len) && id == head && len == 30);
    bool same = true;
    for (int i = 0; i < 10; i++) same &= ram_ptr(b1)[i] == pattern_next();
    for (int i = 0; i < 20; i++) same &= ram_ptr(b2)[i] == pattern_next();
    CHECK(same);
    /* a chain of many small segments: the copy continues segment after segment */
    uint64_t segs[12];
    uint32_t lens[12];
    bool wrs[12];
    for (int i = 0; i < 12; i++) {
        lens[i] = (uint32_t)(1 + i % 5);
        segs[i] = ram_alloc(lens[i], 1);
        wrs[i] = true;
    }
    head = dq_add(&rngq, 12, segs, lens, wrs);
    dq_publish(&rngq, head);
    dq_kick(&rngq);
    uint32_t total = 0;
    for (int i = 0; i < 12; i++) total += lens[i];
    CHECK(dq_used(&rngq, &id, &len) && id == head && len == total);
    same = true;
    for (int i = 0; i < 12; i++)
        for (uint32_t k = 0; k < lens[i]; k++)
            same &= ram_ptr(segs[i])[k] == pattern_next();
    CHECK(same);
    /* EVENT_IDX: used_event far ahead -> no EVENT_USED */
    put16(ram_ptr(rngq.avail) + 4 + 2 * rngq.size, (uint16_t)(rngq.last_used + 100));
    before = used_events[0];
    CHECK(rng_read(8, true));
    CHECK(used_events[0] == before);
    put16(ram_ptr(rngq.avail) + 4 + 2 * rngq.size, 0);
    /* teardown as Linux: RESET_VQUEUE, status 0 */
    CHECK(req32(VMK_RESET_VQUEUE, 0, 0, 6) == 8);
    CHECK(req32(VMK_SET_DEVICE_STATUS, 0, 0, 8) == 0);
    CHECK(req32(VMK_GET_VQUEUE, 0, 0, 16) == 0);   /* cur_size 0 */
}

static void test_i2c(void)
{
    setup(false);
    bring_up();
    CHECK(eeprom_roundtrip(0x10, 0xA5));
    CHECK(eeprom_roundtrip(0xF8, 0x11));
    /* page wrap: 10 bytes at 0x06 overwrite the page start */
    uint8_t wr[11] = {0x06, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, at = 0x00, back[8];
    CHECK(i2c_xfer(0x50, false, 0, wr, 11) == VMK_I2C_MSG_OK);
    CHECK(i2c_xfer(0x50, false, 0, &at, 1) == VMK_I2C_MSG_OK);
    CHECK(i2c_xfer(0x50, true, 0, back, 8) == VMK_I2C_MSG_OK);
    uint8_t expect[8] = {3, 4, 5, 6, 7, 8, 9, 10};
    CHECK(memcmp(back, expect, 8) == 0);
    /* LM75 temperature register: 25.0 degC = 0x19 0x00 */
    uint8_t reg = 0, temp[2];
    CHECK(i2c_xfer(0x48, false, 0, &reg, 1) == VMK_I2C_MSG_OK);
    CHECK(i2c_xfer(0x48, true, 0, temp, 2) == VMK_I2C_MSG_OK && temp[0] == 0x19 && temp[1] == 0);
    /* NACK and malformed requests */
    CHECK(i2c_xfer(0x51, true, 0, back, 4) == VMK_I2C_MSG_ERR);
    CHECK(i2c_xfer(0x50, true, 0x80, back, 4) == VMK_I2C_MSG_ERR);   /* reserved flag */
    CHECK(i2c.malformed == 1);
    CHECK(i2c_xfer(0x50, false, 0, NULL, 0) == VMK_I2C_MSG_OK);     /* zero-length write */
    /* FAIL_NEXT: a NACK in a group fails the rest of it unexecuted */
    uint8_t w2[2] = {0x40, 0x77};
    CHECK(i2c_xfer(0x51, false, VMK_I2C_FLAGS_FAIL_NEXT, w2, 2) == VMK_I2C_MSG_ERR);
    CHECK(i2c_xfer(0x50, false, 0, w2, 2) == VMK_I2C_MSG_ERR);       /* last of the group */
    CHECK(eeprom.mem[0x40] == 0xFF);
    CHECK(i2c_xfer(0x50, false, 0, w2, 2) == VMK_I2C_MSG_OK);        /* a new group */
    CHECK(eeprom.mem[0x40] == 0x77);
    /* without ZERO_LENGTH_REQUEST the driver is refused */
    struct dq q2;
    CHECK(!(probe(1, F_RING, &q2, 1, 8) & VMK_ST_FEATURES_OK));
}

static void test_config(void)
{
    uint8_t r[64], p[32];
    setup(false);
    CHECK(drv_connect());
    put32(p, 4);
    put32(p + 4, 4);
    CHECK(request(0, VMK_GET_CONFIG, 2, p, 8, r) == 24 && get32(r + 16) == 4 && r[20] == 4 && r[23] == 7);
    put32(p, 14);
    put32(p + 4, 4);   /* past the end: no data */
    CHECK(request(0, VMK_GET_CONFIG, 2, p, 8, r) == 20 && get32(r + 16) == 0);
    put32(p, 0xFFFFFFFFu);
    put32(p + 4, 2);   /* offset + length overflows 32 bits */
    CHECK(request(0, VMK_GET_CONFIG, 2, p, 8, r) == 20 && get32(r + 16) == 0);
    put32(p, 0); put32(p + 4, 8); put32(p + 8, 2); p[12] = 0xAA; p[13] = 0xBB;
    CHECK(request(0, VMK_SET_CONFIG, 2, p, 14, r) == 20 && get32(r + 16) == 2 && cfgdev.cfg[8] == 0xAA);
    put32(p, 5);   /* wrong generation */
    CHECK(request(0, VMK_SET_CONFIG, 2, p, 14, r) == 20 && get32(r + 16) == 0);
    put32(p, 0); put32(p + 4, 0);   /* read-only part */
    CHECK(request(0, VMK_SET_CONFIG, 2, p, 14, r) == 20 && get32(r + 16) == 0);
    put32(p + 4, 8); put32(p + 8, 40);   /* length beyond the message: dropped */
    CHECK(request(0, VMK_SET_CONFIG, 2, p, 14, r) == 0);
    vmk_config_changed(&cfgdev.dev);
    put32(p, 0);
    put32(p + 4, 0);
    CHECK(request(0, VMK_GET_CONFIG, 2, p, 8, r) == 20 && get32(r + 8) == 1);
    /* features: 12 blocks fit, block indices beyond 64 bits read 0, huge counts are capped */
    put32(p, 1); put32(p + 4, 0xFFFFFFFFu);
    CHECK(request(0, VMK_GET_DEVICE_FEATURES, 2, p, 8, r) == 64 && get32(r + 12) == 12 && get32(r + 16) == 1
          && get32(r + 20) == 0);
    put32(p, 0); put32(p + 4, 100);   /* announces 100 words, carries none: dropped */
    CHECK(request(0, VMK_SET_DRIVER_FEATURES, 2, p, 8, r) == 0);
}

/* Hostile rings: each breaks the rng queue; the device then reports
 * DEVICE_NEEDS_RESET, and PING and the i2c device keep working.  A reset and
 * a new probe bring the rng back. */
enum attack { A_OUTSIDE, A_LOOP, A_AVAIL_JUMP, A_HEAD, A_NESTED, A_IND_LEN, A_IND_FEAT, A_ORDER, A_HUGE,
              A_IND_OUTSIDE, A_COUNT };

static void attack(enum attack a)
{
    uint64_t buf = ram_alloc(64, 16), table = ram_alloc(64, 16);
    unsigned h = rngq.next_free;
    switch (a) {
    case A_OUTSIDE: desc_set(&rngq, h, 0x1000, 64, VIRTQ_DESC_F_WRITE, 0); break;
    case A_LOOP: desc_set(&rngq, h, buf, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, (uint16_t)h); break;
    case A_AVAIL_JUMP:
        vm_store16(ram_ptr(rngq.avail) + 2, (uint16_t)(rngq.avail_idx + 1000), VM_RELEASE);
        dq_kick(&rngq);
        return;
    case A_HEAD:
        put16(ram_ptr(rngq.avail) + 4 + 2 * (rngq.avail_idx % rngq.size), 999);
        rngq.avail_idx++;
        vm_store16(ram_ptr(rngq.avail) + 2, rngq.avail_idx, VM_RELEASE);
        dq_kick(&rngq);
        return;
    case A_NESTED:
        put64(ram_ptr(table), table); put32(ram_ptr(table) + 8, 16); put16(ram_ptr(table) + 12, VIRTQ_DESC_F_INDIRECT);
        desc_set(&rngq, h, table, 16, VIRTQ_DESC_F_INDIRECT, 0);
        break;
    case A_IND_LEN: desc_set(&rngq, h, table, 17, VIRTQ_DESC_F_INDIRECT, 0); break;
    case A_IND_FEAT: break;   /* probed without INDIRECT below */
    case A_ORDER:
        desc_set(&rngq, h, buf, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, (uint16_t)((h + 1) % rngq.size));
        desc_set(&rngq, (h + 1) % rngq.size, buf, 8, 0, 0);
        break;
    case A_HUGE: desc_set(&rngq, h, buf, 0xFFFFFFFFu, VIRTQ_DESC_F_WRITE, 0); break;
    case A_IND_OUTSIDE: desc_set(&rngq, h, 0xFFFFFFFFFFFFFFF0ull, 64, VIRTQ_DESC_F_INDIRECT, 0); break;
    default: break;
    }
    if (a == A_IND_FEAT) {
        put64(ram_ptr(table), buf); put32(ram_ptr(table) + 8, 8); put16(ram_ptr(table) + 12, VIRTQ_DESC_F_WRITE);
        desc_set(&rngq, h, table, 16, VIRTQ_DESC_F_INDIRECT, 0);
    }
    dq_publish(&rngq, h);
    dq_kick(&rngq);
}

static void test_hostile_rings(void)
{
    static const char *names[A_COUNT] = {"buffer outside the window", "descriptor loop", "avail.idx jump",
                                         "head out of range", "nested indirect", "indirect length",
                                         "indirect without the feature", "readable after writable",
                                         "4 GiB descriptor", "indirect table outside"};
    for (int a = 0; a < A_COUNT; a++) {
        setup(false);
        CHECK(drv_connect());
        uint64_t want = a == A_IND_FEAT ? ((1ull << 32) | (1ull << 29)) : F_RING;
        CHECK(probe(0, want, &rngq, 1, 16) == 0x0f);
        CHECK(probe(1, F_RING | 1, &i2cq, 1, 32) == 0x0f);
        CHECK(rng_read(32, true));
        unsigned ev = config_events[0];
        attack((enum attack)a);
        drain();
        uint32_t st = req32(VMK_GET_DEVICE_STATUS, 0, 0, 8);
        if (!(st & VMK_ST_NEEDS_RESET))
            printf("  attack '%s' did not break the queue (status %#x)\n", names[a], st);
        CHECK(st & VMK_ST_NEEDS_RESET);
        CHECK(config_events[0] == ev + 1 && get32(last_event_config + 8) == st);
        still_serving(names[a]);
        /* a kick on the broken device answers with EVENT_CONFIG, nothing else */
        dq_kick(&rngq);
        CHECK(config_events[0] == ev + 2);
        /* reset and probe again: served again */
        CHECK(probe(0, F_RING, &rngq, 1, 16) == 0x0f);
        pat_state = rng.pattern;
        memcpy(pat_word, rng.word, 4);
        pat_used = rng.word_used;
        CHECK(rng_read(64, true));
    }
    /* SET_VQUEUE rings outside the windows, misaligned, bad size */
    setup(false);
    CHECK(drv_connect());
    CHECK(probe(1, F_RING | 1, &i2cq, 1, 32) == 0x0f);
    uint8_t p[40] = {0}, r[64];
    put32(p + 8, 16); put64(p + 16, 0x10); put64(p + 24, RAM_BUS); put64(p + 32, RAM_BUS + 4096);
    CHECK(request(0, VMK_SET_VQUEUE, 0, p, 40, r) == 8);
    CHECK(req32(VMK_GET_DEVICE_STATUS, 0, 0, 8) & VMK_ST_NEEDS_RESET);
    CHECK(req32(VMK_SET_DEVICE_STATUS, 0, 0, 8) == 0);
    put64(p + 16, RAM_BUS + 8);   /* misaligned descriptor table */
    CHECK(request(0, VMK_SET_VQUEUE, 0, p, 40, r) == 8);
    CHECK(req32(VMK_GET_DEVICE_STATUS, 0, 0, 8) & VMK_ST_NEEDS_RESET);
    CHECK(req32(VMK_SET_DEVICE_STATUS, 0, 0, 8) == 0);
    put64(p + 16, RAM_BUS); put32(p + 8, 12);   /* not a power of two */
    CHECK(request(0, VMK_SET_VQUEUE, 0, p, 40, r) == 8);
    CHECK(req32(VMK_GET_DEVICE_STATUS, 0, 0, 8) & VMK_ST_NEEDS_RESET);
    put32(p, 5);   /* a queue the device does not have */
    CHECK(request(0, VMK_SET_VQUEUE, 1, p, 40, r) == 8);
    CHECK(req32(VMK_GET_DEVICE_STATUS, 1, 0, 8) & VMK_ST_NEEDS_RESET);
    CHECK(ping(7));
}

static void test_hostile_fifo(void)
{
    uint8_t m[64];
    setup(false);
    bring_up();
    /* garbage messages: bad sizes, unknown ids, responses, events */
    static const uint8_t junk[][8] = {
        {0, 0x02, 0, 0, 1, 0, 3, 0},      /* msg_size below the header */
        {0, 0x02, 0, 0, 1, 0, 200, 0},    /* beyond the slot */
        {0, 0x7F, 0, 0, 1, 0, 8, 0},      /* unknown transport id */
        {0, 0x0A, 0, 0, 1, 0, 16, 0},     /* SET_VQUEUE too short */
        {1, 0x02, 0, 0, 1, 0, 8, 0},      /* a response from the driver */
        {2, 0x40, 0, 0, 0, 0, 12, 0},     /* EVENT_DEVICE from the driver */
        {3, 0x02, 0, 0, 0, 0, 8, 0},      /* a GET_DEVICES response */
        {0xFC, 0x42, 0, 0, 0, 0, 12, 0},  /* EVENT_USED from the driver */
    };
    uint32_t bad = ctx.stats.rx_malformed + ctx.stats.rx_unexpected;
    for (size_t i = 0; i < sizeof(junk) / sizeof(junk[0]); i++) {
        memset(m, 0, 64);
        memcpy(m, junk[i], 8);
        drv_send_raw(m);
    }
    drain();
    CHECK(ctx.stats.rx_malformed + ctx.stats.rx_unexpected == bad + 8);
    still_serving("junk messages");
    /* random slots */
    uint32_t x = 12345;
    for (int i = 0; i < 20000; i++) {
        for (int k = 0; k < 64; k++) {
            x ^= x << 13; x ^= x >> 17; x ^= x << 5;
            m[k] = (uint8_t)x;
        }
        if (i % 3 == 0) m[6] = (uint8_t)(8 + x % 56), m[7] = 0;   /* plausible sizes too */
        if (i % 5 == 0) m[2] = (uint8_t)(x % 3), m[3] = 0;          /* existing devices */
        drv_send_raw(m);
        if (i % 32 == 31)
            drain();
    }
    drain();
    /* a random SET_DEVICE_STATUS 0 or SET_VQUEUE may have reset a device: probe again */
    CHECK(ctx.session == VMK_S_RUN);
    CHECK(probe(1, F_RING | 1, &i2cq, 1, 32) == 0x0f);
    still_serving("20000 random messages");
    /* producer index out of range: the session is dropped, devices reset */
    qh_set(drv_qh, VMAMP_QH_OFF_PROD, 1000);
    poll_n(2);
    CHECK(ctx.session != VMK_S_RUN);
    CHECK(ctx.stats.fifo_errors == 1);
    CHECK(req32(VMK_GET_DEVICE_STATUS, 1, 0, 8) == 0xDEADBEEFu);   /* no answer now */
    CHECK(drv_connect());
    CHECK(ctx.slots[1].status == 0);   /* devices were reset */
    CHECK(probe(1, F_RING | 1, &i2cq, 1, 32) == 0x0f);
    still_serving("producer index out of range");
    /* consumer index running ahead of what the device sent */
    qh_set(drv_qh, VMAMP_QH_OFF_CONS, (uint16_t)((drv_cons + 10) % n_slots));
    poll_n(2);
    CHECK(ctx.session != VMK_S_RUN && ctx.stats.fifo_errors == 2);
    CHECK(drv_connect());
    CHECK(probe(1, F_RING | 1, &i2cq, 1, 32) == 0x0f);
    still_serving("consumer index jump");
    /* a driver that never reads: the device stops taking requests, never blocks */
    for (int i = 0; i < 200; i++) {
        uint8_t p[4] = {1, 2, 3, 4};
        build(m, 2, VMK_BUS_PING, 0, p, 4);
        if ((uint16_t)((drv_prod + 1) % n_slots) == vm_load16(dev_qh + VMAMP_QH_OFF_CONS, VM_ACQUIRE))
            break;
        drv_send_raw(m);
        vmk_poll(&ctx);
    }
    CHECK(ctx.stats.tx_full > 0);
    drain();
    drain();
    drain();
    still_serving("a driver that stopped reading");
}

static void test_driver_restart(void)
{
    setup(false);
    bring_up();
    CHECK(rng_read(16, true));
    /* Linux unload: the driver's head goes SHUTDOWN, nothing else */
    qh_set(drv_qh, VMAMP_QH_OFF_STATUS, VMAMP_STATE_SHUTDOWN);
    poll_n(2);
    CHECK(ctx.session == VMK_S_READY);     /* reset, indices zero, READY for the next driver */
    CHECK(ctx.slots[0].status == 0 && ctx.slots[0].vq[0].size == 0);
    CHECK(get16(fifo_mem + 64 + 4) == 0 && get16(fifo_mem + 64 + 6) == 0);
    CHECK(drv_connect());
    CHECK(ctx.stats.sessions == 2);
    CHECK(probe(0, F_RING, &rngq, 1, 16) == 0x0f);
    CHECK(probe(1, F_RING | 1, &i2cq, 1, 32) == 0x0f);
    pat_state = rng.pattern;
    memcpy(pat_word, rng.word, 4);
    pat_used = rng.word_used;
    CHECK(rng_read(16, true));
    /* re-registration straight from RUN to INIT */
    qh_set(drv_qh, VMAMP_QH_OFF_STATUS, VMAMP_STATE_INIT);
    poll_n(2);
    CHECK(ctx.session == VMK_S_READY);
    CHECK(drv_connect());
    CHECK(ctx.slots[1].status == 0);
    CHECK(probe(1, F_RING | 1, &i2cq, 1, 32) == 0x0f);
    still_serving("driver restart");
    /* hot-plug */
    CHECK(vmk_remove_device(&ctx, 2) == 0);
    uint8_t m[64];
    int seen = 0;
    while (drv_recv(m))
        seen += m[0] == 2 && m[1] == VMK_BUS_EVENT_DEVICE && get16(m + 8) == 2 && get16(m + 10) == VMK_DEVICE_REMOVED;
    CHECK(seen == 1);
    CHECK(vmk_add_device(&ctx, 2, &cfgdev.dev) == 0);
    CHECK(vmk_add_device(&ctx, 2, &cfgdev.dev) == -1);
    CHECK(vmk_add_device(&ctx, 32, &cfgdev.dev) == -1);
    /* shutdown */
    vmk_shutdown(&ctx);
    CHECK((get16(fifo_mem + 66) & VMAMP_STATE_MASK) == VMAMP_STATE_SHUTDOWN);
    CHECK(vmk_poll(&ctx) == 0);
}

static void test_sleep_protocol(void)
{
    setup(true);
    bring_up();
    CHECK(vmk_prepare_sleep(&ctx));
    CHECK(get16(fifo_mem + 66) & VMAMP_STATUS_F_WAITING);
    vmk_woken(&ctx);
    CHECK(!(get16(fifo_mem + 66) & VMAMP_STATUS_F_WAITING));
    /* a message already waiting: do not sleep */
    uint8_t m[64], p[4] = {0};
    build(m, 2, VMK_BUS_PING, 0, p, 4);
    drv_send_raw(m);
    CHECK(!vmk_prepare_sleep(&ctx));
    CHECK(!(get16(fifo_mem + 66) & VMAMP_STATUS_F_WAITING));
    drain();
}

int main(void)
{
    test_layout_and_handshake();
    test_bus_messages();
    test_rng();
    test_i2c();
    test_config();
    test_hostile_rings();
    test_hostile_fifo();
    test_driver_restart();
    test_sleep_protocol();
    printf("kit_unit: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
