"""virtio-i2c (device id 34): an I2C adapter behind one request queue.

Each request (virtio spec, "I2C Adapter Device") is one chain::

    out_hdr {le16 addr; le16 padding; le32 flags}   device-readable
    buf[len]                                         readable (write) / writable (read); absent if len 0
    in_hdr  {u8 status}                              device-writable, last byte

``flags`` bit 0 is FAIL_NEXT (groups requests: set on every request of a
group but the last), bit 1 is M_RD (read request); the other bits are
reserved and must be zero.  ``addr`` holds a 7-bit address in bits 7..1 (what
Linux sends: ``msg->addr << 1``) or a 10-bit address in the spec's 11110xx0
encoding.  VIRTIO_I2C_F_ZERO_LENGTH_REQUEST is mandatory: the device offers it
and refuses FEATURES_OK without it (spec device requirement).

Grouping: a group is the run of requests up to the first one without
FAIL_NEXT, or up to the last chain available when the device looks (like
rust-vmm's vhost-device-i2c, which treats everything it finds in one pass as
one transfer, the device never holds a request back waiting for the rest of a
group: Linux sends a partial group with FAIL_NEXT set on its last request when
its ring is full, and waits for it).  The valid requests of a group are handed
to the adapter as one combined transfer (repeated START, one I2C_RDWR).  The
first request that fails gets VIRTIO_I2C_MSG_ERR and, following FAIL_NEXT,
every later request of the group is failed without being executed; that
"fail the next one" state also carries over to the next request popped when a
failing group's tail had not been made available yet.

Malformed requests (no room for the header, a buffer on the wrong side of the
chain, a status part that is not one byte, reserved flag bits, a bad address
encoding, a buffer over ``max_len``) complete with VIRTIO_I2C_MSG_ERR in the
chain's last device-writable byte; the descriptor layout itself is not
assumed (virtio "message framing"), only the byte layout.  A chain with no
device-writable byte at all cannot carry a status: it is returned with used
length 0.  Corrupt rings are the queue's business (QueueBrokenError, which
the transport turns into DEVICE_NEEDS_RESET).
"""
from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vmsgamp.devices._base import VirtioDevice, register_device

log = logging.getLogger("vmsgamp.devices.i2c")

VIRTIO_ID_I2C = 34
VIRTIO_I2C_F_ZERO_LENGTH_REQUEST = 0
VIRTIO_I2C_FLAGS_FAIL_NEXT = 1 << 0
VIRTIO_I2C_FLAGS_M_RD = 1 << 1
VIRTIO_I2C_MSG_OK = 0
VIRTIO_I2C_MSG_ERR = 1

OUT_HDR = struct.Struct("<HHI")     # addr, padding, flags
OUT_HDR_SIZE = OUT_HDR.size          # 8
DEFAULT_MAX_LEN = 8192               # what Linux i2c-dev accepts per I2C_RDWR message
CLEAR_LIMIT = 0xFFFF                 # failed reads up to this size are zeroed (an I2C message's max length)

# Linux <linux/i2c.h>, <linux/i2c-dev.h>
I2C_M_RD = 0x0001
I2C_M_TEN = 0x0010
I2C_RDWR = 0x0707
I2C_RDWR_IOCTL_MAX_MSGS = 42


def encode_addr(addr: int, ten_bit: bool = False) -> int:
    """The ``out_hdr.addr`` value for a 7-bit (or 10-bit) address."""
    if ten_bit:
        if not 0 <= addr <= 0x3FF:
            raise ValueError(f"10-bit I2C address {addr:#x} out of range")
        return (addr & 0xFF) << 8 | 0xF0 | (addr >> 8) << 1
    if not 0 <= addr <= 0x7F:
        raise ValueError(f"7-bit I2C address {addr:#x} out of range")
    return addr << 1


def decode_addr(field_value: int) -> tuple[int, bool] | None:
    """``(address, ten_bit)`` from ``out_hdr.addr``, or None if it is not a
    valid encoding.  Per the spec table, a low byte of 11110xx0 announces a
    10-bit address (7-bit addresses 0x78-0x7B are reserved for that by I2C)."""
    if field_value & 1:
        return None
    low = field_value & 0xFF
    if low & 0xF9 == 0xF0:
        return ((low >> 1) & 3) << 8 | field_value >> 8, True
    if field_value >> 8:
        return None
    return low >> 1, False


# ---- adapters ------------------------------------------------------------------------

@dataclass
class AdapterMsg:
    """One I2C message of a transfer.  For reads, ``data`` is preallocated to
    the length wanted and the adapter fills it."""
    addr: int
    read: bool
    data: bytearray
    ten_bit: bool = False


