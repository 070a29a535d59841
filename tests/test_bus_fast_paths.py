"""AmpBus's fast paths keep the order and the guards of the generic one:
an EVENT_AVAIL goes straight to the kick handler only when no earlier
message of the same wake-up is still waiting to be handled; a PING is
answered straight back; a kick handler's failure is the server's usual
last-resort case."""
from __future__ import annotations

import threading

import pytest

from vmsgamp._core.addrspace import AddressSpace
from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region
from vmsgamp.bus import AmpBus, DeviceServer
from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import (DeviceConnection, EventAvail, GetDeviceStatusRequest, NotificationReceived,
                              PingRequest, PingResponse, RequestReceived, decode, encode)


@pytest.fixture
def fifos():
    """(device MsgFifo, driver MsgFifo, region) over one memfd with eventfd
    doorbells, both started."""
    region = Region.memfd(1 << 20)
    dev_bell, drv_bell = EventfdDoorbell.pair()
    dev_fifo = MsgFifo(region, role="device", doorbell=dev_bell)
    drv_fifo = MsgFifo(region, role="driver", doorbell=drv_bell)
    t = threading.Thread(target=dev_fifo.start, args=(5,))
    t.start()
    drv_fifo.start(5)
    t.join()
    yield dev_fifo, drv_fifo, region
    drv_fifo.close()
    dev_fifo.close()
    dev_bell.close()
    drv_bell.close()
    region.close()


@pytest.fixture
def link(fifos):
    """(device-side AmpBus, raw driver FIFO, region)."""
    dev_fifo, drv_fifo, region = fifos
    yield AmpBus(dev_fifo, DeviceConnection()), drv_fifo, region


def _kicks(bus: AmpBus) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    bus.on_event_avail = lambda dev, vq: seen.append((dev, vq))
    return seen


def test_a_lone_kick_goes_to_the_handler_without_an_event(link):
    bus, drv, _ = link
    seen = _kicks(bus)
    drv.send(encode(EventAvail(dev_num=3, vq_index=1)))
    assert bus.poll(0) == []
    assert seen == [(3, 1)]
    assert bus.conn.counters.rx_messages == 1


def test_a_kick_behind_a_request_waits_its_turn_as_an_event(link):
    # SET_DEVICE_STATUS(DRIVER_OK) then a kick in one wake-up: served first,
    # the kick would find the device not running yet.
    bus, drv, _ = link
    seen = _kicks(bus)
    drv.send(encode(GetDeviceStatusRequest(dev_num=0, token=1)))
    drv.send(encode(EventAvail(dev_num=0, vq_index=0)))
    events = bus.poll(0)
    assert seen == []
    assert [type(e) for e in events] == [RequestReceived, NotificationReceived]
    assert events[1].message == EventAvail(dev_num=0, vq_index=0)


def test_a_kick_ahead_of_a_request_is_served_at_once(link):
    bus, drv, _ = link
    seen = _kicks(bus)
    drv.send(encode(EventAvail(dev_num=0, vq_index=2)))
    drv.send(encode(GetDeviceStatusRequest(dev_num=0, token=1)))
    events = bus.poll(0)
    assert seen == [(0, 2)]
    assert [type(e) for e in events] == [RequestReceived]


def test_without_a_handler_a_kick_is_an_event(link):
    bus, drv, _ = link
    drv.send(encode(EventAvail(dev_num=0, vq_index=0)))
    (ev,) = bus.poll(0)
    assert isinstance(ev, NotificationReceived)


def test_a_ping_is_answered_straight_back(link):
    bus, drv, _ = link
    drv.send(encode(PingRequest(token=9, data=0xABCD)))
    assert bus.poll(0) == []
    assert bus.conn.data_to_send() == []          # not left in the outbox: sent
    answer = decode(drv.recv_bytes(1))
    assert isinstance(answer, PingResponse) and (answer.token, answer.data) == (9, 0xABCD)


