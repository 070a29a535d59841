/*
 * spsc_ref.c - plain C reference for the MsgFifo benchmarks.
 *
 * A single-producer/single-consumer ring of 64-byte slots carrying 64-byte
 * messages between two processes (fork, one shared anonymous mapping, each
 * process pinned to its own CPU).  It is the yardstick issue 2 measures
 * vmsgamp against: "at least 0.4x the C ring measured in the same run", so
 * it is deliberately the textbook fast design and nothing more:
 *   - free-running 32-bit head/tail, each on its own 64-byte line;
 *   - each side keeps a private cached copy of the peer's index and reads the
 *     shared one only when the cached copy says full/empty (DPDK rte_ring,
 *     rigtorp SPSCQueue), which keeps the peer's line from bouncing;
 *   - C11 acquire/release, pairs labelled A1/R1... as in DPDK.
 * No layout header, no validation of the peer: it is a ceiling, not a FIFO
 * anyone should use.
 *
 * Usage: spsc_ref MODE [-n COUNT] [-a CPU] [-b CPU] [-s SLOTS] [-w WARMUP] [-t SECS]
 *   send              one-way throughput, one message per publish
 *   burst             one-way throughput, up to 32 messages per publish
 *   rtt_busy          ping-pong over two rings, both sides busy-polling
 *   eventfd_pingpong  ping-pong over two eventfds, both sides blocking in
 *                     read(): the floor for any blocking round trip
 * Prints one JSON object on stdout; exit 1 on error, 2 on usage error.
 * COUNT defaults are sized for about one second on a 2-core VM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <sched.h>
#include <signal.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LINE 64      /* cache line / index spacing */
#define SLOT_SIZE 64 /* one message per slot, as in the AMP FIFOs */
#define MSG_SIZE 64
#define BURST 32
#define MAX_SLOTS 65536

/* ---- the ring --------------------------------------------------------- */

struct ring {
    alignas(LINE) _Atomic uint32_t head; /* written by the producer only */
    alignas(LINE) _Atomic uint32_t tail; /* written by the consumer only */
    alignas(LINE) unsigned char slots[][SLOT_SIZE];
};

struct producer {
    struct ring *r;
    uint32_t mask, size;
    uint32_t head;       /* private copy of r->head (we are its only writer) */
    uint32_t tail_cache; /* last tail seen; refreshed only when it says full */
};

struct consumer {
    struct ring *r;
    uint32_t mask, size;
    uint32_t tail;       /* private copy of r->tail */
    uint32_t head_cache; /* last head seen; refreshed only when it says empty */
};

static size_t ring_bytes(uint32_t slots)
{
    return sizeof(struct ring) + (size_t)slots * SLOT_SIZE;
}

static uint32_t refresh_tail(struct producer *p)
{
    /* A1: acquire the consumer's tail; pairs with R2.  The consumer's reads
     * of the slots it released must be done before we overwrite them. */
    p->tail_cache = atomic_load_explicit(&p->r->tail, memory_order_acquire);
    return p->size - (p->head - p->tail_cache);
}

static uint32_t refresh_head(struct consumer *c)
{
    /* A2: acquire the producer's head; pairs with R1.  Slot contents written
     * before that head are visible to our reads after this load. */
    c->head_cache = atomic_load_explicit(&c->r->head, memory_order_acquire);
    return c->head_cache - c->tail;
}

static inline void publish_head(struct producer *p)
{
    /* R1: release the new head; pairs with A2.  The slot contents must be
     * visible before the head that covers them. */
    atomic_store_explicit(&p->r->head, p->head, memory_order_release);
}

static inline void publish_tail(struct consumer *c)
{
    /* R2: release the new tail; pairs with A1.  Our reads of the slots must
     * be complete before the producer may reuse them. */
    atomic_store_explicit(&c->r->tail, c->tail, memory_order_release);
}

