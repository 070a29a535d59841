# cython: freethreading_compatible = False
"""AddressSpace: the bus addresses a peer writes (SET_VQUEUE, descriptors)
mapped onto local Regions, every access bounds-checked.

A window is ``(bus_base, region, offset, length)``: bus addresses
``[bus_base, bus_base + length)`` are bytes ``[offset, offset + length)`` of
``region``.  Windows never overlap.  A range that leaves its window, spans
two windows or lies outside all of them is refused (``AddressError``), never
read or written.

The regions are pinned while the AddressSpace is open so the raw pointers
the queues keep cannot dangle; ``close()`` unpins them (deferred while a
nogil batch is running).
"""
from libc.stdint cimport uint64_t, uint32_t, uintptr_t
from libc.stdlib cimport malloc, realloc, free
from vmsgamp._core.region cimport Region, region_check_alive
from vmsgamp._core.io cimport VM_MEM_NORMAL, vm_copy_from_shared, vm_copy_to_shared

from vmsgamp.errors import VmsgampError


class AddressError(VmsgampError, IndexError):
    """A bus address range that is not entirely inside one window."""


cdef class AddressSpace:
    """Bus address -> Region translation over non-overlapping windows."""

    def __cinit__(self):
        self._win = NULL
        self._nwin = 0
        self._cap = 0
        self._last = 0
        self._regions = []
        self.closed = False
        self._busy = 0
        self.mapped_bytes = 0

    def __init__(self, windows=()):
        for w in windows:
            self.add_window(*w)

    @staticmethod
    def identity(Region region):
        """One window covering the whole region at ``region.bus_base``."""
        cdef AddressSpace a = AddressSpace()
        a.add_window(region.bus_base, region, 0, region.size)
        return a

    def add_window(self, uint64_t bus_base, Region region, uint64_t offset=0, length=None):
        """Map bus ``[bus_base, bus_base+length)`` to ``region[offset:offset+length]``."""
        self.check_open()
        if self._busy:
            # a nogil batch is walking the window table right now
            raise RuntimeError("cannot add a window while a queue batch is running")
        cdef uint64_t ln
        if length is None:
            if offset > region.size:
                raise ValueError(f"offset {offset:#x} beyond region of size {region.size:#x}")
            ln = region.size - offset
        else:
            ln = length
        if ln == 0:
            raise ValueError("a window needs a non-zero length")
        if offset > region.size or ln > region.size - offset:
            raise ValueError(f"window [{offset:#x}, +{ln:#x}) outside region of size {region.size:#x}")
        if bus_base + ln - 1 < bus_base:
            raise ValueError(f"window at bus {bus_base:#x} of {ln:#x} bytes wraps the 64-bit bus")
        cdef int i
        for i in range(self._nwin):
            # [a, a+la) and [b, b+lb) overlap iff a < b+lb and b < a+la (written without overflow)
            if (bus_base <= self._win[i].bus_base + (self._win[i].length - 1)
                    and self._win[i].bus_base <= bus_base + (ln - 1)):
                raise ValueError(
                    f"window [{bus_base:#x}, +{ln:#x}) overlaps window "
                    f"[{self._win[i].bus_base:#x}, +{self._win[i].length:#x})")
        cdef char *p = region.ptr(offset, ln)
        if self._nwin == self._cap:
            newcap = self._cap * 2 if self._cap else 4
            nw = <vm_window *>realloc(self._win, newcap * sizeof(vm_window))
            if nw == NULL:
                raise MemoryError()
            self._win = nw
            self._cap = newcap
        region.pin()
        self._win[self._nwin].bus_base = bus_base
        self._win[self._nwin].length = ln
        self._win[self._nwin].ptr = p
        self._win[self._nwin].offset = offset
        self._win[self._nwin].writable = not region.readonly
        self._win[self._nwin].memtype = region.memtype
        self._win[self._nwin].lost = region._lost
        self._nwin += 1
        self.mapped_bytes += ln
        self._regions.append(region)

    @property
    def windows(self):
        """``[(bus_base, region, offset, length), ...]`` in insertion order."""
        return [(self._win[i].bus_base, self._regions[i], self._win[i].offset, self._win[i].length)
                for i in range(self._nwin)]

    # ---- fast path --------------------------------------------------------

    cdef char *tr(self, uint64_t addr, uint64_t n, bint write, int *win) noexcept nogil:
        """Local pointer of bus [addr, addr+n) or NULL.  No exception, no GIL:
        the queues' chain walks call this for every descriptor."""
        cdef int i = self._last
        cdef vm_window *w
        cdef uint64_t rel
        if i < self._nwin:
            w = &self._win[i]
            rel = addr - w.bus_base
            if addr >= w.bus_base and n <= w.length and rel <= w.length - n:
                if write and not w.writable:
                    return NULL
                win[0] = i
                return w.ptr + rel
        for i in range(self._nwin):
            w = &self._win[i]
            rel = addr - w.bus_base
            if addr >= w.bus_base and n <= w.length and rel <= w.length - n:
                if write and not w.writable:
                    return NULL
                self._last = i
                win[0] = i
                return w.ptr + rel
        return NULL

    cdef int check_open(self) except -1:
        """Every queue and chain call starts here: a closed address space, or
        a window whose shared object shrank under it (the SIGBUS guard
        replaced its pages with zeros), ends the call with an error."""
        cdef int i
        if self.closed:
            raise ValueError("address space is closed")
        for i in range(self._nwin):
            if vm_lost(self._win[i].lost):
                region_check_alive(<Region>self._regions[i])   # raises SharedObjectLost
        return 0

    cdef void enter(self) noexcept:
        self._busy += 1

    cdef void leave(self):
        self._busy -= 1
        if self._busy == 0 and self.closed:
            self._release()

    cdef Region region_of(self, int win):
        return <Region>self._regions[win]

    # ---- Python API -------------------------------------------------------

    def translate(self, uint64_t addr, uint64_t length, *, bint write=False):
        """``(region, offset)`` of bus ``[addr, addr+length)``; AddressError if
        the range is not entirely inside one window (or, with ``write``, the
        window's region is read-only)."""
        self.check_open()
        cdef int w = -1
        cdef char *p = self.tr(addr, length, write, &w)
        if p == NULL:
            raise AddressError(f"bus range [{addr:#x}, +{length:#x}) is not inside one "
                               f"{'writable ' if write else ''}window")
        return self._regions[w], self._win[w].offset + <uint64_t>(p - self._win[w].ptr)

    def view(self, uint64_t addr, uint64_t length, *, bint write=False):
        """Zero-copy memoryview of bus ``[addr, addr+length)``."""
        region, off = self.translate(addr, length, write=write)
        return region.view(off, length)

    def read(self, uint64_t addr, uint64_t length):
        """Copy bytes out of bus ``[addr, addr+length)``."""
        region, off = self.translate(addr, length)
        return region.read(off, length)

    def write(self, uint64_t addr, data):
        """Copy bytes into bus memory at ``addr``."""
        n = memoryview(data).nbytes
        region, off = self.translate(addr, n, write=True)
        region.write(off, data)

    def contains(self, uint64_t addr, uint64_t length=1):
        cdef int w
        return not self.closed and self.tr(addr, length, False, &w) != NULL

    cdef _release(self):
        regions, self._regions = self._regions, []
        self._nwin = 0
        self.mapped_bytes = 0
        for r in regions:
            (<Region>r).unpin()

    def close(self):
        """Unpin the regions.  Idempotent.  Queues built on this address
        space refuse further work."""
        if self.closed:
            return
        self.closed = True
        if self._busy == 0:
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self._regions:
            for r in self._regions:
                (<Region>r).unpin()
        free(self._win)

    def __repr__(self):
        ws = ", ".join(f"[{self._win[i].bus_base:#x}, +{self._win[i].length:#x})"
                       for i in range(self._nwin))
        return f"<AddressSpace {ws}{' closed' if self.closed else ''}>"


