"""Driver side of virtio-console over a probed ``DriverDevice``.

``ConsoleClient(dev)`` keeps receive buffers posted on every port it knows,
runs the control protocol when VIRTIO_CONSOLE_F_MULTIPORT was negotiated
(DEVICE_READY, then PORT_READY / PORT_OPEN as the device announces ports),
and gives each port a file-like ``ConsolePortStream`` (``read``,
``readline``, ``write``, ``flush``).  The client itself reads and writes
port 0.  ``open_console_streams(port)`` wraps a port in an asyncio
``StreamReader`` and a small writer with the ``StreamWriter`` methods.

Every blocking call has a timeout (default: the client's) and pumps the bus
while it waits.  One lock serialises all bus access, so a port may be read
from one thread while another writes.

    dev = drv.open(0, features=1 << VIRTIO_CONSOLE_F_SIZE)
    con = ConsoleClient(dev)
    con.write(b"hello\\n")
    line = con.readline(timeout=2)
"""
from __future__ import annotations

import asyncio
import collections
import struct
import threading
from collections.abc import Callable
from typing import Any

from vmsgamp.devices.console import (
    CONSOLE_PORT, CONTROL, CONTROL_RX_QUEUE, CONTROL_TX_QUEUE, DEFAULT_SIZE_ORDER, DEVICE_READY,
    PORT_ADD, PORT_NAME, PORT_OPEN, PORT_READY, PORT_REMOVE, RESIZE, SIZE_ORDERS,
    VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE, VIRTIO_ID_CONSOLE, check_size_order, port_queues,
)
from vmsgamp.errors import VmsgampError

__all__ = ["ConsoleClient", "ConsolePortStream", "ConsoleStreamWriter", "open_console_streams"]


class _BufferPool:
    """Fixed buffers in shared memory (the driver allocator never frees, so
    a client allocates once and recycles)."""

    def __init__(self, dev: Any, count: int, size: int) -> None:
        self.size = size
        self.bufs = [dev.alloc(size) for _ in range(count)]
        self.free = list(range(count))

    def release(self) -> None:
        """Drop the views so the region can be unmapped (the memory itself
        stays allocated: the device may still hold the buffers)."""
        for _, view in self.bufs:
            view.release()
        self.bufs = []
        self.free = []