class I2cAdapter:
    """What the device model drives.  ``transfer`` runs ``msgs`` as one
    combined transaction (START, messages separated by repeated STARTs, STOP)
    and returns how many messages succeeded before the first failure
    (``len(msgs)`` when all did).  It should not raise for bus errors; an
    exception is treated as a failure of the first message."""

    def transfer(self, msgs: list[AdapterMsg]) -> int:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class SimI2cDevice:
    """A simulated I2C target.  ``write``/``read`` are one message each
    (after START or repeated START); returning False from ``write`` is a
    NACK.  ``stop`` is called at the end of every transaction it took part in."""

    def write(self, data: bytes) -> bool:
        return True

    def read(self, length: int) -> bytes:
        return bytes(length)

    def stop(self) -> None:
        pass

    def describe(self) -> str:
        return type(self).__name__


class Eeprom24C02(SimI2cDevice):
    """A 24C02-like serial EEPROM: 256 bytes, 8-byte pages.

    A write message is a word address followed by data; the data goes to the
    page of that address with the low address bits wrapping inside the page
    (writing more than a page overwrites its start, as the real part does).
    A message with only the word address sets the pointer for a following
    read ("random read").  Reads continue from the pointer and roll over at
    the end of the memory."""

    def __init__(self, size: int = 256, page: int = 8, fill: int = 0xFF):
        if size & (size - 1) or page & (page - 1) or not 0 < page <= size <= 256:
            raise ValueError("size and page must be powers of two, page <= size <= 256")
        self.size = size
        self.page = page
        self.mem = bytearray([fill]) * size
        self.pointer = 0

    def write(self, data: bytes) -> bool:
        if not data:
            return True  # address-only (SMBus quick write): ACK
        self.pointer = data[0] & (self.size - 1)
        base_mask = ~(self.page - 1) & (self.size - 1)
        for b in data[1:]:
            self.mem[self.pointer] = b
            self.pointer = (self.pointer & base_mask) | ((self.pointer + 1) & (self.page - 1))
        return True

    def read(self, length: int) -> bytes:
        out = bytearray(length)
        for i in range(length):
            out[i] = self.mem[self.pointer]
            self.pointer = (self.pointer + 1) & (self.size - 1)
        return bytes(out)

    def describe(self) -> str:
        return f"24C02-like EEPROM ({self.size} bytes, {self.page}-byte pages)"


