"""EpbSink: the tracer's per-message work, in C.

A bus thread records each message as a finished pcapng Enhanced Packet Block
(the layout ``vmsgamp.trace._pcapng.encode_packets`` writes, which stays the
reference) appended to a bytearray: a clock read, a 44-byte header and
trailer and one copy of the message.  The writer thread only takes the
filled buffer (``take()``: O(1), the next buffer is a fresh one) and writes
it, the GIL released in ``write()``.  So nothing per message runs in the
writer, and the bus thread never waits for the GIL while the writer encodes
a batch (what the Python writer did: milliseconds per 0.1 s of traffic).

Every method runs with the GIL held and calls nothing that releases it, so
a record and a take never interleave (the taps' ordering guarantee).
"""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME

cdef enum:
    _EPB = 6                    # block type
    _EPB_FIXED = 44             # header 28 + epb_flags option 8 + opt_endofopt 4 + trailing length 4
    _EPB_FLAGS = 2              # option code
    _MAX_DATA = 1 << 24         # far above any slot; keeps every length field inside 32 bits
    _MIN_BUFFER = 1 << 16


cdef inline void _le32(uint8_t *p, uint32_t v) noexcept:
    # The file is little-endian whatever the host (the section header says so).
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = v >> 24


cdef inline bytes _as_bytes(object data):
    # The bus hands over bytes; anything else bytes-like is copied (a tap
    # never breaks a bus over a type), anything else is a TypeError.
    if type(data) is bytes:
        return <bytes>data
    return bytes(memoryview(data))


cdef inline uint64_t _now_ns() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)    # what time.time_ns() reads
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef class EpbSink:
    """Encoded packets waiting for the writer.  ``record()`` appends one;
    ``take()`` hands over everything recorded so far as ``(bytearray,
    count)`` and starts a new buffer."""

    cdef bytearray _buf
    cdef Py_ssize_t _used
    cdef Py_ssize_t _cap_hint          # the next buffer's size: what the last one needed
    cdef readonly unsigned long long pending    # messages in the current buffer
    cdef readonly unsigned long long recorded   # messages ever recorded
    cdef readonly unsigned long long takes      # buffers handed over

    def __cinit__(self):
        self._cap_hint = _MIN_BUFFER
        self._buf = PyByteArray_FromStringAndSize(NULL, self._cap_hint)
        self._used = 0
        self.pending = self.recorded = self.takes = 0

    @property
    def pending_bytes(self) -> int:
        return self._used

    cdef int add(self, uint32_t interface, uint32_t direction, bytes data, uint64_t ts) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if n > _MAX_DATA:
            raise ValueError(f"a {n}-byte message is not a virtio-msg message")
        cdef Py_ssize_t pad = (-n) & 3
        cdef Py_ssize_t total = _EPB_FIXED + n + pad
        cdef Py_ssize_t need = self._used + total
        cdef Py_ssize_t cap = len(self._buf)
        if need > cap:
            # Never exported (take() hands the buffer over whole), so it can grow.
            PyByteArray_Resize(self._buf, need if need > 2 * cap else 2 * cap)
        cdef uint8_t *p = <uint8_t *>PyByteArray_AS_STRING(self._buf) + self._used
        _le32(p, _EPB)
        _le32(p + 4, <uint32_t>total)
        _le32(p + 8, interface)
        _le32(p + 12, <uint32_t>(ts >> 32))
        _le32(p + 16, <uint32_t>ts)
        _le32(p + 20, <uint32_t>n)          # captured length
        _le32(p + 24, <uint32_t>n)          # original length
        memcpy(p + 28, PyBytes_AS_STRING(data), n)
        p += 28 + n
        memset(p, 0, pad)
        p += pad
        _le32(p, _EPB_FLAGS | (4 << 16))    # option code, option length
        _le32(p + 4, direction)
        _le32(p + 8, 0)                     # opt_endofopt
        _le32(p + 12, <uint32_t>total)
        self._used = need
        self.pending += 1
        self.recorded += 1
        return 0

    def record(self, uint32_t interface, uint32_t direction, data, time_ns=None) -> None:
        """Add one message (bytes-like; ``direction``: the EPB flags'
        direction bits; ``time_ns`` defaults to now)."""
        self.add(interface, direction & 3, _as_bytes(data),
                 _now_ns() if time_ns is None else <uint64_t>time_ns)

    def take(self):
        """Everything recorded since the last take, as ``(bytearray, count)``
        (the bytearray is the caller's: the sink never touches it again)."""
        out = self._buf
        count = self.pending
        PyByteArray_Resize(out, self._used)
        if self._used > self._cap_hint:
            self._cap_hint = self._used
        self._buf = PyByteArray_FromStringAndSize(NULL, self._cap_hint)
        self._used = 0
        self.pending = 0
        self.takes += 1
        return out, count


cdef class SinkTap:
    """One bus endpoint's ``tx(data)`` / ``rx(data)`` into a sink, with the
    EPB direction of each; counts what it recorded.  ``data``: bytes (any
    other bytes-like object is copied first)."""

    cdef EpbSink _sink
    cdef uint32_t _interface, _tx_dir, _rx_dir
    cdef readonly unsigned long long tx_count
    cdef readonly unsigned long long rx_count

    def __cinit__(self, EpbSink sink not None, uint32_t interface, uint32_t tx_direction,
                  uint32_t rx_direction):
        self._sink = sink
        self._interface = interface
        self._tx_dir = tx_direction & 3
        self._rx_dir = rx_direction & 3
        self.tx_count = self.rx_count = 0

    @property
    def interface(self) -> int:
        return self._interface

    @property
    def tx_direction(self) -> int:
        return self._tx_dir

    @property
    def rx_direction(self) -> int:
        return self._rx_dir

    def tx(self, data) -> None:
        self._sink.add(self._interface, self._tx_dir, _as_bytes(data), _now_ns())
        self.tx_count += 1

    def rx(self, data) -> None:
        self._sink.add(self._interface, self._rx_dir, _as_bytes(data), _now_ns())
        self.rx_count += 1
