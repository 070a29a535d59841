/*
 * virtq_ref.c - plain C reference for the virtqueue benchmarks (issue 3).
 *
 * Split and packed rings between two processes (fork, one shared anonymous
 * mapping, parent = driver pinned to CPU A, child = device pinned to CPU B,
 * both busy-polling), with the same workloads as vmsgamp/_bench/virtqueue.py:
 *   percall  one 64-byte one-descriptor chain per add, published at once;
 *            the device pops and returns (publishes) each chain on its own;
 *            the driver adds while there is room and collects when full
 *   batch    the driver publishes 32 chains at a time, the device pops up to
 *            32 and publishes their used entries at once
 *   rtt      one chain in flight: add, publish, spin on the used entry
 * Layouts and access helpers are vmsgamp's own (csrc/virtq.h,
 * csrc/vmsgamp_io.h); acquire/release pairs are labelled as in
 * vmsgamp/_core/virtq/_split.pyx and _packed.pyx.  Like vmsgamp it keeps
 * private shadows (free list, indices) and checks the peer's indices and
 * ids, but it translates no buffer address and touches no payload: it
 * measures the rings.
 *
 * Usage: virtq_ref [-n CHAINS] [-r ROUNDTRIPS] [-q QSIZE] [-a CPU] [-b CPU] [-t SECS]
 * Prints one JSON object on stdout; exit 1 on error, 2 on usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "virtq.h"
#include "vmsgamp_io.h"

#define BATCH 32
#define MAXQ 32768u

static unsigned Q = 256;

/* shared mapping: [control line][split desc][avail][used] or [packed desc][events] */
struct ctl {
    volatile uint32_t child_ready;
    volatile uint32_t go;
    volatile uint32_t failed;
};

static char *shm;
#define CTL ((struct ctl *)shm)
#define DESC (shm + 4096)
#define DRV (shm + 4096 + 16 * MAXQ)          /* avail ring / driver event area */
#define DEV (shm + 4096 + 16 * MAXQ + 131072) /* used ring / device event area */
#define BUFADDR 0x100000ull

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *msg)
{
    fprintf(stderr, "virtq_ref: %s\n", msg);
    exit(1);
}

static void pin(int cpu)
{
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s))
        die("sched_setaffinity failed");
}

/* ---- split driver ------------------------------------------------------ */

static uint16_t sd_next[MAXQ], sd_free_head, sd_num_free, sd_avail_idx, sd_last_used, sd_used_shadow;

static void split_drv_init(void)
{
    memset(DESC, 0, 16 * Q);
    memset(DRV, 0, 6 + 2 * Q);
    memset(DEV, 0, 6 + 8 * Q);
    for (unsigned i = 0; i < Q; i++)
        sd_next[i] = i + 1;
    sd_free_head = 0;
    sd_num_free = Q;
    sd_avail_idx = sd_last_used = sd_used_shadow = 0;
}

static inline int split_add(uint64_t addr, uint32_t len)
{
    if (!sd_num_free)
        return 0;
    unsigned head = sd_free_head;
    char *d = DESC + 16 * head;
    vm_store64(d, addr, VM_RELAXED);
    vm_store32(d + 8, len, VM_RELAXED);
    vm_store16(d + 12, 0, VM_RELAXED);
    vm_store16(d + 14, 0, VM_RELAXED);
    sd_free_head = sd_next[head];
    sd_num_free--;
    vm_store16(DRV + 4 + 2 * (sd_avail_idx & (Q - 1)), head, VM_RELAXED);
    sd_avail_idx++;
    return 1;
}

static inline void split_publish(void)
{
    /* R1: release avail.idx; pairs with A1 (device's acquire load) */
    vm_store16(DRV + 2, sd_avail_idx, VM_RELEASE);
}

static inline int split_get(void)
{
    if (sd_last_used == sd_used_shadow) {
        /* A2: acquire used.idx; pairs with R2 (device's release store) */
        uint16_t idx = vm_load16(DEV + 2, VM_ACQUIRE);
        if ((uint16_t)(idx - sd_last_used) > (uint16_t)(sd_avail_idx - sd_last_used))
            die("split: used index jumped");
        sd_used_shadow = idx;
        if (idx == sd_last_used)
            return 0;
    }
    uint32_t id = vm_load32(DEV + 4 + 8 * (sd_last_used & (Q - 1)), VM_RELAXED);
    if (id >= Q)
        die("split: bad used id");
    sd_next[id] = sd_free_head;
    sd_free_head = id;
    sd_num_free++;
    sd_last_used++;
    return 1;
}

