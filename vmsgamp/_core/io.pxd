# Declarations of csrc/vmsgamp_io.h: the single way to touch shared memory.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "vmsgamp_io.h" nogil:
    enum:
        VM_RELAXED
        VM_ACQUIRE
        VM_RELEASE
        VM_SEQ_CST
        VM_MEM_NORMAL
        VM_MEM_DEVICE
    uint8_t vm_load8(const void *p, int order)
    uint16_t vm_load16(const void *p, int order)
    uint32_t vm_load32(const void *p, int order)
    uint64_t vm_load64(const void *p, int order)
    void vm_store8(void *p, uint8_t v, int order)
    void vm_store16(void *p, uint16_t v, int order)
    void vm_store32(void *p, uint32_t v, int order)
    void vm_store64(void *p, uint64_t v, int order)
    void vm_fence_seq_cst()
    void vm_fence_acquire()
    void vm_fence_release()
    void vm_cpu_relax()
    void vm_prefetch_read(const void *p)
    void vm_prefetch_write(void *p)
    void vm_copy_to_shared(void *dst, const void *src, size_t n, int memtype)
    void vm_copy_from_shared(void *dst, const void *src, size_t n, int memtype)
    void vm_zero_shared(void *dst, size_t n, int memtype)
    # private words (our own threads only)
    int vm_int_load(const int *p, int order)
    void vm_int_store(int *p, int v, int order)
    int vm_int_add(int *p, int d)
    int vm_int_xchg(int *p, int v)
    int vm_lost(const int *flag)
    void vm_spin_lock(int *lock)
    void vm_spin_unlock(int *lock)
