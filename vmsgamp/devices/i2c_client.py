"""Driver side of virtio-i2c: an smbus-like client over a probed device.

::

    bus = I2cClient.open(amp_driver, dev_num)
    bus.write_i2c_block_data(0x50, 0x10, b"hello")
    bus.read_i2c_block_data(0x50, 0x10, 5)      # -> [104, 101, 108, 108, 111]
    w, r = I2cMsg.write(0x50, [0x10]), I2cMsg.read(0x50, 5)
    bus.i2c_rdwr(w, r); bytes(r)                  # combined transfer (repeated START)

Every call is one group of requests, laid out as Linux's i2c-virtio does: one
chain per message (out header, buffer if any, status byte), FAIL_NEXT on
every request but the last, one kick.  A failed request raises ``I2cError``
naming the address and the message index; messages before it completed.
"""
from __future__ import annotations

import errno
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any

from vmsgamp.devices.i2c import (
    OUT_HDR, VIRTIO_I2C_F_ZERO_LENGTH_REQUEST, VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD,
    VIRTIO_I2C_MSG_OK, VIRTIO_ID_I2C, encode_addr,
)
from vmsgamp.errors import VmsgampError

STATUS_UNSET = 0xFF   # what we put in the status byte, so "device did not write it" is visible


class I2cError(VmsgampError, OSError):
    """The device reported VIRTIO_I2C_MSG_ERR (address NACK, bus error, or a
    request it found malformed).  ``errno`` is EREMOTEIO like Linux i2c-dev;
    ``completed`` messages before ``index`` went through."""

    def __init__(self, addr: int, index: int, count: int, status: int):
        what = "no status" if status == STATUS_UNSET else f"status {status}"
        OSError.__init__(self, errno.EREMOTEIO,
                         f"I2C transfer to address {addr:#04x} failed at message {index + 1} of {count} ({what})")
        self.addr = addr
        self.index = index
        self.completed = index
        self.status = status


class I2cMsg:
    """One message of an ``i2c_rdwr`` transfer (like smbus2's i2c_msg).
    After the transfer a read message's ``data`` holds what was read."""

    __slots__ = ("addr", "read_flag", "data", "length")

    def __init__(self, addr: int, read: bool, data: bytes | bytearray, length: int):
        self.addr = addr
        self.read_flag = read
        self.data = bytes(data)
        self.length = length

    @classmethod
    def read(cls, addr: int, length: int) -> "I2cMsg":
        return cls(addr, True, b"", length)

    @classmethod
    def write(cls, addr: int, data: Iterable[int] | bytes) -> "I2cMsg":
        buf = bytes(data)
        return cls(addr, False, buf, len(buf))

    def __bytes__(self) -> bytes:
        return self.data

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        if self.read_flag:
            return f"I2cMsg.read({self.addr:#04x}, {self.length})"
        return f"I2cMsg.write({self.addr:#04x}, {self.data!r})"


