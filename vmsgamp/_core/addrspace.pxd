# AddressSpace: bus address -> local pointer, bounds-checked.
from libc.stdint cimport uint64_t, uint32_t
from vmsgamp._core.region cimport Region
from vmsgamp._core.io cimport vm_lost

ctypedef struct vm_window:
    uint64_t bus_base      # first bus address of the window
    uint64_t length        # bytes
    char *ptr              # local pointer of bus_base (region.base + offset)
    uint64_t offset        # offset of bus_base inside the region
    bint writable
    int memtype
    const int *lost        # the region's lost flag (SIGBUS guard), checked at API boundaries

cdef class AddressSpace:
    cdef vm_window *_win
    cdef int _nwin
    cdef int _cap
    cdef int _last             # window of the last hit (most lookups repeat)
    cdef list _regions         # Region per window (pinned while open)
    cdef readonly bint closed
    cdef readonly uint64_t mapped_bytes   # sum of the window lengths
    cdef int _busy             # nogil sections in flight: unpin deferred

    cdef char *tr(self, uint64_t addr, uint64_t n, bint write, int *win) noexcept nogil
    cdef int check_open(self) except -1
    cdef void enter(self) noexcept
    cdef void leave(self)
    cdef Region region_of(self, int win)
    cdef _release(self)

cdef class RegionAllocator:
    cdef readonly Region region
    cdef readonly uint64_t bus_base
    cdef readonly uint64_t start
    cdef readonly uint64_t end
    cdef readonly uint64_t cursor
