/*
 * vmsgamp_io.h - the only way vmsgamp touches shared memory.
 *
 * Every access to a word another processor may read or write goes through
 * one of these helpers: a single naturally aligned 8/16/32/64-bit access with
 * an explicit memory order.  Device memory on arm64 (UIO maps are mapped
 * non-cached) faults on wide or unaligned accesses, and the compiler must not
 * split, merge or re-order these accesses, so they are volatile atomics.
 *
 * Plain C11 with GCC/Clang __atomic builtins, no Python: firmware on the
 * peer (Zephyr, bare metal) may compile this header as it is.
 *
 * All shared layouts are little-endian.  The helpers convert on big-endian
 * hosts so callers always see host-order values.
 */
#ifndef VMSGAMP_IO_H
#define VMSGAMP_IO_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define VM_LE16(x) __builtin_bswap16(x)
#define VM_LE32(x) __builtin_bswap32(x)
#define VM_LE64(x) __builtin_bswap64(x)
#else
#define VM_LE16(x) (x)
#define VM_LE32(x) (x)
#define VM_LE64(x) (x)
#endif

/* Memory orders, numerically equal to the __ATOMIC_* constants so Python code
 * can pass them through unchanged. */
enum vm_order {
    VM_RELAXED = __ATOMIC_RELAXED, /* 0 */
    VM_ACQUIRE = __ATOMIC_ACQUIRE, /* 2 */
    VM_RELEASE = __ATOMIC_RELEASE, /* 3 */
    VM_SEQ_CST = __ATOMIC_SEQ_CST  /* 5 */
};

/* ---- loads ------------------------------------------------------------ */

static inline uint8_t vm_load8(const volatile void *p, int order)
{
    const volatile uint8_t *q = (const volatile uint8_t *)p;
    switch (order) {
    case VM_ACQUIRE: return __atomic_load_n(q, __ATOMIC_ACQUIRE);
    case VM_SEQ_CST: return __atomic_load_n(q, __ATOMIC_SEQ_CST);
    default:         return __atomic_load_n(q, __ATOMIC_RELAXED);
    }
}

static inline uint16_t vm_load16(const volatile void *p, int order)
{
    const volatile uint16_t *q = (const volatile uint16_t *)p;
    uint16_t v;
    switch (order) {
    case VM_ACQUIRE: v = __atomic_load_n(q, __ATOMIC_ACQUIRE); break;
    case VM_SEQ_CST: v = __atomic_load_n(q, __ATOMIC_SEQ_CST); break;
    default:         v = __atomic_load_n(q, __ATOMIC_RELAXED); break;
    }
    return VM_LE16(v);
}

static inline uint32_t vm_load32(const volatile void *p, int order)
{
    const volatile uint32_t *q = (const volatile uint32_t *)p;
    uint32_t v;
    switch (order) {
    case VM_ACQUIRE: v = __atomic_load_n(q, __ATOMIC_ACQUIRE); break;
    case VM_SEQ_CST: v = __atomic_load_n(q, __ATOMIC_SEQ_CST); break;
    default:         v = __atomic_load_n(q, __ATOMIC_RELAXED); break;
    }
    return VM_LE32(v);
}

static inline uint64_t vm_load64(const volatile void *p, int order)
{
    const volatile uint64_t *q = (const volatile uint64_t *)p;
    uint64_t v;
    switch (order) {
    case VM_ACQUIRE: v = __atomic_load_n(q, __ATOMIC_ACQUIRE); break;
    case VM_SEQ_CST: v = __atomic_load_n(q, __ATOMIC_SEQ_CST); break;
    default:         v = __atomic_load_n(q, __ATOMIC_RELAXED); break;
    }
    return VM_LE64(v);
}

/* ---- stores ----------------------------------------------------------- */