class Lm75(SimI2cDevice):
    """An LM75-like temperature sensor.

    Registers (selected by the first byte written, the pointer): 0 temperature
    (read-only, 2 bytes, 9-bit two's complement in 0.5 degC steps, MSB first),
    1 configuration (1 byte), 2 T_hyst and 3 T_os (2 bytes, same format,
    defaults 75 and 80 degC).  Reads repeat the selected register.  The
    temperature is ``temperature`` (degC) or the result of calling it."""

    TEMP, CONF, THYST, TOS = range(4)

    def __init__(self, temperature: float | Callable[[], float] = 25.0):
        self.temperature = temperature
        self.pointer = self.TEMP
        self.config = 0
        self.thyst = self.encode(75.0)
        self.tos = self.encode(80.0)

    @staticmethod
    def encode(celsius: float) -> int:
        half = max(-110, min(250, round(celsius * 2)))   # -55 .. 125 degC
        return (half & 0x1FF) << 7

    @staticmethod
    def decode(raw: int) -> float:
        half = raw >> 7
        if half & 0x100:
            half -= 0x200
        return half / 2

    def _current(self) -> float:
        t = self.temperature
        return float(t() if callable(t) else t)

    def _register_bytes(self) -> bytes:
        if self.pointer == self.CONF:
            return bytes([self.config])
        if self.pointer == self.TEMP:
            raw = self.encode(self._current())
        else:
            raw = self.thyst if self.pointer == self.THYST else self.tos
        return raw.to_bytes(2, "big")

    def write(self, data: bytes) -> bool:
        if not data:
            return True
        if data[0] > 3:
            return False  # no such register: NACK the pointer byte
        self.pointer = data[0]
        payload = data[1:]
        if payload:
            if self.pointer == self.CONF:
                self.config = payload[-1]
            elif self.pointer in (self.THYST, self.TOS) and len(payload) >= 2:
                raw = int.from_bytes(payload[:2], "big") & 0xFF80
                if self.pointer == self.THYST:
                    self.thyst = raw
                else:
                    self.tos = raw
            # the temperature register is read-only: data is ignored
        return True

    def read(self, length: int) -> bytes:
        reg = self._register_bytes()
        return (reg * (length // len(reg) + 1))[:length]

    def describe(self) -> str:
        return f"LM75-like temperature sensor ({self._current():.1f} degC)"


class SimBus(I2cAdapter):
    """A simulated bus: 7-bit address -> SimI2cDevice.  An absent address
    (or any 10-bit one) NACKs."""

    def __init__(self, devices: dict[int, SimI2cDevice] | None = None):
        self.devices: dict[int, SimI2cDevice] = dict(devices or {})

    @classmethod
    def default(cls, *, eeprom: Iterable[int] = (0x50,), temp: Iterable[int] = (0x48,),
                celsius: float = 25.0) -> "SimBus":
        bus = cls()
        for a in eeprom:
            bus.attach(a, Eeprom24C02())
        for a in temp:
            bus.attach(a, Lm75(celsius))
        return bus

    def attach(self, addr: int, device: SimI2cDevice) -> None:
        if not 0 <= addr <= 0x7F:
            raise ValueError(f"7-bit I2C address {addr:#x} out of range")
        if addr in self.devices:
            raise ValueError(f"address {addr:#04x} is already taken")
        self.devices[addr] = device

    def transfer(self, msgs: list[AdapterMsg]) -> int:
        touched: list[SimI2cDevice] = []
        done = 0
        try:
            for m in msgs:
                dev = None if m.ten_bit else self.devices.get(m.addr)
                if dev is None:
                    break  # address NACK
                if dev not in touched:
                    touched.append(dev)
                if m.read:
                    got = bytes(dev.read(len(m.data)))
                    m.data[:] = got[:len(m.data)].ljust(len(m.data), b"\xff")
                elif not dev.write(bytes(m.data)):
                    break
                done += 1
        finally:
            for dev in touched:
                dev.stop()
        return done

    def describe(self) -> dict[str, Any]:
        return {"adapter": "sim", "targets": {f"{a:#04x}": d.describe() for a, d in sorted(self.devices.items())}}


class _I2cMsgC(ctypes.Structure):
    # struct i2c_msg { __u16 addr; __u16 flags; __u16 len; __u8 *buf; }
    _fields_ = [("addr", ctypes.c_uint16), ("flags", ctypes.c_uint16), ("len", ctypes.c_uint16),
                ("buf", ctypes.POINTER(ctypes.c_uint8))]


class _I2cRdwrC(ctypes.Structure):
    # struct i2c_rdwr_ioctl_data { struct i2c_msg *msgs; __u32 nmsgs; }
    _fields_ = [("msgs", ctypes.POINTER(_I2cMsgC)), ("nmsgs", ctypes.c_uint32)]


class LinuxI2cAdapter(I2cAdapter):
    """Pass-through to a Linux ``/dev/i2c-N`` adapter with the I2C_RDWR
    ioctl (one ioctl per group of at most 42 messages, the kernel's limit;
    a longer group is split, losing the repeated START between chunks).
    ``ioctl`` is injectable for tests."""

    def __init__(self, path: str, *, ioctl: Callable[..., int] | None = None, fd: int | None = None):
        self.path = path
        self._ioctl = ioctl or fcntl.ioctl
        self.fd = fd if fd is not None else os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def transfer(self, msgs: list[AdapterMsg]) -> int:
        done = 0
        while done < len(msgs):
            chunk = msgs[done:done + I2C_RDWR_IOCTL_MAX_MSGS]
            if not self._rdwr(chunk):
                return done
            done += len(chunk)
        return done

    def _rdwr(self, chunk: list[AdapterMsg]) -> bool:
        arr = (_I2cMsgC * len(chunk))()
        bufs = []
        for c, m in zip(arr, chunk):
            if len(m.data) > 0xFFFF:
                return False
            buf = (ctypes.c_uint8 * max(1, len(m.data))).from_buffer_copy(bytes(m.data) or b"\0")
            bufs.append(buf)  # keep alive across the ioctl
            c.addr = m.addr
            c.flags = (I2C_M_RD if m.read else 0) | (I2C_M_TEN if m.ten_bit else 0)
            c.len = len(m.data)
            c.buf = ctypes.cast(buf, ctypes.POINTER(ctypes.c_uint8))
        data = _I2cRdwrC(ctypes.cast(arr, ctypes.POINTER(_I2cMsgC)), len(chunk))
        try:
            n = self._ioctl(self.fd, I2C_RDWR, data, True)
        except OSError as e:
            # the kernel does not say which message failed: the first one is
            # reported, the rest of the group is failed by FAIL_NEXT
            log.debug("%s: I2C_RDWR failed: %s", self.path, e)
            return False
        if isinstance(n, int) and 0 <= n < len(chunk):
            return False
        for m, buf in zip(chunk, bufs):
            if m.read:
                m.data[:] = bytes(buf)[:len(m.data)]
        return True

    def describe(self) -> dict[str, Any]:
        return {"adapter": "linux", "path": self.path}

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


# ---- the device model --------------------------------------------------------------

@dataclass
class _Request:
    chain: Any
    fail_next: bool = False
    msg: AdapterMsg | None = None
    error: str | None = None
    status: int | None = None


def _read_prefix(chain: Any, n: int) -> bytes:
    """The first ``n`` device-readable bytes (the caller checked they exist)
    without gathering the whole readable part."""
    out = bytearray()
    for view in chain.readable:
        out += view[:n - len(out)]
        if len(out) >= n:
            break
    return bytes(out)


class I2cDevice(VirtioDevice):
    device_id = VIRTIO_ID_I2C
    name = "i2c"
    features = 1 << VIRTIO_I2C_F_ZERO_LENGTH_REQUEST
    num_queues = 1
    queue_max_size = 256

    def __init__(self, adapter: I2cAdapter | None = None, *, max_len: int = DEFAULT_MAX_LEN):
        super().__init__()
        self.adapter = adapter if adapter is not None else SimBus.default()
        self.max_len = max_len
        self._fail_next = False
        self.stats = {"requests": 0, "errors": 0, "malformed": 0, "groups": 0}

    # ---- negotiation --------------------------------------------------------------
    def features_ok(self, features: int) -> bool:
        # "A device ... MUST reject any driver that doesn't negotiate this feature."
        return bool(features >> VIRTIO_I2C_F_ZERO_LENGTH_REQUEST & 1)

    def activate(self, queues: Sequence[Any | None], features: int) -> None:
        super().activate(queues, features)
        self._fail_next = False

    def reset(self) -> None:
        super().reset()
        self._fail_next = False

    # ---- requests -----------------------------------------------------------------
    def handle_queue(self, index: int, queue: Any) -> bool:
        used = False
        while True:
            group = self._pop_group(queue)
            if not group:
                return used
            self._run_group(group)
            for req in group:
                self._complete(queue, req)
            used = True

    def _pop_group(self, queue: Any) -> list[_Request]:
        group: list[_Request] = []
        while True:
            chain = queue.pop()   # QueueBrokenError propagates: the transport resets
            if chain is None:
                return group
            req = self._parse(chain)
            group.append(req)
            if not req.fail_next:
                return group

    def _parse(self, chain: Any) -> _Request:
        req = _Request(chain)
        rlen, wlen = chain.readable_len, chain.writable_len
        if rlen < OUT_HDR_SIZE:
            req.error = f"{rlen} device-readable bytes, the header needs {OUT_HDR_SIZE}"
            return req
        addr_field, _padding, flags = OUT_HDR.unpack(_read_prefix(chain, OUT_HDR_SIZE))
        req.fail_next = bool(flags & VIRTIO_I2C_FLAGS_FAIL_NEXT)
        read = bool(flags & VIRTIO_I2C_FLAGS_M_RD)
        if wlen == 0:
            req.error = "no device-writable status byte"
        elif flags & ~(VIRTIO_I2C_FLAGS_FAIL_NEXT | VIRTIO_I2C_FLAGS_M_RD):
            req.error = f"reserved flag bits set ({flags:#x})"
        elif read and rlen != OUT_HDR_SIZE:
            req.error = f"read request with {rlen - OUT_HDR_SIZE} device-readable buffer bytes"
        elif not read and wlen != 1:
            req.error = f"write request with {wlen} device-writable bytes (expected only the status byte)"
        else:
            length = wlen - 1 if read else rlen - OUT_HDR_SIZE
            decoded = decode_addr(addr_field)
            if length > self.max_len:
                req.error = f"{length}-byte buffer over the {self.max_len}-byte limit"
            elif decoded is None:
                req.error = f"bad address encoding {addr_field:#06x}"
            else:
                addr, ten = decoded
                data = bytearray(length) if read else bytearray(chain.read()[OUT_HDR_SIZE:])
                req.msg = AdapterMsg(addr, read, data, ten)
        return req

    def _transfer(self, msgs: list[AdapterMsg]) -> int:
        try:
            done = int(self.adapter.transfer(msgs))
        except Exception:
            log.exception("i2c adapter %s failed", type(self.adapter).__name__)
            return 0
        return max(0, min(done, len(msgs)))

    def _run_group(self, group: list[_Request]) -> None:
        """Execute in order; the first failure gets ERR and FAIL_NEXT fails
        what follows it in the group."""
        self.stats["groups"] += 1
        failing = self._fail_next
        i = 0
        while i < len(group):
            req = group[i]
            if failing or req.error is not None:
                if req.error is not None and not failing:
                    self.stats["malformed"] += 1
                    # a hostile driver must not be able to flood the log
                    level = logging.WARNING if self.stats["malformed"] == 1 else logging.DEBUG
                    log.log(level, "i2c: malformed request (%s); further ones are counted in stats",
                            req.error)
                req.status = VIRTIO_I2C_MSG_ERR
                failing = req.fail_next
                i += 1
                continue
            # the run of well-formed requests from here is one combined transfer
            j = i
            while j < len(group) and group[j].error is None:
                j += 1
            run = group[i:j]
            done = self._transfer([r.msg for r in run])   # type: ignore[misc]
            for r in run[:done]:
                r.status = VIRTIO_I2C_MSG_OK
            if done < len(run):
                bad = run[done]
                bad.status = VIRTIO_I2C_MSG_ERR
                failing = bad.fail_next
                i += done + 1
            else:
                failing = False   # the run's last request is the group's last or precedes a malformed one
                i = j
        self._fail_next = failing

    def _complete(self, queue: Any, req: _Request) -> None:
        chain = req.chain
        self.stats["requests"] += 1
        wlen = chain.writable_len
        if req.status == VIRTIO_I2C_MSG_OK and req.msg is not None:
            if req.msg.read:
                written = chain.write(bytes(req.msg.data) + bytes([VIRTIO_I2C_MSG_OK]))
            else:
                written = chain.write(bytes([VIRTIO_I2C_MSG_OK]))
            queue.add_used(chain.head, written)
            return
        self.stats["errors"] += 1
        if wlen == 0:
            queue.add_used(chain.head, 0)      # nowhere to put a status
        elif wlen - 1 <= max(self.max_len, CLEAR_LIMIT):
            # zero what precedes the status so the used length is honest
            queue.add_used(chain.head, chain.write(bytes(wlen - 1) + bytes([VIRTIO_I2C_MSG_ERR])))
        else:
            # too big to clear: status only; len 0 is allowed (a device MAY
            # write more than len bytes)
            chain.write(bytes([VIRTIO_I2C_MSG_ERR]), wlen - 1)
            queue.add_used(chain.head, 0)

    # ---- description ------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(self.adapter.describe())
        d["stats"] = dict(self.stats)
        return d

    def close(self) -> None:
        self.adapter.close()


# ---- --devices i2c:... ---------------------------------------------------------------

def _addresses(value: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if value is None or value == "1":
        return default
    if value.lower() in ("none", "off", "0", ""):
        return ()
    try:
        return tuple(int(a, 0) for a in value.split("+"))
    except ValueError:
        raise ValueError(f"i2c: bad address list {value!r} (e.g. 0x50+0x51)") from None


def _factory(sim: str | None = None, dev: str | None = None, eeprom: str | None = None,
             temp: str | None = None, celsius: str | None = None, max_len: str | None = None) -> I2cDevice:
    limit = int(max_len) if max_len else DEFAULT_MAX_LEN
    if dev is not None:
        if sim is not None or eeprom is not None or temp is not None or celsius is not None:
            raise ValueError("i2c: dev= (pass-through) cannot be combined with simulated targets")
        if not os.path.exists(dev):
            raise ValueError(f"i2c: {dev} does not exist (is i2c-dev loaded?)")
        return I2cDevice(LinuxI2cAdapter(dev), max_len=limit)
    bus = SimBus.default(eeprom=_addresses(eeprom, (0x50,)), temp=_addresses(temp, (0x48,)),
                         celsius=float(celsius) if celsius else 25.0)
    return I2cDevice(bus, max_len=limit)


register_device("i2c", _factory, {
    "sim": "simulated bus (the default): 24C02 EEPROM at 0x50, LM75 sensor at 0x48",
    "dev": "pass-through to a Linux adapter, e.g. dev=/dev/i2c-1 (I2C_RDWR)",
    "eeprom": "addresses of simulated 24C02 EEPROMs, '+'-separated (default 0x50; none to omit)",
    "temp": "addresses of simulated LM75 sensors, '+'-separated (default 0x48; none to omit)",
    "celsius": "temperature the simulated sensors report (default 25.0)",
    "max_len": f"largest buffer per request in bytes (default {DEFAULT_MAX_LEN})",
}, path_key="dev")
