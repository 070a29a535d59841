"""virtio-gpio (device id 41): requestq, and with VIRTIO_GPIO_F_IRQ the eventq.

Follows the virtio specification chapter "GPIO Device" and what Linux's
gpio-virtio driver and rust-vmm's vhost-device-gpio expect:

* config ``{le16 ngpio; u8 padding[2]; le32 gpio_names_size}``;
* requestq chains: ``{le16 type; le16 gpio; le32 value}`` device-readable
  (exactly 8 bytes), then ``{u8 status; u8 value}`` device-writable
  (``1 + gpio_names_size`` bytes for GET_LINE_NAMES);
* eventq chains (one per line, "unmask"): ``{le16 gpio}`` readable,
  ``{u8 status}`` writable; returned VALID when the interrupt fires, INVALID
  when the interrupt is (or becomes) disabled.  Edge interrupts are latched
  while masked, level interrupts are not.

Every malformed request completes with VIRTIO_GPIO_STATUS_ERR (or, for the
eventq, VIRTIO_GPIO_IRQ_STATUS_INVALID) as far as the writable part allows;
nothing a driver sends raises out of ``handle_queue``.  Where the spec
leaves the device a choice:

* GET_VALUE of a line with direction NONE is ERR (as vhost-device-gpio);
  SET_VALUE is accepted in any direction and driven when the line becomes an
  output (low if never set);
* SET_IRQ_TYPE: NONE is always accepted (and hands back the line's eventq
  pair INVALID); re-setting the current type is a no-op; changing one
  enabled type to another without NONE in between is ERR (the spec says the
  driver must disable first; vhost-device-gpio refuses it too); interrupts
  on outputs are ERR, and so is SET_DIRECTION OUT on an interrupt line;
* an eventq pair for a line whose interrupt is not enabled, for a line out of
  range, malformed, or a second pair for the same line comes back INVALID at
  once (the first pair stays with the device).

Lines come from a backend: :class:`SimBackend` (in-memory lines; the host
drives inputs with :meth:`GpioDevice.set_input`, optionally wired to outputs
with ``loopback``) or :class:`ChipBackend` (pass-through to a Linux gpiochip
character device through the v2 uAPI, edge interrupts only).
"""
from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

from vmsgamp.devices._base import VirtioDevice, register_device

log = logging.getLogger("vmsgamp.devices.gpio")

VIRTIO_ID_GPIO = 41
VIRTIO_GPIO_F_IRQ = 0

REQUESTQ = 0
EVENTQ = 1

# request types
MSG_GET_LINE_NAMES = 0x0001
MSG_GET_DIRECTION = 0x0002
MSG_SET_DIRECTION = 0x0003
MSG_GET_VALUE = 0x0004
MSG_SET_VALUE = 0x0005
MSG_SET_IRQ_TYPE = 0x0006

STATUS_OK = 0x0
STATUS_ERR = 0x1

DIRECTION_NONE = 0x00
DIRECTION_OUT = 0x01
DIRECTION_IN = 0x02

IRQ_TYPE_NONE = 0x00
IRQ_TYPE_EDGE_RISING = 0x01
IRQ_TYPE_EDGE_FALLING = 0x02
IRQ_TYPE_EDGE_BOTH = 0x03
IRQ_TYPE_LEVEL_HIGH = 0x04
IRQ_TYPE_LEVEL_LOW = 0x08
IRQ_TYPES = (IRQ_TYPE_NONE, IRQ_TYPE_EDGE_RISING, IRQ_TYPE_EDGE_FALLING, IRQ_TYPE_EDGE_BOTH,
             IRQ_TYPE_LEVEL_HIGH, IRQ_TYPE_LEVEL_LOW)
IRQ_EDGE_MASK = IRQ_TYPE_EDGE_BOTH
IRQ_LEVEL_MASK = IRQ_TYPE_LEVEL_HIGH | IRQ_TYPE_LEVEL_LOW

IRQ_STATUS_INVALID = 0x0
IRQ_STATUS_VALID = 0x1

