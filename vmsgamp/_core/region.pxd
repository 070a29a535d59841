from libc.stdint cimport uint64_t
from vmsgamp._core.io cimport vm_lost

cdef class Region:
    cdef char *base            # start of the usable window (mmap base + map_offset)
    cdef char *_map_base       # what mmap returned (munmap target)
    cdef size_t _map_len
    cdef readonly size_t size
    cdef public uint64_t bus_base
    cdef readonly int memtype
    cdef readonly bint readonly
    cdef readonly object uri
    cdef int _fd               # owned fd, or -1
    cdef int _exports          # buffer views handed out
    cdef int _pins             # internal users (FIFOs, queues) holding raw pointers
    cdef bint _closing
    cdef bint _unmapped
    cdef object _on_close      # callables run after unmapping
    cdef int _guard            # slot in the SIGBUS guard table (vmsgamp_guard.h), or -1
    cdef const int *_lost      # that slot's lost flag while mapped, else NULL
    cdef bint _was_lost        # the lost flag as it was when the mapping went away
    cdef uint64_t _file_end    # file offset just past the mapping (for the size poll)
    cdef bint _sized           # a regular file / shm / memfd: its size can be polled

    cdef int pin(self) except -1
    cdef void unpin(self) noexcept
    cdef char *ptr(self, size_t off, size_t n) except NULL
    cdef int _check_open(self) except -1
    cdef int _raise_lost(self) except -1
    cdef void _unguard(self) noexcept
    cdef int _after_access(self) except -1
    cdef bint poll_size_c(self) noexcept nogil
    cdef char *_word(self, size_t off, size_t width) except NULL
    cdef int _writable(self) except -1
    cdef void _maybe_unmap(self) noexcept
    cdef void _close_fd(self) noexcept


# ---- the lost check, for every module that keeps raw pointers into a Region ----
# A peer that truncates the object under the mapping turns the mapping into
# private zero pages (vmsgamp_guard.h) and sets the Region's lost flag.  Code
# that reads or writes the mapping through cached pointers calls one of these
# at its API boundaries and after each copy out of shared memory; both are one
# fenced load, no call, usable without the GIL.

cdef inline bint region_lost(Region r) noexcept nogil:
    """True once the object behind ``r`` shrank under the mapping."""
    return vm_lost(r._lost) != 0


cdef inline int region_check_alive(Region r) except -1 nogil:
    """Raise SharedObjectLost (naming the region's URI) if ``r`` was lost."""
    if vm_lost(r._lost):
        with gil:
            r._raise_lost()
    return 0
