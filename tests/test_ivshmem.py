"""The QEMU-compatible ivshmem server, client and ``ivshmem:`` carrier.

The server is checked byte for byte from a raw socket client, as QEMU's
ivshmem device would see it (QEMU docs/specs/ivshmem-spec.rst)."""
from __future__ import annotations

import array
import json
import mmap
import multiprocessing
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading

import pytest

from vmsgamp._core.fifo import MsgFifo
from vmsgamp.carriers import (
    IvshmemClient, IvshmemProtocolError, IvshmemServer, open_carrier, open_region,
)

SIZE = 64 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def sock_path():
    # Short, private directory: AF_UNIX paths are limited to 107 bytes.
    d = tempfile.mkdtemp(prefix="vmivs")
    yield os.path.join(d, "ivshmem.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sock_path):
    srv = IvshmemServer(sock_path, SIZE, vectors=2)
    srv.start_thread()
    yield srv
    srv.close()


# ---- a raw protocol client -----------------------------------------------------------

class Raw:
    """A bare AF_UNIX client that records exactly what the server sends."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.fds: list[int] = []

    def msg(self, timeout: float = 5.0) -> tuple[bytes, int | None]:
        """One 8-byte message (raw bytes) and its fd, if any."""
        buf, fds = b"", []
        while len(buf) < 8:
            r, _, _ = select.select([self.sock], [], [], timeout)
            assert r, f"server sent nothing for {timeout} s (got {buf!r} so far)"
            data, anc, flags, _ = self.sock.recvmsg(8 - len(buf), socket.CMSG_SPACE(4 * 4))
            assert data, "server closed the connection"
            assert not flags & socket.MSG_CTRUNC
            for level, kind, payload in anc:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                a = array.array("i")
                a.frombytes(payload)
                fds.extend(a)
            buf += data
        assert len(fds) <= 1, "at most one fd per message"
        self.fds.extend(fds)
        return buf, (fds[0] if fds else None)

    def value(self, timeout: float = 5.0) -> tuple[int, int | None]:
        raw, fd = self.msg(timeout)
        return struct.unpack("<q", raw)[0], fd

    def quiet(self, timeout: float = 0.1) -> bool:
        """True if nothing more arrives within ``timeout``."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        return not r

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def le(v: int) -> bytes:
    return struct.pack("<q", v)


def handshake(raw: Raw, own_id: int, peers: list[int], vectors: int) -> tuple[int, dict[int, list[int]]]:
    """Check a full handshake byte for byte; returns (shm fd, id -> fds)."""
    assert raw.msg() == (le(0), None)                      # protocol version 0, no fd
    assert raw.msg() == (le(own_id), None)                 # our id, no fd
    marker, shm_fd = raw.msg()
    assert marker == b"\xff" * 8 and shm_fd is not None    # -1 with the shm fd
    got: dict[int, list[int]] = {}
    for pid in peers + [own_id]:                           # existing peers, then ourselves
        for _ in range(vectors):
            raw_id, fd = raw.msg()
            assert raw_id == le(pid) and fd is not None
            got.setdefault(pid, []).append(fd)
    return shm_fd, got


# ---- server protocol ---------------------------------------------------------------------

def test_server_protocol_byte_for_byte(server, sock_path):
    a = Raw(sock_path)
    b = c = None
    try:
        shm_a, fds_a = handshake(a, 0, [], 2)
        assert os.fstat(shm_a).st_size == SIZE
        assert a.quiet()

        b = Raw(sock_path)
        shm_b, fds_b = handshake(b, 1, [0], 2)
        assert b.quiet()
        # A is told about B: B's id once per vector, each with an fd.
        notes = [a.value() for _ in range(2)]
        assert [v for v, _ in notes] == [1, 1] and all(fd is not None for _, fd in notes)
        assert a.quiet()

        # Same memory on both sides.
        with mmap.mmap(shm_a, SIZE) as ma, mmap.mmap(shm_b, SIZE) as mb:
            mb[100:104] = b"ping"
            assert ma[100:104] == b"ping"
        # B interrupts A on vector 1 by writing A's vector-1 eventfd as B got it;
        # A sees it on its own vector-1 eventfd and nothing on vector 0.
        os.eventfd_write(fds_b[0][1], 1)
        assert os.eventfd_read(fds_a[0][1]) == 1
        os.set_blocking(fds_a[0][0], False)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fds_a[0][0])
        # And A interrupts B on vector 0 with the fd from the connect notice.
        os.eventfd_write(notes[0][1], 1)
        assert os.eventfd_read(fds_b[1][0]) == 1

        # B leaves: A gets B's id without an fd, once.
        b.close()
        b = None
        assert a.msg() == (le(1), None)
        assert a.quiet()

        # Ids are not reused right away (as QEMU's server): the next one is 2,
        # and it hears only about the live peer 0.
        c = Raw(sock_path)
        handshake(c, 2, [0], 2)
        assert c.quiet()
        assert [a.value()[0] for _ in range(2)] == [2, 2]
        assert server.peer_ids == [0, 2]
    finally:
        for r in (a, b, c):
            if r is not None:
                r.close()