static inline void vm_store8(volatile void *p, uint8_t v, int order)
{
    volatile uint8_t *q = (volatile uint8_t *)p;
    switch (order) {
    case VM_RELEASE: __atomic_store_n(q, v, __ATOMIC_RELEASE); break;
    case VM_SEQ_CST: __atomic_store_n(q, v, __ATOMIC_SEQ_CST); break;
    default:         __atomic_store_n(q, v, __ATOMIC_RELAXED); break;
    }
}

static inline void vm_store16(volatile void *p, uint16_t v, int order)
{
    volatile uint16_t *q = (volatile uint16_t *)p;
    v = VM_LE16(v);
    switch (order) {
    case VM_RELEASE: __atomic_store_n(q, v, __ATOMIC_RELEASE); break;
    case VM_SEQ_CST: __atomic_store_n(q, v, __ATOMIC_SEQ_CST); break;
    default:         __atomic_store_n(q, v, __ATOMIC_RELAXED); break;
    }
}

static inline void vm_store32(volatile void *p, uint32_t v, int order)
{
    volatile uint32_t *q = (volatile uint32_t *)p;
    v = VM_LE32(v);
    switch (order) {
    case VM_RELEASE: __atomic_store_n(q, v, __ATOMIC_RELEASE); break;
    case VM_SEQ_CST: __atomic_store_n(q, v, __ATOMIC_SEQ_CST); break;
    default:         __atomic_store_n(q, v, __ATOMIC_RELAXED); break;
    }
}

static inline void vm_store64(volatile void *p, uint64_t v, int order)
{
    volatile uint64_t *q = (volatile uint64_t *)p;
    v = VM_LE64(v);
    switch (order) {
    case VM_RELEASE: __atomic_store_n(q, v, __ATOMIC_RELEASE); break;
    case VM_SEQ_CST: __atomic_store_n(q, v, __ATOMIC_SEQ_CST); break;
    default:         __atomic_store_n(q, v, __ATOMIC_RELAXED); break;
    }
}

/* Full barrier: a store must be visible before a later load (the
 * "publish index, then read the peer's suppression flag" step). */
static inline void vm_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void vm_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void vm_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

/* Hints that a shared line will be read (or written) soon, so it can move
 * from the peer's cache while we do other work: a per-message caller (Python)
 * does too much between two messages for the CPU to overlap the next slot's
 * miss on its own.  No effect on memory order, never faults.  The write hint
 * is a plain prefetch unless the build targets a CPU with PREFETCHW. */
static inline void vm_prefetch_read(const volatile void *p) { __builtin_prefetch((const void *)p, 0, 3); }
static inline void vm_prefetch_write(volatile void *p) { __builtin_prefetch((const void *)p, 1, 3); }

/* A hint for busy-wait loops (PAUSE on x86, YIELD on arm). */
static inline void vm_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* ---- payload copies ----------------------------------------------------
 * Memory types of a mapping (Region.memtype):
 *   VM_MEM_NORMAL  ordinary cached RAM (memfd, POSIX shm, files): memcpy.
 *   VM_MEM_DEVICE  uncached / device memory (UIO, PCI BARs): only aligned
 *                  32-bit accesses (byte accesses at the unaligned edges),
 *                  because memcpy may use wide or unaligned accesses that
 *                  fault on arm64 device memory.
 */
enum vm_memtype { VM_MEM_NORMAL = 0, VM_MEM_DEVICE = 1 };

/* The default 64-byte slot is copied inline (a constant-size memcpy is a few
 * vector moves); any other size goes to the C library. */
#define VM_SLOT64 64u