REQUEST = struct.Struct("<HHI")       # type, gpio, value
IRQ_REQUEST = struct.Struct("<H")     # gpio
CONFIG = struct.Struct("<HxxI")       # ngpio, padding, gpio_names_size

MAX_LINES = 0xFFFF


class GpioBackendError(Exception):
    """A backend could not do what was asked (reported as STATUS_ERR)."""


# ---- backends ------------------------------------------------------------------

class GpioBackend:
    """The electrical side of the lines.  The device keeps the interrupt
    state (type, mask, latch); a backend reports level changes by calling
    ``on_level(line, level)`` (set by the device)."""

    ngpio: int = 0
    names: list[str]

    def __init__(self) -> None:
        self.on_level: Callable[[int, int], None] = lambda line, level: None

    def reset(self) -> None:
        """Driver reset: release every line, outputs back to their defaults."""

    def direction(self, line: int) -> int:
        raise NotImplementedError

    def set_direction(self, line: int, direction: int) -> None:
        """Going to output drives the value last stored with set_value (the
        spec has the driver set it first), low if none."""
        raise NotImplementedError

    def value(self, line: int) -> int:
        raise NotImplementedError

    def set_value(self, line: int, value: int) -> None:
        """Store the output value; drive it if the line is an output."""
        raise NotImplementedError

    def set_irq_type(self, line: int, irq_type: int) -> None:
        """Arrange for level changes of ``line`` to be reported (or stop)."""

    def level(self, line: int) -> int:
        """The level the interrupt logic compares against."""
        return self.value(line)

    def fds(self) -> Sequence[int]:
        return ()

    def on_fd_ready(self, fd: int) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class SimBackend(GpioBackend):
    """Simulated lines.  Each line has a direction, an output value (what the
    driver set) and an input level (what the outside world drives, changed
    with :meth:`drive`).  ``loopback`` wires an output to an input, like a
    jumper: ``{0: 1}`` makes line 1 see what line 0 drives."""

    def __init__(self, ngpio: int, names: Sequence[str] = (), *, loopback: dict[int, int] | None = None):
        super().__init__()
        if not 1 <= ngpio <= MAX_LINES:
            raise ValueError(f"lines must be 1..{MAX_LINES}, not {ngpio}")
        self.ngpio = ngpio
        self.names = list(names)
        self.loopback = dict(loopback or {})
        for src, dst in self.loopback.items():
            if not (0 <= src < ngpio and 0 <= dst < ngpio) or src == dst:
                raise ValueError(f"loopback {src}:{dst} needs two different lines below {ngpio}")
        self.inputs = [0] * ngpio
        self._dirs = [DIRECTION_NONE] * ngpio
        self._outs = [0] * ngpio

    def reset(self) -> None:
        # Inputs belong to the outside world and keep their level.
        for line in range(self.ngpio):
            self._dirs[line] = DIRECTION_NONE
            self._outs[line] = 0

    def direction(self, line: int) -> int:
        return self._dirs[line]

    def set_direction(self, line: int, direction: int) -> None:
        old = self.level(line)
        self._dirs[line] = direction
        if direction == DIRECTION_OUT:
            self._drive_wire(line)
        elif direction == DIRECTION_NONE:
            self._outs[line] = 0     # "discard all state information"
        if self.level(line) != old:
            self.on_level(line, self.level(line))

    def value(self, line: int) -> int:
        if self._dirs[line] == DIRECTION_NONE:
            raise GpioBackendError(f"line {line} is not configured (direction none)")
        return self.level(line)

    def set_value(self, line: int, value: int) -> None:
        self._outs[line] = value
        if self._dirs[line] == DIRECTION_OUT:
            self._drive_wire(line)

    def level(self, line: int) -> int:
        return self._outs[line] if self._dirs[line] == DIRECTION_OUT else self.inputs[line]

    def drive(self, line: int, level: int) -> None:
        """The outside world drives ``line``'s input to ``level``."""
        old = self.level(line)
        self.inputs[line] = level
        if self.level(line) != old:
            self.on_level(line, level)

    def _drive_wire(self, src: int) -> None:
        dst = self.loopback.get(src)
        if dst is not None:
            self.drive(dst, self._outs[src])

    def describe(self) -> dict[str, Any]:
        return {"backend": "sim", "loopback": [f"{s}:{d}" for s, d in self.loopback.items()]}


