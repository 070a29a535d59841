/*
 * ivshmem_device.c - the device kit on a Linux host: serves virtio-rng and
 * virtio-i2c (24C02 EEPROM at 0x50, LM75 at 0x48) to a virtio-msg-amp driver
 * over an ivshmem server, the way `vmsgamp serve --region ivshmem:SOCK
 * --memory RAM@BUS` does.
 *
 *   ivshmem_device --sock PATH --ram PATH[@BUS_ADDR] [--devices rng,i2c]
 *                  [--offset N] [--fifo-size N]
 *
 * It joins the ivshmem server (QEMU's protocol: docs/specs/ivshmem-spec.rst
 * in QEMU), maps the shared memory it hands out (the FIFO window, layout at
 * --offset) and the driver's RAM file (where the driver puts rings and
 * buffers; BUS_ADDR is the bus address of its first byte, default 0), and
 * rings the first other peer's vector-0 eventfd.  It sleeps on its own
 * eventfd, with a 10 ms timeout for handshake steps, which are not rung.
 *
 * Prints one JSON line when ready.  SIGTERM/SIGINT: own queue state
 * SHUTDOWN, exit 0.  Bad options: one line on stderr, exit 2; a failing
 * server or mapping: exit 1.
 *
 * Build: cc -std=c11 -O2 -I csrc/kit ivshmem_device.c csrc/kit/vmk_*.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "vmk.h"
#include "vmk_models.h"

#define MAX_PEERS 16
#define MAX_VECTORS 8

struct peer { long id; int fd; };   /* fd: its vector-0 eventfd */

static struct {
    int sock;
    long own_id;
    int own_fds[MAX_VECTORS];
    int nvec;
    struct peer peers[MAX_PEERS];
    int npeers;
    int target;                    /* index into peers, -1: nobody to ring */
    bool target_left;              /* the peer we served disconnected */
} ivs = { .sock = -1, .own_id = -1, .target = -1 };

static volatile sig_atomic_t stop_requested;

static void die(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("ivshmem_device: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static void on_signal(int sig) { (void)sig; stop_requested = 1; }

/* One server message: the value, and an fd (or -1).  0 ok, -1 closed, -2 nothing yet. */
static int recv_msg(int sock, long long *value, int *fd, int flags)
{
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = { value, sizeof(*value) };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
    ssize_t n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC | flags);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return -2;
    if (n != (ssize_t)sizeof(*value))
        return -1;
    *fd = -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            memcpy(fd, CMSG_DATA(c), sizeof(int));
    return 0;
}

static void retarget(void)
{
    if (ivs.target >= 0 && ivs.target < ivs.npeers)
        return;
    ivs.target = ivs.npeers ? 0 : -1;
}

/* A peer id with an fd announces (a vector of) a peer; without, its departure. */
static void on_server_msg(long long id, int fd)
{
    if (id == ivs.own_id) {
        if (fd >= 0 && ivs.nvec < MAX_VECTORS) {
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);   /* drained in a loop */
            ivs.own_fds[ivs.nvec++] = fd;
        }
        else if (fd >= 0)
            close(fd);
        return;
    }
    for (int i = 0; i < ivs.npeers; i++) {
        if (ivs.peers[i].id != id)
            continue;
        if (fd >= 0) {
            close(fd);   /* vectors past 0: we only ring vector 0 */
            return;
        }
        close(ivs.peers[i].fd);
        ivs.peers[i] = ivs.peers[--ivs.npeers];
        if (ivs.target == i)
            ivs.target_left = true;
        if (ivs.target == i || ivs.target >= ivs.npeers)
            ivs.target = -1;
        retarget();
        return;
    }
    if (fd >= 0 && ivs.npeers < MAX_PEERS) {
        ivs.peers[ivs.npeers++] = (struct peer){ id, fd };
        retarget();
    } else if (fd >= 0) {
        close(fd);
    }
}

