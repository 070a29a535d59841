/*
 * board.c - mps2-an386 glue: CMSDK APB UARTs, SysTick, NVIC.
 */
#include "board.h"

#define REG(addr) (*(volatile uint32_t *)(addr))

/* CMSDK APB UART */
#define UART0_BASE    0x40004000u     /* doorbell */
#define UART1_BASE    0x40005000u     /* log */
#define UART_DATA     0x00u
#define UART_STATE    0x04u
#define UART_CTRL     0x08u
#define UART_INT      0x0Cu           /* read: status, write 1: clear */
#define UART_BAUDDIV  0x10u
#define UART_TXFULL   0x01u
#define UART_RXFULL   0x02u
#define UART_TX_EN    0x01u
#define UART_RX_EN    0x02u
#define UART_RX_INTEN 0x08u
#define UART_INT_RX   0x02u
#define UART0_RX_IRQ  0u

/* Cortex-M system registers */
#define SYST_CSR      0xE000E010u
#define SYST_RVR      0xE000E014u
#define SYST_CVR      0xE000E018u
#define NVIC_ISER0    0xE000E100u
#define SYSCLK_HZ     25000000u

static volatile uint32_t ticks;
static volatile uint32_t doorbell_pending;
volatile uint32_t board_doorbells;

void systick_handler(void)
{
    ticks++;
}

void uart0_rx_handler(void)
{
    /* the byte's value carries nothing: any byte is one ring */
    while (REG(UART0_BASE + UART_STATE) & UART_RXFULL)
        (void)REG(UART0_BASE + UART_DATA);
    REG(UART0_BASE + UART_INT) = UART_INT_RX;
    doorbell_pending = 1;
    board_doorbells++;
}

void board_init(void)
{
    REG(UART1_BASE + UART_BAUDDIV) = 16;
    REG(UART1_BASE + UART_CTRL) = UART_TX_EN;
    REG(UART0_BASE + UART_BAUDDIV) = 16;
    REG(UART0_BASE + UART_CTRL) = UART_TX_EN | UART_RX_EN | UART_RX_INTEN;
    REG(NVIC_ISER0) = 1u << UART0_RX_IRQ;
    REG(SYST_RVR) = SYSCLK_HZ / 1000u - 1u;   /* 1 ms */
    REG(SYST_CVR) = 0;
    REG(SYST_CSR) = 7u;                       /* processor clock, interrupt, enable */
}

uint32_t board_ticks(void)
{
    return ticks;
}

static void log_putc(char c)
{
    /* bounded: a log that cannot drain loses characters, never stalls serving */
    for (unsigned i = 0; i < 100000u && (REG(UART1_BASE + UART_STATE) & UART_TXFULL); i++)
        ;
    REG(UART1_BASE + UART_DATA) = (uint8_t)c;
}

void board_log(const char *s)
{
    while (*s)
        log_putc(*s++);
}

void board_log_hex(uint32_t v)
{
    static const char digits[] = "0123456789abcdef";
    log_putc('0');
    log_putc('x');
    for (int shift = 28; shift >= 0; shift -= 4)
        log_putc(digits[(v >> shift) & 0xFu]);
}

void board_ring_host(void *arg)
{
    (void)arg;
    /* TX still full: a ring is already on its way; rings coalesce */
    if (!(REG(UART0_BASE + UART_STATE) & UART_TXFULL))
        REG(UART0_BASE + UART_DATA) = 1;
}

void board_wait_for_doorbell(void)
{
    /* Interrupts masked around the check: a doorbell arriving between the
     * check and WFI still wakes WFI (pending interrupt), so none is lost. */
    __asm volatile("cpsid i" ::: "memory");
    if (!doorbell_pending)
        __asm volatile("wfi" ::: "memory");
    doorbell_pending = 0;
    __asm volatile("cpsie i" ::: "memory");
}