class I2cClient:
    """smbus-like access to the targets behind a virtio-i2c device.

    ``dev`` is a DriverDevice (see ``vmsgamp.bus``) probed with the
    ZERO_LENGTH_REQUEST feature; ``open`` does that.  Calls are synchronous
    and not thread-safe (one transfer in flight at a time)."""

    def __init__(self, dev: Any, *, timeout: float = 5.0, data_size: int = 16384):
        if not dev.features >> VIRTIO_I2C_F_ZERO_LENGTH_REQUEST & 1:
            # "A driver MUST ... abort negotiation with the device, if the
            # device doesn't offer this feature."
            raise VmsgampError("virtio-i2c device did not negotiate ZERO_LENGTH_REQUEST")
        self.dev = dev
        self.queue = dev.queues[0]
        self.timeout = timeout
        self.max_msgs = 64
        self._hdr_addr, self._hdr = dev.alloc(OUT_HDR.size * self.max_msgs, 16)
        self._st_addr, self._st = dev.alloc(self.max_msgs, 16)
        self._data_size = 0
        self._grow(data_size)
        self._seq = 0
        self._stale = False

    @classmethod
    def open(cls, driver: Any, dev_num: int, *, packed: bool | None = None, timeout: float = 5.0,
             **kw: Any) -> "I2cClient":
        """Probe ``dev_num`` on ``driver`` (an AmpDriver) and wrap it."""
        info = driver.info(dev_num)
        if info.device_id != VIRTIO_ID_I2C:
            raise VmsgampError(f"device {dev_num} is {info.name}, not i2c")
        if not info.features >> VIRTIO_I2C_F_ZERO_LENGTH_REQUEST & 1:
            raise VmsgampError(f"i2c device {dev_num} does not offer ZERO_LENGTH_REQUEST")
        dev = driver.open(dev_num, features=1 << VIRTIO_I2C_F_ZERO_LENGTH_REQUEST, packed=packed)
        return cls(dev, timeout=timeout, **kw)

    def _grow(self, size: int) -> None:
        # the driver allocator only bumps: a bigger arena replaces the old one
        self._data_addr, self._data = self.dev.alloc(size, 16)
        self._data_size = size

    # ---- the general transfer ---------------------------------------------------------
    def i2c_rdwr(self, *msgs: I2cMsg) -> list[bytes]:
        """Run ``msgs`` as one combined transfer; returns what each read
        message read (also left in its ``data``)."""
        if not msgs:
            return []
        if self._stale:
            raise VmsgampError("i2c client is unusable after a timed-out transfer; reopen the device")
        if len(msgs) > self.max_msgs:
            raise ValueError(f"at most {self.max_msgs} messages per transfer")
        for m in msgs:
            encode_addr(m.addr)   # range check
            if not 0 <= m.length <= 0xFFFF:
                raise ValueError(f"message length {m.length} out of range")
        if self.queue.num_free < 3 * len(msgs):
            raise ValueError(f"{len(msgs)} messages do not fit in the request queue")
        total = sum(m.length for m in msgs)
        if total > self._data_size:
            self._grow(max(total, 2 * self._data_size))

        self._seq += 1
        off = 0
        for i, m in enumerate(msgs):
            flags = (VIRTIO_I2C_FLAGS_M_RD if m.read_flag else 0) | \
                (VIRTIO_I2C_FLAGS_FAIL_NEXT if i != len(msgs) - 1 else 0)
            OUT_HDR.pack_into(self._hdr, OUT_HDR.size * i, encode_addr(m.addr), 0, flags)
            self._st[i] = STATUS_UNSET
            out = [(self._hdr_addr + OUT_HDR.size * i, OUT_HDR.size)]
            in_ = []
            if m.length:
                seg = (self._data_addr + off, m.length)
                if m.read_flag:
                    in_.append(seg)
                else:
                    self._data[off:off + m.length] = m.data
                    out.append(seg)
            in_.append((self._st_addr + i, 1))
            if not self.queue.add(out, in_, token=(self._seq, i)):
                self._stale = True   # cannot happen after the num_free check
                raise VmsgampError("request queue full")
            off += m.length
        self.dev.notify(0)
        self._collect(len(msgs))

        first_bad = next((i for i in range(len(msgs)) if self._st[i] != VIRTIO_I2C_MSG_OK), None)
        results: list[bytes] = []
        off = 0
        for i, m in enumerate(msgs):
            if m.read_flag and (first_bad is None or i < first_bad):
                m.data = bytes(self._data[off:off + m.length])
                results.append(m.data)
            off += m.length
        if first_bad is not None:
            raise I2cError(msgs[first_bad].addr, first_bad, len(msgs), self._st[first_bad])
        return results

    def _collect(self, n: int) -> None:
        got = 0
        deadline = time.monotonic() + self.timeout
        while got < n:
            r = self.queue.get_used()
            if r is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self.dev.wait_used(0, left):
                    self._stale = True
                    raise TimeoutError(f"i2c: {n - got} of {n} requests not completed "
                                       f"within {self.timeout} s")
                continue
            token, _length = r
            if isinstance(token, tuple) and token[0] == self._seq:
                got += 1

    # ---- smbus-like helpers ---------------------------------------------------------
    def write_quick(self, addr: int) -> None:
        """Zero-length write: does anything ACK ``addr``?"""
        self.i2c_rdwr(I2cMsg.write(addr, b""))

    def probe(self, addr: int) -> bool:
        try:
            self.write_quick(addr)
        except I2cError:
            return False
        return True

    def read_byte(self, addr: int) -> int:
        return self.i2c_rdwr(I2cMsg.read(addr, 1))[0][0]

    def write_byte(self, addr: int, value: int) -> None:
        self.i2c_rdwr(I2cMsg.write(addr, [value]))

    def read_byte_data(self, addr: int, reg: int) -> int:
        return self.i2c_rdwr(I2cMsg.write(addr, [reg]), I2cMsg.read(addr, 1))[0][0]

    def write_byte_data(self, addr: int, reg: int, value: int) -> None:
        self.i2c_rdwr(I2cMsg.write(addr, [reg, value]))

    def read_word_data(self, addr: int, reg: int) -> int:
        """SMBus word: little-endian."""
        data = self.i2c_rdwr(I2cMsg.write(addr, [reg]), I2cMsg.read(addr, 2))[0]
        return struct.unpack("<H", data)[0]

    def write_word_data(self, addr: int, reg: int, value: int) -> None:
        self.i2c_rdwr(I2cMsg.write(addr, bytes([reg]) + struct.pack("<H", value)))

    def read_i2c_block_data(self, addr: int, reg: int, length: int) -> list[int]:
        """Write ``reg``, repeated START, read ``length`` bytes.  Unlike SMBus
        there is no 32-byte limit (the device's max_len applies)."""
        return list(self.i2c_rdwr(I2cMsg.write(addr, [reg]), I2cMsg.read(addr, length))[0])

    def write_i2c_block_data(self, addr: int, reg: int, data: Sequence[int] | bytes) -> None:
        self.i2c_rdwr(I2cMsg.write(addr, bytes([reg]) + bytes(data)))

    def close(self) -> None:
        self.dev.close()