static int join_server(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    long long v;
    int fd, shm = -1;
    if (strlen(path) >= sizeof(sa.sun_path))
        die(2, "--sock path too long: %s", path);
    strcpy(sa.sun_path, path);
    ivs.sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ivs.sock < 0 || connect(ivs.sock, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        die(1, "cannot connect to the ivshmem server at %s: %s", path, strerror(errno));
    if (recv_msg(ivs.sock, &v, &fd, 0) || v != 0)
        die(1, "%s: not an ivshmem server (protocol version %lld)", path, v);
    if (recv_msg(ivs.sock, &v, &fd, 0) || v < 0 || v > 0xFFFF)
        die(1, "%s: bad own id", path);
    ivs.own_id = (long)v;
    if (recv_msg(ivs.sock, &v, &shm, 0) || v != -1 || shm < 0)
        die(1, "%s: no shared memory from the server", path);
    /* Peers and our own vectors follow; our own id's fds end the greeting. */
    for (;;) {
        if (recv_msg(ivs.sock, &v, &fd, 0))
            die(1, "%s: the server hung up during the greeting", path);
        on_server_msg(v, fd);
        if (v == ivs.own_id)
            break;
    }
    /* The rest of our vectors, without blocking. */
    while (recv_msg(ivs.sock, &v, &fd, MSG_DONTWAIT) == 0)
        on_server_msg(v, fd);
    return shm;
}

static void pump_server(void)
{
    long long v;
    int fd, r;
    while ((r = recv_msg(ivs.sock, &v, &fd, MSG_DONTWAIT)) == 0)
        on_server_msg(v, fd);
    if (r == -1)
        stop_requested = 1;   /* the server went away */
}

static void ring_driver(void *arg)
{
    uint64_t one = 1;
    (void)arg;
    if (ivs.target >= 0 && write(ivs.peers[ivs.target].fd, &one, 8) < 0 && errno != EAGAIN)
        perror("ivshmem_device: ring");
}

static void *map_file(const char *path, int fd, size_t *size)
{
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_size <= 0)
        die(1, "%s: cannot size it", path);
    *size = (size_t)st.st_size;
    void *p = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die(1, "%s: mmap failed: %s", path, strerror(errno));
    return p;
}

static unsigned long long parse_num(const char *opt, const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end)
        die(2, "%s: not a number: %s", opt, s);
    return v;
}

static void log_event(void *arg, const char *what, uint32_t a, uint32_t b)
{
    (void)arg;
    fprintf(stderr, "ivshmem_device: %s (%#x, %#x)\n", what, a, b);
}

static struct vmk_ctx ctx;
static struct vmk_rng rng;
static struct vmk_i2c i2c;
static struct vmk_eeprom eeprom;
static struct vmk_lm75 lm75;

