from libc.stdint cimport uint64_t

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

    cdef int pin(self) except -1
    cdef void unpin(self) noexcept
    cdef char *ptr(self, size_t off, size_t n) except NULL
    cdef int _check_open(self) except -1
    cdef char *_word(self, size_t off, size_t width) except NULL
    cdef int _writable(self) except -1
    cdef void _maybe_unmap(self) noexcept
