"""virtio-console: the device model through the mock driver (including
malformed requests), and device against client in two processes over the
AMP bus, split and packed rings."""
from __future__ import annotations

import asyncio
import os
import select
import socket
import struct

import pytest

from vmsgamp._core.region import Region
from vmsgamp.devices._base import parse_device_list
from vmsgamp.devices.console import (
    CONSOLE_PORT, CONTROL, DEVICE_READY, PORT_ADD, PORT_NAME, PORT_OPEN, PORT_READY, PORT_REMOVE, RESIZE,
    VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE, CallbackBackend,
    ConsoleDevice, ConsolePort, EchoBackend, FdBackend, PtyBackend, SocketBackend,
)
from vmsgamp.devices.console_client import ConsoleClient, open_console_streams
from vmsgamp.testing.amp import amp_pair
from vmsgamp.testing.virtq_mock import MockDriver

FMTS = ["split", "packed"]


# ---- mock-driver harness -----------------------------------------------------------------

class Rig:
    """A ConsoleDevice with every queue backed by its own MockDriver in one
    region, activated with ``features``."""

    def __init__(self, dev: ConsoleDevice, fmt: str, features: int = 0, size: int = 16) -> None:
        self.dev = dev
        self.region = Region.memfd(4 << 20)
        self.drv = [MockDriver(self.region, fmt, size=size, buf_size=512, nbufs=2 * size,
                               ring_offset=i * (256 << 10)) for i in range(dev.num_queues)]
        self.q = [m.device_queue() for m in self.drv]
        self.notified: list[int] = []
        dev._notify_queue = self.notified.append
        dev.activate(self.q, features)

    def kick(self, i: int) -> bool:
        return self.dev.handle_queue(i, self.q[i])

    def used(self, i: int) -> list[tuple[object, int, bytes]]:
        out = []
        while (u := self.drv[i].get_used()) is not None:
            out.append(u)
        return out

    def control(self, port: int, event: int, value: int) -> None:
        assert self.drv[3].add_chain([CONTROL.pack(port, event, value)], token="ctl")
        self.kick(3)
        assert [ln for _, ln, _ in self.used(3)] == [0]

    def control_msgs(self) -> list[tuple[int, int, int, bytes]]:
        out = []
        for tok, ln, data in self.used(2):
            if tok == "c":   # re-post, as a driver does
                assert self.drv[2].add_chain([], [128], token="c")
            out.append(CONTROL.unpack_from(data) + (data[CONTROL.size:ln],) if ln else (tok, ln))
        self.kick(2)
        return out

    def close(self) -> None:
        self.dev.close()
        for m in self.drv:
            m.close()
        self.region.close()


@pytest.fixture(params=FMTS)
def fmt(request):
    return request.param


def test_echo_through_a_stream_backend(fmt):
    be = CallbackBackend()
    rig = Rig(ConsoleDevice(be), fmt)
    try:
        # driver output -> backend
        assert rig.drv[1].add_chain([b"hello ", b"world"], token="tx")
        assert rig.kick(1)
        assert rig.used(1) == [("tx", 0, b"")]
        assert bytes(be.output) == b"hello world"
        # host input before any receive buffer: kept, then delivered
        rig.dev.input(0, b"abc")
        assert rig.used(0) == []
        assert rig.drv[0].add_chain([], [2], token="r1") and rig.drv[0].add_chain([], [64], token="r2")
        assert rig.kick(0)
        assert rig.used(0) == [("r1", 2, b"ab"), ("r2", 1, b"c")]
        # buffer held, input arrives later: device-initiated notification
        assert rig.drv[0].add_chain([], [64], token="r3")
        assert not rig.kick(0)
        be.feed(b"xyz")
        rig.dev.on_fd_ready(be.input_fds()[0])
        assert rig.used(0) == [("r3", 3, b"xyz")] and rig.notified == [0]
    finally:
        rig.close()


def test_echo_backend_answers_within_the_transmit_kick(fmt):
    # The echo reaches the receive buffer in the same handle_queue call that
    # took the output (no wait for the loop to look at a wake-up pipe), and
    # a callback that answers at once through feed() is delivered there too.
    for backend in (EchoBackend(), CallbackBackend()):
        if not isinstance(backend, EchoBackend):
            backend.on_output = backend.feed
        rig = Rig(ConsoleDevice(backend), fmt)
        try:
            assert rig.drv[0].add_chain([], [64], token="r1")
            assert not rig.kick(0)
            assert rig.drv[1].add_chain([b"ping"], token="tx")
            assert rig.kick(1)
            assert rig.used(1) == [("tx", 0, b"")]
            assert rig.used(0) == [("r1", 4, b"ping")] and rig.notified == [0]
        finally:
            rig.close()


