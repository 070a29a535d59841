/*
 * main.c - the vmsgamp co-processor firmware: virtio-rng (device 0) and
 * virtio-i2c with a 24C02 EEPROM at 0x50 and an LM75 at 0x48 (device 1),
 * served with the device kit over the PSRAM shared with the driver.
 *
 * Main loop: poll the kit; after the last piece of work keep polling for
 * SPIN_MS (a busy driver is answered without an interrupt), then announce
 * that we sleep (vmk_prepare_sleep) and wait for the doorbell interrupt or
 * the 1 ms tick.  A driver without a doorbell is served on the tick; the
 * tick also notices a driver leaving or arriving (the handshake rings no
 * doorbell).
 */
#include "board.h"
#include "vmk.h"
#include "vmk_models.h"

#define SPIN_MS 2u

static struct vmk_ctx ctx;
static struct vmk_rng rng;
static struct vmk_i2c i2c;
static struct vmk_eeprom eeprom;
static struct vmk_lm75 lm75;

static void log_event(void *arg, const char *what, uint32_t a, uint32_t b)
{
    (void)arg;
    board_log("vmsgamp-m4: ");
    board_log(what);
    board_log(" ");
    board_log_hex(a);
    board_log(" ");
    board_log_hex(b);
    board_log(" doorbells ");   /* UART interrupts taken so far: shows the doorbell works */
    board_log_hex(board_doorbells);
    board_log("\n");
}

int main(void)
{
    struct vmk_config cfg = {
        .fifo = (volatile uint8_t *)(BOARD_SHM_BASE + BOARD_FIFO_OFFSET),
        .fifo_size = BOARD_FIFO_SIZE,
        .memtype = VM_MEM_NORMAL,
        .windows = {
            /* bus address = the M4's physical address: local == bus */
            { BOARD_SHM_BASE + BOARD_DMA_OFFSET, BOARD_SHM_SIZE - BOARD_DMA_OFFSET,
              (volatile uint8_t *)(BOARD_SHM_BASE + BOARD_DMA_OFFSET) },
        },
        .num_windows = 1,
        .ring = board_ring_host,
        .log = log_event,
    };
    board_init();
    board_log("vmsgamp-m4: mps2-an386 firmware, virtio-msg-amp device kit\n");
    if (vmk_init(&ctx, &cfg) != 0) {
        board_log("vmsgamp-m4: vmk_init failed\n");
        return 1;
    }
    vmk_rng_init(&rng, 0, 0);
    vmk_i2c_init(&i2c);
    vmk_eeprom_init(&eeprom);
    vmk_lm75_init(&lm75, 50);   /* 25.0 degC */
    vmk_i2c_attach(&i2c, &eeprom.t, 0x50);
    vmk_i2c_attach(&i2c, &lm75.t, 0x48);
    vmk_add_device(&ctx, 0, &rng.dev);
    vmk_add_device(&ctx, 1, &i2c.dev);
    board_log("vmsgamp-m4: layout at ");
    board_log_hex(BOARD_SHM_BASE + BOARD_FIFO_OFFSET);
    board_log(", devices rng=0 i2c=1, waiting for a driver\n");

    uint32_t last_work = board_ticks();
    for (;;) {
        if (vmk_poll(&ctx) > 0) {
            last_work = board_ticks();
            continue;
        }
        if (board_ticks() - last_work < SPIN_MS)
            continue;
        if (!vmk_prepare_sleep(&ctx))
            continue;
        board_wait_for_doorbell();
        vmk_woken(&ctx);
    }
}
