"""vhost-user back-end against a Python front-end that speaks like QEMU 7.2
(vmsgamp.testing.vhost_user_frontend): rng and blk, split and packed rings,
GET/SET_VRING_BASE, malformed and unknown messages, back-end restart."""
import contextlib
import os
import select
import signal
import socket
import struct
import threading
import time

import pytest

from vmsgamp.devices._base import VirtioDevice
from vmsgamp.devices.blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlkDevice
from vmsgamp.devices.rng import RngDevice
from vmsgamp.testing.vhost_user_frontend import QEMU_RNG_PACKED, QEMU_RNG_SPLIT, FakeFrontend, nofd
from vmsgamp.bus._wait import SPIN_SLICE_S, WaitPolicy
from vmsgamp.vhost_user import VhostUserBackend
from vmsgamp.vhost_user._protocol import (
    VERSION, MemoryRegion, Request, encode, encode_config, encode_memory_table, encode_u64,
    encode_vring_state, parse_u64, parse_vring_state,
)

F_EVENT_IDX = 1 << 29
F_PACKED = 1 << 34
BLK_SPLIT = 0x170000000 | 1 << 2 | 1 << 6 | 1 << 9 | 1 << 12   # + SEG_MAX BLK_SIZE FLUSH MQ


class Counter:
    """Deterministic entropy: byte i of the stream is i & 0xff."""

    def __init__(self):
        self.pos = 0

    def __call__(self, n):
        out = bytes((self.pos + i) & 0xFF for i in range(n))
        self.pos += n
        return out


def stream(start, n):
    return bytes((start + i) & 0xFF for i in range(n))