def test_malformed_receive_and_transmit_buffers(fmt):
    be = CallbackBackend()
    rig = Rig(ConsoleDevice(be), fmt)
    try:
        rx = rig.drv[0]
        # readable-only, zero-length writable, readable+writable: all returned unused
        assert rx.add_chain([b"bad"], [], token="ro")
        assert rx.add_sg([], [(rx.buffer(), 0)], token="zero")
        assert rx.add_chain([b"x"], [16], token="mixed")
        assert rx.add_chain([], [16], token="good")
        assert rig.kick(0)
        assert rig.used(0) == [("ro", 0, b""), ("zero", 0, b""), ("mixed", 0, b"")]
        rig.dev.input(0, b"ok")
        assert rig.used(0) == [("good", 2, b"ok")]
        # a transmit buffer with a writable part: data not output, used length 0
        assert rig.drv[1].add_chain([b"nope"], [8], token="w")
        # a zero-length transmit buffer
        assert rig.drv[1].add_sg([(rig.drv[1].buffer(), 0)], [], token="empty")
        # an oversized one (pointing at a big part of the region) is dropped, not copied
        assert rig.drv[1].add_sg([(rig.region.bus_base, 1 << 20)], [], token="huge")
        assert rig.kick(1)
        assert [(t, ln) for t, ln, _ in rig.used(1)] == [("w", 0), ("empty", 0), ("huge", 0)]
        assert bytes(be.output) == b""
        c = rig.dev.counters()
        assert c["malformed"] == 4 and c["port0"]["tx_dropped"] == 1 << 20
        # the queue still works
        assert rig.drv[1].add_chain([b"fine"], token="t")
        rig.kick(1)
        assert bytes(be.output) == b"fine"
    finally:
        rig.close()


def test_rx_bound_counts_drops_and_fd_backends_pause():
    be = CallbackBackend()
    r, w = os.pipe()
    fdb = FdBackend(r, None)
    dev = ConsoleDevice([ConsolePort(0, be, rx_limit=8), ConsolePort(1, fdb, rx_limit=8)])
    rig = Rig(dev, "split", features=1 << VIRTIO_CONSOLE_F_MULTIPORT)
    try:
        be.feed(b"0123456789AB")
        dev.on_fd_ready(be.input_fds()[0])
        assert dev.ports[0].pending == b"01234567" and dev.ports[0].rx_dropped == 4
        # an fd backend is read only up to the bound, then not polled: nothing lost
        os.write(w, b"abcdefghijkl")
        dev.on_fd_ready(r)
        assert dev.ports[1].pending == b"abcdefgh" and dev.ports[1].rx_dropped == 0
        assert r not in dev.poll_fds()
    finally:
        rig.close()
        os.close(w)


def test_queues_of_absent_ports_and_unnegotiated_control_are_returned(fmt):
    rig = Rig(ConsoleDevice([CallbackBackend(), CallbackBackend()]), fmt, features=0)
    try:
        assert rig.dev.num_queues == 6
        for i in (2, 3, 4, 5):   # MULTIPORT not negotiated: none of these exist
            assert rig.drv[i].add_chain([b"x"] if i % 2 else [], [] if i % 2 else [8], token=i)
            assert rig.kick(i)
            assert [(t, ln) for t, ln, _ in rig.used(i)] == [(i, 0)]
    finally:
        rig.close()


