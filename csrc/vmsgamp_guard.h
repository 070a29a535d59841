/*
 * vmsgamp_guard.h - survive a shared object that shrinks under a mapping.
 *
 * Linux user space only (firmware never includes it).  It defines
 * process-wide state, so exactly ONE translation unit includes it:
 * vmsgamp/_core/region.pyx.  Other modules learn that a mapping was lost
 * through the Region (the lost flag, read with vm_flag_get()).
 *
 * The threat: anyone holding the object (a hostile or buggy peer, an admin
 * with `truncate`) can shrink a POSIX shm object, a file or a foreign memfd
 * that we have mapped.  The next access to a page past the new end raises
 * SIGBUS, whose default action kills the process.  Memfds that vmsgamp
 * creates are sealed so this cannot happen to them (F_SEAL_SHRINK); for
 * every other object we catch the fault.
 *
 * The design (the one Wayland compositors use for client buffer pools):
 *  - every live mapping is registered in a lock-free table (vm_guard_add)
 *    and removed before it is unmapped (vm_guard_remove);
 *  - one SIGBUS handler (sigaction, SA_SIGINFO), installed once, looks the
 *    faulting address up.  If it lies in a registered mapping and the fault
 *    is "address past the end of the object" (BUS_ADRERR), it sets the
 *    entry's lost flag and maps anonymous zero pages MAP_FIXED over the whole
 *    mapping, then returns: the faulting instruction runs again and now
 *    reads or writes a private zero page;
 *  - every other SIGBUS (outside our mappings, alignment, hardware memory
 *    errors, kill -BUS) goes to the handler that was installed before ours
 *    (faulthandler, a debugger's) or to the default action, so a real crash
 *    still crashes.
 *
 * Why this is sound for Cython code that touches shared memory with the GIL
 * released:
 *  - no longjmp: the interrupted code is never abandoned half way, so no
 *    lock, reference count or half-updated private state is left behind; it
 *    simply carries on;
 *  - the handler only does atomic loads/stores on the table and one mmap
 *    (a plain system call on Linux, safe in a signal handler although POSIX
 *    does not list it; errno is saved and restored): no malloc, no lock, no
 *    Python;
 *  - what the interrupted code reads afterwards is zeros.  To it these are
 *    just values a hostile peer could have written, which every reader
 *    already survives (indices range-checked, sizes bounded, messages
 *    copied to private memory before they are parsed);
 *  - the Cython layers test the lost flag at their API boundaries and after
 *    each copy out of shared memory, and raise SharedObjectLost, so the
 *    zeros are never handed to the caller as data.  The faulting thread
 *    always sees its own flag store; other threads see it at their next
 *    check (they only ever read zeros in between).
 *
 * Races: vm_guard_remove clears the entry's start, then waits until no
 * handler is inside the entry (busy == 0), and only then may the caller
 * munmap.  The handler announces itself (busy++) and re-reads start before
 * it maps anything, so (both sides sequentially consistent) it can never map
 * zero pages over an address range that was unmapped and reused for
 * something else.  Entries and chunks are never freed, so the lost-flag
 * pointers the Regions keep stay valid.
 */
#ifndef VMSGAMP_GUARD_H
#define VMSGAMP_GUARD_H

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define VM_GUARD_CHUNK      256u   /* entries per chunk */
#define VM_GUARD_MAX_CHUNKS 64u    /* at most 16384 live mappings */

struct vm_guard_entry {
    uintptr_t start;  /* mapping start; 0 while free or being removed */
    size_t len;       /* mapping length (valid while start != 0) */
    int claimed;      /* owned by a live mapping */
    int busy;         /* signal handlers currently inside this entry */
    int lost;         /* 1 once the object shrank under the mapping */
};

/* Chunks are allocated with mmap on demand and never freed. */
static struct vm_guard_entry *vm_guard_chunks[VM_GUARD_MAX_CHUNKS];
static struct sigaction vm_guard_prev;  /* the SIGBUS action before ours */
static int vm_guard_installed;

static inline struct vm_guard_entry *vm_guard_entry_at(int slot)
{
    struct vm_guard_entry *c = __atomic_load_n(&vm_guard_chunks[(unsigned)slot / VM_GUARD_CHUNK],
                                               __ATOMIC_ACQUIRE);
    return &c[(unsigned)slot % VM_GUARD_CHUNK];
}