class ConsolePortStream:
    """One console port seen from the driver: a file-like object."""

    def __init__(self, client: "ConsoleClient", port_id: int, *, rx_buffers: int, tx_buffers: int,
                 buffer_size: int, max_buffered: int) -> None:
        self.client = client
        self.id = port_id
        self.rxq, self.txq = port_queues(port_id)
        self.name: str | None = None
        self.is_console = port_id == 0 and not client.multiport
        self.host_connected = not client.multiport   # PORT_OPEN from the device
        self.size: tuple[int, int] | None = None     # (rows, cols) from RESIZE
        self.removed = False
        self.max_buffered = max_buffered
        self._buf = bytearray()
        self._rx = _BufferPool(client.dev, rx_buffers, buffer_size)
        self._tx = _BufferPool(client.dev, tx_buffers, buffer_size)
        self.bytes_read = 0
        self.bytes_written = 0

    # ---- internals (called with the client lock held) ---------------------------------
    def _post_rx(self) -> bool:
        """Post idle receive buffers while the local buffer has room (when it
        does not, the device keeps the input: back-pressure, not loss)."""
        q = self.client.dev.queues[self.rxq]
        posted = False
        while self._rx.free and len(self._buf) < self.max_buffered:
            i = self._rx.free.pop()
            addr, _ = self._rx.bufs[i]
            if not q.add([], [(addr, self._rx.size)], token=i):
                self._rx.free.append(i)
                break
            posted = True
        return posted

    def _collect(self) -> bool:
        """Take used receive buffers and reclaim transmit buffers; returns
        True if receive buffers were re-posted (a kick is due)."""
        dev = self.client.dev
        rxq = dev.queues[self.rxq]
        while (u := rxq.get_used()) is not None:
            i, ln = u
            _, view = self._rx.bufs[i]
            ln = min(ln, self._rx.size)   # never trust a length past the buffer
            self._buf += view[:ln]
            self.bytes_read += ln
            self._rx.free.append(i)
        txq = dev.queues[self.txq]
        while (u := txq.get_used()) is not None:
            self._tx.free.append(u[0])
        return self._post_rx()

    # ---- file-like API --------------------------------------------------------------------
    def read(self, n: int = -1, timeout: float | None = None) -> bytes:
        """Up to ``n`` bytes (all buffered if n < 0), waiting up to
        ``timeout`` for the first one; b"" if none came."""
        with self.client._lock:
            if not self._buf:
                self.client._wait(lambda: bool(self._buf) or self.removed, timeout)
            return self._take(len(self._buf) if n < 0 else n)

    def read_exactly(self, n: int, timeout: float | None = None) -> bytes:
        """Exactly ``n`` bytes, or TimeoutError (the bytes stay buffered)."""
        with self.client._lock:
            if not self.client._wait(lambda: len(self._buf) >= n or self.removed, timeout):
                raise TimeoutError(f"console port {self.id}: {len(self._buf)} of {n} bytes arrived")
            return self._take(n)

    def readline(self, limit: int = -1, timeout: float | None = None) -> bytes:
        """One line including b"\\n" (or ``limit`` bytes); on timeout what
        has arrived so far (possibly b"")."""
        def ready() -> bool:
            return b"\n" in self._buf or (0 <= limit <= len(self._buf)) or self.removed

        with self.client._lock:
            self.client._wait(ready, timeout)
            end = self._buf.find(b"\n")
            n = len(self._buf) if end < 0 else end + 1
            if limit >= 0:
                n = min(n, limit)
            return self._take(n)

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        if self._rx.free and self._post_rx():
            self.client.dev.notify(self.rxq)
        return data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def write(self, data: bytes, timeout: float | None = None) -> int:
        """Queue ``data`` on the transmitq (split into buffer-sized chunks);
        waits only for free transmit buffers.  Returns len(data)."""
        mv = memoryview(bytes(data))
        with self.client._lock:
            if self.removed:
                raise BrokenPipeError(f"console port {self.id} was removed")
            q = self.client.dev.queues[self.txq]
            off = 0
            while off < len(mv):
                if not self._tx.free:
                    self.client._service()
                if not self._tx.free and not self.client._wait(lambda: bool(self._tx.free), timeout):
                    raise TimeoutError(f"console port {self.id}: transmit buffers not returned")
                i = self._tx.free.pop()
                addr, view = self._tx.bufs[i]
                chunk = mv[off:off + self._tx.size]
                view[:len(chunk)] = chunk
                if not q.add([(addr, len(chunk))], [], token=i):
                    self._tx.free.append(i)
                    self.client.dev.notify(self.txq)
                    if not self.client._wait(lambda: q.num_free > 0, timeout):
                        raise TimeoutError(f"console port {self.id}: transmit queue full")
                    continue
                off += len(chunk)
                self.bytes_written += len(chunk)
                self.client.dev.notify(self.txq)
            return len(mv)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the device has taken every transmit buffer."""
        with self.client._lock:
            total = len(self._tx.bufs)
            if not self.client._wait(lambda: len(self._tx.free) == total, timeout):
                raise TimeoutError(f"console port {self.id}: output not consumed")

    def open(self) -> None:
        """Multiport: tell the device the driver opened this port (PORT_OPEN 1),
        which a device needs before it sends input to a generic port."""
        if self.client.multiport:
            self.client._send_control(self.id, PORT_OPEN, 1)

    def close(self) -> None:
        """Multiport: PORT_OPEN 0.  (Buffers stay posted; they belong to the device.)"""
        if self.client.multiport and not self.removed:
            self.client._send_control(self.id, PORT_OPEN, 0)

    def __repr__(self) -> str:
        return f"<ConsolePortStream {self.id} name={self.name!r} buffered={len(self._buf)}>"


class ConsoleClient:
    """The virtio-console driver over a probed ``DriverDevice`` (``dev``).
    ``size_order`` must match the device's (see vmsgamp.devices.console)."""

    def __init__(self, dev: Any, *, rx_buffers: int = 8, tx_buffers: int = 8, buffer_size: int = 4096,
                 max_buffered: int = 1 << 16, timeout: float | None = None,
                 size_order: str = DEFAULT_SIZE_ORDER, ready_timeout: float | None = None) -> None:
        check_size_order(size_order)
        self.dev = dev
        self.timeout = dev.drv.timeout if timeout is None else timeout
        self.size_order = size_order
        self.multiport = bool(dev.features >> VIRTIO_CONSOLE_F_MULTIPORT & 1)
        self.has_size = bool(dev.features >> VIRTIO_CONSOLE_F_SIZE & 1)
        self._lock = threading.RLock()
        self._port_opts = dict(rx_buffers=rx_buffers, tx_buffers=tx_buffers, buffer_size=buffer_size,
                               max_buffered=max_buffered)
        self.ports: dict[int, ConsolePortStream] = {}
        self.events: list[tuple[str, int, int]] = []     # control messages seen, for tests and reports
        self.max_nr_ports = 1
        with self._lock:
            if self.multiport:
                self.max_nr_ports = struct.unpack("<I", dev.read_config(4, 4))[0]
                self._ctl_rx = _BufferPool(dev, 8, 4096)
                self._ctl_tx = _BufferPool(dev, 8, 64)
                self._ctl_out: collections.deque[bytes] = collections.deque()
                q = dev.queues[CONTROL_RX_QUEUE]
                for i in list(self._ctl_rx.free):
                    addr, _ = self._ctl_rx.bufs[i]
                    q.add([], [(addr, self._ctl_rx.size)], token=i)
                self._ctl_rx.free.clear()
                dev.notify(CONTROL_RX_QUEUE)
                self._send_control(0, DEVICE_READY, 1)
                # Port 0 normally arrives at once; wait for it (not an error if it does not).
                self._wait(lambda: 0 in self.ports, self.timeout if ready_timeout is None else ready_timeout)
            else:
                self._add_port(0)

    @classmethod
    def open(cls, driver: Any, dev_num: int, *, packed: bool | None = None,
             **kw: Any) -> "ConsoleClient":
        """Probe ``dev_num`` on ``driver`` (an AmpDriver), taking SIZE and
        MULTIPORT when offered, and wrap it."""
        from vmsgamp.errors import VmsgampError

        info = driver.info(dev_num)
        if info.device_id != VIRTIO_ID_CONSOLE:
            raise VmsgampError(f"device {dev_num} is {info.name}, not console")
        wanted = info.features & (1 << VIRTIO_CONSOLE_F_SIZE | 1 << VIRTIO_CONSOLE_F_MULTIPORT)
        return cls(driver.open(dev_num, features=wanted, packed=packed), **kw)

    # ---- ports ------------------------------------------------------------------------------
    def port(self, port_id: int = 0, timeout: float | None = None) -> ConsolePortStream:
        """The stream of ``port_id``, waiting for the device to add it."""
        with self._lock:
            if port_id not in self.ports and not self._wait(lambda: port_id in self.ports, timeout):
                raise TimeoutError(f"console port {port_id} was not added by the device")
            return self.ports[port_id]

    def _add_port(self, port_id: int) -> ConsolePortStream | None:
        rxq, txq = port_queues(port_id)
        if port_id >= max(self.max_nr_ports, 1) or txq >= len(self.dev.queues):
            return None     # the device must not add a port it has no queues for
        port = self.ports.get(port_id)
        if port is None:
            port = ConsolePortStream(self, port_id, **self._port_opts)
            self.ports[port_id] = port
            if port._post_rx():
                self.dev.notify(rxq)
        return port

    # ---- configuration ------------------------------------------------------------------
    def read_size(self) -> tuple[int, int] | None:
        """(rows, cols) from the configuration space, or None without SIZE."""
        if not self.has_size:
            return None
        with self._lock:
            a, b = struct.unpack("<HH", self.dev.read_config(0, 4))
        return (b, a) if SIZE_ORDERS[self.size_order][0] else (a, b)

    def emergency_write(self, data: bytes) -> None:
        """Write bytes one by one to emerg_wr (works before queues exist)."""
        with self._lock:
            for b in data:
                if not self.dev.write_config(8, struct.pack("<I", b)):
                    raise OSError("the device refused the emergency write")

    # ---- control protocol ---------------------------------------------------------------
    def _send_control(self, port_id: int, event: int, value: int) -> None:
        with self._lock:
            self._ctl_out.append(CONTROL.pack(port_id, event, value))
            self._flush_control()
            if self._ctl_out and not self._wait(lambda: not self._ctl_out, None):
                raise TimeoutError("console: control transmit buffers not returned")

    def _flush_control(self) -> None:
        q = self.dev.queues[CONTROL_TX_QUEUE]
        sent = False
        while self._ctl_out and self._ctl_tx.free:
            i = self._ctl_tx.free.pop()
            addr, view = self._ctl_tx.bufs[i]
            msg = self._ctl_out[0]
            view[:len(msg)] = msg
            if not q.add([(addr, len(msg))], [], token=i):
                self._ctl_tx.free.append(i)
                break
            self._ctl_out.popleft()
            sent = True
        if sent:
            self.dev.notify(CONTROL_TX_QUEUE)

    def _on_control(self, msg: bytes) -> None:
        if len(msg) < CONTROL.size:
            return
        port_id, event, value = CONTROL.unpack_from(msg)
        self.events.append(({PORT_ADD: "PORT_ADD", PORT_REMOVE: "PORT_REMOVE", CONSOLE_PORT: "CONSOLE_PORT",
                             RESIZE: "RESIZE", PORT_OPEN: "PORT_OPEN", PORT_NAME: "PORT_NAME"}
                            .get(event, str(event)), port_id, value))
        if event == PORT_ADD:
            port = self._add_port(port_id)
            if port is not None:
                self._ctl_out.append(CONTROL.pack(port_id, PORT_READY, 1))
            return
        port = self.ports.get(port_id)
        if port is None:
            return
        if event == PORT_REMOVE:
            port.removed = True
            self.ports.pop(port_id, None)
        elif event == CONSOLE_PORT and value:
            port.is_console = True
            self._ctl_out.append(CONTROL.pack(port_id, PORT_OPEN, 1))   # as Linux: console ports open at once
        elif event == RESIZE and len(msg) >= CONTROL.size + 4:
            a, b = struct.unpack_from("<HH", msg, CONTROL.size)
            port.size = (b, a) if SIZE_ORDERS[self.size_order][1] else (a, b)
        elif event == PORT_OPEN:
            port.host_connected = bool(value)
        elif event == PORT_NAME:
            port.name = msg[CONTROL.size:].decode("utf-8", "replace")

    def _service(self) -> None:
        """Collect every completion without waiting."""
        kicks = []
        for port in list(self.ports.values()):
            if port._collect():
                kicks.append(port.rxq)
        if self.multiport:
            q = self.dev.queues[CONTROL_RX_QUEUE]
            got = False
            while (u := q.get_used()) is not None:
                i, ln = u
                _, view = self._ctl_rx.bufs[i]
                msg = bytes(view[:min(ln, self._ctl_rx.size)])
                addr, _ = self._ctl_rx.bufs[i]
                q.add([], [(addr, self._ctl_rx.size)], token=i)
                got = True
                self._on_control(msg)
            if got:
                kicks.append(CONTROL_RX_QUEUE)
            txq = self.dev.queues[CONTROL_TX_QUEUE]
            while (u := txq.get_used()) is not None:
                self._ctl_tx.free.append(u[0])
            self._flush_control()
        for index in kicks:
            self.dev.notify(index)

    def _wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Service the queues and pump the bus until ``done()`` or timeout
        (the driver's adaptive wait, watching every queue of the device)."""
        timeout = self.timeout if timeout is None else timeout

        def ready() -> bool:
            self._service()
            if self.dev.removed:
                raise BrokenPipeError(f"console device {self.dev.dev_num} was removed")
            return done()

        try:
            return self.dev.wait_until(ready, None, timeout)
        except VmsgampError:   # the bus's "device was removed"
            if self.dev.removed:
                raise BrokenPipeError(f"console device {self.dev.dev_num} was removed") from None
            raise

    def poll(self) -> None:
        """Process completions and control messages now (non-blocking)."""
        with self._lock:
            self.dev.drv.pump(0)
            self._service()

    def close(self) -> None:
        """Release the buffer views (idempotent).  The device keeps running;
        close or reset the DriverDevice to stop it."""
        with self._lock:
            for port in self.ports.values():
                port._rx.release()
                port._tx.release()
                port.removed = True
            self.ports.clear()
            if self.multiport:
                self._ctl_rx.release()
                self._ctl_tx.release()

    def __enter__(self) -> "ConsoleClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- port 0 shortcuts ------------------------------------------------------------------
    def read(self, n: int = -1, timeout: float | None = None) -> bytes:
        return self.port(0).read(n, timeout)

    def read_exactly(self, n: int, timeout: float | None = None) -> bytes:
        return self.port(0).read_exactly(n, timeout)

    def readline(self, limit: int = -1, timeout: float | None = None) -> bytes:
        return self.port(0).readline(limit, timeout)

    def write(self, data: bytes, timeout: float | None = None) -> int:
        return self.port(0).write(data, timeout)

    def flush(self, timeout: float | None = None) -> None:
        self.port(0).flush(timeout)


# ---- asyncio -----------------------------------------------------------------------------

class ConsoleStreamWriter:
    """The ``asyncio.StreamWriter`` methods over a port: write() buffers,
    drain() sends (in a worker thread), close()/wait_closed() stop the reader
    pump started by ``open_console_streams``."""

    def __init__(self, port: ConsolePortStream, reader: asyncio.StreamReader, poll: float) -> None:
        self.port = port
        self._reader = reader
        self._poll = poll
        self._pending = bytearray()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def write(self, data: bytes) -> None:
        if self._closing:
            raise BrokenPipeError("console stream is closed")
        self._pending += data

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    async def drain(self) -> None:
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            await asyncio.to_thread(self.port.write, data)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    async def wait_closed(self) -> None:
        self._closing = True
        if self._task is not None:
            await self._task
            self._task = None

    async def _pump(self) -> None:
        try:
            while not self._closing:
                data = await asyncio.to_thread(self.port.read, 4096, self._poll)
                if data:
                    self._reader.feed_data(data)
                elif self.port.removed:
                    break
        except Exception as e:  # surface bus errors to the reader
            self._reader.set_exception(e)
            return
        self._reader.feed_eof()


async def open_console_streams(port: ConsolePortStream, *, poll: float = 0.05
                               ) -> tuple[asyncio.StreamReader, ConsoleStreamWriter]:
    """(reader, writer) over a console port.  A task reads the port in short
    slices (``poll`` seconds) in a worker thread and feeds the reader."""
    reader = asyncio.StreamReader()
    writer = ConsoleStreamWriter(port, reader, poll)
    writer._task = asyncio.create_task(writer._pump())
    return reader, writer