# Linux gpiochip character device, uAPI v2 (include/uapi/linux/gpio.h).
def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xB4 << 8) | nr


CHIPINFO = struct.Struct("<32s32sI")                          # gpiochip_info
LINE_ATTR = struct.Struct("<IIQ")                             # gpio_v2_line_attribute
LINE_CONFIG = struct.Struct("<QI20x" + "16sQ" * 10)           # gpio_v2_line_config (272)
LINE_INFO = struct.Struct("<32s32sIIQ160s16x")                # gpio_v2_line_info (256)
LINE_VALUES = struct.Struct("<QQ")                            # gpio_v2_line_values
LINE_EVENT = struct.Struct("<QIIII24x")                       # gpio_v2_line_event (48)
LINE_REQUEST_SIZE = 592                                       # gpio_v2_line_request
_REQ_CONSUMER_OFF = 256
_REQ_CONFIG_OFF = 288
_REQ_NUM_LINES_OFF = 560
_REQ_FD_OFF = 588

GPIO_GET_CHIPINFO_IOCTL = (2 << 30) | (CHIPINFO.size << 16) | (0xB4 << 8) | 0x01
GPIO_V2_GET_LINEINFO_IOCTL = _iowr(0x05, LINE_INFO.size)
GPIO_V2_GET_LINE_IOCTL = _iowr(0x07, LINE_REQUEST_SIZE)
GPIO_V2_LINE_SET_CONFIG_IOCTL = _iowr(0x0D, LINE_CONFIG.size)
GPIO_V2_LINE_GET_VALUES_IOCTL = _iowr(0x0E, LINE_VALUES.size)
GPIO_V2_LINE_SET_VALUES_IOCTL = _iowr(0x0F, LINE_VALUES.size)

V2_FLAG_INPUT = 1 << 2
V2_FLAG_OUTPUT = 1 << 3
V2_FLAG_EDGE_RISING = 1 << 4
V2_FLAG_EDGE_FALLING = 1 << 5
V2_ATTR_ID_OUTPUT_VALUES = 2
V2_EVENT_RISING_EDGE = 1
V2_EVENT_FALLING_EDGE = 2


def pack_line_config(flags: int, output_value: int | None = None) -> bytes:
    """gpio_v2_line_config for one line (mask bit 0): ``flags`` and, for an
    output, its value as an OUTPUT_VALUES attribute."""
    attrs: list[Any] = []
    n = 0
    if output_value is not None:
        attrs += [LINE_ATTR.pack(V2_ATTR_ID_OUTPUT_VALUES, 0, output_value & 1), 1]
        n = 1
    attrs += [bytes(16), 0] * (10 - n)
    return LINE_CONFIG.pack(flags, n, *attrs)


def pack_line_request(offset: int, flags: int, output_value: int | None = None,
                      consumer: str = "vmsgamp") -> bytearray:
    buf = bytearray(LINE_REQUEST_SIZE)
    struct.pack_into("<I", buf, 0, offset)
    cons = consumer.encode("ascii", "replace")[:31]
    buf[_REQ_CONSUMER_OFF:_REQ_CONSUMER_OFF + len(cons)] = cons
    buf[_REQ_CONFIG_OFF:_REQ_CONFIG_OFF + LINE_CONFIG.size] = pack_line_config(flags, output_value)
    struct.pack_into("<I", buf, _REQ_NUM_LINES_OFF, 1)
    struct.pack_into("<i", buf, _REQ_FD_OFF, -1)
    return buf


def v2_flags_to_direction(flags: int) -> int:
    if flags & V2_FLAG_OUTPUT:
        return DIRECTION_OUT
    if flags & V2_FLAG_INPUT:
        return DIRECTION_IN
    return DIRECTION_NONE


