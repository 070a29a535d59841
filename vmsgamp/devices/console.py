"""virtio-console (device id 3): port 0 receiveq/transmitq, optional console
size (VIRTIO_CONSOLE_F_SIZE), multiple ports with control queues
(VIRTIO_CONSOLE_F_MULTIPORT) and emergency write (VIRTIO_CONSOLE_F_EMERG_WRITE).

Queues: 0 receiveq(port 0), 1 transmitq(port 0), 2 control receiveq,
3 control transmitq, then 4 + 2(p-1) / 5 + 2(p-1) for port p >= 1 (the
control and extra queues exist only when MULTIPORT is negotiated).

Each port is attached to a host backend: a pseudo-terminal (``PtyBackend``,
the slave path is printed by ``vmsgamp serve``), the process's stdio, a
listening UNIX socket, a pair of file descriptors, or a Python callback
(``CallbackBackend``, for tests and embedding).

Data flow.  Host input is read from the backend when it becomes readable,
appended to the port's pending buffer and copied into receive buffers the
driver posted; when no receive buffer is held the bytes wait (bounded:
``rx_limit``).  While a port's pending buffer is full its backend fd is not
polled, so fd backends lose nothing (the kernel buffers and the writer
blocks); only ``CallbackBackend.feed`` can overflow, counted in
``rx_dropped``.  Driver output (transmitq) goes to the backend without
blocking the serving loop: what the backend cannot take at once waits in a
bounded buffer (``tx_limit``), beyond which bytes are dropped and counted in
``tx_dropped`` (as QEMU does for an unconnected pty).

The size field order (see docs/console.md).  Two places carry (cols, rows):

* the configuration space (non-multiport resize, SIZE feature).  Linux reads
  it by field name from ``struct virtio_console_config {cols; rows; ...}``,
  i.e. cols at offset 0, rows at offset 2, as virtio <= 1.3 says; the
  virtio-1.4 branch lists ``rows; cols`` instead;
* the VIRTIO_CONSOLE_RESIZE control message (multiport).  The spec says
  ``{cols; rows}``, and so does Linux since "virtio_console: fix order of
  fields cols and rows" (mainline, and Debian's 6.1 since 6.1.162).  Older
  kernels read ``{rows; cols}``.  Measured with the Linux virtio-msg driver
  stack and the stock virtio_console driver of Debian 6.1.192: a multiport
  console configured ``rows=24;cols=80`` showed ``stty size`` = ``80 24``
  with the old-kernel order, ``24 80`` with the spec order.

``size_order`` picks the layout of both:

=============  ==============  =============
size_order     config space    RESIZE message
=============  ==============  =============
``spec``       cols, rows      cols, rows      (default; virtio 1.0-1.3, current Linux)
``old-linux``  cols, rows      rows, cols      (Linux before the fix above)
``spec-1.4``   rows, cols      cols, rows      (virtio-1.4 branch text)
=============  ==============  =============
"""
from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import threading
import tty
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from vmsgamp.devices._base import VirtioDevice, register_device

log = logging.getLogger("vmsgamp.devices.console")

VIRTIO_ID_CONSOLE = 3

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

# Control events (struct virtio_console_control {le32 id; le16 event; le16 value}).
DEVICE_READY = 0
PORT_ADD = 1          # "DEVICE_ADD" in the spec text
PORT_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7
EVENT_NAMES = {DEVICE_READY: "DEVICE_READY", PORT_ADD: "PORT_ADD", PORT_REMOVE: "PORT_REMOVE",
               PORT_READY: "PORT_READY", CONSOLE_PORT: "CONSOLE_PORT", RESIZE: "RESIZE",
               PORT_OPEN: "PORT_OPEN", PORT_NAME: "PORT_NAME"}

CONTROL = struct.Struct("<IHH")
CONFIG_SIZE = 12
EMERG_WR_OFFSET = 8

# (config space order, RESIZE message order): True = cols first.
SIZE_ORDERS: dict[str, tuple[bool, bool]] = {
    "spec": (True, True),
    "old-linux": (True, False),
    "spec-1.4": (False, True),
}
DEFAULT_SIZE_ORDER = "spec"


def check_size_order(size_order: str) -> str:
    """``size_order`` if known, else ValueError saying what exists."""
    if size_order == "linux":     # the old default's name: say what it became
        raise ValueError("size_order 'linux' is now 'old-linux' (kernels before \"virtio_console: "
                         "fix order of fields cols and rows\"); current Linux reads the spec "
                         "order, the default 'spec'")
    if size_order not in SIZE_ORDERS:
        raise ValueError(f"size_order {size_order!r}: one of {', '.join(SIZE_ORDERS)}")
    return size_order

