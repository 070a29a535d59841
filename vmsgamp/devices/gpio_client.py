"""Driver side of virtio-gpio over a :class:`~vmsgamp.bus.DriverDevice`.

One request at a time on the requestq (like Linux's per-line mutex, but
for the whole chip: the client is synchronous).  Interrupts: ``set_irq_type``
enables the interrupt at the device and unmasks it by posting the line's
eventq buffer pair; ``wait_irq`` returns the status the device put in that
pair (VALID: the interrupt fired; INVALID: it was disabled) and re-posts the
pair on the next call, so edges that arrive meanwhile are latched by the
device and delivered then.
"""
from __future__ import annotations

import enum
import struct
from typing import Any

from vmsgamp.devices.gpio import (
    CONFIG, DIRECTION_IN, DIRECTION_NONE, DIRECTION_OUT, EVENTQ, IRQ_REQUEST, IRQ_STATUS_INVALID,
    IRQ_STATUS_VALID, IRQ_TYPE_EDGE_BOTH, IRQ_TYPE_EDGE_FALLING, IRQ_TYPE_EDGE_RISING,
    IRQ_TYPE_LEVEL_HIGH, IRQ_TYPE_LEVEL_LOW, IRQ_TYPE_NONE, MSG_GET_DIRECTION, MSG_GET_LINE_NAMES,
    MSG_GET_VALUE, MSG_SET_DIRECTION, MSG_SET_IRQ_TYPE, MSG_SET_VALUE, REQUEST, REQUESTQ, STATUS_OK,
    VIRTIO_GPIO_F_IRQ, VIRTIO_ID_GPIO,
)
from vmsgamp.errors import VmsgampError

__all__ = ["GpioClient", "GpioError", "Direction", "IrqType", "IrqStatus"]


class Direction(enum.IntEnum):
    NONE = DIRECTION_NONE
    OUT = DIRECTION_OUT
    IN = DIRECTION_IN


class IrqType(enum.IntEnum):
    NONE = IRQ_TYPE_NONE
    EDGE_RISING = IRQ_TYPE_EDGE_RISING
    EDGE_FALLING = IRQ_TYPE_EDGE_FALLING
    EDGE_BOTH = IRQ_TYPE_EDGE_BOTH
    LEVEL_HIGH = IRQ_TYPE_LEVEL_HIGH
    LEVEL_LOW = IRQ_TYPE_LEVEL_LOW


class IrqStatus(enum.IntEnum):
    INVALID = IRQ_STATUS_INVALID
    VALID = IRQ_STATUS_VALID


_MSG_NAMES = {MSG_GET_LINE_NAMES: "GET_LINE_NAMES", MSG_GET_DIRECTION: "GET_DIRECTION",
              MSG_SET_DIRECTION: "SET_DIRECTION", MSG_GET_VALUE: "GET_VALUE",
              MSG_SET_VALUE: "SET_VALUE", MSG_SET_IRQ_TYPE: "SET_IRQ_TYPE"}


class GpioError(VmsgampError):
    """The device answered a request with an error status (or not at all)."""

    def __init__(self, msg_type: int, line: int, value: int, reason: str):
        self.msg_type, self.line, self.value = msg_type, line, value
        name = _MSG_NAMES.get(msg_type, f"type {msg_type}")
        super().__init__(f"{name} line {line} value {value}: {reason}")


MAX_NAMES_SIZE = 1 << 20   # far above 65535 lines of 15 characters


