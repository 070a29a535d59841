/*
 * startup.c - vector table and reset handler for the Cortex-M4 of
 * mps2-an386: copy .data, clear .bss, run main().  Faults are logged on the
 * log UART and park the core (the host sees the firmware stop answering).
 */
#include <stdint.h>

#include "board.h"

extern uint32_t _data_start, _data_end, _data_load, _bss_start, _bss_end, _stack_top;
int main(void);
void reset_handler(void);
void systick_handler(void);
void uart0_rx_handler(void);

static void fault_handler(void)
{
    board_log("vmsgamp-m4: FAULT, halted\n");
    for (;;)
        __asm volatile("wfi");
}

static void unused_handler(void)
{
}

#define N_IRQ 32

/* Cortex-M vector table: initial stack, 15 system exceptions, N_IRQ interrupts. */
__attribute__((section(".vectors"), used))
static void (*const vectors[16 + N_IRQ])(void) = {
    (void (*)(void))(uintptr_t)&_stack_top,
    reset_handler,
    fault_handler,      /* NMI */
    fault_handler,      /* HardFault */
    fault_handler,      /* MemManage */
    fault_handler,      /* BusFault */
    fault_handler,      /* UsageFault */
    0, 0, 0, 0,
    unused_handler,     /* SVCall */
    unused_handler,     /* DebugMonitor */
    0,
    unused_handler,     /* PendSV */
    systick_handler,
    [16 + 0] = uart0_rx_handler,
    [16 + 1 ... 16 + N_IRQ - 1] = unused_handler,
};

void reset_handler(void)
{
    uint32_t *src = &_data_load, *dst = &_data_start;
    while (dst < &_data_end)
        *dst++ = *src++;
    for (dst = &_bss_start; dst < &_bss_end; dst++)
        *dst = 0;
    main();
    fault_handler();
}