/* ---- split device ------------------------------------------------------ */

static uint16_t sv_next_avail, sv_next_used, sv_avail_shadow;

static inline int split_pop(unsigned *head_out)
{
    if (sv_avail_shadow == sv_next_avail) {
        /* A1: acquire avail.idx; pairs with R1 */
        uint16_t idx = vm_load16(DRV + 2, VM_ACQUIRE);
        if ((uint16_t)(idx - sv_next_used) > Q)
            die("split: avail index jumped");
        sv_avail_shadow = idx;
        if (idx == sv_next_avail)
            return 0;
    }
    unsigned head = vm_load16(DRV + 4 + 2 * (sv_next_avail & (Q - 1)), VM_RELAXED);
    if (head >= Q)
        die("split: bad head");
    unsigned i = head, ttl = Q;
    for (;;) { /* walk the chain, bounded */
        char *d = DESC + 16 * i;
        volatile uint64_t a = vm_load64(d, VM_RELAXED);
        volatile uint32_t l = vm_load32(d + 8, VM_RELAXED);
        (void)a; (void)l;
        uint16_t f = vm_load16(d + 12, VM_RELAXED);
        if (!(f & VIRTQ_DESC_F_NEXT))
            break;
        i = vm_load16(d + 14, VM_RELAXED);
        if (i >= Q || --ttl == 0)
            die("split: bad chain");
    }
    sv_next_avail++;
    *head_out = head;
    return 1;
}

static inline void split_put_used(unsigned head, uint32_t len)
{
    char *e = DEV + 4 + 8 * (sv_next_used & (Q - 1));
    vm_store32(e, head, VM_RELAXED);
    vm_store32(e + 4, len, VM_RELAXED);
    sv_next_used++;
}

static inline void split_publish_used(void)
{
    /* R2: release used.idx; pairs with A2 */
    vm_store16(DEV + 2, sv_next_used, VM_RELEASE);
}

/* ---- packed driver ------------------------------------------------------ */

static uint16_t pd_next_id[MAXQ], pd_free_id, pd_num_free, pd_next_avail, pd_last_used;
static uint8_t pd_ndesc[MAXQ];
static int pd_avail_wrap, pd_used_wrap;

static void packed_drv_init(void)
{
    memset(DESC, 0, 16 * Q);
    memset(DRV, 0, 4);
    memset(DEV, 0, 4);
    for (unsigned i = 0; i < Q; i++)
        pd_next_id[i] = i + 1;
    pd_free_id = 0;
    pd_num_free = Q;
    pd_next_avail = pd_last_used = 0;
    pd_avail_wrap = pd_used_wrap = 1;
}

static inline int packed_add(uint64_t addr, uint32_t len)
{
    if (!pd_num_free)
        return 0;
    unsigned id = pd_free_id;
    pd_free_id = pd_next_id[id];
    char *d = DESC + 16 * pd_next_avail;
    vm_store64(d, addr, VM_RELAXED);
    vm_store32(d + 8, len, VM_RELAXED);
    vm_store16(d + 12, id, VM_RELAXED);
    /* R1: release the head flags (written last); pairs with A1 */
    vm_store16(d + 14, pd_avail_wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED, VM_RELEASE);
    pd_ndesc[id] = 1;
    pd_num_free--;
    if (++pd_next_avail == Q) {
        pd_next_avail = 0;
        pd_avail_wrap ^= 1;
    }
    return 1;
}

static inline int packed_get(void)
{
    char *d = DESC + 16 * pd_last_used;
    /* A2: acquire the used flags; pairs with R2 */
    uint16_t f = vm_load16(d + 14, VM_ACQUIRE);
    int a = !!(f & VIRTQ_DESC_F_AVAIL), u = !!(f & VIRTQ_DESC_F_USED);
    if (a != u || u != pd_used_wrap)
        return 0;
    unsigned id = vm_load16(d + 12, VM_RELAXED);
    if (id >= Q || !pd_ndesc[id])
        die("packed: bad used id");
    unsigned k = pd_ndesc[id];
    pd_ndesc[id] = 0;
    pd_last_used += k;
    if (pd_last_used >= Q) {
        pd_last_used -= Q;
        pd_used_wrap ^= 1;
    }
    pd_num_free += k;
    pd_next_id[id] = pd_free_id;
    pd_free_id = id;
    return 1;
}