class ChipBackend(GpioBackend):
    """Pass-through to ``/dev/gpiochipN``: one line request per configured
    line (so each line can be reconfigured on its own); edge interrupts via
    the request's event fd.  Level interrupts are refused (the cdev has no
    level detection).  ``ioctl``/``open``/``read``/``close`` are injectable
    so the marshalling can be tested without hardware."""

    def __init__(self, path: str, *, consumer: str = "vmsgamp",
                 ioctl: Callable[..., Any] = fcntl.ioctl, open_: Callable[..., int] = os.open,
                 read: Callable[[int, int], bytes] = os.read, close: Callable[[int], None] = os.close):
        super().__init__()
        self.path = path
        self.consumer = consumer
        self._ioctl, self._read, self._close = ioctl, read, close
        self._fd = open_(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            info = bytearray(CHIPINFO.size)
            self._ioctl(self._fd, GPIO_GET_CHIPINFO_IOCTL, info, True)
            name, label, lines = CHIPINFO.unpack(info)
            self.chip_name = name.split(b"\0")[0].decode("ascii", "replace")
            self.label = label.split(b"\0")[0].decode("ascii", "replace")
            if not 1 <= lines <= MAX_LINES:
                raise ValueError(f"{path}: {lines} lines")
            self.ngpio = lines
            self.names = []
            self._initial_dirs = []
            for line in range(lines):
                li = bytearray(LINE_INFO.size)
                struct.pack_into("<I", li, 64, line)
                self._ioctl(self._fd, GPIO_V2_GET_LINEINFO_IOCTL, li, True)
                lname, _consumer, _off, _nattrs, flags, _attrs = LINE_INFO.unpack(li)
                self.names.append(lname.split(b"\0")[0].decode("ascii", "replace"))
                self._initial_dirs.append(v2_flags_to_direction(flags))
        except BaseException:
            self._close(self._fd)
            raise
        self._req: dict[int, int] = {}          # line -> request fd
        self._dirs: dict[int, int] = {}
        self._outs: dict[int, int] = {}
        self._edges: dict[int, int] = {}        # line -> v2 edge flags
        self._fd_line: dict[int, int] = {}

    def _flags(self, line: int) -> int:
        d = self._dirs.get(line, DIRECTION_NONE)
        if d == DIRECTION_OUT:
            return V2_FLAG_OUTPUT
        return V2_FLAG_INPUT | self._edges.get(line, 0)

    def _call(self, fd: int, req: int, buf: bytearray) -> None:
        try:
            self._ioctl(fd, req, buf, True)
        except OSError as e:
            raise GpioBackendError(f"{self.path}: {os.strerror(e.errno or errno.EIO)}") from e

    def _release(self, line: int) -> None:
        fd = self._req.pop(line, None)
        if fd is not None:
            self._fd_line.pop(fd, None)
            self._close(fd)

    def reset(self) -> None:
        for line in list(self._req):
            self._release(line)
        self._dirs.clear()
        self._outs.clear()
        self._edges.clear()

    def direction(self, line: int) -> int:
        if line in self._dirs:
            return self._dirs[line]
        return self._initial_dirs[line]

    def set_direction(self, line: int, direction: int) -> None:
        if direction == DIRECTION_NONE:
            self._release(line)
            self._dirs[line] = DIRECTION_NONE
            self._edges.pop(line, None)
            self._outs.pop(line, None)
            return
        self._dirs[line] = direction
        out = self._outs.get(line, 0) if direction == DIRECTION_OUT else None
        fd = self._req.get(line)
        if fd is None:
            buf = pack_line_request(line, self._flags(line), out, self.consumer)
            self._call(self._fd, GPIO_V2_GET_LINE_IOCTL, buf)
            (fd,) = struct.unpack_from("<i", buf, _REQ_FD_OFF)
            if fd < 0:
                raise GpioBackendError(f"{self.path}: line {line}: no request fd")
            self._req[line] = fd
            self._fd_line[fd] = line
        else:
            self._call(fd, GPIO_V2_LINE_SET_CONFIG_IOCTL, bytearray(pack_line_config(self._flags(line), out)))

    def value(self, line: int) -> int:
        fd = self._req.get(line)
        if fd is None:
            raise GpioBackendError(f"line {line} is not configured (direction none)")
        buf = bytearray(LINE_VALUES.pack(0, 1))
        self._call(fd, GPIO_V2_LINE_GET_VALUES_IOCTL, buf)
        return LINE_VALUES.unpack(buf)[0] & 1

    def set_value(self, line: int, value: int) -> None:
        self._outs[line] = value
        fd = self._req.get(line)
        if fd is not None and self._dirs.get(line) == DIRECTION_OUT:
            self._call(fd, GPIO_V2_LINE_SET_VALUES_IOCTL, bytearray(LINE_VALUES.pack(value & 1, 1)))

    def set_irq_type(self, line: int, irq_type: int) -> None:
        if irq_type & IRQ_LEVEL_MASK:
            raise GpioBackendError("level interrupts are not supported by the gpiochip uAPI")
        edges = ((V2_FLAG_EDGE_RISING if irq_type & IRQ_TYPE_EDGE_RISING else 0)
                 | (V2_FLAG_EDGE_FALLING if irq_type & IRQ_TYPE_EDGE_FALLING else 0))
        if edges and self._dirs.get(line, DIRECTION_NONE) == DIRECTION_NONE:
            # Edge detection needs a requested input: request it now.
            self._edges[line] = edges
            self.set_direction(line, DIRECTION_IN)
            return
        self._edges[line] = edges
        fd = self._req.get(line)
        if fd is not None:
            self._call(fd, GPIO_V2_LINE_SET_CONFIG_IOCTL, bytearray(pack_line_config(self._flags(line))))

    def fds(self) -> Sequence[int]:
        return [fd for line, fd in self._req.items() if self._edges.get(line)]

    def on_fd_ready(self, fd: int) -> None:
        line = self._fd_line.get(fd)
        if line is None:
            return
        try:
            data = self._read(fd, LINE_EVENT.size * 16)
        except BlockingIOError:
            return
        for off in range(0, len(data) - LINE_EVENT.size + 1, LINE_EVENT.size):
            _ts, ev_id, _offset, _seq, _lseq = LINE_EVENT.unpack_from(data, off)
            if ev_id == V2_EVENT_RISING_EDGE:
                self.on_level(line, 1)
            elif ev_id == V2_EVENT_FALLING_EDGE:
                self.on_level(line, 0)

    def level(self, line: int) -> int:
        try:
            return self.value(line)
        except GpioBackendError:
            return 0

    def describe(self) -> dict[str, Any]:
        return {"backend": "chip", "path": self.path, "chip": self.chip_name, "label": self.label}

    def close(self) -> None:
        self.reset()
        self._close(self._fd)


# ---- the device model ---------------------------------------------------------------

def names_blob(names: Sequence[str], ngpio: int) -> bytes:
    """The GET_LINE_NAMES block: one NUL-terminated 7-bit ASCII string per
    line (empty for unnamed lines), or b"" when no line has a name."""
    names = list(names)
    if len(names) > ngpio:
        raise ValueError(f"{len(names)} line names for {ngpio} lines")
    if not any(names):
        return b""
    seen: set[str] = set()
    for n in names:
        if "\0" in n or not n.isascii():
            raise ValueError(f"GPIO line name {n!r}: 7-bit ASCII without NUL only")
        if n and n in seen:
            raise ValueError(f"GPIO line name {n!r} is not unique")
        seen.add(n)
    names += [""] * (ngpio - len(names))
    return b"".join(n.encode("ascii") + b"\0" for n in names)


class _Irq:
    """Interrupt state of one line: trigger type, edge latch, and the eventq
    chain that unmasks it (None = masked)."""

    __slots__ = ("type", "latched", "chain")

    def __init__(self) -> None:
        self.type = IRQ_TYPE_NONE
        self.latched = False
        self.chain: tuple[Any, Any] | None = None   # (eventq, chain)


class GpioDevice(VirtioDevice):
    device_id = VIRTIO_ID_GPIO
    name = "gpio"
    queue_max_size = 256

    def __init__(self, lines: int = 8, names: Sequence[str] = (), *, irq: bool = True,
                 loopback: dict[int, int] | None = None, backend: GpioBackend | None = None):
        self.backend = backend if backend is not None else SimBackend(lines, names, loopback=loopback)
        self.ngpio = self.backend.ngpio
        self.blob = names_blob(self.backend.names, self.ngpio)
        # Instance attributes: the transport reads them per device.
        self.features = (1 << VIRTIO_GPIO_F_IRQ) if irq else 0
        self.num_queues = 2 if irq else 1
        super().__init__()
        self.config[:] = CONFIG.pack(self.ngpio, len(self.blob))
        self.backend.on_level = self._on_level
        self._irq = [_Irq() for _ in range(self.ngpio)]
        self._event_used = False     # eventq chains completed, driver not told yet
        self._posted: collections.deque[tuple[int, int]] = collections.deque()
        self._wake_r = self._wake_w = -1
        self._wake_lock = threading.Lock()
        self.stats = {"requests": 0, "errors": 0, "irqs": 0, "invalid_events": 0}

    def config_size(self) -> int:
        return CONFIG.size

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(lines=self.ngpio, names=len(self.blob) > 0, irq=bool(self.features))
        d.update(self.backend.describe())
        return d

    # ---- lifecycle -------------------------------------------------------------
    def activate(self, queues: Sequence[Any | None], features: int) -> None:
        self._drop_irq_state()
        super().activate(queues, features)

    def reset(self) -> None:
        super().reset()
        self._drop_irq_state()
        try:
            self.backend.reset()
        except Exception:
            log.exception("gpio backend reset failed")

    def _drop_irq_state(self) -> None:
        # The rings are gone: forget held eventq chains without touching them.
        self._irq = [_Irq() for _ in range(self.ngpio)]
        self._event_used = False

    def close(self) -> None:
        self.backend.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # ---- host side ------------------------------------------------------------------
    def set_input(self, line: int, level: int) -> None:
        """Drive a simulated input (from the serving thread, or before the
        device is served).  Raises interrupts as configured."""
        if not isinstance(self.backend, SimBackend):
            raise TypeError("set_input needs the simulated backend")
        if not 0 <= line < self.ngpio:
            raise ValueError(f"line {line} outside 0..{self.ngpio - 1}")
        self.backend.drive(line, 1 if level else 0)
        self._flush_events()

    def post_input(self, line: int, level: int) -> None:
        """Thread-safe set_input: applied by the serving loop (its wake-up fd
        is created on first use, so the first call may wait for the loop's
        next turn)."""
        if not isinstance(self.backend, SimBackend):
            raise TypeError("post_input needs the simulated backend")
        with self._wake_lock:
            if self._wake_r < 0:
                self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._posted.append((line, level))
            try:
                os.write(self._wake_w, b"\1")
            except BlockingIOError:
                pass  # already readable

    def poll_fds(self) -> Sequence[int]:
        fds = list(self.backend.fds())
        if self._wake_r >= 0:
            fds.append(self._wake_r)
        return fds

    def on_fd_ready(self, fd: int) -> None:
        try:
            if fd == self._wake_r:
                try:
                    os.read(fd, 4096)
                except BlockingIOError:
                    pass
                while self._posted:
                    line, level = self._posted.popleft()
                    if 0 <= line < self.ngpio:
                        self.backend.drive(line, 1 if level else 0)  # type: ignore[attr-defined]
            else:
                self.backend.on_fd_ready(fd)
        except Exception:
            log.exception("gpio: input source failed")
        self._flush_events()

    # ---- interrupts ------------------------------------------------------------------
    def _on_level(self, line: int, level: int) -> None:
        irq = self._irq[line]
        t = irq.type
        if t & IRQ_EDGE_MASK:
            if (level and t & IRQ_TYPE_EDGE_RISING) or (not level and t & IRQ_TYPE_EDGE_FALLING):
                if irq.chain is not None:
                    self._complete_event(irq, IRQ_STATUS_VALID)
                else:
                    irq.latched = True    # masked: latch (spec: edge MUST be latched)
        elif t & IRQ_LEVEL_MASK and irq.chain is not None and self._level_active(line, t):
            self._complete_event(irq, IRQ_STATUS_VALID)

    def _level_active(self, line: int, t: int) -> bool:
        level = self.backend.level(line)
        return bool((t & IRQ_TYPE_LEVEL_HIGH and level) or (t & IRQ_TYPE_LEVEL_LOW and not level))

    def _complete_event(self, irq: _Irq, status: int) -> None:
        (queue, chain), irq.chain = irq.chain, None
        self._finish_event_chain(queue, chain, status)

    def _finish_event_chain(self, queue: Any, chain: Any, status: int) -> None:
        current = self.queues[EVENTQ] if len(self.queues) > EVENTQ else None
        if queue is not current:
            return   # the eventq was reset meanwhile: the chain is not in flight any more
        n = chain.write(bytes([status])) if chain.writable_len >= 1 else 0
        queue.add_used(chain.head, n)
        self._event_used = True
        self.stats["irqs" if status == IRQ_STATUS_VALID else "invalid_events"] += 1

    def _flush_events(self) -> None:
        """Tell the driver about eventq completions made outside handle_queue(EVENTQ)."""
        if self._event_used:
            self._event_used = False
            self.notify_queue(EVENTQ)

    def _disable_irq(self, line: int) -> None:
        irq = self._irq[line]
        irq.type = IRQ_TYPE_NONE
        irq.latched = False
        if irq.chain is not None:
            self._complete_event(irq, IRQ_STATUS_INVALID)

    # ---- queues ------------------------------------------------------------------------
    def handle_queue(self, index: int, queue: Any) -> bool:
        if index == REQUESTQ:
            used = False
            while (chain := queue.pop()) is not None:
                self._request(chain, queue)
                used = True
            self._flush_events()
            return used
        if index == EVENTQ and self.num_queues > EVENTQ:
            while (chain := queue.pop()) is not None:
                self._unmask(queue, chain)
            used, self._event_used = self._event_used, False
            return used
        # A queue this device does not have: complete whatever is there, empty.
        used = False
        while (chain := queue.pop()) is not None:
            queue.add_used(chain.head, 0)
            used = True
        return used

    def _unmask(self, queue: Any, chain: Any) -> None:
        """An eventq chain: ``{le16 gpio}`` then ``{u8 status}``."""
        line = -1
        if chain.readable_len == IRQ_REQUEST.size and chain.writable_len >= 1:
            (line,) = IRQ_REQUEST.unpack(chain.read())
        if 0 <= line < self.ngpio:
            held = self._irq[line].chain
            if held is not None and held[0] is not queue:
                self._irq[line].chain = None   # held on an eventq that was reset since
        if (not self.has_feature(VIRTIO_GPIO_F_IRQ) or not 0 <= line < self.ngpio
                or self._irq[line].type == IRQ_TYPE_NONE or self._irq[line].chain is not None):
            # Malformed, unknown line, interrupt not enabled (spec: return
            # INVALID), or a second pair for the same line (driver MUST NOT).
            self._finish_event_chain(queue, chain, IRQ_STATUS_INVALID)
            return
        irq = self._irq[line]
        irq.chain = (queue, chain)
        if irq.type & IRQ_EDGE_MASK and irq.latched:
            irq.latched = False
            self._complete_event(irq, IRQ_STATUS_VALID)
        elif irq.type & IRQ_LEVEL_MASK and self._level_active(line, irq.type):
            self._complete_event(irq, IRQ_STATUS_VALID)

    def _request(self, chain: Any, queue: Any) -> None:
        self.stats["requests"] += 1
        wlen = chain.writable_len
        if chain.readable_len != REQUEST.size or wlen < 2:
            # Wrong layout: report ERR in what is writable (maybe nothing).
            self._respond(chain, queue, bytes([STATUS_ERR, 0])[:wlen])
            return
        rtype, line, value = REQUEST.unpack(chain.read())
        try:
            payload = self._execute(rtype, line, value, wlen)
        except (GpioBackendError, OSError) as e:
            # The line cannot do it (host refused, unsupported): the driver
            # gets ERR.  Other exceptions are model bugs and go to the
            # transport, which marks the queue broken.
            log.debug("gpio request type %d line %d value %d: %s", rtype, line, value, e)
            payload = None
        if payload is None:
            self._respond(chain, queue, bytes([STATUS_ERR, 0]))
        else:
            self._respond(chain, queue, bytes([STATUS_OK]) + payload)

    def _respond(self, chain: Any, queue: Any, data: bytes) -> None:
        if data and data[0] != STATUS_OK:
            self.stats["errors"] += 1
        n = chain.write(data) if data else 0
        queue.add_used(chain.head, n)

    def _execute(self, rtype: int, line: int, value: int, wlen: int) -> bytes | None:
        """The response payload after the status byte, or None for ERR."""
        b = self.backend
        if rtype == MSG_GET_LINE_NAMES:
            if not self.blob or wlen < 1 + len(self.blob):
                return None
            return self.blob
        if not 0 <= line < self.ngpio:
            return None
        if rtype == MSG_GET_DIRECTION:
            return bytes([b.direction(line)])
        if rtype == MSG_SET_DIRECTION:
            if value not in (DIRECTION_NONE, DIRECTION_OUT, DIRECTION_IN):
                return None
            if value == DIRECTION_OUT and self._irq[line].type != IRQ_TYPE_NONE:
                return None   # an interrupt line cannot become an output
            if value == DIRECTION_NONE:
                self._disable_irq(line)   # "discard all state information"
            b.set_direction(line, value)
            return b"\0"
        if rtype == MSG_GET_VALUE:
            return bytes([b.value(line) & 1])
        if rtype == MSG_SET_VALUE:
            if value > 1:
                return None
            b.set_value(line, value)
            return b"\0"
        if rtype == MSG_SET_IRQ_TYPE:
            if not self.has_feature(VIRTIO_GPIO_F_IRQ) or value not in IRQ_TYPES:
                return None
            irq = self._irq[line]
            if value == IRQ_TYPE_NONE:
                b.set_irq_type(line, IRQ_TYPE_NONE)
                self._disable_irq(line)
                return b"\0"
            if irq.type == value:
                return b"\0"              # already so: keep the latch
            if irq.type != IRQ_TYPE_NONE:
                return None               # spec: disable before changing the type
            if b.direction(line) == DIRECTION_OUT:
                return None               # driver MUST NOT: IRQ on an output
            b.set_irq_type(line, value)
            irq.type = value
            irq.latched = False           # latch edges from now on
            return b"\0"
        return None


# ---- --devices gpio:... -------------------------------------------------------------------

def _parse_loopback(spec: str) -> dict[int, int]:
    pairs: dict[int, int] = {}
    for item in filter(None, spec.split("|")):
        src, sep, dst = item.partition(":")
        if not sep:
            raise ValueError(f"loopback {item!r}: expected OUT:IN")
        pairs[int(src, 0)] = int(dst, 0)
    return pairs


def _factory(lines: str = "8", names: str = "", chip: str = "", irq: str = "1",
             loopback: str = "") -> GpioDevice:
    want_irq = irq.lower() not in ("0", "no", "false", "off")
    if chip:
        path = chip if chip.startswith("/") else f"/dev/gpiochip{int(chip)}"
        return GpioDevice(irq=want_irq, backend=ChipBackend(path))
    name_list = names.split("|") if names else []
    return GpioDevice(int(lines, 0), name_list, irq=want_irq, loopback=_parse_loopback(loopback))


register_device("gpio", _factory, {
    "lines": "number of simulated lines (default 8)",
    "names": "line names separated by '|' (empty entries: unnamed lines)",
    "loopback": "wire simulated outputs to inputs, OUT:IN pairs separated by '|' (e.g. 0:1)",
    "irq": "offer VIRTIO_GPIO_F_IRQ (default 1)",
    "chip": "pass through a Linux gpiochip: N for /dev/gpiochipN, or a path",
}, path_key="chip")