class GpioClient:
    """virtio-gpio driver.  ``dev`` is an opened DriverDevice (use
    :meth:`open` to negotiate VIRTIO_GPIO_F_IRQ)."""

    def __init__(self, dev: Any, *, timeout: float = 5.0):
        if dev.info is not None and dev.info.device_id != VIRTIO_ID_GPIO:
            raise ValueError(f"device {dev.dev_num} is {dev.info.name}, not gpio")
        self.dev = dev
        self.timeout = timeout
        self.ngpio, self.names_size = CONFIG.unpack(dev.read_config(0, CONFIG.size))
        if self.ngpio == 0:   # Linux refuses such a device too
            raise GpioError(0, 0, 0, "the device reports ngpio = 0")
        if self.names_size > MAX_NAMES_SIZE:
            raise GpioError(MSG_GET_LINE_NAMES, 0, 0, f"gpio_names_size {self.names_size} is implausible")
        self.irq = bool(dev.features >> VIRTIO_GPIO_F_IRQ & 1) and len(dev.queues) > EVENTQ
        # Buffers in shared memory, allocated once (the allocator never frees).
        self._req_addr, self._req = dev.alloc(REQUEST.size)
        self._resp_addr, self._resp = dev.alloc(2)
        self._names: tuple[int, memoryview] | None = None
        self._irq_bufs: dict[int, tuple[int, memoryview, int, memoryview]] = {}
        self._armed: set[int] = set()                 # lines whose pair is with the device
        self._results: dict[int, IrqStatus] = {}      # returned pairs not yet reported
        self._stuck = False   # a request timed out: its buffers may still be written

    @classmethod
    def open(cls, driver: Any, dev_num: int, *, irq: bool = True, packed: bool | None = None,
             timeout: float = 5.0) -> GpioClient:
        dev = driver.open(dev_num, features=(1 << VIRTIO_GPIO_F_IRQ) if irq else 0, packed=packed)
        return cls(dev, timeout=timeout)

    # ---- requestq ---------------------------------------------------------------
    def request(self, msg_type: int, line: int = 0, value: int = 0, *,
                resp: tuple[int, memoryview] | None = None) -> bytes:
        """Send one request; the response bytes after the status.  GpioError
        on an error status, a short response or no response in time (after
        which the client refuses further requests: reopen the device)."""
        if not (0 <= msg_type <= 0xFFFF and 0 <= line <= 0xFFFF and 0 <= value <= 0xFFFFFFFF):
            raise ValueError(f"request type {msg_type} line {line} value {value} does not fit le16/le16/le32")
        if self._stuck:
            raise GpioError(msg_type, line, value, "an earlier request timed out; reopen the device")
        struct.pack_into(REQUEST.format, self._req, 0, msg_type, line, value)
        addr, view = resp if resp is not None else (self._resp_addr, self._resp)
        view[:] = bytes(len(view))
        q = self.dev.queues[REQUESTQ]
        if not q.add([(self._req_addr, REQUEST.size)], [(addr, len(view))], token="req"):
            raise GpioError(msg_type, line, value, "requestq full")
        self.dev.notify(REQUESTQ)
        if not self.dev.wait_used(REQUESTQ, self.timeout):
            self._stuck = True
            reason = "device needs reset" if self.dev.needs_reset else f"no response within {self.timeout} s"
            raise GpioError(msg_type, line, value, reason)
        used = q.get_used()
        self._collect_events()
        if used is None or used[0] != "req":
            raise GpioError(msg_type, line, value, f"unexpected completion {used!r}")
        length = used[1]
        if length < 1:
            raise GpioError(msg_type, line, value, "empty response")
        status = view[0]
        if status != STATUS_OK:
            raise GpioError(msg_type, line, value, f"status {status} (VIRTIO_GPIO_STATUS_ERR)")
        if length != len(view):   # as Linux: an OK response fills the whole buffer
            raise GpioError(msg_type, line, value, f"response of {length} bytes, expected {len(view)}")
        return bytes(view[1:])

    def line_names(self) -> list[str]:
        """One name per line ("" for unnamed lines; all "" when the device
        has no names)."""
        if self.names_size == 0:
            return [""] * self.ngpio
        if self._names is None or len(self._names[1]) < 1 + self.names_size:
            self._names = self.dev.alloc(1 + self.names_size)
        blob = self.request(MSG_GET_LINE_NAMES, resp=self._names)
        names = [n.decode("ascii", "replace") for n in blob[:self.names_size].split(b"\0")]
        return (names + [""] * self.ngpio)[:self.ngpio]

    def get_direction(self, line: int) -> Direction:
        raw = self.request(MSG_GET_DIRECTION, line)[0]
        try:
            return Direction(raw)
        except ValueError:
            raise GpioError(MSG_GET_DIRECTION, line, 0, f"unknown direction {raw}") from None

    def set_direction(self, line: int, direction: int) -> None:
        self.request(MSG_SET_DIRECTION, line, int(direction))

    def direction_output(self, line: int, value: int) -> None:
        """Linux's order: the value first, then the direction."""
        self.set_value(line, value)
        self.set_direction(line, Direction.OUT)

    def get_value(self, line: int) -> int:
        return self.request(MSG_GET_VALUE, line)[0]

    def set_value(self, line: int, value: int) -> None:
        self.request(MSG_SET_VALUE, line, int(value))

    # ---- interrupts -------------------------------------------------------------------
    def set_irq_type(self, line: int, irq_type: int, *, unmask: bool = True) -> None:
        """Enable (any type but NONE) or disable the interrupt of ``line`` at
        the device.  Enabling also unmasks it unless ``unmask=False``;
        disabling makes the device hand back the line's pair (INVALID)."""
        if not self.irq:
            raise GpioError(MSG_SET_IRQ_TYPE, line, irq_type, "VIRTIO_GPIO_F_IRQ was not negotiated")
        self.request(MSG_SET_IRQ_TYPE, line, int(irq_type))
        if irq_type != IRQ_TYPE_NONE and unmask:
            self.unmask(line)
        elif irq_type == IRQ_TYPE_NONE:
            self._collect_events()

    def unmask(self, line: int) -> None:
        """Post the line's eventq pair (no-op if it is already posted)."""
        if line in self._armed:
            return
        if line not in self._irq_bufs:
            ra, rv = self.dev.alloc(IRQ_REQUEST.size)
            sa, sv = self.dev.alloc(1)
            self._irq_bufs[line] = (ra, rv, sa, sv)
        ra, rv, sa, sv = self._irq_bufs[line]
        struct.pack_into(IRQ_REQUEST.format, rv, 0, line)
        sv[0] = 0xFF   # neither VALID nor INVALID until the device writes it
        if not self.dev.queues[EVENTQ].add([(ra, IRQ_REQUEST.size)], [(sa, 1)], token=line):
            raise GpioError(MSG_SET_IRQ_TYPE, line, 0, "eventq full")
        self._armed.add(line)
        self.dev.notify(EVENTQ)

    def _collect_events(self) -> None:
        if not self.irq:
            return
        q = self.dev.queues[EVENTQ]
        while (used := q.get_used()) is not None:
            line, length = used
            self._armed.discard(line)
            status = self._irq_bufs[line][3][0] if length >= 1 else IRQ_STATUS_INVALID
            self._results[line] = IrqStatus.VALID if status == IRQ_STATUS_VALID else IrqStatus.INVALID

    def poll_irq(self, line: int) -> IrqStatus | None:
        """A returned pair for ``line`` if there is one (does not wait)."""
        self._collect_events()
        return self._results.pop(line, None)

    def wait_irq(self, line: int, timeout: float | None = None) -> IrqStatus | None:
        """Wait for ``line``'s interrupt: VALID when it fired, INVALID when
        the device returned the pair because the interrupt is disabled, None
        on timeout.  Re-posts the pair first if the device handed it back."""
        if not self.irq:
            raise GpioError(MSG_SET_IRQ_TYPE, line, 0, "VIRTIO_GPIO_F_IRQ was not negotiated")
        timeout = self.timeout if timeout is None else timeout
        got = self.poll_irq(line)
        if got is not None:
            return got
        self.unmask(line)
        clock = self.dev.drv.bus.clock
        deadline = clock() + timeout
        while True:
            got = self.poll_irq(line)
            if got is not None:
                return got
            left = deadline - clock()
            if left <= 0 or self.dev.needs_reset:
                return None
            self.dev.wait_used(EVENTQ, left)

    def close(self) -> None:
        self.dev.close()
