# cython: freethreading_compatible = False
"""Region: a mapped window of shared memory with bounds-checked typed access.

Every typed access is a single naturally aligned little-endian load or store
with an explicit memory order (csrc/vmsgamp_io.h).  Payload windows are
zero-copy memoryviews / numpy arrays.  A Region is unmapped only when nobody
can still reach it: close() while views are exported or while a FIFO/queue
has pinned it marks it closing and the unmap happens when the last user
lets go, so no access can ever touch an unmapped page.

The object behind a mapping is not trusted to keep its size either:

* a mapping that reaches past the end of a regular file, shm object or memfd
  is refused at map time (ObjectTooSmall); character devices (UIO, PCI
  resources, VFIO) have no meaningful st_size and their carriers check them;
* memfds vmsgamp creates are sealed against shrinking and growing
  (:func:`sealed_memfd`);
* every mapping is registered with a process-wide SIGBUS guard
  (csrc/vmsgamp_guard.h, which explains why the design is sound): if the
  object shrinks later, the access that faults gets zero pages instead of a
  signal death, the Region is marked lost, and every accessor (and every
  FIFO or queue built on it, through ``region_check_alive``) raises
  SharedObjectLost naming the region.
"""
cimport cython
from cpython.buffer cimport PyBUF_WRITABLE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.errno cimport errno
from libc.string cimport strerror
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.stat cimport struct_stat, fstat, S_ISREG
from posix.unistd cimport close as c_close

import fcntl
import os
import stat

from vmsgamp._core.io cimport (
    VM_RELAXED, VM_ACQUIRE, VM_RELEASE, VM_SEQ_CST, VM_MEM_NORMAL, VM_MEM_DEVICE,
    vm_load8, vm_load16, vm_load32, vm_load64,
    vm_store8, vm_store16, vm_store32, vm_store64,
    vm_copy_to_shared, vm_copy_from_shared, vm_zero_shared, vm_fence_seq_cst, vm_lost,
)

from vmsgamp.errors import ObjectTooSmall, SharedObjectLost

# The guard defines process-wide state: this module is the only one that
# includes it.  Others reach the lost flag through Region (region.pxd).
cdef extern from "vmsgamp_guard.h" nogil:
    int vm_guard_install()
    int vm_guard_add(void *start, size_t length)
    void vm_guard_remove(int slot)
    void vm_guard_mark_lost(int slot)
    const int *vm_guard_lost_flag(int slot)

RELAXED = VM_RELAXED
ACQUIRE = VM_ACQUIRE
RELEASE = VM_RELEASE
SEQ_CST = VM_SEQ_CST
MEM_NORMAL = VM_MEM_NORMAL
MEM_DEVICE = VM_MEM_DEVICE

_ORDER_NAMES = {"relaxed": VM_RELAXED, "acquire": VM_ACQUIRE,
                "release": VM_RELEASE, "seq_cst": VM_SEQ_CST}
_MEMTYPES = {"normal": VM_MEM_NORMAL, "device": VM_MEM_DEVICE}


cdef int _load_order(object order) except -1:
    cdef int o = _ORDER_NAMES[order] if isinstance(order, str) else order
    if o not in (VM_RELAXED, VM_ACQUIRE, VM_SEQ_CST):
        raise ValueError(f"invalid memory order for a load: {order!r} (relaxed, acquire, seq_cst)")
    return o


cdef int _store_order(object order) except -1:
    cdef int o = _ORDER_NAMES[order] if isinstance(order, str) else order
    if o not in (VM_RELAXED, VM_RELEASE, VM_SEQ_CST):
        raise ValueError(f"invalid memory order for a store: {order!r} (relaxed, release, seq_cst)")
    return o


SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(size_t size, name="vmsgamp"):
    """A new close-on-exec memfd of ``size`` bytes, sealed against shrinking
    and growing (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL).  Whoever we hand
    it to (a peer process, QEMU) can map, read and write it but can never
    truncate it under our mapping.  Returns the fd; the caller closes it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def memtype_from_name(name):
    """'normal' or 'device' (or the int constants) -> int."""
    if isinstance(name, int):
        if name not in (VM_MEM_NORMAL, VM_MEM_DEVICE):
            raise ValueError(f"unknown memtype {name!r}")
        return name
    try:
        return _MEMTYPES[name]
    except KeyError:
        raise ValueError(f"unknown memtype {name!r}: use 'normal' or 'device'") from None


cdef class Region:
    """A mapping of shared memory.

    Build one with :meth:`Region.from_fd`, :meth:`Region.memfd` or through
    ``vmsgamp.carriers.open_region(uri)``.  ``bus_base`` is the address the
    peer uses for offset 0 (virtqueue and buffer addresses are
    ``bus_base + offset``).  ``memtype`` is ``MEM_NORMAL`` for RAM and
    ``MEM_DEVICE`` for uncached device memory (payload copies then use aligned
    32-bit accesses).
    """

    def __cinit__(self):
        self.base = NULL
        self._map_base = NULL
        self._map_len = 0
        self.size = 0
        self._fd = -1
        self._exports = 0
        self._pins = 0
        self._closing = False
        self._unmapped = True
        self._on_close = []
        self.uri = None
        self._guard = -1
        self._lost = NULL
        self._was_lost = False
        self._file_end = 0
        self._sized = False

    def __init__(self):
        raise TypeError("use Region.from_fd(), Region.memfd() or vmsgamp.carriers.open_region()")

    @staticmethod
    def from_fd(int fd, size_t size, *, size_t offset=0, size_t map_offset=0,
                uint64_t bus_base=0, memtype="normal", bint readonly=False,
                bint own_fd=False, uri=None):
        """Map ``size`` bytes of ``fd`` starting at file offset ``offset``.

        ``offset`` must be page-aligned (it is the mmap offset); ``map_offset``
        is added to the mapped pointer (UIO maps that do not start on a page).
        With ``own_fd`` the Region keeps ``fd`` and closes it on close().

        For a regular file, shm object or memfd, a mapping that would reach
        past the object's end raises ObjectTooSmall.
        """
        cdef Region r = Region.__new__(Region)
        cdef int prot = PROT_READ if readonly else (PROT_READ | PROT_WRITE)
        cdef size_t maplen = size + map_offset
        cdef void *p
        if size == 0:
            raise ValueError("a region needs a non-zero size")
        if offset % os.sysconf("SC_PAGE_SIZE"):
            raise ValueError(f"mmap offset {offset:#x} is not page-aligned")
        mt = memtype_from_name(memtype)
        st = os.fstat(fd)
        # Pages past the end of a file-like object fault (SIGBUS) on first
        # touch: refuse such a mapping now, with the sizes in the message.
        if stat.S_ISREG(st.st_mode) and <uint64_t>offset + maplen > <uint64_t>st.st_size:
            raise ObjectTooSmall(
                f"{uri or f'fd {fd}'}: cannot map [{offset:#x}, {offset + maplen:#x}): the object "
                f"is only {st.st_size:#x} bytes, so the mapping would reach past its end")
        if vm_guard_install() != 0:
            e = errno
            raise OSError(e, f"cannot install the SIGBUS guard: {strerror(e).decode()}")
        with nogil:
            p = mmap(NULL, maplen, prot, MAP_SHARED, fd, <long>offset)
        if p == MAP_FAILED:
            e = errno
            raise OSError(e, f"cannot map {maplen} bytes at offset {offset:#x} of fd {fd}: "
                             f"{strerror(e).decode()}")
        r._guard = vm_guard_add(p, maplen)
        if r._guard < 0:
            e = errno
            munmap(p, maplen)
            raise OSError(e, f"cannot guard a new mapping ({strerror(e).decode()}): "
                             f"too many regions are mapped")
        r._lost = vm_guard_lost_flag(r._guard)
        r._map_base = <char *>p
        r._map_len = maplen
        r.base = <char *>p + map_offset
        r.size = size
        r._unmapped = False
        r.bus_base = bus_base
        r.memtype = mt
        r.readonly = readonly
        r._fd = fd if own_fd else -1
        r.uri = uri
        r._file_end = <uint64_t>offset + maplen
        r._sized = stat.S_ISREG(st.st_mode)
        return r

    @staticmethod
    def memfd(size_t size, name="vmsgamp", *, uint64_t bus_base=0):
        """A new anonymous shared-memory region (memfd) that can be passed to
        another process by its fd (``region.fd``) or inherited over fork.
        The memfd is sealed (:func:`sealed_memfd`): nobody can shrink it."""
        fd = sealed_memfd(size, name)
        try:
            return Region.from_fd(fd, size, bus_base=bus_base, own_fd=True,
                                  uri=f"memfd:{name}")
        except BaseException:
            os.close(fd)
            raise

    # ---- lifetime ---------------------------------------------------------

    cdef int pin(self) except -1:
        self._check_open()
        self._pins += 1
        return 0

    cdef void unpin(self) noexcept:
        if self._pins > 0:
            self._pins -= 1
        self._maybe_unmap()

    cdef int _check_open(self) except -1:
        if self._closing or self._unmapped:
            raise ValueError(f"region {self.uri or ''} is closed".replace("  ", " "))
        if vm_lost(self._lost):
            self._raise_lost()
        return 0

    cdef int _raise_lost(self) except -1:
        raise SharedObjectLost(self.uri)

    cdef void _unguard(self) noexcept:
        # Before munmap: once vm_guard_remove returns no SIGBUS handler can
        # map over this range any more (it might be reused after munmap).
        if self._guard >= 0:
            vm_guard_remove(self._guard)
            self._was_lost = self._was_lost or vm_lost(self._lost)
            self._guard = -1
            self._lost = NULL

    cdef void _maybe_unmap(self) noexcept:
        if not self._closing or self._unmapped or self._exports or self._pins:
            return
        self._unguard()
        munmap(self._map_base, self._map_len)
        self._unmapped = True
        self.base = NULL
        self._map_base = NULL
        self._close_fd()
        # _on_close may be None here when the cyclic GC cleared this object
        callbacks, self._on_close = self._on_close or [], []
        for cb in callbacks:
            try:
                cb()
            except Exception:
                pass

    def add_close_callback(self, cb):
        """Run ``cb()`` once the mapping is really gone (used by carriers to
        release what backs the mapping)."""
        if self._unmapped:
            cb()
        else:
            self._on_close.append(cb)

    def close(self):
        """Close the region.  Idempotent.  While views are exported or a FIFO
        or queue still uses the region, the unmap is deferred until the last
        of them is released; the region refuses new accesses at once."""
        self._closing = True
        self._maybe_unmap()

    @property
    def closed(self):
        return self._closing or self._unmapped

    @property
    def lost(self):
        """True once the object behind the mapping shrank under it (the
        mapping then holds zero pages; accessors raise SharedObjectLost)."""
        return self._was_lost or bool(vm_lost(self._lost))

    cdef bint poll_size_c(self) noexcept nogil:
        # One fstat: an object that is now shorter than the mapping is lost
        # even if nothing has touched the missing pages yet (an idle waiter
        # would otherwise never find out).  Only for fds the region owns: a
        # borrowed fd may be closed and reused behind our back.
        cdef struct_stat st
        if self._guard >= 0 and self._fd >= 0 and self._sized:
            if fstat(self._fd, &st) == 0 and S_ISREG(st.st_mode) and <uint64_t>st.st_size < self._file_end:
                vm_guard_mark_lost(self._guard)
        return vm_lost(self._lost) != 0

    def poll_size(self):
        """Check the object's size now (one fstat); if it shrank below the
        mapping, mark the region lost.  Returns ``lost``.  The FIFO's wait
        loops do this every 100 ms while idle."""
        if self._unmapped:
            return self.lost
        return self._was_lost or self.poll_size_c()

    def check_alive(self):
        """Raise SharedObjectLost if the object shrank under the mapping.
        One load: cheap enough for every API boundary.  (Cython code uses
        ``region_check_alive(region)`` from region.pxd, also without the GIL.)"""
        if vm_lost(self._lost):
            self._raise_lost()

    @property
    def mapped(self):
        """True while the memory is still mapped (close may be deferred)."""
        return not self._unmapped

    @property
    def fd(self):
        """The file descriptor backing the region, or -1 if it does not own one."""
        return self._fd

    def fileno(self):
        if self._fd < 0:
            raise ValueError("this region does not own a file descriptor")
        return self._fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef void _close_fd(self) noexcept:
        # C close(), not os.close: this also runs from __dealloc__ (directly or
        # through the last unpin), and at interpreter shutdown the module's
        # globals such as ``os`` may already be None.  An error from close()
        # leaves nothing to undo: the fd is gone either way (Linux).
        if self._fd >= 0:
            c_close(self._fd)
            self._fd = -1

    def __dealloc__(self):
        # C calls only (munmap, close): see _close_fd.
        if not self._unmapped and self._map_base != NULL:
            self._unguard()
            munmap(self._map_base, self._map_len)
            self._unmapped = True
        self._close_fd()

    def __repr__(self):
        state = "closed" if self.closed else ("lost" if self.lost else "open")
        mt = "device" if self.memtype == VM_MEM_DEVICE else "normal"
        return (f"<Region {self.uri or '?'} size={self.size:#x} bus_base={self.bus_base:#x} "
                f"memtype={mt} {state}>")

    def __len__(self):
        return self.size

    # ---- bounds -----------------------------------------------------------

    cdef char *ptr(self, size_t off, size_t n) except NULL:
        self._check_open()
        if off > self.size or n > self.size - off:
            raise IndexError(f"access [{off:#x}, +{n:#x}) outside region of size {self.size:#x}")
        return self.base + off

    cdef char *_word(self, size_t off, size_t width) except NULL:
        cdef char *p = self.ptr(off, width)
        if (<uintptr_t>p) % width:
            raise ValueError(f"{width * 8}-bit access at offset {off:#x} is not naturally aligned")
        return p

    def check_range(self, size_t off, size_t n):
        """Raise IndexError unless [off, off+n) lies inside the region."""
        self.ptr(off, n)

    # ---- typed access -----------------------------------------------------

    def load8(self, size_t off, order=VM_RELAXED):
        v = vm_load8(self._word(off, 1), _load_order(order))
        self._after_access()
        return v

    def load16(self, size_t off, order=VM_RELAXED):
        v = vm_load16(self._word(off, 2), _load_order(order))
        self._after_access()
        return v

    def load32(self, size_t off, order=VM_RELAXED):
        v = vm_load32(self._word(off, 4), _load_order(order))
        self._after_access()
        return v

    def load64(self, size_t off, order=VM_RELAXED):
        v = vm_load64(self._word(off, 8), _load_order(order))
        self._after_access()
        return v

    cdef int _after_access(self) except -1:
        # The access itself may have been the one that found the object
        # shrunk: never hand back zeros from the replacement pages as data.
        if vm_lost(self._lost):
            self._raise_lost()
        return 0

    cdef int _writable(self) except -1:
        if self.readonly:
            raise PermissionError(f"region {self.uri or ''} is mapped read-only")
        return 0

    def store8(self, size_t off, uint8_t value, order=VM_RELAXED):
        self._writable()
        vm_store8(self._word(off, 1), value, _store_order(order))
        self._after_access()

    def store16(self, size_t off, uint16_t value, order=VM_RELAXED):
        self._writable()
        vm_store16(self._word(off, 2), value, _store_order(order))
        self._after_access()

    def store32(self, size_t off, uint32_t value, order=VM_RELAXED):
        self._writable()
        vm_store32(self._word(off, 4), value, _store_order(order))
        self._after_access()

    def store64(self, size_t off, uint64_t value, order=VM_RELAXED):
        self._writable()
        vm_store64(self._word(off, 8), value, _store_order(order))
        self._after_access()

    def fence(self):
        """Full memory barrier (seq_cst)."""
        vm_fence_seq_cst()

    # ---- payload ----------------------------------------------------------

    def read(self, size_t off, size_t n):
        """Copy n bytes out of the region (word-sized for device memory)."""
        cdef char *p = self.ptr(off, n)
        out = bytearray(n)
        cdef char *d = out
        with nogil:
            vm_copy_from_shared(d, p, n, self.memtype)
        self._after_access()
        return bytes(out)

    @cython.boundscheck(False)  # src[0] is read only when n = len(src) > 0
    def write(self, size_t off, data):
        """Copy bytes into the region (word-sized for device memory)."""
        self._writable()
        cdef const unsigned char[::1] src = memoryview(data).cast("B")
        cdef size_t n = src.shape[0]
        cdef char *p = self.ptr(off, n)
        if n:
            with nogil:
                vm_copy_to_shared(p, &src[0], n, self.memtype)
            self._after_access()

    def zero(self, size_t off, size_t n):
        self._writable()
        cdef char *p = self.ptr(off, n)
        with nogil:
            vm_zero_shared(p, n, self.memtype)
        self._after_access()

    def view(self, size_t off=0, n=None):
        """Zero-copy memoryview of [off, off+n).  Keeps the mapping alive."""
        cdef size_t ln = (self.size - off) if n is None else n
        self.ptr(off, ln)
        return memoryview(self)[off:off + ln]

    def ndarray(self, dtype="u1", size_t off=0, count=None):
        """Zero-copy numpy array over the region (little-endian dtypes advised:
        '<u4', '<u8').  For normal memory only; device memory needs read()/write()."""
        import numpy as np
        dt = np.dtype(dtype)
        cdef size_t n = ((self.size - off) // dt.itemsize) if count is None else count
        self.ptr(off, n * dt.itemsize)
        return np.frombuffer(self, dtype=dt, count=n, offset=off)

    # ---- buffer protocol ----------------------------------------------------

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        self._check_open()
        if (flags & PyBUF_WRITABLE) and self.readonly:
            raise BufferError("region is mapped read-only")
        buffer.buf = self.base
        buffer.obj = self
        buffer.len = self.size
        buffer.readonly = self.readonly
        buffer.itemsize = 1
        buffer.format = "B"
        buffer.ndim = 1
        buffer.shape = NULL
        buffer.strides = NULL
        buffer.suboffsets = NULL
        buffer.internal = NULL
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self._exports -= 1
        self._maybe_unmap()