def test_vanished_client_gets_epipe_not_the_others(sock_path):
    # Driven by hand so both events are pending in the same round: the new
    # connection is handled first and writing to the vanished client fails.
    with IvshmemServer(sock_path, SIZE, vectors=1) as srv:
        a = Raw(sock_path)
        while 0 not in srv.peers:
            srv.serve(2)
        handshake(a, 0, [], 1)
        a.close()
        b = Raw(sock_path)
        try:
            srv.serve(2)
            while 0 in srv.peers:    # in case the kernel reported A's hang-up late
                srv.serve(2)
            assert srv.peer_ids == [1]
            handshake(b, 1, [], 1)   # never told about the dead peer 0
            assert b.quiet()
        finally:
            b.close()


def test_client_that_talks_is_dropped_and_others_told(server, sock_path):
    a, b = Raw(sock_path), Raw(sock_path)
    try:
        handshake(a, 0, [], 2)
        handshake(b, 1, [0], 2)
        assert [a.value()[0] for _ in range(2)] == [1, 1]
        b.sock.sendall(b"hello")       # the protocol is one-way
        assert a.msg() == (le(1), None)
    finally:
        a.close()
        b.close()


def test_many_clients_come_and_go(server, sock_path):
    keep = IvshmemClient(sock_path, timeout=5)
    try:
        for _ in range(20):
            r = Raw(sock_path)
            r.msg()
            r.close()            # vanishes mid-handshake
        probe = IvshmemClient(sock_path, timeout=5)
        with probe:
            assert probe.own_id == 21
            assert list(probe.peers) == [0]   # the vanished ones are gone
    finally:
        keep.close()


# ---- socket path handling ------------------------------------------------------------------