@contextlib.contextmanager
def serving(device, path, **kw):
    be = VhostUserBackend(device, str(path), **kw)
    t = threading.Thread(target=be.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        yield be
    finally:
        be.stop()
        t.join(5)
        assert not t.is_alive()
        be.close()


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


@pytest.fixture
def sock(tmp_path):
    return tmp_path / "vhost.sock"


def read_entropy(fe, q=0, n=64):
    assert fe.driver(q).add_chain([], [n], token=n)
    fe.kick(q)
    token, ln, data = fe.wait_used(q)
    assert token == n and ln == n
    return data


# ---- rng ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_rng_qemu_sequence(sock, fmt):
    with serving(RngDevice(Counter()), sock) as be, FakeFrontend(str(sock)) as fe:
        info = fe.realize()
        assert info["features"] >> 30 & 1                      # PROTOCOL_FEATURES offered
        assert info["features"] >> 32 & 1 and info["features"] >> 34 & 1
        assert info["protocol_features"] & 0b1001 == 0b1001      # MQ, REPLY_ACK
        assert not info["protocol_features"] >> 9 & 1            # no CONFIG for rng
        assert info["queue_num"] == 1
        fe.start(fmt=fmt, size=4)
        # 6 buffers on a ring of 4: the ring wraps
        got = b"".join(read_entropy(fe) for _ in range(6))
        assert got == stream(0, 6 * 64)
        bases = fe.stop()
        assert bases[0] == (6 if fmt == "split" else 0x00020002)   # packed: idx 2, both wraps 0
        assert be.stats["refused"] == 0 and be.stats["calls"] >= 6
        assert f"start 0 {fmt}" in be.events
        # a fresh ring with the initial base: nothing "recovered"
        assert not any("packed position" in e for e in be.events)


def test_rng_features_never_offered_are_followed(sock):
    """QEMU 7.2 rng sets packed/event-idx even when not offered."""
    with serving(RngDevice(Counter()), sock, offer_packed=False, offer_event_idx=False) as be, \
            FakeFrontend(str(sock)) as fe:
        assert not fe.realize()["features"] >> 34 & 1
        fe.start(fmt="packed", features=QEMU_RNG_PACKED)
        assert read_entropy(fe) == stream(0, 64)
        assert "start 0 packed" in be.events


def test_rng_without_protocol_features(sock):
    """proto=0: no NEED_REPLY at all, rings start enabled on SET_VRING_KICK."""
    with serving(RngDevice(Counter()), sock), FakeFrontend(str(sock)) as fe:
        fe.realize(protocol_mask=0)
        fe.start(fmt="split", features=QEMU_RNG_SPLIT & ~(1 << 30))
        assert read_entropy(fe) == stream(0, 64)


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_stop_and_restart_with_the_reported_base(sock, fmt):
    """VM stop/cont: GET_VRING_BASE, then a new start with SET_VRING_BASE =
    that value on the same rings; nothing is served twice or lost.  A second
    SET_MEM_TABLE while running (memory hot-plug) keeps the rings going."""
    with serving(RngDevice(Counter()), sock) as be, FakeFrontend(str(sock)) as fe:
        fe.realize()
        fe.start(fmt=fmt, size=4)
        a = b"".join(read_entropy(fe) for _ in range(3))
        bases = fe.stop()
        fe.start(fmt=fmt, size=4, bases=bases, new_drivers=False)
        b = b"".join(read_entropy(fe) for _ in range(3))
        assert fe.ack(Request.SET_MEM_TABLE, encode_memory_table(fe.mem_regions), [fe.ram.fd] * 2) == 0
        c = read_entropy(fe)
        assert a + b + c == stream(0, 7 * 64)
        assert be.stats["refused"] == 0


# ---- blk ----------------------------------------------------------------------------------

def blk_rw(fe, q, rtype, sector, data=b"", nread=0, token="t"):
    out = [struct.pack("<IIQ", rtype, 0, sector)] + ([data] if data else [])
    ins = ([nread] if nread else []) + [1]
    assert fe.driver(q).add_chain(out, ins, token=token)
    fe.kick(q)
    tok, ln, got = fe.wait_used(q)
    assert tok == token
    return got[-1], got[:-1]


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_blk_write_read_back_multiqueue(sock, tmp_path, fmt):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    features = BLK_SPLIT | (F_PACKED if fmt == "packed" else 0)
    with serving(BlkDevice(str(img), num_queues=2), sock) as be, FakeFrontend(str(sock)) as fe:
        info = fe.realize(queues=(0, 1), protocol_mask=0x1FFFF, config_size=60)
        assert info["protocol_features"] >> 9 & 1               # CONFIG for blk
        assert info["queue_num"] == 2
        cfg = info["config"]
        offset, size, flags = struct.unpack_from("<III", cfg)
        assert (offset, size) == (0, 60)
        assert struct.unpack_from("<Q", cfg, 12)[0] == 2048     # capacity in sectors
        assert struct.unpack_from("<H", cfg, 12 + 34)[0] == 2    # num_queues
        fe.start(queues=(0, 1), fmt=fmt, size=16, features=features, buf_size=65536, nbufs=8)
        pattern = os.urandom(65536)
        assert blk_rw(fe, 1, VIRTIO_BLK_T_OUT, 128, pattern)[0] == VIRTIO_BLK_S_OK
        st, data = blk_rw(fe, 0, VIRTIO_BLK_T_IN, 128, nread=65536)
        assert st == VIRTIO_BLK_S_OK and data == pattern
        for i in range(20):   # more requests than the ring holds, 4 KiB each
            assert blk_rw(fe, i % 2, VIRTIO_BLK_T_OUT, 512 + 8 * i, pattern[:4096], token=i)[0] == VIRTIO_BLK_S_OK
        # out of range: IOERR, the file does not grow
        assert blk_rw(fe, 0, VIRTIO_BLK_T_OUT, 2048, pattern[:512])[0] == VIRTIO_BLK_S_IOERR
        fe.stop(queues=(0, 1))
        assert be.stats["refused"] == 0
    raw = img.read_bytes()
    assert len(raw) == 1 << 20
    assert raw[128 * 512:128 * 512 + 65536] == pattern
    assert all(raw[(512 + 8 * i) * 512:(512 + 8 * i) * 512 + 4096] == pattern[:4096] for i in range(20))


def test_blk_get_set_config(sock, tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(8192))
    with serving(BlkDevice(str(img)), sock), FakeFrontend(str(sock)) as fe:
        fe.realize(protocol_mask=0x1FFFF)
        # QEMU may ask for more than the model has: the reply has the size asked for
        r = fe.config_request(0, 72)
        assert len(r.payload) == 12 + 72 and struct.unpack_from("<Q", r.payload, 12)[0] == 16
        r = fe.config_request(8, 4)
        assert len(r.payload) == 16
        # the blk config is read-only here: SET_CONFIG refused with a failure ack
        assert fe.ack(Request.SET_CONFIG, encode_config(32, b"\1")) != 0


# ---- malformed and unknown messages -----------------------------------------------------

def test_unknown_and_malformed_messages_are_refused_not_fatal(sock):
    with serving(RngDevice(Counter()), sock) as be, FakeFrontend(str(sock)) as fe:
        fe.realize()
        # unknown request: failure ack with NEED_REPLY, silence without
        assert fe.ack(200, b"abc") != 0
        fe.request(201, b"")
        # known request, wrong payload size
        assert fe.ack(Request.SET_VRING_NUM, b"\0" * 3) != 0
        # queue that does not exist / impossible size
        assert fe.ack(Request.SET_VRING_NUM, encode_vring_state(5, 4)) != 0
        assert fe.ack(Request.SET_VRING_NUM, encode_vring_state(0, 0)) != 0
        # SET_VRING_ADDR before any memory table
        assert fe.ack(Request.SET_VRING_ADDR, bytes(40)) != 0
        # protocol features never offered
        assert fe.ack(Request.SET_PROTOCOL_FEATURES, encode_u64(1 << 15)) != 0
        # a memory table with fewer fds than regions; the fd sent is closed
        r, w = os.pipe()
        table = encode_memory_table([MemoryRegion(0, 4096, 0, 0), MemoryRegion(8192, 4096, 8192, 0)])
        assert fe.ack(Request.SET_MEM_TABLE, table, [w]) != 0
        os.close(w)
        wait_for(lambda: select.select([r], [], [], 0)[0])   # EOF: the back-end closed its copy
        assert os.read(r, 1) == b""
        os.close(r)
        # a request with a mandatory reply still gets a well-formed one
        rep = fe.request(Request.GET_VRING_BASE, b"\0" * 2, expect_reply=True)
        assert parse_vring_state(rep).num == 0
        # NOFD kick fd: accepted, the ring just does not start
        fe.request(Request.SET_VRING_KICK, nofd(0))
        # the session still works
        assert parse_u64(fe.request(Request.GET_FEATURES, expect_reply=True)) >> 30 & 1
        fe.start(fmt="split")
        assert read_entropy(fe) == stream(0, 64)
        assert be.stats["refused"] == 9
        assert be.stats["connections"] == 1


@pytest.mark.parametrize("bad", [
    struct.pack("<III", Request.GET_FEATURES, 0x2, 0),          # version 2
    struct.pack("<III", Request.SET_MEM_TABLE, VERSION, 1 << 24),  # absurd size
])
def test_broken_framing_drops_the_connection_and_the_backend_waits(sock, bad):
    with serving(RngDevice(Counter()), sock) as be:
        fe = FakeFrontend(str(sock))
        fe.send_raw(bad)
        assert fe.sock.recv(1) == b""        # closed by the back-end
        fe.disconnect()
        wait_for(lambda: not be.connected)
        fe.connect()                          # and it accepts the next front-end
        fe.realize()
        fe.start()
        assert read_entropy(fe) == stream(0, 64)
        fe.close()


def test_second_frontend_refused_while_one_is_connected(sock):
    with serving(RngDevice(Counter()), sock) as be, FakeFrontend(str(sock)) as fe:
        fe.realize()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.connect(str(sock))
        other.settimeout(5)
        assert other.recv(1) == b""
        other.close()
        fe.start()
        assert read_entropy(fe) == stream(0, 64)


class Exploding(VirtioDevice):
    device_id = 4
    name = "exploding"

    def handle_queue(self, index, queue):
        queue.pop()
        raise RuntimeError("model bug")


def test_broken_ring_signals_err_fd_and_backend_survives(sock):
    with serving(Exploding(), sock) as be, FakeFrontend(str(sock)) as fe:
        fe.realize()
        fe.start()
        fe.driver(0).add_chain([], [16])
        fe.kick(0, force=True)
        r, _, _ = select.select([fe.err_fds[0]], [], [], 5)
        assert r, "no SET_VRING_ERR notification"
        assert be.stats["broken"] == 1
        assert parse_u64(fe.request(Request.GET_FEATURES, expect_reply=True))


def test_hostile_descriptor_outside_guest_memory(sock):
    with serving(RngDevice(Counter()), sock) as be, FakeFrontend(str(sock)) as fe:
        fe.realize()
        fe.start()
        # a buffer in the 0xa0000-0xc0000 hole QEMU never sends
        fe.driver(0).add_sg([], [(0xA0000, 64)])
        fe.kick(0, force=True)
        r, _, _ = select.select([fe.err_fds[0]], [], [], 5)
        assert r
        assert any("broken 0" in e for e in be.events)


# ---- back-end restart (kill -9 while the guest idles) ---------------------------------------

def _fork_backend(path, start):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            be = VhostUserBackend(RngDevice(Counter()), str(path))
            be.device.source.pos = start
            be.serve_forever()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def _restart_block(fe, fmt, features):
    """What QEMU 7.2 resends after reconnecting: the start block only, with
    NEED_REPLY on SET_MEM_TABLE, the split base restored from used->idx and
    the packed base reset to its initial value."""
    bases = {0: fe.used_idx(0)} if fmt == "split" else {0: 0x80008000}
    fe.start(fmt=fmt, features=features, bases=bases, reconnect=True, new_drivers=False)


@pytest.mark.parametrize("fmt,features", [
    ("split", QEMU_RNG_SPLIT),
    ("packed", QEMU_RNG_PACKED),                     # position from the driver event area
    ("packed", QEMU_RNG_PACKED & ~F_EVENT_IDX),      # position from the descriptor scan
])
def test_backend_killed_and_restarted(sock, fmt, features):
    pid = _fork_backend(sock, 0)
    try:
        fe = FakeFrontend(str(sock))
        fe.realize()
        fe.start(fmt=fmt, size=4, features=features)
        got = b"".join(read_entropy(fe) for _ in range(5))   # ring position 1, wrap 0 for packed
        assert got == stream(0, 5 * 64)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    # the connection is dead; QEMU's stop path fails on it
    with pytest.raises((ConnectionError, OSError)):
        fe.stop()
    fe.disconnect()
    # the guest posts a buffer and kicks while no back-end runs
    assert fe.driver(0).add_chain([], [64], token="during")
    fe.kick(0, force=True)
    with serving(RngDevice(Counter()), sock) as be:
        be.device.source.pos = 5 * 64
        fe.connect()
        fe.log.clear()
        _restart_block(fe, fmt, features)
        assert "SET_OWNER" not in fe.log and "GET_PROTOCOL_FEATURES" not in fe.log
        token, ln, data = fe.wait_used(0)
        assert (token, data) == ("during", stream(5 * 64, 64))
        assert b"".join(read_entropy(fe) for _ in range(4)) == stream(6 * 64, 4 * 64)
        if fmt == "packed":
            how = "driver event area" if features & F_EVENT_IDX else "descriptor scan"
            assert f"queue 0: packed position 1/0 from {how}" in be.events
        fe.stop()
        fe.close()


# ---- waiting: spin on the rings after serving, then re-enable kicks and block -----------------

class FakeClock:
    """Time that moves only when told (``step`` per read: a clock that runs).
    ``live``: 1 ms per read, so a loop in a thread never spins for long."""

    def __init__(self, step=0.0, max_reads=None):
        self.t = 1000.0
        self.step = step
        self.reads = 0
        self.max_reads = max_reads
        self.live = False

    def __call__(self):
        self.reads += 1
        if self.max_reads is not None and self.reads > self.max_reads:
            raise AssertionError("the back-end kept reading the clock: a spin that does not end")
        self.t += 1e-3 if self.live else self.step
        return self.t

    def advance(self, seconds):
        self.t += seconds


@contextlib.contextmanager
def stepped(device, path, clock, fmt="split", features=None, **kw):
    """A back-end driven by hand: set up by a serving thread (the front-end
    waits for replies), then stepped by the test with an injected clock."""
    be = VhostUserBackend(device, str(path), clock=clock, **kw)
    fe = FakeFrontend(str(path))
    done = threading.Event()
    clock.live = True     # a busy-polling thread must still see its slices end
    t = threading.Thread(target=be.serve_forever, args=(done,), kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    try:
        fe.realize()
        fe.start(fmt=fmt, features=features)
        fe.request(Request.GET_FEATURES, expect_reply=True)   # every set-up message handled
    finally:
        done.set()
        t.join(5)
        clock.live = False
    try:
        assert not t.is_alive()
        be.step(0)        # arm what the set-up left quiet: the ring starts with kicks on
        assert kicks_off(fe) == be.wait_policy.busy_poll
        yield be, fe
    finally:
        fe.close()
        be.close()


def kicks_off(fe, q=0):
    """Whether the ring, as the guest driver reads it, asks it not to kick."""
    drv = fe.driver(q)
    dev = drv.device_addr

    def u16(addr):
        return struct.unpack("<H", fe.ram.read(addr, 2))[0]

    if drv.fmt == "packed":
        return u16(dev + 2) & 3 == 1                          # device event flags: DISABLE
    if drv.event_idx:
        # avail_event left behind the driver's index: it was crossed, no kick until it moves
        return u16(dev + 4 + 8 * drv.size) != drv.ref.avail_idx
    return bool(u16(dev) & 1)                                  # used->flags: NO_NOTIFY


def post(fe, token, q=0):
    """A request from the guest; True if the driver wants to kick (it does not kick)."""
    assert fe.driver(q).add_chain([], [16], token=token)
    return fe.driver(q).kick_prepare()


def used_tokens(fe, q=0):
    out = []
    while (got := fe.driver(q).get_used()) is not None:
        out.append(got[0])
    return out


RING_KINDS = [("split", QEMU_RNG_SPLIT), ("split", QEMU_RNG_SPLIT & ~F_EVENT_IDX),
              ("packed", QEMU_RNG_PACKED), ("packed", QEMU_RNG_PACKED & ~F_EVENT_IDX)]
RING_IDS = ["split-event-idx", "split", "packed-event-idx", "packed"]


@pytest.mark.parametrize("fmt,features", RING_KINDS, ids=RING_IDS)
def test_spin_serves_requests_without_kicks(sock, fmt, features):
    clock = FakeClock()    # stands still: the spin window never ends by itself
    with stepped(RngDevice(Counter()), sock, clock, fmt, features) as (be, fe):
        assert be.stats["spins"] == 0            # no traffic yet: no spinning
        blocks = be.stats["blocks"]
        # 1. a kicked request wakes the back-end up; kicks stay off afterwards
        assert post(fe, "a")
        fe.kick(0, force=True)
        be.step(0)
        assert used_tokens(fe) == ["a"] and be.stats["kicks"] == 1
        assert kicks_off(fe)
        # 2. the next request, not kicked (the driver sees kicks are off), is
        #    found by the spin of the next step
        assert not post(fe, "b")
        be.step(0)
        assert used_tokens(fe) == ["b"]
        assert be.stats["served_while_spinning"] == 1 and be.stats["spins"] == 1 and be.stats["kicks"] == 1
        assert kicks_off(fe)
        # 3. a request posted just before the window ends is found by the
        #    re-check after re-enabling kicks: served, no sleep
        assert not post(fe, "c")
        clock.advance(1.0)
        be.step(5.0)
        assert used_tokens(fe) == ["c"] and be.stats["served_at_arm"] == 1
        assert be.stats["blocks"] == blocks
        # 4. a window with nothing in it ends with kicks on, and the back-end sleeps on them again
        clock.advance(1.0)
        be.step(0)
        assert not kicks_off(fe)
        assert post(fe, "d")
        fe.kick(0, force=True)
        be.step(0)
        assert used_tokens(fe) == ["d"] and be.stats["kicks"] == 2
        assert be.stats["served_while_spinning"] == 1 and be.stats["served_at_arm"] == 1
        assert be.stats["refused"] == be.stats["broken"] == 0


def test_spin_window_adapts_to_the_guests_pace(sock):
    """A guest slower than the window (QEMU under TCG) shrinks it to nothing;
    one whose requests come soon after the window ends grows it back."""
    clock = FakeClock()
    with stepped(RngDevice(Counter()), sock, clock) as (be, fe):
        w = be._wait
        clock.max_reads = clock.reads + 10_000   # a spin on the frozen clock would never end
        assert post(fe, "a")
        fe.kick(0, force=True)
        be.step(0)

        def request_after(gap):
            clock.advance(gap)      # the guest's next request comes this long after the last
            be.step(0.001)          # nothing yet: the back-end sleeps on the kicks
            assert post(fe, "x")
            fe.kick(0, force=True)
            be.step(0.001)
            assert used_tokens(fe)[-1] == "x"
            return w.window

        shrinking = [request_after(1.0) for _ in range(5)]
        assert shrinking == sorted(shrinking, reverse=True) and shrinking[-1] == 0
        assert shrinking[0] < w.spin_s
        growing = [request_after(95e-6) for _ in range(5)]
        assert growing == pytest.approx([10e-6, 20e-6, 40e-6, 80e-6, 100e-6])
        assert be.stats["served_while_spinning"] == 0 and be.stats["kicks"] == 11


@pytest.mark.parametrize("fmt,features", RING_KINDS[:3], ids=RING_IDS[:3])
def test_spin_us_0_waits_for_kicks_as_before(sock, fmt, features):
    clock = FakeClock()
    with stepped(RngDevice(Counter()), sock, clock, fmt, features, wait=WaitPolicy(spin_us=0)) as (be, fe):
        assert post(fe, "a")
        fe.kick(0, force=True)
        be.step(0)
        assert used_tokens(fe) == ["a"]
        assert not kicks_off(fe)                 # every service re-enables kicks
        assert post(fe, "b")                     # so the driver would kick; it does not
        be.step(0)
        assert used_tokens(fe) == []             # and nothing looks at the ring without one
        fe.kick(0, force=True)
        be.step(0)
        assert used_tokens(fe) == ["b"]
        assert be.stats["spins"] == be.stats["served_while_spinning"] == be.stats["served_at_arm"] == 0
        assert be.stats["kicks"] == 2


@pytest.mark.parametrize("fmt,features", [RING_KINDS[1], RING_KINDS[2]], ids=[RING_IDS[1], RING_IDS[2]])
def test_busy_poll_returns_from_step_within_its_slice(sock, fmt, features):
    clock = FakeClock()
    with stepped(RngDevice(Counter()), sock, clock, fmt, features, wait=WaitPolicy(busy_poll=True)) as (be, fe):
        assert not post(fe, "a")                 # busy polling: kicks off from the start
        blocks = be.stats["blocks"]
        be.step(None)
        assert used_tokens(fe) == ["a"] and be.stats["kicks"] == 0
        # nothing to do: step(None) still returns once a slice has passed
        clock.step, clock.reads, clock.max_reads = 0.001, 0, 1000
        t0 = clock.t
        be.step(None)
        assert SPIN_SLICE_S <= clock.t - t0 <= SPIN_SLICE_S + 0.002
        assert be.stats["blocks"] == blocks and kicks_off(fe)
        clock.max_reads = None
        be.stop()                                # and a stop ends serve_forever
        be.serve_forever()


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_socket_message_handled_while_spinning(sock, fmt):
    clock = FakeClock()
    with stepped(RngDevice(Counter()), sock, clock, fmt) as (be, fe):
        assert post(fe, "a")
        fe.kick(0, force=True)
        be.step(0)
        assert used_tokens(fe) == ["a"]
        fe.send_raw(encode(Request.GET_FEATURES, b""))
        messages, blocks = be.stats["messages"], be.stats["blocks"]
        clock.step, clock.max_reads, clock.reads = 10e-6, 1000, 0   # the window is 10 reads long
        be.step(None)
        assert be.stats["messages"] == messages + 1
        assert parse_u64(fe.recv_reply()) >> 30 & 1
        assert be._wait.spinning and be.stats["blocks"] == blocks and kicks_off(fe)


class Hoarder(VirtioDevice):
    """Leaves the driver's buffers posted (an RX queue waiting for host data)."""

    device_id = 4
    name = "hoarder"
    calls = 0

    def handle_queue(self, index, queue):
        self.calls += 1
        return False


def test_spin_does_not_hammer_a_ring_whose_chains_stay_posted(sock):
    clock = FakeClock()
    dev = Hoarder()
    with stepped(dev, sock, clock, "split", QEMU_RNG_SPLIT & ~F_EVENT_IDX,
                 wait=WaitPolicy(busy_poll=True)) as (be, fe):
        post(fe, "a")
        per_step = []
        for step in (0.001, 0.0001):             # one slice: 10 looks at the ring, then 100
            clock.step, clock.max_reads = step, clock.reads + 1000
            calls = dev.calls
            be.step(None)
            per_step.append(dev.calls - calls)
        assert per_step[0] == per_step[1]        # served once per wait, not once per look


@pytest.mark.parametrize("fmt,features", RING_KINDS[1:3], ids=RING_IDS[1:3])
def test_ring_stopped_while_spinning_is_left_with_kicks_on(sock, fmt, features):
    """GET_VRING_BASE during a spin: whoever runs the ring next (QEMU, a
    restarted back-end) must get the guest's kicks."""
    clock = FakeClock()
    with stepped(RngDevice(Counter()), sock, clock, fmt, features) as (be, fe):
        assert post(fe, "a")
        fe.kick(0, force=True)
        be.step(0)
        assert used_tokens(fe) == ["a"] and kicks_off(fe)
        fe.request(Request.SET_VRING_ENABLE, encode_vring_state(0, 0))
        fe.request(Request.GET_VRING_BASE, encode_vring_state(0, 0))
        be.step(0)
        assert parse_vring_state(fe.recv_reply()).num == (1 if fmt == "split" else 0x80018001)
        assert not kicks_off(fe) and not be._wait.quiet


def test_cli_wait_options(sock, tmp_path):
    from vmsgamp.cli import main

    assert main(["vhost-user", "--socket", str(sock), "--device", "rng", "--spin-us", "-1"]) == 2


# ---- the command ------------------------------------------------------------------------------

def test_cli_serves_until_sigterm(sock, tmp_path):
    import json
    import subprocess
    import sys

    src = tmp_path / "entropy"
    src.write_bytes(stream(0, 4096))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.Popen([sys.executable, "-m", "vmsgamp", "vhost-user", "--socket", str(sock),
                          "--device", f"rng:{src}", "--json"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        info = json.loads(p.stdout.readline())
        assert info["socket"] == str(sock) and info["device"]["name"] == "rng"
        with FakeFrontend(str(sock)) as fe:
            fe.realize()
            fe.start(fmt="packed")
            assert read_entropy(fe) == stream(0, 64)
    finally:
        p.terminate()
        rc = p.wait(10)
    assert rc == 0
    assert not sock.exists()


@pytest.mark.parametrize("argv,match", [
    (["--device", "blk"], "needs a disk image"),
    (["--device", "net"], "unknown device"),
    (["--device", "rng", "--queues", "2"], "blk only"),
    (["--device", "blk:/nonexistent/disk.img"], "no such file"),
])
def test_cli_errors(sock, argv, match, capsys):
    from vmsgamp.cli import main

    assert main(["vhost-user", "--socket", str(sock), *argv]) == 1
    assert match in capsys.readouterr().err


def test_reconnect_seen_before_the_old_connections_eof(sock):
    """QEMU's reconnect can be readable on the listener in the same round as
    the old connection's EOF: the new front-end must not be refused."""
    be = VhostUserBackend(RngDevice(Counter()), str(sock))
    t = None
    try:
        fe = FakeFrontend(str(sock))
        be.step(1.0)                      # accept
        assert be.connected
        fe.disconnect()
        fe.connect()                      # new connection queued while the EOF is unread
        time.sleep(0.05)
        be._accept()                      # the listener first, as in the worst-case order
        assert be.connected and be.stats["connections"] == 2
        t = threading.Thread(target=be.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        t.start()
        fe.realize()
        fe.start()
        assert read_entropy(fe) == stream(0, 64)
        fe.close()
    finally:
        be.stop()
        if t is not None:
            t.join(5)
        be.close()