def test_multiport_control_protocol_and_bad_messages(fmt):
    p0, p1 = CallbackBackend(), CallbackBackend()
    dev = ConsoleDevice([ConsolePort(0, p0, name="con"), ConsolePort(1, p1, name="data", console=False)],
                        rows=25, cols=80, max_nr_ports=4)
    feats = 1 << VIRTIO_CONSOLE_F_MULTIPORT | 1 << VIRTIO_CONSOLE_F_SIZE
    rig = Rig(dev, fmt, features=feats)
    try:
        assert struct.unpack("<I", dev.read_config(4, 4)) == (4,)
        for _ in range(8):
            assert rig.drv[2].add_chain([], [128], token="c")
        rig.kick(2)
        # malformed control messages: short, unknown port, device-only event, bad id
        assert rig.drv[3].add_chain([b"\x00\x01"], token="short")
        rig.kick(3)
        assert [(t, ln) for t, ln, _ in rig.used(3)] == [("short", 0)]
        rig.control(7, PORT_READY, 1)          # never added
        rig.control(0xFFFFFFFF, PORT_OPEN, 1)
        rig.control(0, 99, 0)
        assert rig.control_msgs() == [] and dev.stats["malformed"] >= 4
        rig.control(0, DEVICE_READY, 1)
        assert [(p, e) for p, e, _, _ in rig.control_msgs()] == [(0, PORT_ADD), (1, PORT_ADD)]
        rig.control(0, PORT_READY, 1)
        msgs = rig.control_msgs()
        # console port: CONSOLE_PORT, RESIZE (cols first: the spec order, the default), name, host open
        assert [(p, e, v) for p, e, v, _ in msgs] == [(0, CONSOLE_PORT, 1), (0, RESIZE, 0), (0, PORT_NAME, 0),
                                                      (0, PORT_OPEN, 1)]
        assert msgs[1][3] == struct.pack("<HH", 80, 25) and msgs[2][3] == b"con"
        rig.control(0, DEVICE_READY, 1)        # duplicate: ignored
        assert rig.control_msgs() == []
        rig.control(1, PORT_READY, 1)
        assert [(e, extra) for _, e, _, extra in rig.control_msgs()] == [(PORT_NAME, b"data"), (PORT_OPEN, b"")]
        # a generic port gets input only once the driver opened it
        p1.feed(b"hi")
        dev.on_fd_ready(p1.input_fds()[0])
        assert rig.drv[4].add_chain([], [16], token="p1")
        rig.kick(4)
        assert rig.used(4) == []
        rig.control(1, PORT_OPEN, 1)
        assert rig.used(4) == [("p1", 2, b"hi")]
        # port 1 output
        assert rig.drv[5].add_chain([b"out1"], token="t")
        rig.kick(5)
        assert bytes(p1.output) == b"out1"
        # a control receive buffer too small for a message is returned unused
        dev.resize(30, 100)
        assert rig.control_msgs()[0][1] == RESIZE
        while rig.drv[2].in_flight:          # take every held buffer away first
            dev._send_control(0, RESIZE, 0, b"\0" * 4)
            rig.used(2)
        assert rig.drv[2].add_chain([], [4], token="tiny")
        rig.kick(2)
        dev.resize(31, 101)
        assert [(t, ln) for t, ln, _ in rig.used(2)] == [("tiny", 0)]
        assert dev.stats["control_dropped"] == 0 and len(dev._control_out) == 1  # kept for a real buffer
    finally:
        rig.close()


def test_port_hot_plug(fmt):
    dev = ConsoleDevice(CallbackBackend(), max_nr_ports=3)
    rig = Rig(dev, fmt, features=1 << VIRTIO_CONSOLE_F_MULTIPORT)
    try:
        for _ in range(8):
            assert rig.drv[2].add_chain([], [128], token="c")
        rig.kick(2)
        rig.control(0, DEVICE_READY, 1)
        assert [(p, e) for p, e, _, _ in rig.control_msgs()] == [(0, PORT_ADD)]
        be = CallbackBackend()
        assert dev.add_port(be, name="hot") == 1
        assert [(p, e) for p, e, _, _ in rig.control_msgs()] == [(1, PORT_ADD)]
        rig.control(1, PORT_READY, 1)
        assert [(p, e) for p, e, _, _ in rig.control_msgs()] == [(1, PORT_NAME), (1, PORT_OPEN)]
        assert rig.drv[4].add_chain([], [16], token="held")
        rig.kick(4)
        dev.remove_port(1)
        assert [(p, e) for p, e, _, _ in rig.control_msgs()] == [(1, PORT_REMOVE)]
        assert rig.used(4) == [("held", 0, b"")] and be.closed
        rig.control(1, PORT_OPEN, 1)          # a removed port: ignored
        with pytest.raises(ValueError):
            dev.add_port(CallbackBackend(), 3)
    finally:
        rig.close()


@pytest.mark.parametrize("order,config,resize", [
    (None, (80, 25), (80, 25)),                     # the default is the spec order (current Linux)
    ("spec", (80, 25), (80, 25)), ("old-linux", (80, 25), (25, 80)), ("spec-1.4", (25, 80), (80, 25))])