int main(int argc, char **argv)
{
    const char *sock = NULL, *ram = NULL, *devices = "rng,i2c";
    unsigned long long offset = 0, fifo_size = 8192, ram_bus = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            die(2, "%s needs a value (usage: --sock PATH --ram PATH[@BUS_ADDR] [--devices rng,i2c] "
                   "[--offset N] [--fifo-size N])", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--sock"))
            sock = v;
        else if (!strcmp(a, "--ram"))
            ram = v;
        else if (!strcmp(a, "--devices"))
            devices = v;
        else if (!strcmp(a, "--offset"))
            offset = parse_num(a, v);
        else if (!strcmp(a, "--fifo-size"))
            fifo_size = parse_num(a, v);
        else
            die(2, "unknown option %s", a);
    }
    if (!sock || !ram)
        die(2, "usage: --sock PATH --ram PATH[@BUS_ADDR] [--devices rng,i2c] [--offset N] [--fifo-size N]");
    static char ram_path[4096];
    snprintf(ram_path, sizeof(ram_path), "%s", ram);
    char *at = strrchr(ram_path, '@');
    if (at) {
        *at = 0;
        ram_bus = parse_num("--ram", at + 1);
    }

    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);

    int shm = join_server(sock);
    size_t shm_size, ram_size;
    uint8_t *shm_p = map_file("the server's shared memory", shm, &shm_size);
    int ram_fd = open(ram_path, O_RDWR | O_CLOEXEC);
    if (ram_fd < 0)
        die(1, "--ram %s: %s", ram_path, strerror(errno));
    uint8_t *ram_p = map_file(ram_path, ram_fd, &ram_size);
    if (offset >= shm_size || fifo_size > shm_size - offset)
        die(2, "--offset/--fifo-size: [%#llx, +%#llx) is outside the %zu-byte shared memory",
            offset, fifo_size, shm_size);

    struct vmk_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.fifo = shm_p + offset;
    cfg.fifo_size = (uint32_t)fifo_size;
    cfg.memtype = VM_MEM_NORMAL;
    cfg.windows[0] = (struct vmk_window){ ram_bus, ram_size, ram_p };
    cfg.num_windows = 1;
    cfg.ring = ring_driver;
    cfg.log = log_event;
    if (vmk_init(&ctx, &cfg))
        die(2, "--offset/--fifo-size: the FIFO window is too small or not 8-byte aligned");

    char listed[256] = "";
    unsigned dev_num = 0;
    char *spec = strdup(devices);
    for (char *tok = strtok(spec, ","); tok; tok = strtok(NULL, ",")) {
        struct vmk_device *d;
        if (!strcmp(tok, "rng")) {
            vmk_rng_init(&rng, NULL, NULL);
            d = &rng.dev;
        } else if (!strcmp(tok, "i2c")) {
            vmk_i2c_init(&i2c);
            vmk_eeprom_init(&eeprom);
            vmk_lm75_init(&lm75, 50);   /* 25.0 degC */
            vmk_i2c_attach(&i2c, &eeprom.t, 0x50);
            vmk_i2c_attach(&i2c, &lm75.t, 0x48);
            d = &i2c.dev;
        } else {
            die(2, "--devices: unknown device %s (known: rng, i2c)", tok);
        }
        if (vmk_add_device(&ctx, dev_num, d))
            die(2, "--devices: %s given twice", tok);
        snprintf(listed + strlen(listed), sizeof(listed) - strlen(listed), "%s{\"dev_num\": %u, \"name\": \"%s\"}",
                 dev_num ? ", " : "", dev_num, tok);
        dev_num++;
    }
    free(spec);
    printf("{\"own_id\": %ld, \"fifo_slots\": %u, \"devices\": [%s]}\n", ivs.own_id, ctx.num_slots, listed);
    fflush(stdout);

    struct timespec last_work;
    clock_gettime(CLOCK_MONOTONIC, &last_work);
    while (!stop_requested) {
        if (vmk_poll(&ctx) > 0) {
            clock_gettime(CLOCK_MONOTONIC, &last_work);
            continue;
        }
        /* spin 50 us after the last message: a busy driver answers within it */
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long long idle_ns = (now.tv_sec - last_work.tv_sec) * 1000000000LL + (now.tv_nsec - last_work.tv_nsec);
        if (idle_ns < 50000) {
            vm_cpu_relax();
            continue;
        }
        if (!vmk_prepare_sleep(&ctx))
            continue;
        struct pollfd pf[MAX_VECTORS + 1];
        int n = 0;
        pf[n++] = (struct pollfd){ ivs.sock, POLLIN, 0 };
        for (int i = 0; i < ivs.nvec; i++)
            pf[n++] = (struct pollfd){ ivs.own_fds[i], POLLIN, 0 };
        poll(pf, (nfds_t)n, 10);
        vmk_woken(&ctx);
        for (int i = 1; i < n; i++) {
            uint64_t v;
            if (pf[i].revents & POLLIN)
                while (read(pf[i].fd, &v, 8) == 8)
                    ;
        }
        if (pf[0].revents)
            pump_server();
        if (ivs.target_left) {
            /* the driver's process is gone: whatever its queue head says */
            ivs.target_left = false;
            vmk_driver_gone(&ctx);
        }
    }
    vmk_shutdown(&ctx);
    fprintf(stderr, "ivshmem_device: %u messages in, %u out, %u malformed, %u unexpected, %u pings\n",
            ctx.stats.rx_messages, ctx.stats.tx_messages, ctx.stats.rx_malformed, ctx.stats.rx_unexpected,
            ctx.stats.pings_answered);
    return 0;
}