/* ---- packed device ------------------------------------------------------ */

static uint16_t pv_next_avail, pv_next_used;
static uint8_t pv_ndesc[MAXQ];
static int pv_avail_wrap, pv_used_wrap;

static inline int packed_pop(unsigned *id_out)
{
    char *d = DESC + 16 * pv_next_avail;
    /* A1: acquire the head flags; pairs with R1 */
    uint16_t f = vm_load16(d + 14, VM_ACQUIRE);
    int a = !!(f & VIRTQ_DESC_F_AVAIL), u = !!(f & VIRTQ_DESC_F_USED);
    if (a != pv_avail_wrap || u == pv_avail_wrap)
        return 0;
    unsigned n = 1, pos = pv_next_avail;
    int w = pv_avail_wrap;
    for (;;) { /* walk, bounded by the queue size */
        volatile uint64_t ad = vm_load64(d, VM_RELAXED);
        volatile uint32_t l = vm_load32(d + 8, VM_RELAXED);
        (void)ad; (void)l;
        if (!(f & VIRTQ_DESC_F_NEXT))
            break;
        if (++pos == Q) {
            pos = 0;
            w ^= 1;
        }
        if (++n > Q)
            die("packed: chain too long");
        d = DESC + 16 * pos;
        f = vm_load16(d + 14, VM_RELAXED);
    }
    unsigned id = vm_load16(d + 12, VM_RELAXED);
    if (id >= Q || pv_ndesc[id])
        die("packed: bad buffer id");
    pv_ndesc[id] = n;
    pv_next_avail += n;
    if (pv_next_avail >= Q) {
        pv_next_avail -= Q;
        pv_avail_wrap ^= 1;
    }
    *id_out = id;
    return 1;
}