def test_size_order(order, config, resize):
    if order is None:
        dev = ConsoleDevice(CallbackBackend(), rows=25, cols=80)
        try:
            assert struct.unpack("<HH", dev._size_bytes(False)) == resize
        finally:
            dev.close()
        return
    dev = ConsoleDevice(CallbackBackend(), rows=25, cols=80, size_order=order)
    try:
        assert struct.unpack("<HH", dev.read_config(0, 4)) == config
        assert struct.unpack("<HH", dev._size_bytes(False)) == resize
        assert dev.features >> VIRTIO_CONSOLE_F_SIZE & 1 and not dev.features >> VIRTIO_CONSOLE_F_MULTIPORT & 1
    finally:
        dev.close()


def test_old_size_order_name_says_what_it_became():
    with pytest.raises(ValueError, match="old-linux"):
        ConsoleDevice(CallbackBackend(), rows=25, cols=80, size_order="linux")


def test_emergency_write_and_read_only_config():
    be = CallbackBackend()
    dev = ConsoleDevice(be)
    try:
        assert dev.features >> VIRTIO_CONSOLE_F_EMERG_WRITE & 1
        assert dev.write_config(8, struct.pack("<I", 0x141))   # low byte only, before activation
        assert not dev.write_config(0, b"\1\0")                   # size is read-only
        assert bytes(be.output) == b"A"
    finally:
        dev.close()


def test_reset_forgets_held_buffers_keeps_host_input(fmt):
    be = CallbackBackend()
    rig = Rig(ConsoleDevice(be), fmt)
    try:
        assert rig.drv[0].add_chain([], [16], token="old")
        rig.kick(0)
        rig.dev.reset()
        rig.dev.input(0, b"kept")
        assert rig.used(0) == [] and rig.dev.ports[0].held == collections_deque()
    finally:
        rig.close()


def test_resize_without_multiport_updates_config_and_notifies():
    rig = Rig(ConsoleDevice(CallbackBackend(), rows=24, cols=80), "split", features=1 << VIRTIO_CONSOLE_F_SIZE)
    config_events = []
    rig.dev._notify_config = lambda: config_events.append(rig.dev.config_generation)
    try:
        gen = rig.dev.config_generation
        rig.dev.resize(50, 132)
        assert struct.unpack("<HH", rig.dev.read_config(0, 4)) == (132, 50)
        assert config_events == [gen + 1]
    finally:
        rig.close()


def test_two_process_malformed_request_does_not_disturb_other_devices():
    from vmsgamp.devices.rng import RngDevice

    host, dev_end = socket.socketpair()
    fd = dev_end.detach()
    with amp_pair(lambda: [ConsoleDevice(FdBackend(fd)), RngDevice()]) as drv:
        os.close(fd)
        dev = _open(drv, False)
        # a device-readable buffer on the receiveq: handed back unused
        addr, view = dev.alloc(16)
        assert dev.queues[0].add([(addr, 16)], [], token="bad")
        dev.notify(0)
        assert dev.wait_used(0, 5)
        assert dev.queues[0].get_used() == ("bad", 0)
        assert not dev.needs_reset
        view.release()
        # the rng next to it still serves, and the console still works
        rng = drv.open(1)
        a, v = rng.alloc(32)
        rng.queues[0].add([], [(a, 32)], token="r")
        rng.notify(0)
        assert rng.wait_used(0, 5) and rng.queues[0].get_used()[1] == 32
        v.release()
        with ConsoleClient(dev) as con:
            host.sendall(b"still here")
            assert con.read_exactly(10, timeout=5) == b"still here"
    host.close()


def collections_deque():
    import collections

    return collections.deque()


def test_device_list_options(tmp_path):
    devs = parse_device_list(f"console:socket={tmp_path}/s;rows=24;cols=80,console:pty;ports=2")
    try:
        a, b = devs
        assert a.describe()["socket"] == f"{tmp_path}/s" and a.describe()["size"] == "80x24"
        assert b.describe()["pty"].startswith("/dev/") and b.max_nr_ports == 2
    finally:
        for d in devs:
            d.close()
    with pytest.raises(ValueError):
        parse_device_list("console:pty;stdio")


# ---- two processes over the AMP bus ------------------------------------------------------------

def _open(drv, packed, features=0):
    dev = drv.open(0, packed=packed, features=features, queue_sizes=[32] * 16)
    assert packed is None or dev.packed == packed
    return dev


