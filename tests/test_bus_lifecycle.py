"""Peer restart, hot-plug, keepalive: two processes over one region."""
import os
import signal
import time

import pytest

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region
from vmsgamp.bus import AmpBus, AmpDriver, BusError, DeviceServer, PeerLost
from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import DeviceConnection, DriverConnection
from vmsgamp.testing.amp import DRIVER_MEMORY_START, amp_pair


def _entropy(drv, dev_num, n=32):
    dev = drv.open(dev_num)
    addr, view = dev.alloc(n)
    dev.queues[0].add([], [(addr, n)])
    dev.notify(0)
    assert dev.wait_used(0, 5)
    return dev.queues[0].get_used()[1]


def _driver(region, bell, timeout=5.0):
    fifo = MsgFifo(region, role="driver", doorbell=bell)
    bus = AmpBus(fifo, DriverConnection())
    bus.start(timeout)
    return AmpDriver(bus, RegionAllocator(region, DRIVER_MEMORY_START))


def _fork_server(region, bell, stop_after=None):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fifo = MsgFifo(region, role="device", doorbell=bell)
            server = DeviceServer(AmpBus(fifo, DeviceConnection()), AddressSpace.identity(region),
                                  [RngDevice()], handshake_timeout=0.2)
            stopping = []
            signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
            while not stopping:
                server.step(0.05)
            fifo.close()
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def _stop(pid):
    os.kill(pid, signal.SIGTERM)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_driver_restart_gets_a_fresh_session():
    region = Region.memfd(4 << 20)
    dev_bell, drv_bell = EventfdDoorbell.pair()
    pid = _fork_server(region, dev_bell)
    try:
        drv = _driver(region, drv_bell)
        assert drv.enumerate() == [0] and _entropy(drv, 0) == 32
        drv.bus.close()               # SHUTDOWN: the device side resets everything
        for _ in range(3):            # like a module reload: INIT, READY, RUN again
            drv = _driver(region, drv_bell)
            assert drv.enumerate() == [0]
            assert _entropy(drv, 0, 64) == 64
            drv.bus.close()
    finally:
        _stop(pid)


def test_device_restart_is_seen_and_recovered():
    region = Region.memfd(4 << 20)
    dev_bell, drv_bell = EventfdDoorbell.pair()
    pid = _fork_server(region, dev_bell)
    drv = _driver(region, drv_bell)
    assert _entropy(drv, 0) == 32
    _stop(pid)                         # device side goes away (SHUTDOWN)
    with pytest.raises(BusError):
        for _ in range(50):
            drv.ping(1, timeout=0.2)
    assert drv.peer_lost and drv.peer_lost[-1].event in ("shutdown", "dead", "restart")
    assert drv.devices == {}
    pid = _fork_server(region, dev_bell)  # comes back
    try:
        drv.bus.start(5)
        assert drv.enumerate() == [0]
        assert _entropy(drv, 0) == 32
        assert drv.bus.sessions == 2
    finally:
        drv.bus.close()
        _stop(pid)


def test_hot_plug_and_unplug():
    r, w = os.pipe()

    def hook(server):
        def on_cmd():
            cmd = os.read(r, 1)
            if cmd == b"+":
                server.add_device(RngDevice(), 5)
            elif cmd == b"-":
                server.remove_device(0)
        server.add_fd(r, on_cmd)

    with amp_pair(lambda: [RngDevice()], server_hook=hook) as drv:
        assert drv.enumerate() == [0]
        dev0 = drv.open(0)
        os.write(w, b"+")
        for _ in range(100):
            drv.pump(0.05)
            if ("ready", 5) in drv.hotplug:
                break
        assert ("ready", 5) in drv.hotplug
        assert drv.enumerate() == [0, 5]
        assert _entropy(drv, 5) == 32
        os.write(w, b"-")
        for _ in range(100):
            drv.pump(0.05)
            if ("removed", 0) in drv.hotplug:
                break
        assert ("removed", 0) in drv.hotplug and dev0.removed
        assert drv.enumerate() == [5]


def test_keepalive_declares_a_silent_peer_dead():
    """A device side that stops answering (hung, not shut down) is declared
    dead after N missed pings instead of being waited for forever."""
    region = Region.memfd(1 << 20)
    dev_bell, drv_bell = EventfdDoorbell.pair()
    dev_fifo = MsgFifo(region, role="device", doorbell=dev_bell)
    import threading
    t = threading.Thread(target=dev_fifo.start, args=(5,))
    t.start()
    drv = _driver(region, drv_bell)
    t.join()
    drv.bus.keepalive(0.05, misses=3)
    # the device answers nothing: its FIFO is up but nobody serves it
    events = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(isinstance(e, PeerLost) for e in events):
        events += drv.bus.poll(0.02)
    lost = [e for e in events if isinstance(e, PeerLost)]
    assert lost and lost[0].event == "dead" and not drv.bus.up


def test_keepalive_quiet_with_a_live_peer():
    with amp_pair(lambda: [RngDevice()]) as drv:
        # generous margins: a loaded CI machine must not make a live peer "dead"
        drv.bus.keepalive(0.1, misses=5)
        deadline = time.monotonic() + 10
        while len(drv.bus.keepalive_rtts) < 3 and time.monotonic() < deadline:
            drv.pump(0.05)
        assert drv.bus.up and len(drv.bus.keepalive_rtts) >= 3
        assert drv._done == []   # keepalive answers are consumed by the bus