CONTROL_RX_QUEUE = 2
CONTROL_TX_QUEUE = 3


def port_queues(port_id: int) -> tuple[int, int]:
    """(receiveq, transmitq) indices of ``port_id``."""
    if port_id == 0:
        return 0, 1
    return 2 + 2 * port_id, 3 + 2 * port_id


def queue_port(index: int) -> tuple[int, bool] | None:
    """(port id, is_transmit) for a data queue index; None for control queues."""
    if index in (0, 1):
        return 0, index == 1
    if index in (CONTROL_RX_QUEUE, CONTROL_TX_QUEUE):
        return None
    return (index - 2) // 2, index % 2 == 1


def _set_nonblocking(fd: int) -> bool:
    """Set O_NONBLOCK; returns the previous state."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return bool(flags & os.O_NONBLOCK)


# ---- backends -------------------------------------------------------------------

class ConsoleBackend:
    """Host side of one port.  Subclasses implement ``input_fds``,
    ``on_ready`` and ``_write_some``; output buffering lives here.

    ``input_fds()`` are polled by the serving loop; ``on_ready(fd, max_bytes)``
    returns the host bytes that arrived (possibly b"", at most ``max_bytes``
    where the source allows it)."""

    kind = "none"

    def __init__(self, *, tx_limit: int = 1 << 16) -> None:
        self.tx_limit = tx_limit
        self._out = bytearray()
        self.tx_dropped = 0
        self.bytes_out = 0
        self.closed = False

    # -- input --
    def input_fds(self) -> Sequence[int]:
        return ()

    def on_ready(self, fd: int, max_bytes: int = 4096) -> bytes:
        return b""

    def take_ready_input(self) -> bytes:
        """Host input already waiting in this process (a Python endpoint
        that answered the output it was just given): the model delivers it
        at once instead of when the loop next looks at ``input_fds``."""
        return b""

    @property
    def connected(self) -> bool:
        """Whether a host-side user is attached (PORT_OPEN to the driver)."""
        return not self.closed

    # -- output --
    def write(self, data: bytes) -> None:
        """Queue driver output; never blocks.  Over ``tx_limit`` the newest
        bytes are dropped (counted)."""
        room = self.tx_limit - len(self._out)
        if len(data) > room:
            self.tx_dropped += len(data) - max(room, 0)
            data = data[:max(room, 0)]
        self._out += data
        self.flush()

    def flush(self) -> None:
        """Push buffered output to the host as far as it goes without blocking."""
        while self._out and not self.closed:
            try:
                n = self._write_some(memoryview(self._out))
            except BlockingIOError:
                return
            except OSError as e:
                log.debug("console backend %s: write failed: %s", self.kind, e)
                self._on_write_error(e)
                return
            if n is None:       # nowhere to write now (e.g. socket without a client): keep
                return
            self.bytes_out += n
            del self._out[:n]

    def _write_some(self, data: memoryview) -> int | None:
        return len(data)    # discard

    def _on_write_error(self, e: OSError) -> None:
        self.tx_dropped += len(self._out)
        self._out.clear()

    @property
    def pending_output(self) -> int:
        return len(self._out)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind}

    def close(self) -> None:
        self.closed = True


class NullBackend(ConsoleBackend):
    """Discards output, never has input."""

    kind = "null"


class FdBackend(ConsoleBackend):
    """Input from ``read_fd``, output to ``write_fd`` (a pipe, a socket of a
    socketpair, a tty...).  Both are made non-blocking; ``own=True`` closes
    them on close()."""

    kind = "fd"

    def __init__(self, read_fd: int | None, write_fd: int | None = None, *, own: bool = True,
                 tx_limit: int = 1 << 16) -> None:
        super().__init__(tx_limit=tx_limit)
        self.read_fd = read_fd
        self.write_fd = read_fd if write_fd is None else write_fd
        self._own = own
        self._eof = False
        self._restore: list[tuple[int, bool]] = []
        for fd in {fd for fd in (self.read_fd, self.write_fd) if fd is not None}:
            self._restore.append((fd, _set_nonblocking(fd)))
        if self.read_fd is not None and stat.S_ISREG(os.fstat(self.read_fd).st_mode):
            self._eof = True    # epoll cannot watch regular files: no input from them

    def input_fds(self) -> Sequence[int]:
        if self.closed or self._eof or self.read_fd is None:
            return ()
        return (self.read_fd,)

    def on_ready(self, fd: int, max_bytes: int = 4096) -> bytes:
        try:
            data = os.read(fd, max(1, max_bytes))
        except BlockingIOError:
            return b""
        except OSError as e:
            if e.errno != errno.EIO:
                log.debug("console backend %s: read failed: %s", self.kind, e)
            data = b""
        if not data:
            self._eof = True    # stop polling a closed input
        return data

    def _write_some(self, data: memoryview) -> int | None:
        if self.write_fd is None:
            return len(data)
        return os.write(self.write_fd, data)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        for fd, was_nonblocking in self._restore:
            if not self._own and not was_nonblocking:
                try:
                    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
                except OSError:
                    pass
        if self._own:
            for fd in {fd for fd in (self.read_fd, self.write_fd) if fd is not None}:
                try:
                    os.close(fd)
                except OSError:
                    pass


class StdioBackend(FdBackend):
    """The serving process's stdin/stdout (left open on close; their
    blocking mode is restored)."""

    kind = "stdio"

    def __init__(self, *, tx_limit: int = 1 << 16) -> None:
        super().__init__(0, 1, own=False, tx_limit=tx_limit)


class PtyBackend(FdBackend):
    """A new pseudo-terminal: the device holds the master, a user opens
    ``slave_path`` (``screen /dev/pts/N``).  The slave is put in raw mode
    (no echo, no line editing: the driver side has its own tty) and kept
    open so the master never reports a hang-up while nobody is attached."""

    kind = "pty"

    def __init__(self, *, tx_limit: int = 1 << 16) -> None:
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            self.slave_path = os.ttyname(slave)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        self.master_fd = master
        self._slave_fd = slave
        super().__init__(master, master, own=True, tx_limit=tx_limit)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "pty": self.slave_path}

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        try:
            os.close(self._slave_fd)
        except OSError:
            pass


class SocketBackend(ConsoleBackend):
    """A listening UNIX stream socket at ``path``; one client at a time
    (a second one is refused while the first is connected).  Output while no
    client is connected waits in the bounded buffer."""

    kind = "socket"

    def __init__(self, path: str, *, tx_limit: int = 1 << 16) -> None:
        super().__init__(tx_limit=tx_limit)
        self.path = path
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)     # a stale socket from an earlier run
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
            self._listener.listen(1)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self._client: socket.socket | None = None
        self.on_connect: Callable[[bool], None] | None = None   # set by the port
        self.connections = 0

    @property
    def connected(self) -> bool:
        return self._client is not None

    def input_fds(self) -> Sequence[int]:
        if self.closed:
            return ()
        fds = [self._listener.fileno()]
        if self._client is not None:
            fds.append(self._client.fileno())
        return fds

    def on_ready(self, fd: int, max_bytes: int = 4096) -> bytes:
        if fd == self._listener.fileno():
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return b""
            if self._client is not None:
                conn.close()    # busy: one client at a time
                return b""
            conn.setblocking(False)
            self._client = conn
            self.connections += 1
            if self.on_connect is not None:
                self.on_connect(True)
            self.flush()
            return b""
        if self._client is None or fd != self._client.fileno():
            return b""
        try:
            data = self._client.recv(max(1, max_bytes))
        except BlockingIOError:
            return b""
        except OSError:
            data = b""
        if not data:
            self._drop_client()
        return data

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            if self.on_connect is not None:
                self.on_connect(False)

    def _write_some(self, data: memoryview) -> int | None:
        if self._client is None:
            return None
        return self._client.send(data)

    def _on_write_error(self, e: OSError) -> None:
        self._drop_client()     # keep the output for the next client

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "socket": self.path}

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self._client is not None:
            self._client.close()
            self._client = None
        self._listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class CallbackBackend(ConsoleBackend):
    """A Python endpoint: driver output is passed to ``on_output(bytes)``
    (or collected in ``output`` when no callback is given); host input is
    given with ``feed(data)``, callable from any thread (it wakes the
    serving loop through a pipe)."""

    kind = "callback"

    def __init__(self, on_output: Callable[[bytes], None] | None = None, *,
                 tx_limit: int = 1 << 16) -> None:
        super().__init__(tx_limit=tx_limit)
        self.on_output = on_output
        self.output = bytearray()
        self._lock = threading.Lock()
        self._input: collections.deque[bytes] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        _set_nonblocking(self._wake_r)
        _set_nonblocking(self._wake_w)

    def feed(self, data: bytes) -> None:
        """Host input for the driver."""
        if not data or self.closed:
            return
        with self._lock:
            self._input.append(bytes(data))
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass    # already woken

    def input_fds(self) -> Sequence[int]:
        return () if self.closed else (self._wake_r,)

    def on_ready(self, fd: int, max_bytes: int = 4096) -> bytes:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        return self.take_input()

    def take_input(self) -> bytes:
        """Input fed so far (for a model driven without a serving loop)."""
        with self._lock:
            data = b"".join(self._input)
            self._input.clear()
        return data

    def take_ready_input(self) -> bytes:
        if not self._input:
            return b""
        return self.take_input()

    def _write_some(self, data: memoryview) -> int | None:
        chunk = bytes(data)
        if self.on_output is not None:
            self.on_output(chunk)
        else:
            self.output += chunk
        return len(chunk)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class EchoBackend(CallbackBackend):
    """Loopback: whatever the driver writes comes straight back as input
    (for `vmsgamp emulate` and round-trip measurements)."""

    kind = "echo"

    def __init__(self, *, tx_limit: int = 1 << 16) -> None:
        super().__init__(self._echo, tx_limit=tx_limit)

    def _echo(self, data: bytes) -> None:
        # Output is written by the model on the serving thread, which takes
        # the echo right after (take_ready_input): no wake-up pipe needed.
        with self._lock:
            self._input.append(data)


# ---- ports ---------------------------------------------------------------------------

class ConsolePort:
    """One port: its backend, host input waiting for receive buffers, the
    receive buffers held, and (multiport) the control-protocol state."""

    def __init__(self, port_id: int, backend: ConsoleBackend, *, name: str | None = None,
                 console: bool | None = None, rx_limit: int = 1 << 16) -> None:
        self.id = port_id
        self.backend = backend
        self.name = name
        self.is_console = (port_id == 0) if console is None else console
        self.rx_limit = rx_limit
        self.pending = bytearray()
        self.rx_dropped = 0
        self.bytes_in = 0
        self.held: collections.deque[tuple[Any, Any]] = collections.deque()  # (queue, chain)
        # multiport state (reset on device reset)
        self.added = False         # PORT_ADD sent
        self.ready = False         # PORT_READY 1 received
        self.guest_open = False    # PORT_OPEN 1 received

    def reset(self) -> None:
        self.held.clear()
        self.added = self.ready = self.guest_open = False

    def accept_input(self, data: bytes) -> None:
        room = self.rx_limit - len(self.pending)
        if len(data) > room:
            self.rx_dropped += len(data) - max(room, 0)
            data = data[:max(room, 0)]
        self.pending += data

    @property
    def input_paused(self) -> bool:
        return len(self.pending) >= self.rx_limit


# ---- the device ---------------------------------------------------------------------

class ConsoleDevice(VirtioDevice):
    """virtio-console.

    ``ports``: backends (or ``ConsolePort`` objects) for ports 0, 1, ...;
    a single backend is port 0.  ``max_nr_ports`` > 1 (default: the number
    of ports given) offers MULTIPORT with the control queues.  ``rows`` and
    ``cols`` offer SIZE.  ``emerg_write`` offers EMERG_WRITE (low byte of a
    write to ``emerg_wr`` goes to port 0's backend)."""

    device_id = VIRTIO_ID_CONSOLE
    name = "console"
    queue_max_size = 256

    def __init__(self, ports: ConsoleBackend | ConsolePort | Iterable[ConsoleBackend | ConsolePort] | None = None,
                 *, rows: int | None = None, cols: int | None = None, max_nr_ports: int | None = None,
                 emerg_write: bool = True, size_order: str = DEFAULT_SIZE_ORDER, rx_limit: int = 1 << 16,
                 control_limit: int = 256) -> None:
        check_size_order(size_order)
        if ports is None:
            ports = [PtyBackend()]
        elif isinstance(ports, (ConsoleBackend, ConsolePort)):
            ports = [ports]
        self.ports: dict[int, ConsolePort] = {}
        for i, p in enumerate(ports):
            port = p if isinstance(p, ConsolePort) else ConsolePort(i, p, rx_limit=rx_limit)
            port.id = i
            self.ports[i] = port
        if not self.ports:
            raise ValueError("a console needs at least port 0")
        nports = len(self.ports) if max_nr_ports is None else max_nr_ports
        if nports < len(self.ports):
            raise ValueError(f"max_nr_ports {nports} < {len(self.ports)} ports given")
        if (rows is None) != (cols is None):
            raise ValueError("give both rows and cols, or neither")
        self.size_order = size_order
        self.max_nr_ports = nports
        self.rows = rows or 0
        self.cols = cols or 0
        feats = 0
        if rows is not None:
            if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
                raise ValueError("rows and cols are 16-bit")
            feats |= 1 << VIRTIO_CONSOLE_F_SIZE
        if nports > 1:
            feats |= 1 << VIRTIO_CONSOLE_F_MULTIPORT
        if emerg_write:
            feats |= 1 << VIRTIO_CONSOLE_F_EMERG_WRITE
        self.features = feats
        self.num_queues = 2 if nports <= 1 else 2 * nports + 2
        self.control_limit = control_limit
        super().__init__()
        self._control_out: collections.deque[bytes] = collections.deque()
        self._control_held: collections.deque[tuple[Any, Any]] = collections.deque()
        self.device_ready = False
        self.stats = {"malformed": 0, "control_dropped": 0, "control_in": 0, "control_out": 0,
                      "emerg_bytes": 0}
        self._write_config_fields()
        for port in self.ports.values():
            if isinstance(port.backend, SocketBackend):
                port.backend.on_connect = lambda up, p=port: self._host_connection(p, up)

    # ---- configuration space ------------------------------------------------------
    def config_size(self) -> int:
        return CONFIG_SIZE

    def _size_bytes(self, in_config: bool) -> bytes:
        cols_first = SIZE_ORDERS[self.size_order][0 if in_config else 1]
        return struct.pack("<HH", *((self.cols, self.rows) if cols_first else (self.rows, self.cols)))

    def _write_config_fields(self) -> None:
        self.config[0:4] = self._size_bytes(True)
        self.config[4:8] = struct.pack("<I", self.max_nr_ports if self.max_nr_ports > 1 else 0)
        self.config[8:12] = bytes(4)    # emerg_wr reads as 0

    def write_config(self, offset: int, data: bytes) -> bool:
        # Only emerg_wr is writable, and it works even before negotiation.
        if not self.features >> VIRTIO_CONSOLE_F_EMERG_WRITE & 1:
            return False
        if offset != EMERG_WR_OFFSET or len(data) not in (1, 2, 4):
            return False
        port0 = self.ports.get(0)
        if port0 is not None:
            port0.backend.write(bytes(data[:1]))
            self.stats["emerg_bytes"] += 1
        return True

    def resize(self, rows: int, cols: int, port_id: int = 0) -> None:
        """The host console changed size: config space + config change
        (non-multiport) or a RESIZE control message (multiport)."""
        if not self.features >> VIRTIO_CONSOLE_F_SIZE & 1:
            raise ValueError("SIZE was not offered (create the device with rows and cols)")
        if port_id == 0:
            self.rows, self.cols = rows, cols
            self.set_config(0, self._size_bytes(True), notify=self.active and not self._multiport)
        if self.active and self._multiport:
            port = self.ports.get(port_id)
            if port is not None and port.ready and port.is_console:
                self._send_control(port_id, RESIZE, 0,
                                   struct.pack("<HH", *((cols, rows) if SIZE_ORDERS[self.size_order][1]
                                                        else (rows, cols))))

    # ---- lifecycle --------------------------------------------------------------
    @property
    def _multiport(self) -> bool:
        return self.has_feature(VIRTIO_CONSOLE_F_MULTIPORT)

    def activate(self, queues: Sequence[Any | None], features: int) -> None:
        super().activate(queues, features)
        self._clear_runtime()

    def reset(self) -> None:
        super().reset()
        self._clear_runtime()

    def _clear_runtime(self) -> None:
        for port in self.ports.values():
            port.reset()
        self._control_out.clear()
        self._control_held.clear()
        self.device_ready = False

    def _deliverable(self, port: ConsolePort) -> bool:
        """Whether host input may go to the driver now.  Linux drops data
        for a generic port the guest has not opened, so hold it until then."""
        if not self.active:
            return False
        if not self._multiport:
            return port.id == 0
        return port.ready and (port.is_console or port.guest_open)

    # ---- queues -----------------------------------------------------------------------
    def handle_queue(self, index: int, queue: Any) -> bool:
        which = queue_port(index)
        if which is None:
            if not self._multiport:
                return self._discard_all(queue)
            if index == CONTROL_RX_QUEUE:
                return self._hold_receive(queue, self._control_held) | self._flush_control()
            return self._handle_control_tx(queue)
        port_id, transmit = which
        port = self.ports.get(port_id)
        if port is None or (port_id > 0 and not self._multiport):
            return self._discard_all(queue)  # a queue of no port: give the buffers back unused
        if transmit:
            return self._handle_tx(port, queue)
        used = self._hold_receive(queue, port.held)
        return self._deliver(port) | used

    def _discard_all(self, queue: Any) -> bool:
        used = False
        while (chain := queue.pop()) is not None:
            self.stats["malformed"] += 1
            queue.add_used(chain.head, 0)
            used = True
        return used

    def _hold_receive(self, queue: Any, held: collections.deque) -> bool:
        """Keep every valid receive buffer; return malformed ones unused
        (a receive buffer must be device-writable only, virtio 5.3.6.1)."""
        used = False
        while (chain := queue.pop()) is not None:
            if chain.readable_len or not chain.writable_len:
                self.stats["malformed"] += 1
                queue.add_used(chain.head, 0)
                used = True
            else:
                held.append((queue, chain))
        return used

    def _take_held(self, held: collections.deque, index: int) -> tuple[Any, Any] | None:
        """Next held buffer still belonging to the live queue ``index``
        (buffers of a queue reset by RESET_VQUEUE are forgotten)."""
        live = self.queues[index] if index < len(self.queues) else None
        while held:
            q, chain = held[0]
            if q is live:
                return q, chain
            held.popleft()
        return None

    def _deliver(self, port: ConsolePort) -> bool:
        """Copy pending host input into held receive buffers."""
        if not port.pending or not self._deliverable(port):
            return False
        rxq = port_queues(port.id)[0]
        used = False
        while port.pending:
            item = self._take_held(port.held, rxq)
            if item is None:
                break
            q, chain = item
            n = min(len(port.pending), chain.writable_len)
            written = chain.write(memoryview(port.pending)[:n])
            port.held.popleft()
            q.add_used(chain.head, written)
            del port.pending[:written]
            port.bytes_in += written
            used = True
        return used

    def _handle_tx(self, port: ConsolePort, queue: Any) -> bool:
        used = False
        while (chain := queue.pop()) is not None:
            if chain.writable_len:
                # A transmit buffer must be device-readable only: drop its data.
                self.stats["malformed"] += 1
            elif chain.readable_len > port.backend.tx_limit:
                # Larger than the output buffer can ever hold: count it as dropped
                # without copying it (a hostile length must not cost memory).
                port.backend.tx_dropped += chain.readable_len
            elif chain.readable_len:
                port.backend.write(chain.read())
            queue.add_used(chain.head, 0)   # nothing written to a transmit buffer
            used = True
        if used:
            answer = port.backend.take_ready_input()
            if answer:
                self.input(port.id, answer)
        return used

    # ---- control queues (MULTIPORT) -------------------------------------------------
    def _send_control(self, port_id: int, event: int, value: int, extra: bytes = b"") -> None:
        if len(self._control_out) >= self.control_limit:
            self._control_out.popleft()
            self.stats["control_dropped"] += 1
        self._control_out.append(CONTROL.pack(port_id, event, value) + extra)
        if self._flush_control():
            self.notify_queue(CONTROL_RX_QUEUE)

    def _flush_control(self) -> bool:
        used = False
        while self._control_out:
            item = self._take_held(self._control_held, CONTROL_RX_QUEUE)
            if item is None:
                break
            q, chain = item
            msg = self._control_out[0]
            if chain.writable_len < CONTROL.size:
                self.stats["malformed"] += 1     # too small for any message: give it back
                self._control_held.popleft()
                q.add_used(chain.head, 0)
                used = True
                continue
            msg = msg[:chain.writable_len]       # a long PORT_NAME is truncated to the buffer
            written = chain.write(msg)
            self._control_held.popleft()
            self._control_out.popleft()
            q.add_used(chain.head, written)
            self.stats["control_out"] += 1
            used = True
        return used

    def _handle_control_tx(self, queue: Any) -> bool:
        used = False
        while (chain := queue.pop()) is not None:
            msg = chain.read() if not chain.writable_len and chain.readable_len <= 4096 else b""
            queue.add_used(chain.head, 0)
            used = True
            if len(msg) < CONTROL.size:
                self.stats["malformed"] += 1
                continue
            self.stats["control_in"] += 1
            port_id, event, value = CONTROL.unpack_from(msg)
            self._on_control(port_id, event, value)
        return used

    def _on_control(self, port_id: int, event: int, value: int) -> None:
        if event == DEVICE_READY:
            if value != 1:
                log.warning("console: the driver failed to initialise (DEVICE_READY %d)", value)
                return
            if self.device_ready:
                return
            self.device_ready = True
            for port in self.ports.values():
                port.added = True
                self._send_control(port.id, PORT_ADD, 0)
            return
        port = self.ports.get(port_id)
        if port is None or not port.added:
            self.stats["malformed"] += 1
            log.debug("console: %s for unknown port %d ignored", EVENT_NAMES.get(event, event), port_id)
            return
        if event == PORT_READY:
            if value != 1:
                log.warning("console: the driver failed to add port %d", port_id)
                port.ready = False
                return
            if port.ready:
                return
            port.ready = True
            if port.is_console:
                self._send_control(port.id, CONSOLE_PORT, 1)
                if port.id == 0 and self.features >> VIRTIO_CONSOLE_F_SIZE & 1:
                    self.resize(self.rows, self.cols, 0)
            if port.name:
                self._send_control(port.id, PORT_NAME, 0, port.name.encode())
            if port.backend.connected:
                self._send_control(port.id, PORT_OPEN, 1)
            self._deliver_and_notify(port)
        elif event == PORT_OPEN:
            port.guest_open = bool(value)
            if port.guest_open:
                self._deliver_and_notify(port)
        else:
            # Device-to-driver events sent back, or unknown: ignored.
            self.stats["malformed"] += 1
            log.debug("console: unexpected control event %d from the driver", event)

    # ---- hot-plug (MULTIPORT) --------------------------------------------------------------
    def add_port(self, backend: ConsoleBackend, port_id: int | None = None, *, name: str | None = None,
                 console: bool = False) -> int:
        """Add a port at run time (PORT_ADD once the driver is ready).  Call
        from the serving thread."""
        if port_id is None:
            port_id = next((i for i in range(self.max_nr_ports) if i not in self.ports), self.max_nr_ports)
        if not 0 <= port_id < self.max_nr_ports or self.max_nr_ports < 2:
            raise ValueError(f"port {port_id}: the device has room for ports 0..{self.max_nr_ports - 1}"
                             " (hot-plug needs max_nr_ports > 1)")
        if port_id in self.ports:
            raise ValueError(f"port {port_id} exists")
        port = ConsolePort(port_id, backend, name=name, console=console, rx_limit=self.ports[0].rx_limit)
        self.ports[port_id] = port
        if isinstance(backend, SocketBackend):
            backend.on_connect = lambda up, p=port: self._host_connection(p, up)
        if self.active and self._multiport and self.device_ready:
            port.added = True
            self._send_control(port_id, PORT_ADD, 0)
        return port_id

    def remove_port(self, port_id: int) -> None:
        """Remove a port (PORT_REMOVE) and close its backend; port 0 stays."""
        if port_id == 0 or port_id not in self.ports:
            raise ValueError(f"port {port_id} cannot be removed")
        port = self.ports.pop(port_id)
        if port.added and self.active and self._multiport:
            self._send_control(port_id, PORT_REMOVE, 0)
        # Buffers the driver posted for the port go back unused.
        rxq = port_queues(port_id)[0]
        used = False
        while (item := self._take_held(port.held, rxq)) is not None:
            q, chain = item
            port.held.popleft()
            q.add_used(chain.head, 0)
            used = True
        if used:
            self.notify_queue(rxq)
        port.backend.close()

    def _host_connection(self, port: ConsolePort, up: bool) -> None:
        if self.active and self._multiport and port.ready:
            self._send_control(port.id, PORT_OPEN, int(up))

    def _deliver_and_notify(self, port: ConsolePort) -> None:
        if self._deliver(port):
            self.notify_queue(port_queues(port.id)[0])

    # ---- host sources ------------------------------------------------------------------
    def poll_fds(self) -> Sequence[int]:
        fds: list[int] = []
        for port in self.ports.values():
            if port.input_paused:
                continue    # back-pressure: leave the bytes in the kernel
            for fd in port.backend.input_fds():
                if fd not in fds:
                    fds.append(fd)
        return fds

    def on_fd_ready(self, fd: int) -> None:
        # Called straight from the serving loop: nothing may escape.
        for port in list(self.ports.values()):
            if fd in port.backend.input_fds():
                try:
                    # Read no more than fits: an fd backend then never loses bytes.
                    data = port.backend.on_ready(fd, min(4096, port.rx_limit - len(port.pending)))
                    if data:
                        self.input(port.id, data)
                    port.backend.flush()
                except Exception:
                    log.exception("console port %d: input handling failed", port.id)

    def input(self, port_id: int, data: bytes) -> None:
        """Host input for ``port_id`` (what a backend read), delivered to the
        driver now if it has receive buffers posted, else kept.  Call it
        from the serving thread; other threads use ``CallbackBackend.feed``."""
        port = self.ports[port_id]
        port.accept_input(data)
        self._deliver_and_notify(port)

    # ---- reporting -----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(self.ports[0].backend.describe())
        for p in self.ports.values():
            if p.id:    # extra ports: where a user attaches (pty/socket path) or the backend kind
                info = p.backend.describe()
                d[f"port{p.id}"] = info.get("pty") or info.get("socket") or info["backend"]
        if self.max_nr_ports > 1:
            d["max_nr_ports"] = self.max_nr_ports
        if self.features >> VIRTIO_CONSOLE_F_SIZE & 1:
            d["size"] = f"{self.cols}x{self.rows}"
        return d

    def counters(self) -> dict[str, Any]:
        c: dict[str, Any] = dict(self.stats)
        for p in self.ports.values():
            c[f"port{p.id}"] = {"bytes_in": p.bytes_in, "bytes_out": p.backend.bytes_out,
                                "rx_pending": len(p.pending), "rx_dropped": p.rx_dropped,
                                "tx_pending": p.backend.pending_output, "tx_dropped": p.backend.tx_dropped}
        return c

    def close(self) -> None:
        for port in self.ports.values():
            try:
                port.backend.close()
            except OSError:
                pass


# ---- `--devices console:...` ---------------------------------------------------------------

def _backend_from_options(pty: str | None, stdio: str | None, socket_path: str | None,
                          echo: str | None = None) -> ConsoleBackend:
    chosen = [k for k, v in (("pty", pty), ("stdio", stdio), ("socket", socket_path), ("echo", echo)) if v]
    if len(chosen) > 1:
        raise ValueError(f"console: pick one backend, not {' and '.join(chosen)}")
    if echo:
        return EchoBackend()
    if stdio:
        return StdioBackend()
    if socket_path:
        if socket_path == "1":
            raise ValueError("console: socket needs a path (socket=/path/to/sock)")
        return SocketBackend(socket_path)
    return PtyBackend()


def _factory(pty: str | None = None, stdio: str | None = None, socket: str | None = None,
             rows: str | None = None, cols: str | None = None, ports: str | None = None,
             size_order: str = DEFAULT_SIZE_ORDER, name: str | None = None, echo: str | None = None) -> ConsoleDevice:
    backend = _backend_from_options(pty, stdio, socket, echo)
    nports = int(ports) if ports else 1
    if nports < 1:
        raise ValueError("console: ports must be >= 1")
    port_list: list[ConsolePort] = [ConsolePort(0, backend, name=name)]
    try:
        # Extra ports are generic (non-console) ports, each on its own pty.
        for i in range(1, nports):
            port_list.append(ConsolePort(i, PtyBackend(), name=f"vmsgamp.{i}", console=False))
        return ConsoleDevice(port_list, rows=int(rows) if rows else None, cols=int(cols) if cols else None,
                             size_order=size_order)
    except BaseException:
        for p in port_list:
            p.backend.close()
        raise


register_device("console", _factory, {
    "pty": "attach port 0 to a new pseudo-terminal (default; its path is printed)",
    "stdio": "attach port 0 to this process's stdin/stdout",
    "socket": "attach port 0 to a listening UNIX socket at this path",
    "echo": "loop port 0 back: what the driver writes it reads again",
    "rows": "console rows (offers VIRTIO_CONSOLE_F_SIZE with cols)",
    "cols": "console columns (offers VIRTIO_CONSOLE_F_SIZE with rows)",
    "ports": "number of ports (>1 offers MULTIPORT; ports 1.. are ptys)",
    "size_order": "order of cols/rows: spec (default; current Linux), old-linux (RESIZE as rows, "
                  "cols: kernels before 'virtio_console: fix order of fields cols and rows') or spec-1.4",
    "name": "port 0 name sent with PORT_NAME (multiport)",
})