/* Per-message API: one publish per message. */
static inline int try_send(struct producer *p, const void *msg)
{
    if (p->head - p->tail_cache == p->size && refresh_tail(p) == 0)
        return 0;
    memcpy(p->r->slots[p->head & p->mask], msg, MSG_SIZE);
    p->head++;
    publish_head(p);
    return 1;
}

static inline int try_recv(struct consumer *c, void *out)
{
    if (c->tail == c->head_cache && refresh_head(c) == 0)
        return 0;
    memcpy(out, c->r->slots[c->tail & c->mask], MSG_SIZE);
    c->tail++;
    publish_tail(c);
    return 1;
}

/* Burst API: as many as fit (at most n), one publish for the lot. */
static inline uint32_t send_burst(struct producer *p, const unsigned char (*msgs)[MSG_SIZE],
                                  uint32_t n)
{
    uint32_t room = p->size - (p->head - p->tail_cache);
    if (room < n)
        room = refresh_tail(p);
    if (n > room)
        n = room;
    for (uint32_t i = 0; i < n; i++)
        memcpy(p->r->slots[(p->head + i) & p->mask], msgs[i], MSG_SIZE);
    if (n) {
        p->head += n;
        publish_head(p);
    }
    return n;
}

static inline uint32_t recv_burst(struct consumer *c, unsigned char (*out)[MSG_SIZE], uint32_t n)
{
    uint32_t avail = c->head_cache - c->tail;
    if (avail < n)
        avail = refresh_head(c);
    if (n > avail)
        n = avail;
    for (uint32_t i = 0; i < n; i++)
        memcpy(out[i], c->r->slots[(c->tail + i) & c->mask], MSG_SIZE);
    if (n) {
        c->tail += n;
        publish_tail(c);
    }
    return n;
}

/* ---- process plumbing ------------------------------------------------- */

/* Shared between the two processes, outside the rings. */
struct control {
    alignas(LINE) _Atomic int child_ready;
    alignas(LINE) uint64_t child_end_ns; /* read by the parent after waitpid */
    uint64_t child_errors;
};

struct options {
    const char *mode;
    long count;
    long warmup;
    int cpu_a, cpu_b;
    uint32_t slots;
    unsigned timeout_s;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "spsc_ref: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void pin_to(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0)
        die("sched_setaffinity");
}

/* First two CPUs this process may run on. */
static int default_cpus(int *a, int *b)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0)
        die("sched_getaffinity");
    int found = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && found < 2; cpu++) {
        if (CPU_ISSET(cpu, &set)) {
            if (found == 0)
                *a = cpu;
            else
                *b = cpu;
            found++;
        }
    }
    return found == 2 ? 0 : -1;
}

static void *shared_map(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    memset(p, 0, bytes); /* fault every page in before anyone times anything */
    return p;
}

/* Fork a child pinned to cpu_b; both processes die if one hangs (alarm) and
 * the child dies with the parent (PDEATHSIG), so a bug never leaves a
 * spinning process on a shared machine. */
static pid_t fork_child(const struct options *o)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        alarm(o->timeout_s);
        pin_to(o->cpu_b);
    }
    return pid;
}

static void wait_child(pid_t pid)
{
    int status;
    if (waitpid(pid, &status, 0) < 0)
        die("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "spsc_ref: child failed (status 0x%x)\n", status);
        exit(1);
    }
}

static void wait_ready(struct control *ctl)
{
    /* A3: acquire child_ready; pairs with R3.  The child's set-up (pinning,
     * first touch of its private state) is done before we start the clock. */
    while (!atomic_load_explicit(&ctl->child_ready, memory_order_acquire))
        ;
}

static void signal_ready(struct control *ctl)
{
    /* R3: release child_ready; pairs with A3. */
    atomic_store_explicit(&ctl->child_ready, 1, memory_order_release);
}

/* The sequence number sits in bytes 8..15, where every Python mechanism of
 * the comparison puts it (after an 8-byte message header). */
#define SEQ_OFF 8

