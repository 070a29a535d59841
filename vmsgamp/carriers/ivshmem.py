"""QEMU-compatible ivshmem server and client (QEMU ``docs/specs/ivshmem-spec.rst``).

The laptop-emulation transport: two vmsgamp processes (or a vmsgamp process
and a QEMU guest with ``-device ivshmem-doorbell,chardev=...``) share the
memory and the eventfds an ivshmem server hands out.

Protocol (server -> client only, on a UNIX stream socket; every message is
one little-endian signed 64-bit integer, some with one fd in SCM_RIGHTS):

1. ``0`` -- protocol version;
2. the client's own id (0..65535);
3. ``-1`` with the shared-memory fd;
4. for each peer already connected: its id, once per vector, each with the
   eventfd that interrupts that peer on that vector;
5. the client's own id, once per vector, each with the eventfd it is
   interrupted on.

Afterwards a peer id with an fd announces a new peer (as in 4) and a peer id
without an fd says that peer disconnected.  To interrupt peer P on vector v
write the 8-byte integer 1 to P's v-th eventfd; to be interrupted, read your
own.

Peer ids: like QEMU's ``contrib/ivshmem-server``, ids are handed out in
connection order from 0 and are *not* reused right after a disconnect: the
counter moves on (skipping ids still in use) and wraps at 65536.  A restarted
peer therefore comes back under a new id, and a late notification about the
old id can never be confused with the new peer.
"""
from __future__ import annotations

import array
import errno
import logging
import os
import select
import selectors
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.region import Region, sealed_memfd
from vmsgamp.carriers._registry import (
    Carrier, parse_bool, parse_int, parse_timeout, region_options, register_scheme,
)
from vmsgamp.errors import RemoteProtocolError

__all__ = [
    "IvshmemServer", "IvshmemClient", "IvshmemCarrier", "IvshmemProtocolError",
    "PROTOCOL_VERSION", "MAX_PEER_ID", "MAX_VECTORS", "open_ivshmem",
]

log = logging.getLogger("vmsgamp.ivshmem")

PROTOCOL_VERSION = 0
MAX_PEER_ID = 0xFFFF
MAX_VECTORS = 64            # QEMU's server and device limit
_MSG = struct.Struct("<q")
_MAX_SUN_PATH = 107         # sizeof(sun_path) - 1 on Linux
_EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK


class IvshmemProtocolError(RemoteProtocolError, ConnectionError):
    """The other end of the ivshmem socket broke the protocol."""