static inline void vm_copy_to_shared(volatile void *dst, const void *src, size_t n, int memtype)
{
    if (memtype == VM_MEM_NORMAL) {
        if (n == VM_SLOT64)
            memcpy((void *)dst, src, VM_SLOT64);
        else
            memcpy((void *)dst, src, n);
        return;
    }
    volatile uint8_t *d = (volatile uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    while (n && ((uintptr_t)d & 3)) { *d++ = *s++; n--; }
    while (n >= 4) {
        uint32_t w;
        memcpy(&w, s, 4);
        *(volatile uint32_t *)d = w;
        d += 4; s += 4; n -= 4;
    }
    while (n) { *d++ = *s++; n--; }
}

static inline void vm_copy_from_shared(void *dst, const volatile void *src, size_t n, int memtype)
{
    if (memtype == VM_MEM_NORMAL) {
        if (n == VM_SLOT64)
            memcpy(dst, (const void *)src, VM_SLOT64);
        else
            memcpy(dst, (const void *)src, n);
        return;
    }
    uint8_t *d = (uint8_t *)dst;
    const volatile uint8_t *s = (const volatile uint8_t *)src;
    while (n && ((uintptr_t)s & 3)) { *d++ = *s++; n--; }
    while (n >= 4) {
        uint32_t w = *(const volatile uint32_t *)s;
        memcpy(d, &w, 4);
        d += 4; s += 4; n -= 4;
    }
    while (n) { *d++ = *s++; n--; }
}

static inline void vm_zero_shared(volatile void *dst, size_t n, int memtype)
{
    if (memtype == VM_MEM_NORMAL) {
        memset((void *)dst, 0, n);
        return;
    }
    volatile uint8_t *d = (volatile uint8_t *)dst;
    while (n && ((uintptr_t)d & 3)) { *d++ = 0; n--; }
    while (n >= 4) { *(volatile uint32_t *)d = 0; d += 4; n -= 4; }
    while (n) { *d++ = 0; n--; }
}

/* ---- private words ------------------------------------------------------
 * Flags and counters that only our own threads share (never peer memory, so
 * no byte-order conversion, and read-modify-write atomics are fine).
 */
static inline int vm_int_load(const int *p, int order)
{
    switch (order) {
    case VM_ACQUIRE: return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    case VM_SEQ_CST: return __atomic_load_n(p, __ATOMIC_SEQ_CST);
    default:         return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
}

static inline void vm_int_store(int *p, int v, int order)
{
    switch (order) {
    case VM_RELEASE: __atomic_store_n(p, v, __ATOMIC_RELEASE); break;
    case VM_SEQ_CST: __atomic_store_n(p, v, __ATOMIC_SEQ_CST); break;
    default:         __atomic_store_n(p, v, __ATOMIC_RELAXED); break;
    }
}

/* Atomic add; returns the new value (seq_cst: used in Dekker-style pairs). */
static inline int vm_int_add(int *p, int d) { return __atomic_add_fetch(p, d, __ATOMIC_SEQ_CST); }
static inline int vm_int_xchg(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }

/* A lost flag of the mapping guard (vmsgamp_guard.h), checked after reading
 * shared memory: the acquire fence keeps the loads before it (the data just
 * copied) from moving after the flag load, so data read from the zero pages
 * that replaced a lost mapping is never taken for good data. */
static inline int vm_lost(const int *flag)
{
    if (flag == NULL)
        return 0;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return __atomic_load_n(flag, __ATOMIC_RELAXED);
}

/* A tiny spin lock for private state two of our threads update together
 * (held for a few instructions, never across a system call). */
static inline void vm_spin_lock(int *lock)
{
    while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(lock, __ATOMIC_RELAXED))
            vm_cpu_relax();
}

static inline void vm_spin_unlock(int *lock) { __atomic_store_n(lock, 0, __ATOMIC_RELEASE); }

/* CACHE: hooks for cacheable shared RAM on non-coherent SoCs.  The writer
 * flushes after writing, the reader invalidates before reading.  Linux user
 * space maps shared memory uncached or write-combined (UIO, PCI), and every
 * host vmsgamp runs on today is coherent, so they compile to nothing. */
#define VM_CACHE_FLUSH(p, n)      ((void)(p), (void)(n))
#define VM_CACHE_INVALIDATE(p, n) ((void)(p), (void)(n))

#endif /* VMSGAMP_IO_H */