static void fill_msg(unsigned char *msg, uint64_t seq)
{
    memcpy(msg + SEQ_OFF, &seq, sizeof(seq));
}

static uint64_t msg_seq(const unsigned char *msg)
{
    uint64_t seq;
    memcpy(&seq, msg + SEQ_OFF, sizeof(seq));
    return seq;
}

static void print_header(const struct options *o)
{
    printf("{\"bench\": \"spsc_ref\", \"mode\": \"%s\", \"msg_size\": %d, \"slot_size\": %d, "
           "\"slots\": %u, \"cpus\": [%d, %d], ",
           o->mode, MSG_SIZE, SLOT_SIZE, o->slots, o->cpu_a, o->cpu_b);
}

/* ---- one-way throughput ----------------------------------------------- */

static int run_throughput(const struct options *o, int burst)
{
    size_t rbytes = ring_bytes(o->slots);
    unsigned char *mem = shared_map(sizeof(struct control) + rbytes);
    struct control *ctl = (struct control *)mem;
    struct ring *ring = (struct ring *)(mem + sizeof(struct control));
    uint64_t n = (uint64_t)o->count;
    uint32_t per_call = burst ? BURST : 1;

    pid_t pid = fork_child(o);
    if (pid == 0) { /* consumer */
        struct consumer c = {ring, o->slots - 1, o->slots, 0, 0};
        unsigned char buf[BURST][MSG_SIZE];
        uint64_t expect = 0, errors = 0;
        signal_ready(ctl);
        while (expect < n) {
            uint32_t got = per_call == 1 ? (uint32_t)try_recv(&c, buf[0])
                                         : recv_burst(&c, buf, per_call);
            for (uint32_t i = 0; i < got; i++, expect++)
                errors += msg_seq(buf[i]) != expect;
        }
        ctl->child_end_ns = now_ns();
        ctl->child_errors = errors;
        _exit(0);
    }

    alarm(o->timeout_s);
    pin_to(o->cpu_a);
    struct producer p = {ring, o->slots - 1, o->slots, 0, 0};
    unsigned char msgs[BURST][MSG_SIZE];
    memset(msgs, 0xa5, sizeof(msgs));
    wait_ready(ctl);
    uint64_t start = now_ns();
    for (uint64_t seq = 0; seq < n;) {
        if (per_call == 1) {
            fill_msg(msgs[0], seq);
            seq += (uint64_t)try_send(&p, msgs[0]);
        } else {
            uint32_t want = n - seq < BURST ? (uint32_t)(n - seq) : BURST;
            for (uint32_t i = 0; i < want; i++)
                fill_msg(msgs[i], seq + i);
            seq += send_burst(&p, (const unsigned char (*)[MSG_SIZE])msgs, want);
        }
    }
    wait_child(pid);
    double secs = (double)(ctl->child_end_ns - start) / 1e9;
    print_header(o);
    printf("\"burst\": %u, \"msgs\": %lu, \"seconds\": %.6f, \"msgs_per_s\": %.1f, "
           "\"errors\": %lu}\n",
           per_call, (unsigned long)n, secs, (double)n / secs, (unsigned long)ctl->child_errors);
    return ctl->child_errors ? 1 : 0;
}