def test_stale_socket_is_replaced(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    s.close()                          # leaves the socket file behind
    with IvshmemServer(sock_path, SIZE) as srv:
        srv.start_thread()
        with IvshmemClient(sock_path, timeout=5) as c:
            assert c.own_id == 0
    assert not os.path.exists(sock_path)


def test_live_socket_is_refused(server, sock_path):
    with pytest.raises(OSError, match="already listening"):
        IvshmemServer(sock_path, SIZE)
    with IvshmemClient(sock_path, timeout=5):   # the first server still works
        pass


def test_bad_socket_paths(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(FileExistsError, match="not a socket"):
        IvshmemServer(str(regular), SIZE)
    assert regular.read_text() == "x"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        IvshmemServer(str(tmp_path / "no" / "such" / "dir.sock"), SIZE)
    with pytest.raises(ValueError, match="too long"):
        IvshmemServer("/tmp/" + "x" * 200, SIZE)
    with pytest.raises(ValueError):
        IvshmemServer(str(tmp_path / "s"), 0)
    with pytest.raises(ValueError):
        IvshmemServer(str(tmp_path / "s"), SIZE, vectors=65)


# ---- client errors -----------------------------------------------------------------------

def test_client_no_server(sock_path):
    with pytest.raises(FileNotFoundError, match="no ivshmem server socket"):
        IvshmemClient(sock_path, timeout=1)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    s.close()
    with pytest.raises(ConnectionRefusedError, match="nothing is listening"):
        IvshmemClient(sock_path, timeout=1)


def test_client_times_out_on_a_silent_server(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    s.listen(1)                        # accepts in the kernel, never says anything
    try:
        with pytest.raises(TimeoutError, match="sent nothing"):
            IvshmemClient(sock_path, timeout=0.3)
        with pytest.raises(TimeoutError):
            open_carrier(f"ivshmem:{sock_path}#timeout=0.3")
    finally:
        s.close()


def _fake_server(path: str, script: bytes, fds: list[int] | None = None) -> threading.Thread:
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)

    def run():
        conn, _ = ls.accept()
        ls.close()
        try:
            if fds:
                socket.send_fds(conn, [script[:8]], fds)
            if script[8 if fds else 0:]:
                conn.sendall(script[8 if fds else 0:])
        except OSError:
            pass     # the client may already have given up on us
        finally:
            conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("script, match", [
    (le(1), "protocol version 0: first message was 1"),
    (le(0) + le(0) + le(-1), "expected -1 with the shared-memory fd"),
    (le(0) + le(70000), "bad peer id 70000"),
    (le(0) + b"\x01\x02\x03", "closed the connection"),
    (b"", "closed the connection"),
])
def test_client_rejects_wrong_protocol(sock_path, script, match):
    t = _fake_server(sock_path, script)
    with pytest.raises(IvshmemProtocolError, match=match):
        IvshmemClient(sock_path, timeout=2)
    t.join(2)


def test_client_rejects_fd_with_version(sock_path):
    r, w = os.pipe()
    try:
        t = _fake_server(sock_path, le(0), fds=[r])
        with pytest.raises(IvshmemProtocolError, match="with an fd"):
            IvshmemClient(sock_path, timeout=2)
        t.join(2)
    finally:
        os.close(r)
        os.close(w)


# ---- client and carrier --------------------------------------------------------------------

def _events(carrier_or_client, count: int, timeout: float = 5.0) -> list[tuple[str, int]]:
    got: list[tuple[str, int]] = []
    client = getattr(carrier_or_client, "client", carrier_or_client)
    while len(got) < count:
        got += carrier_or_client.poll_events()
        if len(got) < count:
            assert client.wait_readable(timeout), f"only {got} after {timeout} s"
    return got


def test_client_wants_more_vectors_than_served(server, sock_path):
    with pytest.raises(TimeoutError, match="gave us 2 vector.s., 3 wanted"):
        IvshmemClient(sock_path, timeout=0.2, min_vectors=3)
    with pytest.raises(TimeoutError):
        open_carrier(f"ivshmem:{sock_path}#vector=2&timeout=0.2")


def test_client_events_and_doorbells(server, sock_path):
    with IvshmemClient(sock_path, timeout=5) as a:
        assert (a.own_id, a.region.size, len(a.vectors)) == (0, SIZE, 2)
        assert a.poll_events() == []
        with pytest.raises(TimeoutError, match="no other peer"):
            a.wait_for_peer(0.05)
        with IvshmemClient(sock_path, timeout=5) as b:
            assert b.own_id == 1 and list(b.peers) == [0]
            assert b.poll_events() == [("connected", 0)]   # present at the handshake
            assert a.wait_for_peer(5) == 1
            assert _events(a, 1) == [("connected", 1)]
            db_a, db_b = a.doorbell_to(1, vector=1), b.doorbell_to(0, vector=1)
            db_a.ring()
            assert db_b.wait(5)
            assert not db_b.wait(0)          # drained
            db_b.ring()
            assert db_a.wait(5)
            with pytest.raises(ValueError, match="no peer 7"):
                a.doorbell_to(7)
            with pytest.raises(ValueError, match="vector 2 out of range"):
                a.doorbell_to(1, vector=2)
            a.region.store64(0, 42)
            assert b.region.load64(0) == 42
        assert _events(a, 1) == [("disconnected", 1)]
        assert a.peers == {}
        db_a.ring()                          # the peer is gone: harmless


def test_carrier_follows_the_peer(server, sock_path):
    with open_carrier(f"ivshmem:{sock_path}#wait_peer=0") as dev:
        assert (dev.own_id, dev.peer_id) == (0, None)
        dev.doorbell.ring()                  # nobody to ring yet: goes nowhere
        with open_carrier(f"ivshmem:{sock_path}") as drv:
            assert (drv.own_id, drv.peer_id) == (1, 0)
            assert _events(dev, 1) == [("connected", 1)]
            assert dev.peer_id == 1
            dev.doorbell.ring()
            assert drv.doorbell.wait(5)
            drv.doorbell.ring()
            assert dev.doorbell.wait(5)
        assert _events(dev, 1) == [("disconnected", 1)]
        assert dev.peer_id is None
        # A restarted driver comes back under a new id; the same doorbell
        # object now reaches it.
        with open_carrier(f"ivshmem:{sock_path}", timeout=5) as drv2:
            assert drv2.own_id == 2
            assert _events(dev, 1) == [("connected", 2)]
            assert dev.peer_id == 2
            dev.doorbell.ring()
            assert drv2.doorbell.wait(5)
            drv2.doorbell.ring()
            assert dev.doorbell.wait(5)


def test_carrier_fixed_peer_and_offset(server, sock_path):
    with open_carrier(f"ivshmem:{sock_path}#wait_peer=0") as p0, \
         open_carrier(f"ivshmem:{sock_path}#wait_peer=0") as p1, \
         open_carrier(f"ivshmem:{sock_path}#peer=1&offset=0x2000&vector=1") as p2:
        assert (p2.own_id, p2.peer_id, p2.offset) == (2, 1, 0x2000)
        assert _events(p1, 2) == [("connected", 0), ("connected", 2)]
        p2.doorbell.ring()
        assert p1.client.doorbell_to(2, vector=1).wait(5)
        assert not p1.client.doorbell_to(2, vector=0).wait(0)   # vector 1 only
        assert p0.own_id == 0
        with pytest.raises(TimeoutError, match="peer 9"):
            open_carrier(f"ivshmem:{sock_path}#peer=9&timeout=0.1")


def test_open_region_over_ivshmem(server, sock_path):
    with open_carrier(f"ivshmem:{sock_path}#wait_peer=0") as keep:
        keep.region.store32(64, 0xABCD)
        region = open_region(f"ivshmem:{sock_path}", wait_peer=False)
        with region:
            assert region.load32(64) == 0xABCD
            assert region.uri == f"ivshmem:{sock_path}"
        # open_region left the server right away; the mapping outlived it.
        assert ("disconnected", 1) in _events(keep, 2)


@pytest.mark.parametrize("uri, exc, match", [
    ("ivshmem:", ValueError, "needs a socket path"),
    ("ivshmem:/nonexistent/vmsgamp.sock", FileNotFoundError, "no ivshmem server socket"),
    ("ivshmem:/x#peer=abc", ValueError, "peer must be an integer"),
    ("ivshmem:/x#peer=70000", ValueError, "peer must be in"),
    ("ivshmem:/x#timeout=-1", ValueError, "negative"),
    ("ivshmem:/x#size=4K", ValueError, "unknown option"),
])
def test_bad_ivshmem_uris(uri, exc, match):
    with pytest.raises(exc, match=match):
        open_carrier(uri)


def test_own_id_as_peer_is_refused(server, sock_path):
    with pytest.raises(ValueError, match="our own id"):
        open_carrier(f"ivshmem:{sock_path}#peer=0")


# ---- two processes: MsgFifo Gen B over ivshmem with eventfd doorbells -----------------------

def _msg(seq: int) -> bytes:
    return bytes(6) + struct.pack("<HQ", 16, seq)     # G2 header, msg_size 16, then seq


def _fifo_side(path: str, role: str, count: int, done, ids, wakeups) -> None:
    with open_carrier(f"ivshmem:{path}#timeout=10") as c:
        ids[0], ids[1] = c.own_id, c.peer_id
        # spin_us=0: every wait goes to sleep on the eventfd, so a miswired
        # doorbell shows up as zero wake-ups (the FIFO would still limp on by
        # re-checking every 100 ms).
        fifo = MsgFifo(c.region, role=role, offset=c.offset, doorbell=c.doorbell, spin_us=0)
        fifo.start(10)
        for i in range(count):
            if role == "driver":
                fifo.send(_msg(i), 10)
                assert fifo.recv_bytes(10) == _msg(i + 1_000_000), i
            else:
                assert fifo.recv_bytes(10) == _msg(i), i
                fifo.send(_msg(i + 1_000_000), 10)
        if role == "driver":
            done.set()
        assert done.wait(10)
        wakeups.value = c.doorbell.wakeups
        fifo.close()


def _serve_until(path: str, ready, stop) -> None:
    with IvshmemServer(path, SIZE) as srv:
        ready.set()
        while not stop.is_set():
            srv.serve(0.05)


def test_two_processes_msgfifo_over_ivshmem(sock_path):
    ctx = multiprocessing.get_context("fork")
    ready, stop, done = ctx.Event(), ctx.Event(), ctx.Event()
    srv = ctx.Process(target=_serve_until, args=(sock_path, ready, stop))
    srv.start()
    procs = []
    try:
        assert ready.wait(10)
        count = 400
        sides = {}
        for role in ("device", "driver"):
            ids, wakeups = ctx.Array("i", [-1, -1]), ctx.Value("L", 0)
            p = ctx.Process(target=_fifo_side, args=(sock_path, role, count, done, ids, wakeups))
            p.start()
            procs.append(p)
            sides[role] = (ids, wakeups)
        for p in procs:
            p.join(20)
        assert [p.exitcode for p in procs] == [0, 0]
        (dev_own, dev_peer), (drv_own, drv_peer) = (list(sides[r][0]) for r in ("device", "driver"))
        assert {dev_own, drv_own} == {0, 1}
        assert (dev_peer, drv_peer) == (drv_own, dev_own)
        assert sides["device"][1].value > 0 and sides["driver"][1].value > 0
    finally:
        done.set()
        stop.set()
        for p in procs + [srv]:
            p.join(5)
            if p.is_alive():
                p.kill()
    assert srv.exitcode == 0
    assert not os.path.exists(sock_path)


# ---- the CLI -------------------------------------------------------------------------------

def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "vmsgamp", "ivshmem-server", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_cli_serves_until_ctrl_c(sock_path):
    proc = _cli(sock_path, "--size", "64K", "--vectors", "2", "--json")
    try:
        info = json.loads(proc.stdout.readline())
        assert info == {"socket": sock_path, "size": 65536, "vectors": 2}
        with IvshmemClient(sock_path, timeout=5, min_vectors=2) as c:
            assert (c.own_id, c.region.size, len(c.vectors)) == (0, 65536, 2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err          # Ctrl-C: one line, 130 (SIGTERM is the clean stop: 0)
    assert err == "vmsgamp ivshmem-server: interrupted\n"
    assert not os.path.exists(sock_path)


def test_cli_error_is_one_line(sock_path):
    proc = _cli(os.path.join(sock_path, "missing-dir", "s"))
    out, err = proc.communicate(timeout=60)    # a hang guard: start-up alone took >10 s under load
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0], err


def test_server_going_away_keeps_known_peers_working(sock_path):
    srv = IvshmemServer(sock_path, SIZE)
    srv.start_thread()
    try:
        a = open_carrier(f"ivshmem:{sock_path}#wait_peer=0")
        b = open_carrier(f"ivshmem:{sock_path}")
        assert _events(a, 1) == [("connected", 1)]
    finally:
        srv.close()
    with a, b:
        assert a.client.wait_readable(5)             # the EOF
        assert a.poll_events() == []
        assert not a.client.server_connected
        assert not a.client.wait_readable(0)         # no busy EOF for a selector
        a.doorbell.ring()                            # eventfds outlive the server
        assert b.doorbell.wait(5)
        a.region.store8(1, 9)
        assert b.region.load8(1) == 9


def test_server_going_away_while_waiting_for_a_peer(sock_path):
    srv = IvshmemServer(sock_path, SIZE)
    srv.start_thread()
    with IvshmemClient(sock_path, timeout=5) as lonely:
        srv.close()
        with pytest.raises(ConnectionError, match="went away"):
            lonely.wait_for_peer(5)