def test_a_failing_kick_handler_is_counted_and_the_loop_goes_on(link, monkeypatch):
    bus, drv, region = link
    server = DeviceServer(bus, AddressSpace.identity(region), [RngDevice("zero")], claim=False)

    def broken(dev_num: int, vq_index: int) -> None:
        raise RuntimeError("bug in the kick path")

    monkeypatch.setattr(server, "_kick", broken)
    drv.send(encode(EventAvail(dev_num=0, vq_index=0)))
    server.step(0)
    assert server.dispatch_errors == 1
    drv.send(encode(PingRequest(token=2, data=5)))
    server.step(0)
    got = [decode(drv.recv_bytes(1)) for _ in range(drv.pending())]
    assert got[-1] == PingResponse(token=2, data=5)   # after the EVENT_CONFIG that says NEEDS_RESET


class _CountingFifo:
    """The device's MsgFifo, with ``wait_readable`` counted and, on its
    first call, the driver's next message sent first (a peer answering
    during the wait, without timing)."""

    def __init__(self, fifo: MsgFifo, inject=None):
        object.__setattr__(self, "_fifo", fifo)
        object.__setattr__(self, "waits", [])
        object.__setattr__(self, "_inject", inject)

    def wait_readable(self, timeout=None):
        self.waits.append(timeout)
        inject = self._inject
        if inject is not None:
            object.__setattr__(self, "_inject", None)
            inject()
        return self._fifo.wait_readable(timeout)

    def __getattr__(self, name):
        return getattr(self._fifo, name)

    def __setattr__(self, name, value):
        setattr(self._fifo, name, value)


def test_after_a_ping_the_drain_lingers_and_takes_the_next_one(link):
    bus, drv, _ = link
    fifo = _CountingFifo(bus.fifo, inject=lambda: drv.send(encode(PingRequest(token=2, data=2))))
    bus.fifo = fifo
    drv.send(encode(PingRequest(token=1, data=1)))
    assert bus.poll(0) == []
    assert bus.conn.counters.pings_answered == 2        # the second came during the linger
    assert [decode(drv.recv_bytes(1)).data for _ in range(2)] == [1, 2]
    assert len(fifo.waits) == 2                          # lingered again after the second, in vain
    assert all(0 < t <= 20e-6 for t in fifo.waits)


def test_no_linger_without_a_fast_path_exchange_or_without_spinning(link):
    from vmsgamp.bus._wait import Waiter, WaitPolicy

    bus, drv, _ = link
    fifo = _CountingFifo(bus.fifo)
    bus.fifo = fifo
    drv.send(encode(GetDeviceStatusRequest(dev_num=0, token=1)))   # an event for the caller
    assert len(bus.poll(0)) == 1 and fifo.waits == []
    bus.waiter = Waiter(WaitPolicy(spin_us=0))                    # the policy does not spin
    drv.send(encode(PingRequest(token=2, data=2)))
    assert bus.poll(0) == [] and fifo.waits == []
    assert decode(drv.recv_bytes(1)).data == 2


def test_a_peer_that_never_stops_sending_cannot_hold_the_loop(link):
    # recv_many never comes back empty: the drain still returns, so the
    # loop's housekeeping (timeouts, liveness, fds, Ctrl-C) gets its turn.
    bus, drv, _ = link

    class Flood(_CountingFifo):
        def recv_many(self, max_count=None):
            return [encode(PingRequest(token=1, data=7))]

    bus.fifo = Flood(bus.fifo)
    assert bus.poll(0) == []
    answered = bus.conn.counters.pings_answered
    assert 1 <= answered <= 64
    assert bus.poll(0) == [] and bus.conn.counters.pings_answered == 2 * answered


def test_await_reply_reports_a_peer_that_left_while_it_spun(fifos):
    # The wait that meets the peer's SHUTDOWN ends the session there and
    # says so: the FIFO has stopped, a later poll() could not tell why.
    from vmsgamp.bus import PeerLost
    from vmsgamp.protocol import DriverConnection

    dev_fifo, drv_fifo, _ = fifos
    bus = AmpBus(drv_fifo, DriverConnection())
    dev_fifo.close()                       # the device side shuts down
    events = bus.await_reply()
    assert [type(e) for e in events] == [PeerLost] and not bus.up