/* ---- round trips ------------------------------------------------------ */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted samples (same rule as harness.py). */
static double pct_us(const uint64_t *sorted, uint64_t n, double p)
{
    uint64_t rank = (uint64_t)((p / 100.0) * (double)n + 0.999999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return (double)sorted[rank - 1] / 1000.0;
}

static void print_rtt(const struct options *o, uint64_t *samples, uint64_t n, uint64_t total_ns,
                      uint64_t errors)
{
    qsort(samples, n, sizeof(*samples), cmp_u64);
    print_header(o);
    printf("\"iters\": %lu, \"warmup\": %ld, \"p50_us\": %.3f, \"p99_us\": %.3f, "
           "\"p999_us\": %.3f, \"min_us\": %.3f, \"mean_us\": %.3f, "
           "\"timer\": \"clock_gettime(CLOCK_MONOTONIC) around each round trip\", "
           "\"errors\": %lu}\n",
           (unsigned long)n, o->warmup, pct_us(samples, n, 50), pct_us(samples, n, 99),
           pct_us(samples, n, 99.9), (double)samples[0] / 1000.0,
           (double)total_ns / (double)n / 1000.0, (unsigned long)errors);
}

static int run_rtt_busy(const struct options *o)
{
    size_t rbytes = ring_bytes(o->slots);
    unsigned char *mem = shared_map(sizeof(struct control) + 2 * rbytes);
    struct control *ctl = (struct control *)mem;
    struct ring *ping = (struct ring *)(mem + sizeof(struct control));
    struct ring *pong = (struct ring *)((unsigned char *)ping + rbytes);
    uint64_t total = (uint64_t)(o->count + o->warmup);

    pid_t pid = fork_child(o);
    if (pid == 0) { /* echo: receive on ping, send the same bytes back on pong */
        struct consumer c = {ping, o->slots - 1, o->slots, 0, 0};
        struct producer p = {pong, o->slots - 1, o->slots, 0, 0};
        unsigned char buf[MSG_SIZE];
        signal_ready(ctl);
        for (uint64_t i = 0; i < total; i++) {
            while (!try_recv(&c, buf))
                ;
            while (!try_send(&p, buf))
                ;
        }
        _exit(0);
    }

    alarm(o->timeout_s);
    pin_to(o->cpu_a);
    struct producer p = {ping, o->slots - 1, o->slots, 0, 0};
    struct consumer c = {pong, o->slots - 1, o->slots, 0, 0};
    uint64_t *samples = malloc((size_t)o->count * sizeof(*samples));
    if (!samples)
        die("malloc");
    memset(samples, 0, (size_t)o->count * sizeof(*samples)); /* fault in now */
    unsigned char msg[MSG_SIZE], reply[MSG_SIZE];
    memset(msg, 0x5a, sizeof(msg));
    uint64_t errors = 0, timed_start = 0;
    wait_ready(ctl);
    for (uint64_t i = 0; i < total; i++) {
        if (i == (uint64_t)o->warmup)
            timed_start = now_ns();
        fill_msg(msg, i);
        uint64_t t0 = now_ns();
        while (!try_send(&p, msg))
            ;
        while (!try_recv(&c, reply))
            ;
        uint64_t t1 = now_ns();
        errors += msg_seq(reply) != i;
        if (i >= (uint64_t)o->warmup)
            samples[i - (uint64_t)o->warmup] = t1 - t0;
    }
    uint64_t timed_ns = now_ns() - timed_start;
    wait_child(pid);
    print_rtt(o, samples, (uint64_t)o->count, timed_ns, errors);
    free(samples);
    return errors ? 1 : 0;
}

static void efd_write(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) != sizeof(one))
        die("eventfd write");
}

static void efd_read(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof(v)) != sizeof(v))
        if (errno != EINTR)
            die("eventfd read");
}

static int run_eventfd(const struct options *o)
{
    struct control *ctl = shared_map(sizeof(struct control));
    int ping = eventfd(0, EFD_CLOEXEC), pong = eventfd(0, EFD_CLOEXEC);
    if (ping < 0 || pong < 0)
        die("eventfd");
    uint64_t total = (uint64_t)(o->count + o->warmup);

    pid_t pid = fork_child(o);
    if (pid == 0) {
        signal_ready(ctl);
        for (uint64_t i = 0; i < total; i++) {
            efd_read(ping);
            efd_write(pong);
        }
        _exit(0);
    }

    alarm(o->timeout_s);
    pin_to(o->cpu_a);
    uint64_t *samples = malloc((size_t)o->count * sizeof(*samples));
    if (!samples)
        die("malloc");
    memset(samples, 0, (size_t)o->count * sizeof(*samples));
    uint64_t timed_start = 0;
    wait_ready(ctl);
    for (uint64_t i = 0; i < total; i++) {
        if (i == (uint64_t)o->warmup)
            timed_start = now_ns();
        uint64_t t0 = now_ns();
        efd_write(ping);
        efd_read(pong);
        uint64_t t1 = now_ns();
        if (i >= (uint64_t)o->warmup)
            samples[i - (uint64_t)o->warmup] = t1 - t0;
    }
    uint64_t timed_ns = now_ns() - timed_start;
    wait_child(pid);
    print_rtt(o, samples, (uint64_t)o->count, timed_ns, 0);
    free(samples);
    return 0;
}