static inline void packed_put_used(unsigned id, uint32_t len)
{
    char *d = DESC + 16 * pv_next_used;
    unsigned k = pv_ndesc[id];
    pv_ndesc[id] = 0;
    vm_store32(d + 8, len, VM_RELAXED);
    vm_store16(d + 12, id, VM_RELAXED);
    /* R2: release the used flags; pairs with A2 */
    vm_store16(d + 14, pv_used_wrap ? (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : 0, VM_RELEASE);
    pv_next_used += k;
    if (pv_next_used >= Q) {
        pv_next_used -= Q;
        pv_used_wrap ^= 1;
    }
}

/* ---- workloads ------------------------------------------------------------ */

enum fmt { SPLIT, PACKED };
enum work { PERCALL, BATCHED, RTT };

static void device_loop(enum fmt fmt, enum work work, uint64_t n)
{
    sv_next_avail = sv_next_used = sv_avail_shadow = 0;
    pv_next_avail = pv_next_used = 0;
    pv_avail_wrap = pv_used_wrap = 1;
    memset(pv_ndesc, 0, sizeof pv_ndesc);
    unsigned ids[BATCH];
    uint64_t done = 0;
    CTL->child_ready = 1;
    while (!CTL->go)
        vm_cpu_relax();
    while (done < n) {
        unsigned k = 0;
        unsigned lim = work == BATCHED ? BATCH : 1;
        if (fmt == SPLIT) {
            while (k < lim && split_pop(&ids[k]))
                k++;
            for (unsigned i = 0; i < k; i++)
                split_put_used(ids[i], 0);
            if (k)
                split_publish_used();
        } else {
            while (k < lim && packed_pop(&ids[k]))
                k++;
            for (unsigned i = 0; i < k; i++)
                packed_put_used(ids[i], 0);
        }
        if (!k)
            vm_cpu_relax(); /* idle: back off the driver's lines */
        done += k;
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* returns chains/s, or p50 in us for RTT (nearest rank, like the harness) */
static double run(enum fmt fmt, enum work work, uint64_t n, int cpu_a, int cpu_b, unsigned secs)
{
    CTL->child_ready = 0;
    CTL->go = 0;
    if (fmt == SPLIT)
        split_drv_init();
    else
        packed_drv_init();
    uint64_t warm = work == RTT ? (n / 10 > 100 ? n / 10 : 100) : 0;
    uint64_t total = n + warm;
    pid_t pid = fork();
    if (pid < 0)
        die("fork failed");
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        alarm(secs);
        pin(cpu_b);
        device_loop(fmt, work, total);
        _exit(0);
    }
    pin(cpu_a);
    while (!CTL->child_ready)
        vm_cpu_relax();
    CTL->go = 1;
    double result = 0;
    if (work == RTT) {
        uint64_t *s = malloc(total * sizeof *s);
        if (!s)
            die("out of memory");
        for (uint64_t i = 0; i < total; i++) {
            uint64_t t0 = now_ns();
            if (fmt == SPLIT) {
                split_add(BUFADDR, 64);
                split_publish();
                while (!split_get())
                    vm_cpu_relax();
            } else {
                packed_add(BUFADDR, 64);
                while (!packed_get())
                    vm_cpu_relax();
            }
            s[i] = now_ns() - t0;
        }
        qsort(s + warm, n, sizeof *s, cmp_u64);
        uint64_t rank = (n + 1) / 2; /* nearest rank, p50 */
        result = s[warm + (rank ? rank - 1 : 0)] / 1000.0;
        free(s);
    } else {
        uint64_t sent = 0, got = 0, t0 = now_ns();
        while (got < n) {
            if (work == PERCALL) {
                if (sent < n && (fmt == SPLIT ? (split_add(BUFADDR, 64) ? (split_publish(), 1) : 0)
                                              : packed_add(BUFADDR, 64))) {
                    sent++;
                    continue;
                }
                uint64_t before = got;
                while (fmt == SPLIT ? split_get() : packed_get())
                    got++;
                if (got == before)
                    vm_cpu_relax(); /* ring full, nothing back yet */
            } else {
                unsigned k = 0;
                while (sent < n && k < BATCH && (fmt == SPLIT ? split_add(BUFADDR, 64) : packed_add(BUFADDR, 64))) {
                    k++;
                    sent++;
                }
                if (k && fmt == SPLIT)
                    split_publish();
                if (k < BATCH) {
                    uint64_t before = got;
                    while (fmt == SPLIT ? split_get() : packed_get())
                        got++;
                    if (!k && got == before)
                        vm_cpu_relax();
                }
            }
        }
        result = n / ((now_ns() - t0) / 1e9);
    }
    int status;
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
        die("device process failed");
    return result;
}

int main(int argc, char **argv)
{
    uint64_t n = 20000000, rt = 200000;
    int a = 0, b = 1, opt;
    unsigned secs = 120;
    while ((opt = getopt(argc, argv, "n:r:q:a:b:t:")) != -1) {
        switch (opt) {
        case 'n': n = strtoull(optarg, 0, 0); break;
        case 'r': rt = strtoull(optarg, 0, 0); break;
        case 'q': Q = strtoul(optarg, 0, 0); break;
        case 'a': a = atoi(optarg); break;
        case 'b': b = atoi(optarg); break;
        case 't': secs = strtoul(optarg, 0, 0); break;
        default:
            fprintf(stderr, "usage: virtq_ref [-n CHAINS] [-r ROUNDTRIPS] [-q QSIZE] [-a CPU] [-b CPU] [-t SECS]\n");
            return 2;
        }
    }
    if (!Q || Q > MAXQ || (Q & (Q - 1)) || a == b || !n || !rt) {
        fprintf(stderr, "virtq_ref: queue size must be a power of two <= 32768, CPUs distinct, counts > 0\n");
        return 2;
    }
    shm = mmap(NULL, 4096 + 16 * MAXQ + 2 * 131072, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED)
        die("mmap failed");
    double sp = run(SPLIT, PERCALL, n, a, b, secs);
    double sb = run(SPLIT, BATCHED, n * 2, a, b, secs);
    double sr = run(SPLIT, RTT, rt, a, b, secs);
    double pp = run(PACKED, PERCALL, n, a, b, secs);
    double pb = run(PACKED, BATCHED, n * 2, a, b, secs);
    double pr = run(PACKED, RTT, rt, a, b, secs);
    printf("{\"split_chains_per_s\": %.0f, \"split_batch_chains_per_s\": %.0f, \"split_rtt_p50_us\": %.4f, "
           "\"packed_chains_per_s\": %.0f, \"packed_batch_chains_per_s\": %.0f, \"packed_rtt_p50_us\": %.4f, "
           "\"queue_size\": %u, \"batch\": %d}\n", sp, sb, sr, pp, pb, pr, Q, BATCH);
    return 0;
}