cdef class RegionAllocator:
    """Bump allocator over ``region[start:end)`` for driver-side rings and
    buffers.  Returns bus addresses (``bus_base + offset``); ``reset()``
    forgets everything (rings are allocated once per queue lifetime)."""

    def __init__(self, Region region, uint64_t start=0, end=None, bus_base=None):
        self.region = region
        self.bus_base = region.bus_base if bus_base is None else bus_base
        self.end = region.size if end is None else end
        if self.end > region.size or start > self.end:
            raise ValueError(f"allocator range [{start:#x}, {self.end:#x}) outside region")
        self.start = start
        self.cursor = start

    def alloc(self, uint64_t size, uint64_t align=16):
        """Bus address of ``size`` fresh bytes aligned to ``align`` (a power of
        two).  MemoryError when the range is exhausted."""
        if align == 0 or (align & (align - 1)):
            raise ValueError(f"alignment {align} is not a power of two")
        # the bus address must be aligned, and so must the local pointer
        # (index words are accessed as naturally aligned atomics)
        cdef uint64_t skew = (self.bus_base + self.cursor) & (align - 1)
        cdef uint64_t off = self.cursor + ((align - skew) & (align - 1))
        if off > self.end or size > self.end - off:
            raise MemoryError(f"allocator exhausted: {size} bytes (align {align}) do not fit "
                              f"in [{self.cursor:#x}, {self.end:#x})")
        if (<uintptr_t>self.region.ptr(off, size)) & (align - 1):
            raise ValueError(f"bus_base {self.bus_base:#x} and the mapping disagree on alignment {align}")
        self.cursor = off + size
        return self.bus_base + off

    def offset_of(self, uint64_t addr):
        """Region offset of a bus address returned by alloc()."""
        if addr < self.bus_base + self.start or addr > self.bus_base + self.end:
            raise ValueError(f"{addr:#x} was not allocated here")
        return addr - self.bus_base

    @property
    def free_bytes(self):
        return self.end - self.cursor

    def reset(self):
        self.cursor = self.start
