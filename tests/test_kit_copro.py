"""The copro: region URI and its UART doorbell, without QEMU: a UNIX socket
or a pseudo-terminal plays the co-processor's UART."""
import os
import select
import socket
import threading
import time

import pytest

from vmsgamp._core.fifo import MsgFifo
from vmsgamp.carriers import open_carrier, parse_uri, schemes
from vmsgamp.carriers.copro import UartDoorbell


@pytest.fixture
def memfile(tmp_path):
    p = tmp_path / "psram"
    with open(p, "wb") as f:
        f.truncate(64 << 10)
    return p


@pytest.fixture
def uart_server(tmp_path):
    path = str(tmp_path / "uart.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    yield path, srv
    srv.close()


def test_scheme_is_registered_and_parsed():
    assert "copro" in schemes()
    assert parse_uri("copro:/dev/shm/x#uart=/tmp/s.sock&bus_base=0x21000000") == \
        ("copro", "/dev/shm/x", {"uart": "/tmp/s.sock", "bus_base": "0x21000000"})


def test_polling_copro_maps_the_file_at_its_bus_base(memfile):
    with open_carrier(f"copro:{memfile}#bus_base=0x21000000&offset=0x1000") as c:
        assert c.region.bus_base == 0x21000000 and c.offset == 0x1000 and c.region.size == 64 << 10
        assert not c.doorbell.can_wait


def test_uart_doorbell_over_a_socket(memfile, uart_server):
    path, srv = uart_server
    with open_carrier(f"copro:{memfile}#uart={path}&bus_base=0x21000000") as c:
        peer, _ = srv.accept()
        bell = c.doorbell
        assert isinstance(bell, UartDoorbell) and bell.can_wait
        bell.ring()
        assert peer.recv(16) == b"\x01"
        assert not bell.wait(0.01)                    # nothing rang
        peer.sendall(b"\x01\x01\x01")                 # rings coalesce into one wake-up
        assert bell.wait(1.0)
        assert not bell.wait(0.01)
        assert bell.wakeup_count == 1 and bell.ring_count == 1
        # an event loop waits on fileno()
        peer.sendall(b"x")
        assert select.select([bell.fileno()], [], [], 1.0)[0]
        bell.drain()
        assert not select.select([bell.fileno()], [], [], 0)[0]
        # the emulator goes away: waits stop blocking, rings are dropped, nothing raises
        peer.close()
        t0 = time.monotonic()
        assert not bell.wait(0.2)
        assert bell.peer_gone and not bell.can_wait
        bell.ring()
        assert not bell.wait(0.05)
        assert time.monotonic() - t0 < 1.0
    assert bell.closed
    bell.close()   # idempotent


def test_uart_doorbell_over_a_tty(memfile):
    master, slave = os.openpty()
    try:
        with open_carrier(f"copro:{memfile}#uart={os.ttyname(slave)}&baud=115200") as c:
            c.doorbell.ring()
            assert select.select([master], [], [], 1.0)[0] and os.read(master, 16) == b"\x01"
            os.write(master, b"\x01")
            assert c.doorbell.wait(1.0)
    finally:
        os.close(master)
        os.close(slave)


def test_fifo_sleeps_on_the_uart_doorbell(memfile, uart_server):
    """The driver FIFO sets WAITING before sleeping and wakes on a UART byte."""
    path, srv = uart_server
    with open_carrier(f"copro:{memfile}#uart={path}") as c:
        peer, _ = srv.accept()
        fifo = MsgFifo(c.region, role="driver", doorbell=c.doorbell)
        assert fifo.doorbell is c.doorbell
        woke = threading.Event()

        def sleeper():
            c.doorbell.wait(5.0)
            woke.set()

        t = threading.Thread(target=sleeper)
        t.start()
        time.sleep(0.05)
        assert not woke.is_set()
        peer.sendall(b"\x01")
        t.join(5)
        assert woke.is_set()
        peer.close()
        fifo.close()


@pytest.mark.parametrize("uri, error, match", [
    ("copro:", ValueError, "needs the path"),
    ("copro:{mem}#create=1&size=4K", ValueError, "unknown option create"),   # never creates it
    ("copro:{mem}#uart={mem}", ValueError, "neither a UNIX socket nor a character device"),
    ("copro:{mem}#uart={missing}&timeout=0.05", FileNotFoundError, "no such socket or tty"),
    ("copro:{missing}#timeout=0.05", FileNotFoundError, "start the co-processor"),
    ("copro:{mem}#uart=/dev/null&baud=12345", ValueError, "baud"),
    ("copro:{mem}#doorbell=uart", ValueError, "unknown option"),
])
def test_bad_copro_uris(memfile, tmp_path, uri, error, match):
    with pytest.raises(error, match=match):
        open_carrier(uri.format(mem=memfile, missing=tmp_path / "missing"))


def test_uart_socket_nobody_listening(memfile, tmp_path):
    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)   # bound, never listening: connect is refused
    try:
        with pytest.raises(ConnectionRefusedError, match="nobody listens"):
            open_carrier(f"copro:{memfile}#uart={path}&timeout=0.05")
    finally:
        s.close()