/* ---- main ------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr, "usage: spsc_ref {send|burst|rtt_busy|eventfd_pingpong} [-n COUNT] "
                    "[-a CPU] [-b CPU] [-s SLOTS] [-w WARMUP] [-t TIMEOUT_S]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    struct options o = {.count = -1, .warmup = -1, .cpu_a = -1, .cpu_b = -1, .slots = 64,
                        .timeout_s = 120};
    if (argc < 2)
        usage();
    o.mode = argv[1];
    optind = 2;
    int opt;
    while ((opt = getopt(argc, argv, "n:a:b:s:w:t:")) != -1) {
        switch (opt) {
        case 'n': o.count = atol(optarg); break;
        case 'a': o.cpu_a = atoi(optarg); break;
        case 'b': o.cpu_b = atoi(optarg); break;
        case 's': o.slots = (uint32_t)atol(optarg); break;
        case 'w': o.warmup = atol(optarg); break;
        case 't': o.timeout_s = (unsigned)atol(optarg); break;
        default: usage();
        }
    }
    if (optind != argc)
        usage();
    /* Power of two so the index wraps with a mask, as in DPDK/rigtorp. */
    if (o.slots < BURST || o.slots > MAX_SLOTS || (o.slots & (o.slots - 1))) {
        fprintf(stderr, "spsc_ref: -s must be a power of two in [%d, %d]\n", BURST, MAX_SLOTS);
        return 2;
    }
    if (o.cpu_a < 0 || o.cpu_b < 0) {
        int a, b;
        if (default_cpus(&a, &b) != 0) {
            fprintf(stderr, "spsc_ref: needs two CPUs in the affinity mask\n");
            return 2;
        }
        if (o.cpu_a < 0)
            o.cpu_a = a;
        if (o.cpu_b < 0)
            o.cpu_b = o.cpu_a == b ? a : b;
    }
    if (o.cpu_a == o.cpu_b) {
        /* Busy-polling peers on one CPU measure the scheduler, not the ring. */
        fprintf(stderr, "spsc_ref: the two processes need different CPUs\n");
        return 2;
    }

    int busy = 0;
    long default_count;
    if (strcmp(o.mode, "send") == 0)
        default_count = 20000000; /* ~21 M/s on the reference VM */
    else if (strcmp(o.mode, "burst") == 0)
        default_count = 80000000; /* ~80 M/s */
    else if (strcmp(o.mode, "rtt_busy") == 0)
        default_count = 2000000, busy = 1; /* ~0.2-0.5 us each */
    else if (strcmp(o.mode, "eventfd_pingpong") == 0)
        default_count = 15000; /* ~65 us each */
    else
        usage();
    if (o.count < 0)
        o.count = default_count;
    if (o.warmup < 0)
        o.warmup = busy ? 10000 : (strcmp(o.mode, "eventfd_pingpong") == 0 ? 200 : 0);
    if (o.count < 1) {
        fprintf(stderr, "spsc_ref: -n must be at least 1\n");
        return 2;
    }

    if (strcmp(o.mode, "send") == 0)
        return run_throughput(&o, 0);
    if (strcmp(o.mode, "burst") == 0)
        return run_throughput(&o, 1);
    if (busy)
        return run_rtt_busy(&o);
    return run_eventfd(&o);
}
