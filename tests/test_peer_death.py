"""Issue: a peer killed with SIGKILL is noticed late.

Over ivshmem the server's disconnect notice ends the session at once; over
carriers without a notice the liveness rule (AmpBus: a peer silent for
`liveness` seconds while our requests wait is dead, after one probe PING)
does.  Either way the driver gets the error a graceful exit gives ("the peer
went away"), never its request timeout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region
from vmsgamp.bus import AmpBus, AmpDriver, BusError, DeviceServer, PeerLost
from vmsgamp.bus._amp import DEFAULT_LIVENESS_S
from vmsgamp.carriers import open_carrier
from vmsgamp.carriers.ivshmem import IvshmemServer
from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import (
    DeviceConnection, DriverConnection, GetShmRequest, PingRequest, RequestCancelled, decode, encode,
)

REQUEST_TIMEOUT = 60.0     # far beyond what any test below may take


# ---- the liveness rule, on a fake clock -------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _pair(clock):
    region = Region.memfd(1 << 20)
    dev = MsgFifo(region, role="device")
    drv = MsgFifo(region, role="driver")
    t = threading.Thread(target=dev.start, args=(5,))
    t.start()
    drv.start(5)
    t.join()
    bus = AmpBus(drv, DriverConnection(request_timeout=REQUEST_TIMEOUT), clock=clock, liveness=3.0)
    return region, dev, bus


def test_a_silent_peer_is_probed_then_declared_dead():
    clock = Clock()
    region, dev, bus = _pair(clock)
    bus.send(PingRequest(data=1))
    assert bus.poll(0) == []
    dev.recv_bytes(1)                       # consumed, never answered: the peer then dies
    clock.t += 1.1
    assert bus.poll(0) == [] and bus.probes_sent == 1
    probe = decode(dev.recv_bytes(1))
    assert isinstance(probe, PingRequest) and probe.data >> 24 == 0x7E
    clock.t += 2.0
    events = bus.poll(0)
    assert [type(e) for e in events] == [RequestCancelled, PeerLost]
    assert events[-1].event == "dead" and not bus.up


def test_a_live_peer_that_ignores_a_request_is_not_dead():
    """QEMU never answers GET_SHM: the request times out, the peer lives."""
    clock = Clock()
    region, dev, bus = _pair(clock)
    bus.send(GetShmRequest(dev_num=0, index=0), timeout=10.0)
    dev.recv_bytes(1)
    for _ in range(8):                      # 8 s of silence about GET_SHM
        clock.t += 1.0
        bus.poll(0)
        while True:
            try:
                raw = dev.recv_bytes(0.01)
            except TimeoutError:
                break
            req = decode(raw)
            dev.send(encode(_pong(req)), 1)
        assert bus.up
    assert bus.probes_sent >= 2
    clock.t += 3.0
    events = bus.poll(0)
    assert any(type(e).__name__ == "RequestTimedOut" for e in events) and bus.up
    assert bus.conn.counters.rx_unsolicited == 0        # probe answers never reach the connection


def _pong(req):
    from vmsgamp.protocol import PingResponse
    return PingResponse(data=req.data, token=req.token)


def test_an_idle_bus_sends_nothing():
    clock = Clock()
    region, dev, bus = _pair(clock)
    for _ in range(10):
        clock.t += 5
        assert bus.poll(0) == []
    assert bus.probes_sent == 0 and bus.up and dev.pending() == 0


# ---- SIGKILL, for real ----------------------------------------------------------------------

def _serve_in_child(uri: str) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            carrier = open_carrier(uri, wait_peer=0)
            fifo = MsgFifo(carrier.region, role="device", offset=carrier.offset, doorbell=carrier.doorbell)
            bus = AmpBus(fifo, DeviceConnection())
            bus.watch_carrier(carrier)
            server = DeviceServer(bus, AddressSpace.identity(carrier.region), [RngDevice()],
                                  handshake_timeout=0.1)
            while True:
                server.step(0.05)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def _kill_while_pinging(drv: AmpDriver, pid: int) -> tuple[Exception, float]:
    """Ping until the device process, SIGKILLed meanwhile, is noticed gone."""
    assert drv.ping(3)["count"] == 3
    killed = []
    timer = threading.Timer(0.3, lambda: (os.kill(pid, signal.SIGKILL), killed.append(time.monotonic())))
    timer.start()
    try:
        with pytest.raises((BusError, TimeoutError)) as info:
            drv.ping(10_000_000, timeout=REQUEST_TIMEOUT)
    finally:
        timer.join()
        os.waitpid(pid, 0)
    return info.value, time.monotonic() - killed[0]


def test_sigkill_over_ivshmem_is_the_disconnect_notice(tmp_path):
    sock = str(tmp_path / "ivshmem.sock")
    with IvshmemServer(sock, 1 << 20) as srv:
        srv.start_thread()
        pid = _serve_in_child(f"ivshmem:{sock}")
        with open_carrier(f"ivshmem:{sock}") as carrier:
            fifo = MsgFifo(carrier.region, role="driver", offset=carrier.offset, doorbell=carrier.doorbell)
            bus = AmpBus(fifo, DriverConnection(request_timeout=REQUEST_TIMEOUT), liveness=None)
            bus.watch_carrier(carrier)     # the notice alone, no liveness rule
            bus.start(10)
            drv = AmpDriver(bus, RegionAllocator(carrier.region, 16384))
            err, after = _kill_while_pinging(drv, pid)
            fifo.close()
    assert isinstance(err, BusError) and "the peer went away" in str(err), err
    assert drv.peer_lost[-1].event == "dead" and "disconnected" in drv.peer_lost[-1].peer_state
    # The notice, not the 60 s request timeout nor the 3 s liveness rule
    # (the bound the issue asks for is 1 s; leave room for a loaded machine).
    assert after < DEFAULT_LIVENESS_S, after


def test_sigkill_over_shm_is_the_liveness_rule():
    region = Region.memfd(1 << 20)
    from vmsgamp._core.doorbell import EventfdDoorbell
    dev_bell, drv_bell = EventfdDoorbell.pair()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fifo = MsgFifo(region, role="device", doorbell=dev_bell)
            server = DeviceServer(AmpBus(fifo, DeviceConnection()), AddressSpace.identity(region),
                                  [RngDevice()], handshake_timeout=0.1)
            while True:
                server.step(0.05)
        except BaseException:
            code = 1
        os._exit(code)
    fifo = MsgFifo(region, role="driver", doorbell=drv_bell)
    bus = AmpBus(fifo, DriverConnection(request_timeout=REQUEST_TIMEOUT))   # default liveness
    bus.start(10)
    drv = AmpDriver(bus, RegionAllocator(region, 16384))
    err, after = _kill_while_pinging(drv, pid)
    assert isinstance(err, BusError) and "the peer went away" in str(err), err
    assert drv.peer_lost[-1].event == "dead"
    assert after < REQUEST_TIMEOUT / 4, after       # the rule (3 s), not the request timeout


_DRIVER_UNTIL_KILLED = """
import sys
from vmsgamp._core.addrspace import RegionAllocator
from vmsgamp._core.fifo import MsgFifo
from vmsgamp.bus import AmpBus, AmpDriver
from vmsgamp.carriers import open_carrier
from vmsgamp.protocol import DriverConnection
carrier = open_carrier(sys.argv[1])
fifo = MsgFifo(carrier.region, role="driver", offset=carrier.offset, doorbell=carrier.doorbell)
bus = AmpBus(fifo, DriverConnection())
bus.start(30)
drv = AmpDriver(bus, RegionAllocator(carrier.region, 16384))
drv.ping(2)
print("up", flush=True)
while True:
    drv.ping(100)
"""


def test_a_killed_driver_resets_the_device_side_over_ivshmem(tmp_path):
    """The device side hears of its driver's death from the server too, and
    waits for the next driver's handshake (the dead one stays RUN forever)."""
    sock = str(tmp_path / "ivshmem.sock")
    with IvshmemServer(sock, 1 << 20) as srv:
        srv.start_thread()
        serve = subprocess.Popen([sys.executable, "-m", "vmsgamp", "-v", "serve", "--region",
                                  f"ivshmem:{sock}", "--devices", "rng"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            serve.stdout.readline()
            ping = subprocess.Popen([sys.executable, "-c", _DRIVER_UNTIL_KILLED, f"ivshmem:{sock}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert ping.stdout.readline().strip() == "up", ping.stderr.read()
            ping.send_signal(signal.SIGKILL)
            ping.communicate(timeout=20)
            p = subprocess.run([sys.executable, "-m", "vmsgamp", "ping", "--region", f"ivshmem:{sock}",
                                "-n", "3"], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr
        finally:
            serve.send_signal(signal.SIGTERM)
            out, err = serve.communicate(timeout=20)
    assert serve.returncode == 0, err
    assert "the carrier says peer" in err and "went away" in err, err[-2000:]