def _recv(sock, n, timeout=5.0):
    sock.settimeout(timeout)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_two_process_write_read_echo(packed):
    host, dev_end = socket.socketpair()
    fd = dev_end.detach()
    with amp_pair(lambda: [ConsoleDevice(FdBackend(fd), rows=24, cols=80)]) as drv:
        os.close(fd)   # the device process has its own copy
        dev = _open(drv, packed, 1 << VIRTIO_CONSOLE_F_SIZE)
        con = ConsoleClient(dev)
        assert con.read_size() == (24, 80)
        # emergency write: one byte per config write, straight to the backend
        con.emergency_write(b"!?")
        assert _recv(host, 2) == b"!?"
        # client writes -> backend sees it (more than one buffer's worth)
        big = bytes(range(256)) * 40
        assert con.write(b"hello\n" + big) == 6 + len(big)
        con.flush()
        assert _recv(host, 6 + len(big)) == b"hello\n" + big
        # backend input -> client reads it
        host.sendall(b"from host\nsecond")
        assert con.readline(timeout=5) == b"from host\n"
        assert con.read_exactly(6, timeout=5) == b"second"
        assert con.read(timeout=0.05) == b""
        # echo round trip
        for i in range(5):
            con.write(b"ping %d\n" % i)
            line = _recv(host, 7)
            host.sendall(line.upper())
            assert con.readline(timeout=5) == b"PING %d\n" % i
        # re-negotiation after a reset
        con.close()
        con.close()   # idempotent
        dev.close()
        dev = _open(drv, not packed)
        with ConsoleClient(dev) as con:
            host.sendall(b"again")
            assert con.read_exactly(5, timeout=5) == b"again"
    host.close()


@pytest.mark.parametrize("packed", [False, True])
def test_two_process_pty(packed):
    pty = PtyBackend()
    path = pty.slave_path
    with amp_pair(lambda: [ConsoleDevice(pty)]) as drv:
        pty.close()   # the parent's copy; the device process keeps its own
        user = os.open(path, os.O_RDWR | os.O_NOCTTY)
        try:
            con = ConsoleClient(_open(drv, packed))
            os.write(user, b"typed\r")
            assert con.read_exactly(6, timeout=5) == b"typed\r"
            con.write(b"shown\n")
            got = b""
            while len(got) < 6 and select.select([user], [], [], 5)[0]:
                got += os.read(user, 64)
            assert got == b"shown\n"    # raw mode: no \r\n translation, no echo
            con.close()
        finally:
            os.close(user)


@pytest.mark.parametrize("packed", [False, True])
def test_two_process_multiport_and_socket_backend(tmp_path, packed):
    path = str(tmp_path / "port1.sock")
    host, dev_end = socket.socketpair()
    fd = dev_end.detach()

    def factory():
        return [ConsoleDevice([ConsolePort(0, FdBackend(fd)),
                               ConsolePort(1, SocketBackend(path), name="org.vmsgamp.data", console=False)],
                              rows=30, cols=100)]

    with amp_pair(factory) as drv:
        os.close(fd)
        dev = _open(drv, packed, 1 << VIRTIO_CONSOLE_F_MULTIPORT | 1 << VIRTIO_CONSOLE_F_SIZE)
        con = ConsoleClient(dev)
        assert con.max_nr_ports == 2
        p1 = con.port(1, timeout=5)
        p0 = con.port(0)
        con._wait(lambda: p0.size is not None and p1.name is not None, 5)
        assert p0.is_console and p0.size == (30, 100)
        assert p1.name == "org.vmsgamp.data" and not p1.is_console and not p1.host_connected
        p0.write(b"on port 0")
        assert _recv(host, 9) == b"on port 0"
        # a host client connects to the port's socket: PORT_OPEN 1 reaches the driver
        user = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        user.connect(path)
        assert con._wait(lambda: p1.host_connected, 5)
        user.sendall(b"early")           # held by the device until the driver opens the port
        assert p1.read(timeout=0.2) == b""
        p1.open()
        assert p1.read_exactly(5, timeout=5) == b"early"
        p1.write(b"reply")
        assert _recv(user, 5) == b"reply"
        user.close()
        assert con._wait(lambda: not p1.host_connected, 5)
        con.close()
    host.close()


def test_two_process_asyncio_streams():
    host, dev_end = socket.socketpair()
    fd = dev_end.detach()
    with amp_pair(lambda: [ConsoleDevice(FdBackend(fd))]) as drv:
        os.close(fd)
        con = ConsoleClient(_open(drv, None))

        async def main():
            reader, writer = await open_console_streams(con.port(0))
            writer.write(b"async hello\n")
            await writer.drain()
            line = await asyncio.to_thread(_recv, host, 12)
            host.sendall(line[::-1][1:] + b"\n")
            got = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            await writer.wait_closed()
            return line, got

        line, got = asyncio.run(main())
        con.close()
        assert line == b"async hello\n" and got == b"olleh cnysa\n"
    host.close()
