/*
 * board.h - board glue of the vmsgamp co-processor firmware for QEMU's
 * mps2-an386 (Cortex-M4, 25 MHz).  This is the only part a port to another
 * board replaces: where the shared memory is, how the doorbell rings and
 * interrupts, where the log goes, and a millisecond tick.
 *
 * Shared memory: the 16 MiB PSRAM at 0x21000000, which QEMU maps from a host
 * file (-object memory-backend-file,...,share=on -machine memory-backend=...).
 *   0x21000000 + 0       8 KiB FIFO window (Gen B layout at its start)
 *   0x21000000 + 8 KiB   rings and buffers of the driver, to the end
 *
 * Doorbell: UART0 (0x40004000).  A byte from the host raises the RX
 * interrupt (IRQ 0); the firmware rings the host by sending a byte.  QEMU
 * connects it with -chardev socket,...,server=on -serial chardev:ID.
 * Log: UART1 (0x40005000), the second -serial.  The two never mix.
 */
#ifndef BOARD_H
#define BOARD_H

#include <stdbool.h>
#include <stdint.h>

#define BOARD_SHM_BASE     0x21000000u
#define BOARD_SHM_SIZE     0x01000000u
#define BOARD_FIFO_OFFSET  0x0u
#define BOARD_FIFO_SIZE    0x2000u
#define BOARD_DMA_OFFSET   0x2000u       /* rings and buffers: from here to the end */

void board_init(void);
uint32_t board_ticks(void);              /* milliseconds since boot */
void board_log(const char *s);
void board_log_hex(uint32_t v);
void board_ring_host(void *arg);         /* vmk_ring_fn */
/* Sleep until an interrupt (doorbell or tick) unless the doorbell already
 * rang; returns with the doorbell flag cleared. */
void board_wait_for_doorbell(void);
extern volatile uint32_t board_doorbells;   /* UART0 RX interrupts taken */

#endif /* BOARD_H */