def _close_fds(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _send_msg(sock: socket.socket, value: int, fd: int = -1) -> None:
    """One protocol message; raises OSError if it cannot go out whole now."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd >= 0 else []
    # MSG_NOSIGNAL: a vanished client must give EPIPE, not kill an embedding
    # process that did not ignore SIGPIPE.  MSG_DONTWAIT: a client that stops
    # reading must not stall the server (it is dropped instead).
    n = sock.sendmsg([_MSG.pack(value)], anc, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
    if n != _MSG.size:
        raise OSError(errno.EPIPE, f"short write ({n} of {_MSG.size} bytes)")


# ---- server ---------------------------------------------------------------------

@dataclass
class _Peer:
    id: int
    sock: socket.socket
    vectors: list[int]
    # Ids this peer has been told about (connect sent, no disconnect yet), so
    # a disconnect is announced exactly to those who heard of the connect.
    told: set[int] = field(default_factory=set)


def _bind_listener(path: str) -> socket.socket:
    if len(os.fsencode(path)) > _MAX_SUN_PATH:
        raise ValueError(f"socket path too long ({len(os.fsencode(path))} bytes, "
                         f"at most {_MAX_SUN_PATH}): {path}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket; "
                                  f"refusing to replace it")
        if _socket_is_live(path):
            raise OSError(errno.EADDRINUSE, f"a server is already listening on {path}")
        log.info("replacing stale socket %s", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(16)
        sock.setblocking(False)
    except FileNotFoundError as e:
        sock.close()
        raise FileNotFoundError(e.errno, f"cannot listen on {path}: directory "
                                f"{os.path.dirname(path) or '.'} does not exist") from None
    except OSError as e:
        sock.close()
        raise type(e)(e.errno, f"cannot listen on {path}: {e.strerror}") from None
    return sock


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return True   # unsure (e.g. EAGAIN: backlog full): assume someone is there
    finally:
        probe.close()


class IvshmemServer:
    """A QEMU-compatible ivshmem server.

    Creates a memfd of ``size`` bytes and, per client, ``vectors`` eventfds,
    and hands them out on ``socket_path`` exactly as QEMU's
    ``contrib/ivshmem-server`` does.  Single-threaded and non-blocking
    (``selectors``): call :meth:`serve_forever`, :meth:`serve` in your own
    loop, or :meth:`start_thread`.  A client that vanishes (EOF, EPIPE,
    ECONNRESET) or stops reading is dropped and the others are told.

    QEMU's ivshmem PCI device needs a power-of-two ``size`` (its BAR2);
    other sizes only work between vmsgamp processes.
    """

    def __init__(self, socket_path: str | os.PathLike[str], size: int, vectors: int = 1, *,
                 on_event: Callable[[str, int], Any] | None = None) -> None:
        if size <= 0:
            raise ValueError(f"shared-memory size must be positive, not {size}")
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"vectors must be in 1..{MAX_VECTORS}, not {vectors}")
        self.socket_path = os.fspath(socket_path)
        self.size = size
        self.vectors = vectors
        self.on_event = on_event
        self.peers: dict[int, _Peer] = {}
        self.closed = False
        self._next_id = 0
        self._stopping = False
        self._serving_thread: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._shm_fd = -1
        self._wake_fd = -1
        self._listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        try:
            # Sealed against resizing, as QEMU's own ivshmem-server does: no client can shrink it.
            self._shm_fd = sealed_memfd(size, "ivshmem")
            self._listener = _bind_listener(self.socket_path)
            self._listener_ino = os.stat(self.socket_path).st_ino
            self._wake_fd = os.eventfd(0, _EFD_FLAGS)
            self._sel = selectors.DefaultSelector()
            self._sel.register(self._listener, selectors.EVENT_READ, "listen")
            self._sel.register(self._wake_fd, selectors.EVENT_READ, "wake")
        except BaseException:
            self.close()
            raise

    # ---- public ----------------------------------------------------------------

    @property
    def shm_fd(self) -> int:
        """The shared-memory fd (owned by the server)."""
        return self._shm_fd

    @property
    def peer_ids(self) -> list[int]:
        return list(self.peers)

    def serve(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) for activity and
        handle everything that is ready.  Returns True if something was."""
        if self.closed or self._sel is None:
            raise ValueError("the ivshmem server is closed")
        ready = self._sel.select(timeout)
        # New connections first: a client that connects and one that vanished
        # in the same round are both handled, the vanished one via EPIPE.
        ready.sort(key=lambda kv: kv[0].data != "listen")
        for key, _ in ready:
            if key.data == "listen":
                self._accept_all()
            elif key.data == "wake":
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
            elif key.data in self.peers and self.peers[key.data].sock is key.fileobj:
                self._client_readable(self.peers[key.data])
        return bool(ready)

    def serve_forever(self) -> None:
        """Serve until :meth:`close` (from another thread or a signal handler)."""
        self._serving_thread = threading.current_thread()
        try:
            while not self._stopping:
                self.serve(None)
        finally:
            self._serving_thread = None

    def start_thread(self) -> threading.Thread:
        """Serve in a daemon thread; :meth:`close` stops and joins it."""
        if self._thread is not None:
            raise RuntimeError("the ivshmem server thread is already running")
        t = threading.Thread(target=self._thread_main, name=f"ivshmem-server {self.socket_path}",
                             daemon=True)
        self._thread = t
        t.start()
        return t

    def close(self) -> None:
        """Stop serving, drop every client, remove the socket file.  Idempotent."""
        if self.closed:
            return
        self._stopping = True
        if self._wake_fd >= 0:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass
        serving = self._serving_thread or self._thread
        if serving is not None and serving is not threading.current_thread():
            serving.join(5.0)
        self.closed = True
        for peer in list(self.peers.values()):
            self._release(peer)
        self.peers.clear()
        if self._sel is not None:
            self._sel.close()
        if self._listener is not None:
            self._listener.close()
            self._unlink_own_socket()
        _close_fds([fd for fd in (self._shm_fd, self._wake_fd) if fd >= 0])
        self._shm_fd = self._wake_fd = -1

    def __enter__(self) -> "IvshmemServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<IvshmemServer {self.socket_path} size={self.size:#x} vectors={self.vectors} "
                f"peers={self.peer_ids}{' closed' if self.closed else ''}>")

    # ---- internals -------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            self.serve_forever()
        except Exception:   # pragma: no cover - logged, the thread must not die silently
            if not self.closed:
                log.exception("ivshmem server thread failed")

    def _unlink_own_socket(self) -> None:
        # Only remove the path if it is still our socket (someone may have
        # replaced it after deciding ours was stale).
        try:
            if os.stat(self.socket_path).st_ino == self._listener_ino:
                os.unlink(self.socket_path)
        except (OSError, AttributeError):
            pass

    def _emit(self, kind: str, peer_id: int) -> None:
        log.info("peer %d %s", peer_id, kind)
        if self.on_event is not None:
            try:
                self.on_event(kind, peer_id)
            except Exception:
                log.exception("ivshmem server on_event callback failed")

    def _alloc_id(self) -> int | None:
        for _ in range(MAX_PEER_ID + 1):
            cand = self._next_id
            self._next_id = (self._next_id + 1) & MAX_PEER_ID
            if cand not in self.peers:
                return cand
        return None

    def _accept_all(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:   # EMFILE and friends: keep serving the others
                log.warning("accept on %s failed: %s", self.socket_path, e)
                return
            conn.setblocking(True)   # sends use MSG_DONTWAIT explicitly
            self._new_peer(conn)

    def _send(self, peer: _Peer, value: int, fd: int = -1) -> bool:
        try:
            _send_msg(peer.sock, value, fd)
            return True
        except BlockingIOError:
            log.warning("peer %d does not read its socket; dropping it", peer.id)
        except OSError as e:
            log.info("peer %d vanished (%s)", peer.id, e.strerror or e)
        return False

    def _send_vectors(self, to: _Peer, peer_id: int, fds: list[int]) -> bool:
        return all(self._send(to, peer_id, fd) for fd in fds)

    def _new_peer(self, conn: socket.socket) -> None:
        pid = self._alloc_id()
        if pid is None:
            log.warning("no free ivshmem peer id (65536 peers connected); refusing a client")
            conn.close()
            return
        try:
            vecs = [os.eventfd(0, _EFD_FLAGS) for _ in range(self.vectors)]
        except OSError as e:
            log.warning("cannot create eventfds for a new peer: %s", e)
            conn.close()
            return
        peer = _Peer(pid, conn, vecs)
        # Same order as QEMU's server: own info, the newcomer to the others,
        # the others to the newcomer, then the newcomer's own vectors.
        if not (self._send(peer, PROTOCOL_VERSION) and self._send(peer, pid)
                and self._send(peer, -1, self._shm_fd)):
            self._release(peer)
            return
        dead: list[int] = []
        for other in self.peers.values():
            if self._send_vectors(other, pid, vecs):
                other.told.add(pid)
            else:
                dead.append(other.id)
        ok = True
        for other in self.peers.values():
            if other.id in dead:
                continue
            if not self._send_vectors(peer, other.id, other.vectors):
                ok = False
                break
            peer.told.add(other.id)
        ok = ok and self._send_vectors(peer, pid, vecs)
        self.peers[pid] = peer
        assert self._sel is not None
        self._sel.register(conn, selectors.EVENT_READ, pid)
        self._emit("connected", pid)
        if not ok:
            dead.append(pid)
        for d in dead:
            self._drop(d)

    def _client_readable(self, peer: _Peer) -> None:
        # Clients never send anything: readable means EOF, an error, or a
        # client breaking the one-way protocol.  All three end the peer, as in
        # QEMU's server.
        try:
            data = peer.sock.recv(64, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            log.warning("peer %d sent data on the one-way ivshmem socket; dropping it", peer.id)
        self._drop(peer.id)

    def _release(self, peer: _Peer) -> None:
        if self._sel is not None and not self.closed:
            try:
                self._sel.unregister(peer.sock)
            except (KeyError, ValueError):
                pass
        peer.sock.close()
        _close_fds(peer.vectors)
        peer.vectors = []

    def _drop(self, pid: int) -> None:
        work = [pid]
        while work:
            peer = self.peers.pop(work.pop(), None)
            if peer is None:
                continue
            self._release(peer)
            self._emit("disconnected", peer.id)
            for other in list(self.peers.values()):
                if peer.id in other.told:
                    other.told.discard(peer.id)
                    if not self._send(other, peer.id):
                        work.append(other.id)


# ---- client ---------------------------------------------------------------------

class IvshmemClient:
    """Join an ivshmem server (ours or QEMU's) as a peer.

    After the handshake: ``own_id``, ``region`` (the shared memory, mapped),
    ``vectors`` (our own eventfds, one per vector) and ``peers`` (peer id ->
    that peer's eventfds).  :meth:`poll_events` reads later connect and
    disconnect notifications.  The client owns every fd it received;
    doorbells from :meth:`doorbell_to` borrow them and must not outlive the
    client.
    """

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float | None = 5.0, *,
                 min_vectors: int = 1, bus_base: int = 0, memtype: str | int = "normal",
                 readonly: bool = False) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout
        self.own_id = -1
        self.region: Region | None = None
        self.vectors: list[int] = []
        self.peers: dict[int, list[int]] = {}
        self.server_connected = True
        self.closed = False
        self._events: list[tuple[str, int]] = []
        self._buf = b""
        self._msg_fds: list[int] = []
        self._lent: set[int] = set()       # fds handed to doorbells: closed only by close()
        self._retired: list[int] = []
        self._shm_fd = -1
        self._sock: socket.socket | None = None
        try:
            self._connect()
            self._handshake(min_vectors)
            size = os.fstat(self._shm_fd).st_size
            if size == 0:
                raise IvshmemProtocolError(f"the ivshmem server at {self.socket_path} "
                                           f"handed out shared memory of size 0")
            self.region = Region.from_fd(self._shm_fd, size, own_fd=True, bus_base=bus_base,
                                         memtype=memtype, readonly=readonly,
                                         uri=f"ivshmem:{self.socket_path}")
            self._shm_fd = -1    # the region owns it now
        except BaseException:
            self.close()
            raise

    # ---- connection and handshake ----------------------------------------------

    def _connect(self) -> None:
        path = self.socket_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock = sock
        sock.settimeout(self.timeout)
        try:
            sock.connect(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(e.errno, f"no ivshmem server socket at {path} "
                                    f"(start one with: vmsgamp ivshmem-server {path})") from None
        except ConnectionRefusedError as e:
            # connect() says "refused" for a directory or a plain file too.
            if os.path.isdir(path):
                raise IsADirectoryError(e.errno, f"{path} is a directory, not an ivshmem server "
                                        f"socket (give the socket's path, e.g. {path.rstrip('/')}"
                                        f"/ivshmem.sock)") from None
            if os.path.exists(path) and not stat.S_ISSOCK(os.stat(path).st_mode):
                raise ConnectionRefusedError(e.errno, f"{path} is not a socket (an ivshmem server "
                                             f"listens on a UNIX socket)") from None
            raise ConnectionRefusedError(e.errno, f"nothing is listening on {path} "
                                         f"(a stale socket? is the ivshmem server running?)") from None
        except (socket.timeout, TimeoutError):
            raise TimeoutError(f"connecting to {path} timed out after {self.timeout} s") from None
        except OSError as e:
            raise type(e)(e.errno, f"cannot connect to ivshmem server {path}: {e.strerror}") from None
        sock.setblocking(True)   # reads use MSG_DONTWAIT and poll() explicitly

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _handshake(self, min_vectors: int) -> None:
        deadline = self._deadline()
        version, fd = self._expect(deadline, "the protocol version")
        if fd is not None or version != PROTOCOL_VERSION:
            if fd is not None:
                _close_fds([fd])
            raise IvshmemProtocolError(
                f"{self.socket_path} is not an ivshmem server speaking protocol version "
                f"{PROTOCOL_VERSION}: first message was {version}{' with an fd' if fd is not None else ''}")
        own, fd = self._expect(deadline, "our peer id")
        if fd is not None or not 0 <= own <= MAX_PEER_ID:
            if fd is not None:
                _close_fds([fd])
            raise IvshmemProtocolError(f"ivshmem server {self.socket_path} sent a bad peer id {own}")
        self.own_id = own
        marker, fd = self._expect(deadline, "the shared-memory fd")
        if marker != -1 or fd is None:
            if fd is not None:
                _close_fds([fd])
            raise IvshmemProtocolError(
                f"ivshmem server {self.socket_path}: expected -1 with the shared-memory fd, "
                f"got {marker}{' with an fd' if fd is not None else ' without an fd'}")
        self._shm_fd = fd
        # Peers' vectors then our own come next; the protocol has no end
        # marker, so wait until we hold enough of our own vectors and take
        # whatever else has already arrived.
        while len(self.vectors) < min_vectors:
            try:
                msg = self._expect(deadline, "our own eventfds")
            except TimeoutError:
                if not self.vectors:
                    raise
                raise TimeoutError(f"the ivshmem server at {self.socket_path} gave us "
                                   f"{len(self.vectors)} vector(s), {min_vectors} wanted") from None
            self._dispatch(*msg)
        self._pump()

    def _expect(self, deadline: float | None, what: str) -> tuple[int, int | None]:
        try:
            msg = self._recv_msg(deadline)
        except EOFError:
            raise IvshmemProtocolError(
                f"ivshmem server {self.socket_path} closed the connection while we waited for "
                f"{what} (out of peer ids? not an ivshmem server?)") from None
        assert msg is not None
        return msg

    def _recv_msg(self, deadline: float | None, *, block: bool = True) -> tuple[int, int | None] | None:
        """The next whole message.  Non-blocking (``block=False``) returns None
        when it has not fully arrived; EOFError when the server hung up."""
        sock = self._sock
        assert sock is not None
        while len(self._buf) < _MSG.size:
            if block and not self.wait_readable(None if deadline is None
                                                else max(0.0, deadline - time.monotonic())):
                raise TimeoutError(
                    f"the ivshmem server at {self.socket_path} sent nothing for {self.timeout} s "
                    f"during the handshake (is it an ivshmem server? is it stuck?)")
            try:
                # Ask only for the rest of this message so an fd that belongs
                # to the next message is never taken with this one.
                data, anc, flags, _ = sock.recvmsg(
                    _MSG.size - len(self._buf), socket.CMSG_SPACE(4 * 4),
                    socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                if not block:
                    return None
                continue
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._msg_fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                self._drop_partial()
                raise IvshmemProtocolError(f"ivshmem server {self.socket_path} sent too many fds "
                                           f"in one message")
            if not data:
                self._drop_partial()
                raise EOFError
            self._buf += data
        (value,) = _MSG.unpack(self._buf)
        fds, self._buf, self._msg_fds = self._msg_fds, b"", []
        if len(fds) > 1:
            _close_fds(fds)
            raise IvshmemProtocolError(f"ivshmem server {self.socket_path} sent {len(fds)} fds "
                                       f"with one message")
        return value, (fds[0] if fds else None)

    def _drop_partial(self) -> None:
        _close_fds(self._msg_fds)
        self._msg_fds = []
        self._buf = b""

    def _dispatch(self, value: int, fd: int | None) -> None:
        if not 0 <= value <= MAX_PEER_ID:
            if fd is not None:
                _close_fds([fd])
            raise IvshmemProtocolError(f"ivshmem server {self.socket_path} sent a bad peer id "
                                       f"{value}")
        if fd is not None:
            # Our doorbell drain reads until EAGAIN: the eventfd must not block
            # (QEMU's server makes them non-blocking too; make sure).
            os.set_blocking(fd, False)
            if value == self.own_id:
                if len(self.vectors) >= MAX_VECTORS:
                    _close_fds([fd])
                    raise IvshmemProtocolError(f"more than {MAX_VECTORS} vectors")
                self.vectors.append(fd)
            elif value in self.peers:
                self.peers[value].append(fd)
            else:
                self.peers[value] = [fd]
                self._events.append(("connected", value))
        elif value in self.peers:
            for vfd in self.peers.pop(value):
                if vfd in self._lent:
                    self._retired.append(vfd)   # a doorbell may still write it
                else:
                    _close_fds([vfd])
            self._events.append(("disconnected", value))
        else:
            log.debug("ivshmem server announced peer %d without fd (unknown peer)", value)

    def _pump(self) -> None:
        """Read and dispatch every whole message available now."""
        if self._sock is None or not self.server_connected:
            return
        while True:
            try:
                msg = self._recv_msg(None, block=False)
            except EOFError:
                self._server_gone()
                return
            except OSError as e:
                log.warning("reading the ivshmem socket failed: %s", e)
                self._server_gone()
                return
            if msg is None:
                return
            self._dispatch(*msg)

    def _server_gone(self) -> None:
        log.warning("the ivshmem server at %s closed the connection; known peers keep "
                    "working, new peers cannot join", self.socket_path)
        self.server_connected = False
        assert self._sock is not None
        # Keep the fd number valid (it may be registered in a selector or an
        # asyncio loop) but never readable again, instead of spinning on EOF.
        quiet = os.eventfd(0, _EFD_FLAGS)
        try:
            os.dup2(quiet, self._sock.fileno(), inheritable=False)
        finally:
            os.close(quiet)

    # ---- public ----------------------------------------------------------------

    def fileno(self) -> int:
        """The socket fd: readable when notifications are waiting for
        :meth:`poll_events`."""
        if self._sock is None:
            raise ValueError("the ivshmem client is closed")
        return self._sock.fileno()

    def wait_readable(self, timeout: float | None) -> bool:
        """Wait for the server to say something (True) or the timeout (False)."""
        if self._sock is None:
            raise ValueError("the ivshmem client is closed")
        p = select.poll()
        p.register(self._sock.fileno(), select.POLLIN)
        ms = -1 if timeout is None else int(timeout * 1000 + 0.999)
        return bool(p.poll(ms))

    def poll_events(self) -> list[tuple[str, int]]:
        """``[('connected'|'disconnected', peer_id), ...]`` since the last
        call, without blocking.  Peers already present at the handshake are
        reported as 'connected' too."""
        self._pump()
        events, self._events = self._events, []
        return events

    def wait_for_peer(self, timeout: float | None = None) -> int:
        """The first other peer (in the order they became known), waiting up
        to ``timeout`` seconds for one to connect.  Events stay queued for
        :meth:`poll_events`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._pump()
            if self.peers:
                return next(iter(self.peers))
            if not self.server_connected:
                raise ConnectionError(f"the ivshmem server at {self.socket_path} went away "
                                      f"before another peer joined")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"no other peer joined the ivshmem server at "
                                   f"{self.socket_path} within {timeout} s (we are peer "
                                   f"{self.own_id})")
            self.wait_readable(left)

    def doorbell_to(self, peer_id: int, vector: int = 0) -> EventfdDoorbell:
        """A doorbell that rings ``peer_id`` on ``vector`` and waits on our
        own eventfd for that vector.  The client keeps owning both fds."""
        if peer_id not in self.peers:
            raise ValueError(f"no peer {peer_id} on {self.socket_path}; known peers: "
                             f"{sorted(self.peers) or 'none'}")
        theirs = self.peers[peer_id]
        if not 0 <= vector < min(len(self.vectors), len(theirs)):
            raise ValueError(f"vector {vector} out of range: we have {len(self.vectors)}, "
                             f"peer {peer_id} has {len(theirs)}")
        self._lent.add(theirs[vector])
        return EventfdDoorbell(self.vectors[vector], theirs[vector], own=False)

    def close(self) -> None:
        """Leave the server and release every fd and the mapping.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        _close_fds(self.vectors)
        for fds in self.peers.values():
            _close_fds(fds)
        _close_fds(self._retired + self._msg_fds)
        if self._shm_fd >= 0:
            _close_fds([self._shm_fd])
        self.vectors, self.peers, self._retired, self._msg_fds = [], {}, [], []
        self._lent.clear()
        self._shm_fd = -1
        if self.region is not None:
            self.region.close()

    def __enter__(self) -> "IvshmemClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<IvshmemClient {self.socket_path} own_id={self.own_id} "
                f"vectors={len(self.vectors)} peers={sorted(self.peers)}"
                f"{' closed' if self.closed else ''}>")


# ---- the ivshmem: carrier ------------------------------------------------------

class IvshmemCarrier(Carrier):
    """An ``ivshmem:SOCKET`` carrier: the shared memory, and a doorbell
    towards the other peer (fixed with ``peer=``, else the first other peer,
    followed when it leaves and another joins -- call :meth:`poll_events`
    when :meth:`fileno` is readable).

    The doorbell writes a private fd number that is re-pointed (``dup2``) at
    the current peer's eventfd, so the C fast path of :class:`EventfdDoorbell`
    keeps working across peer changes; until a peer is known, rings go to a
    sink eventfd nobody reads.
    """

    def __init__(self, client: IvshmemClient, *, uri: str, offset: int = 0,
                 peer: int | None = None, vector: int = 0) -> None:
        if not 0 <= vector < len(client.vectors):
            raise ValueError(f"{uri}: vector {vector} out of range (we got "
                             f"{len(client.vectors)} from the server)")
        assert client.region is not None
        self._client = client
        self._fixed_peer = peer
        self._vector = vector
        self._tx_fd = os.eventfd(0, _EFD_FLAGS)
        doorbell = EventfdDoorbell(client.vectors[vector], self._tx_fd, own=False)
        try:
            super().__init__(client.region, doorbell, uri=uri, offset=offset,
                             own_id=client.own_id, closers=[self._close_client])
        except BaseException:
            _close_fds([self._tx_fd])
            raise
        self._retarget()

    @property
    def client(self) -> IvshmemClient:
        return self._client

    def _close_client(self) -> None:
        _close_fds([self._tx_fd])
        self._client.close()

    def _retarget(self) -> None:
        peers = self._client.peers
        if self._fixed_peer is not None:
            want = self._fixed_peer if self._fixed_peer in peers else None
        elif self._peer_id in peers:
            want = self._peer_id
        else:
            want = next(iter(peers), None)
        if want == self._peer_id:
            return
        if want is not None:
            fds = peers[want]
            if self._vector >= len(fds):
                return   # its vectors are still arriving
            # The doorbell writes self._tx_fd from C without the GIL; dup2
            # swaps what that number refers to atomically, so a concurrent
            # ring reaches either the old or the new peer, never a closed fd.
            os.dup2(fds[self._vector], self._tx_fd, inheritable=False)
        # With no peer the old target stays wired: it is gone, so rings are lost
        # harmlessly (our dup keeps that eventfd alive).
        if want != self._peer_id:
            log.info("%s: doorbell now targets peer %s", self.uri, want)
        self._peer_id = want

    def fileno(self) -> int:
        return self._client.fileno()

    def poll_events(self) -> list[tuple[str, int]]:
        events = self._client.poll_events()
        if events:
            self._retarget()
        return events

    def wait_for_peer(self, timeout: float | None = None) -> int:
        """Block until the doorbell has a peer to ring; returns its id."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._client._pump()
            self._retarget()
            if self._peer_id is not None:
                return self._peer_id
            if not self._client.server_connected:
                raise ConnectionError(f"{self.uri}: the ivshmem server went away before a "
                                      f"peer joined")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                who = f"peer {self._fixed_peer}" if self._fixed_peer is not None else "no other peer"
                raise TimeoutError(f"{self.uri}: {who} joined within {timeout} s (we are peer "
                                   f"{self.own_id}; start the other side, or pass wait_peer=0)")
            self._client.wait_readable(left)

    def detach_region(self) -> Region:
        self._client.region = None    # the caller takes the mapping over
        return super().detach_region()


def open_ivshmem(target: str, *, uri: str, peer: Any = None, vector: Any = 0, offset: Any = 0,
                 timeout: Any = 10.0, wait_peer: Any = True, **opts: Any) -> IvshmemCarrier:
    """Opener for ``ivshmem:SOCKET[#peer=N][&offset=..][&timeout=S][&wait_peer=0]``."""
    if not target:
        raise ValueError(f"{uri!r}: ivshmem: needs a socket path, e.g. ivshmem:/tmp/ivshmem_socket")
    t = parse_timeout(timeout)
    vec = parse_int(vector, "vector")
    peer_id = None if peer is None else parse_int(peer, "peer")
    if peer_id is not None and not 0 <= peer_id <= MAX_PEER_ID:
        raise ValueError(f"{uri!r}: peer must be in 0..{MAX_PEER_ID}")
    client = IvshmemClient(os.path.expanduser(target), timeout=t, min_vectors=vec + 1,
                           **region_options(opts))
    try:
        if peer_id is not None and peer_id == client.own_id:
            raise ValueError(f"{uri}: peer={peer_id} is our own id")
        carrier = IvshmemCarrier(client, uri=uri, offset=parse_int(offset, "offset"),
                                 peer=peer_id, vector=vec)
    except BaseException:
        client.close()
        raise
    try:
        if parse_bool(wait_peer, "wait_peer"):
            carrier.wait_for_peer(t)
    except BaseException:
        carrier.close()
        raise
    return carrier


register_scheme("ivshmem", open_ivshmem, options=("peer", "vector", "wait_peer"),
                summary="ivshmem:SOCKET  join an ivshmem server; eventfd doorbell to the other peer")