/* Hand a SIGBUS we do not own to whoever had it before us. */
static void vm_guard_chain(int sig, siginfo_t *si, void *uc)
{
    const struct sigaction *p = &vm_guard_prev;
    if (p->sa_flags & SA_SIGINFO) {
        if (p->sa_sigaction != NULL) {
            p->sa_sigaction(sig, si, uc);
            return;
        }
    } else if (p->sa_handler != SIG_DFL && p->sa_handler != SIG_IGN) {
        p->sa_handler(sig);
        return;
    }
    if (p->sa_handler == SIG_IGN && si != NULL && si->si_code <= 0)
        return;  /* an ignored SIGBUS sent by kill() stays ignored */
    /* Default action: restore it and re-raise.  The signal is blocked while
     * we run, so it is delivered (and kills) when we return; a fault would
     * also simply recur. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    raise(sig);
}

static void vm_guard_on_sigbus(int sig, siginfo_t *si, void *uc)
{
    int saved_errno = errno;
    if (si != NULL && si->si_code == BUS_ADRERR) {
        uintptr_t a = (uintptr_t)si->si_addr;
        for (unsigned k = 0; k < VM_GUARD_MAX_CHUNKS; k++) {
            struct vm_guard_entry *c = __atomic_load_n(&vm_guard_chunks[k], __ATOMIC_ACQUIRE);
            if (c == NULL)
                break;
            for (unsigned i = 0; i < VM_GUARD_CHUNK; i++) {
                struct vm_guard_entry *e = &c[i];
                uintptr_t s = __atomic_load_n(&e->start, __ATOMIC_ACQUIRE);
                if (s == 0 || a - s >= __atomic_load_n(&e->len, __ATOMIC_RELAXED))
                    continue;
                /* Announce ourselves, then re-check: vm_guard_remove clears
                 * start before it reads busy (Dekker pair, seq_cst). */
                __atomic_fetch_add(&e->busy, 1, __ATOMIC_SEQ_CST);
                size_t l = __atomic_load_n(&e->len, __ATOMIC_SEQ_CST);
                if (__atomic_load_n(&e->start, __ATOMIC_SEQ_CST) == s && a - s < l) {
                    /* The flag first: a thread that reads the zero pages
                     * below has been ordered after it by the page-table
                     * change, so its next flag check sees it. */
                    __atomic_store_n(&e->lost, 1, __ATOMIC_SEQ_CST);
                    void *p = mmap((void *)s, l, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
                    __atomic_fetch_sub(&e->busy, 1, __ATOMIC_RELEASE);
                    if (p == MAP_FAILED)
                        goto chain;  /* cannot repair: die as we would have */
                    errno = saved_errno;
                    return;
                }
                __atomic_fetch_sub(&e->busy, 1, __ATOMIC_RELEASE);
            }
        }
    }
chain:
    errno = saved_errno;
    vm_guard_chain(sig, si, uc);
}

/* Install the handler once per process.  0, or -1 with errno set. */
static int vm_guard_install(void)
{
    if (__atomic_load_n(&vm_guard_installed, __ATOMIC_ACQUIRE))
        return 0;
    /* Read the previous action before ours goes in: the handler may run
     * the moment sigaction() installs it. */
    if (sigaction(SIGBUS, NULL, &vm_guard_prev) != 0)
        return -1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = vm_guard_on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, NULL) != 0)
        return -1;
    __atomic_store_n(&vm_guard_installed, 1, __ATOMIC_RELEASE);
    return 0;
}

/* Register [start, start+len) (start page-aligned, as mmap returned it).
 * Returns the slot, or -1 with errno set (ENOMEM: table full). */
static int vm_guard_add(void *start, size_t len)
{
    for (unsigned k = 0; k < VM_GUARD_MAX_CHUNKS; k++) {
        struct vm_guard_entry *c = __atomic_load_n(&vm_guard_chunks[k], __ATOMIC_ACQUIRE);
        if (c == NULL) {
            void *m = mmap(NULL, VM_GUARD_CHUNK * sizeof(struct vm_guard_entry),
                           PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED)
                return -1;
            struct vm_guard_entry *expected = NULL;
            if (__atomic_compare_exchange_n(&vm_guard_chunks[k], &expected,
                                            (struct vm_guard_entry *)m, 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                c = (struct vm_guard_entry *)m;
            } else {
                munmap(m, VM_GUARD_CHUNK * sizeof(struct vm_guard_entry));
                c = expected;
            }
        }
        for (unsigned i = 0; i < VM_GUARD_CHUNK; i++) {
            struct vm_guard_entry *e = &c[i];
            int zero = 0;
            if (__atomic_load_n(&e->claimed, __ATOMIC_RELAXED) == 0 &&
                __atomic_compare_exchange_n(&e->claimed, &zero, 1, 0,
                                            __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
                __atomic_store_n(&e->lost, 0, __ATOMIC_RELAXED);
                __atomic_store_n(&e->len, len, __ATOMIC_RELAXED);
                /* release: len and lost are visible before start is */
                __atomic_store_n(&e->start, (uintptr_t)start, __ATOMIC_RELEASE);
                return (int)(k * VM_GUARD_CHUNK + i);
            }
        }
    }
    errno = ENOMEM;
    return -1;
}

/* Unregister a slot; the caller may munmap once this returns. */
static void vm_guard_remove(int slot)
{
    struct vm_guard_entry *e = vm_guard_entry_at(slot);
    __atomic_store_n(&e->start, 0, __ATOMIC_SEQ_CST);
    /* A handler inside the entry is a handful of instructions and one
     * mmap: wait for it to leave before the range may be unmapped. */
    while (__atomic_load_n(&e->busy, __ATOMIC_SEQ_CST) != 0)
        sched_yield();
    __atomic_store_n(&e->claimed, 0, __ATOMIC_RELEASE);
}

/* Mark a slot lost without a fault (a size check found the object shorter
 * than the mapping); the pages past the end still fault and are repaired
 * by the handler if something touches them. */
static inline void vm_guard_mark_lost(int slot)
{
    __atomic_store_n(&vm_guard_entry_at(slot)->lost, 1, __ATOMIC_SEQ_CST);
}

/* The slot's lost flag (static storage: the pointer stays valid). */
static inline const int *vm_guard_lost_flag(int slot)
{
    return &vm_guard_entry_at(slot)->lost;
}

#endif /* VMSGAMP_GUARD_H */
