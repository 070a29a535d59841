"""The passive observer against real FIFOs: exact when it keeps up, honest
(Missed, never garbage) when it does not, and untouched by a hostile peer."""
from __future__ import annotations

import struct

import threading
import time

import pytest

from conftest import start_pair
from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region
from vmsgamp.protocol import (
    GetDeviceStatusRequest, GetDeviceStatusResponse, PingRequest, PingResponse, encode,
)
from vmsgamp.trace import DIR_INBOUND, DIR_OUTBOUND, Missed, Notice, Observer, Seen

SLOTS = {"b": 63, "a": 62}


class Bus:
    """A device and a driver FIFO over one memfd, and a read-only mapping of it."""

    def __init__(self, layout: str, profile: str = "g2"):
        self.layout = layout
        self.profile = profile
        self.region = Region.memfd(16384)
        self.ro = Region.from_fd(self.region.fd, self.region.size, readonly=True)
        self.bells = EventfdDoorbell.pair()
        self.dev = self.drv = None

    def start(self):
        self.dev = MsgFifo(self.region, role="device", layout=self.layout, doorbell=self.bells[0],
                           header=self.profile)
        self.drv = MsgFifo(self.region, role="driver", layout=self.layout, doorbell=self.bells[1],
                           header=self.profile)
        start_pair(self.dev, self.drv)

    def restart_driver(self):
        self.drv.close()
        self.drv = MsgFifo(self.region, role="driver", layout=self.layout, doorbell=self.bells[1])
        start_pair(self.dev, self.drv)

    def request(self, i: int) -> tuple[bytes, bytes]:
        req = encode(GetDeviceStatusRequest(dev_num=1, token=i & 0xFFFF or 1), profile=self.profile)
        resp = encode(GetDeviceStatusResponse(dev_num=1, token=i & 0xFFFF or 1, status=i & 0xFF),
                      profile=self.profile)
        assert self.drv.try_send(req)
        assert self.dev.recv_bytes(1) == req
        assert self.dev.try_send(resp)
        assert self.drv.recv_bytes(1) == resp
        return req, resp

    def close(self):
        for f in (self.drv, self.dev):
            if f is not None:
                f.close()
        for b in self.bells:
            b.close()
        self.ro.close()
        self.region.close()


@pytest.fixture(params=["b", "a"])
def bus(request):
    b = Bus(request.param)
    yield b
    b.close()


def _observer(bus, **kw):
    return Observer(bus.ro, layout=bus.layout, window=8192, profile=bus.profile, **kw)


def _seen(recs):
    return [(r.direction, r.data) for r in recs if isinstance(r, Seen)]


def _missed(recs):
    return [r for r in recs if isinstance(r, Missed)]


def test_layout_appearing_late_then_every_message_in_order(bus):
    obs = _observer(bus)
    first = obs.poll()
    if bus.layout == "b":
        assert [r.text for r in first] == ["waiting for the device side to write the layout"]
        assert obs.poll() == []                    # the same notice is not repeated
    bus.start()
    obs._next_layout_check = 0
    up = obs.poll()
    assert any(isinstance(r, Notice) and r.up for r in up + first)
    expected = []
    for i in range(1, 200):                        # more than three rings' worth
        req, resp = bus.request(i)
        expected += [(DIR_OUTBOUND, req), (DIR_INBOUND, resp)]
        if i % 20 == 0:                            # look every 40 messages: always in time
            got = obs.poll()
            assert not _missed(got)
            assert _seen(got) == expected          # requests before their responses
            expected = []
    assert _seen(obs.poll()) == expected
    assert obs.missed == 0 and obs.seen == 2 * 199


@pytest.mark.parametrize("profile", ["g2", "g1"])
def test_each_response_follows_its_request_within_one_look(profile):
    """Requests and responses that pile up between two looks come out
    interleaved as they happened, also without tokens (G1); a request from
    the device side and the driver's answer too."""
    bus = Bus("b", profile)
    try:
        bus.start()
        obs = _observer(bus)
        obs.poll()
        expected = []
        for i in range(1, 6):
            req, resp = bus.request(i)
            expected += [(DIR_OUTBOUND, req), (DIR_INBOUND, resp)]
        ping = encode(PingRequest(token=9, data=9), profile=profile)
        pong = encode(PingResponse(token=9, data=9), profile=profile)
        assert bus.dev.try_send(ping) and bus.drv.recv_bytes(1) == ping
        assert bus.drv.try_send(pong) and bus.dev.recv_bytes(1) == pong
        expected += [(DIR_INBOUND, ping), (DIR_OUTBOUND, pong)]
        assert _seen(obs.poll()) == expected
    finally:
        bus.close()


def test_falling_behind_is_reported_not_printed(bus):
    bus.start()
    obs = _observer(bus)
    obs.poll()
    n = SLOTS[bus.layout]
    sent = [bus.request(i)[0] for i in range(1, 3 * n + 11)]    # three laps and 10 unseen
    recs = obs.poll()
    missed = _missed(recs)
    out = [d for direction, d in _seen(recs) if direction == DIR_OUTBOUND]
    # The index says 10 new; the slots say it went round.  What is shown is
    # intact (the newest 10), the gap is counted as a lap (a lower bound: the
    # index alone cannot say how many laps went by).
    assert out == sent[-10:]
    outbound_missed = [m for m in missed if m.direction == DIR_OUTBOUND]
    assert len(outbound_missed) == 1 and outbound_missed[0].at_least
    assert outbound_missed[0].count == n <= len(sent) - 10
    # and it is back in step afterwards, exactly
    req, resp = bus.request(9999)
    recs = obs.poll()
    assert _seen(recs) == [(DIR_OUTBOUND, req), (DIR_INBOUND, resp)] and not _missed(recs)


def test_lap_with_identical_bytes_is_caught_by_the_consumer_index(bus):
    """The producer goes round with byte-identical messages (the slot check sees
    nothing); the consumer's index being ahead of the producer's gives it away."""
    bus.start()
    obs = _observer(bus)
    obs.poll()
    n = SLOTS[bus.layout]
    msg = encode(PingRequest(token=1, data=1))
    for _ in range(n - 1):                          # a full ring, consumed
        assert bus.drv.try_send(msg)
        bus.dev.recv_bytes(1)
    for _ in range(3):                              # three more, not consumed yet
        assert bus.drv.try_send(msg)
    recs = obs.poll()
    missed = [m for m in _missed(recs) if m.direction == DIR_OUTBOUND]
    assert len(missed) == 1 and missed[0].at_least
    assert all(d == msg for _, d in _seen(recs))


class _Racing:
    """A region whose next bulk read lets the peer act while it copies: the
    copy sees the old bytes (``first=False``) or the new ones."""

    def __init__(self, region, during_copy, first=False):
        self._r = region
        self.size = region.size
        self.during_copy = during_copy
        self.first = first
        self.armed = False

    def __getattr__(self, name):
        return getattr(self._r, name)

    def read(self, off, n):
        if self.armed and self.first:
            self.armed = False
            self.during_copy()
        data = self._r.read(off, n)
        if self.armed:
            self.armed = False
            self.during_copy()
        return data


def test_slots_overwritten_while_copying_are_counted_exactly():
    bus = Bus("a")
    try:
        bus.start()
        msgs = [encode(PingRequest(token=i, data=i)) for i in range(1, 200)]
        it = iter(msgs)

        def run_on():       # the producer publishes 60 more while we copy
            for _ in range(60):
                assert bus.drv.try_send(next(it))
                bus.dev.recv_bytes(1)

        racing = _Racing(bus.ro, run_on)
        obs = Observer(racing, layout="a")
        obs.poll()
        for _ in range(10):
            assert bus.drv.try_send(next(it))
            bus.dev.recv_bytes(1)
        racing.armed = True
        recs = obs.poll()
        # 10 published before the copy, 60 more during it: the producer, at 70,
        # may be writing message 70 into the slot of message 8, so messages 0..8
        # cannot be trusted; message 9 can.
        out = [r for r in recs if getattr(r, "direction", None) == DIR_OUTBOUND]
        assert isinstance(out[0], Missed) and out[0].count == 9 and not out[0].at_least
        assert [r.data for r in out[1:]] == msgs[9:10]
        rest = obs.poll()
        assert [d for _, d in _seen(rest)] == msgs[10:70] and not _missed(rest)
        assert obs.missed == 9 and not obs.missed_at_least
    finally:
        bus.close()


class _Burst:
    """A region where, while the observer copies the slots, a producer fills
    the next slots without publishing them yet (send_burst does that), then
    publishes them ``publish_after`` index loads later (never, if None)."""

    def __init__(self, region, ro, msgs, publish_after):
        self._ro, self._rw = ro, region
        self.size = ro.size
        self.msgs = msgs
        self.publish_after = publish_after
        self.armed = False
        self.loads = None

    def __getattr__(self, name):
        return getattr(self._ro, name)

    def read(self, off, n):
        if self.armed:
            self.armed = False
            head = self._rw.load32(0)
            for i, m in enumerate(self.msgs):
                self._rw.write(128 + ((head + i) % 62) * 64, m.ljust(64, b"\0"))
            self.loads = 0
        return self._ro.read(off, n)

    def load32(self, off, order="relaxed"):
        if self.loads is not None and off == 0:
            self.loads += 1
            if self.loads == self.publish_after:
                self._rw.store32(0, (self._rw.load32(0) + len(self.msgs)) % 62, "release")
                self.loads = None
        return self._ro.load32(off, order)


@pytest.mark.parametrize("publish_after", [2, 5, None])
def test_a_burst_being_written_is_not_a_lap(publish_after):
    """Slots beyond the producer index that change while we copy are a burst
    in progress when the index soon covers them; if it never does, the
    observer says it may have missed a lap, and still prints nothing that was
    not published."""
    region = Region.memfd(16384)
    ro = Region.from_fd(region.fd, region.size, readonly=True)
    try:
        burst = [encode(PingRequest(token=100 + i, data=i)) for i in range(3)]
        view = _Burst(region, ro, burst, publish_after)
        obs = Observer(view, layout="a")
        assert obs.poll()[0].up
        first = encode(PingRequest(token=1, data=1))
        region.write(128, first.ljust(64, b"\0"))
        region.store32(0, 1, "release")
        view.armed = True
        recs = obs.poll()
        assert _seen(recs) == [(DIR_OUTBOUND, first)]
        if publish_after is None:
            assert [(m.count, m.at_least) for m in _missed(recs)] == [(62, True)]
            assert _seen(obs.poll()) == []
        else:
            assert not _missed(recs)
            assert _seen(obs.poll()) == [(DIR_OUTBOUND, m) for m in burst]
    finally:
        ro.close()
        region.close()


def test_bus_restart_starts_counting_from_zero_again():
    bus = Bus("b")
    try:
        bus.start()
        obs = _observer(bus)
        obs.poll()
        bus.request(1)
        assert len(_seen(obs.poll())) == 2
        bus.drv.close()                             # driver leaves: SHUTDOWN
        down = obs.poll()
        assert [r.text for r in down if isinstance(r, Notice)] == ["bus down: device RUN, driver SHUTDOWN"]
        bus.drv = MsgFifo(bus.region, role="driver", layout="b", doorbell=bus.bells[1])
        start_pair(bus.dev, bus.drv)                # both handshake again (device saw the peer go)
        obs._next_layout_check = 0
        up = obs.poll()
        assert any(isinstance(r, Notice) and r.up for r in up)
        pairs = [bus.request(i) for i in range(2, 7)]
        got = _seen(obs.poll())
        assert got == [x for req, resp in pairs for x in ((DIR_OUTBOUND, req), (DIR_INBOUND, resp))]
        assert obs.sessions == 2 and obs.missed == 0
    finally:
        bus.close()


def test_a_side_clearing_its_ring_under_our_copy_is_not_a_lap():
    """The driver leaves; while we copy the device's ring the device starts
    over (state INIT, ring and index zeroed).  The changed slots are a restart,
    not messages gone by: nothing is printed and nothing counted as missed."""
    bus = Bus("b")
    try:
        bus.start()
        obs = _observer(bus)
        obs.poll()
        for i in range(1, 4):
            bus.request(i)
        assert len(_seen(obs.poll())) == 6
        bus.drv.close()
        ring = obs.rings[1]                           # device -> driver
        dev_qh = obs._dev_qh
        snapshot = bus.region.read(0, 16384)          # to replay the same moment twice
        states = [dict(r.__dict__) for r in obs.rings]

        def restart():
            bus.region.store16(dev_qh + 2, 0, "release")     # INIT
            bus.region.store16(dev_qh + 4, 0, "release")     # its producer index
            bus.region.zero(ring.elems, ring.n * ring.slot)

        for first in (False, True):    # the copy holds the old slots, or the cleared ones
            bus.region.write(0, snapshot)
            obs.up, obs._waiting = True, None
            for r, st in zip(obs.rings, states):
                r.__dict__.update(st)
            racing = _Racing(bus.ro, restart, first)
            racing.armed = True
            ring.region = racing
            recs = obs.poll()
            assert not _seen(recs) and not _missed(recs), (first, recs)
            assert obs.missed == 0 and not obs.up
    finally:
        bus.close()


def test_a_consumer_restarting_under_our_look_is_not_a_lap():
    """The driver leaves with requests we have not read yet; right after we
    looked at the states the device starts over, zeroing its queue head (the
    consumer index of the driver's ring) and its own ring.  The driver's
    requests are intact and printed; the device's cleared responses are
    counted from the driver's consumer index."""
    bus = Bus("b")
    try:
        bus.start()
        obs = _observer(bus)
        obs.poll()
        for i in range(1, 4):
            bus.request(i)
        assert len(_seen(obs.poll())) == 6            # consumer indices now at 3
        reqs = [bus.request(i)[0] for i in range(4, 9)]
        bus.drv.close()
        dev_ring = obs.rings[1]
        dev_qh = obs._dev_qh
        real_load = dev_ring.load
        fired = []

        def load(off, order="relaxed"):
            if not fired:
                fired.append(1)
                bus.region.store16(dev_qh + 2, 0, "release")     # INIT
                bus.region.store16(dev_qh + 4, 0, "release")     # its producer index
                bus.region.store16(dev_qh + 6, 0, "release")     # its consumer index
                bus.region.zero(dev_ring.elems, dev_ring.n * dev_ring.slot)
            return real_load(off, order)

        dev_ring.load = load
        recs = obs.poll()
        assert _seen(recs) == [(DIR_OUTBOUND, r) for r in reqs]
        assert [(m.direction, m.count, m.at_least) for m in _missed(recs)] == [(DIR_INBOUND, 5, True)]
    finally:
        bus.close()


def test_a_whole_session_between_two_looks_is_counted():
    """The driver's queue head going from INIT to SHUTDOWN while we never saw
    both sides in RUN means a session came and went unseen; its indices say
    (at least) how much it carried."""
    bus = Bus("b")
    try:
        bus.start()
        obs = _observer(bus)
        obs.poll()
        bus.drv.close()
        obs.poll()                                   # down; the old driver says SHUTDOWN
        drv_qh = obs._drv_qh

        def look():
            obs._next_layout_check = 0
            return obs.poll()

        assert not _missed(look())
        bus.region.store16(drv_qh + 2, 0x2000, "release")        # a new driver: INIT
        assert not _missed(look())
        bus.region.store16(drv_qh + 4, 7, "release")             # it sent 7
        bus.region.store16(drv_qh + 6, 6, "release")             # and took 6
        bus.region.store16(drv_qh + 2, 0x2003, "release")        # and left: SHUTDOWN
        recs = look()
        assert [(m.direction, m.count, m.at_least) for m in _missed(recs)] == [
            (DIR_OUTBOUND, 7, True), (DIR_INBOUND, 6, True)]
        assert not _missed(look())                   # said once
        assert obs.missed == 13 and obs.missed_at_least
    finally:
        bus.close()


def test_a_whole_first_session_while_we_waited_is_counted():
    """We started before any driver; a whole session (handshake, 3 requests,
    shutdown) went by before our next look, which is the final one taken
    within the waiting rate limit (Ctrl-C right after it).  We must say what
    we missed, not claim that nothing happened."""
    bus = Bus("b")
    try:
        bus.dev = MsgFifo(bus.region, role="device", layout="b", doorbell=bus.bells[0])
        started = threading.Thread(target=bus.dev.start, args=(10,))
        started.start()                              # writes the layout, waits for a driver
        obs = _observer(bus)
        deadline = time.monotonic() + 10
        while not any(isinstance(r, Notice) and "waiting for both sides" in r.text
                      for r in obs.poll(final=True)):
            assert time.monotonic() < deadline, "the device side never wrote its layout"
            time.sleep(0.001)
        bus.drv = MsgFifo(bus.region, role="driver", layout="b", doorbell=bus.bells[1])
        bus.drv.start(10)
        started.join()
        for i in range(1, 4):
            bus.request(i)
        bus.drv.close()                              # SHUTDOWN
        recs = obs.poll(final=True)                  # within 2 ms of the last look
        assert [(m.direction, m.count, m.at_least) for m in _missed(recs)] == [
            (DIR_OUTBOUND, 3, True), (DIR_INBOUND, 3, True)]
    finally:
        bus.close()


def test_a_session_ending_like_the_stale_one_before_it_is_told_by_its_indices():
    """The driver head said SHUTDOWN when we started (an old session); a new
    session came and went unseen and ended in SHUTDOWN too, with other
    indices: counted.  The same indices again: nothing new, nothing said."""
    bus = Bus("b")
    try:
        bus.start()
        bus.request(1)
        bus.drv.close()                              # an old, ended session: 1 and 1
        obs = _observer(bus)
        assert not _missed(obs.poll())
        drv_qh = obs._drv_qh
        bus.region.store16(drv_qh + 4, 4, "release")             # a new one sent 4
        bus.region.store16(drv_qh + 6, 2, "release")             # and took 2
        recs = obs.poll(final=True)
        assert [(m.direction, m.count, m.at_least) for m in _missed(recs)] == [
            (DIR_OUTBOUND, 4, True), (DIR_INBOUND, 2, True)]
        assert not _missed(obs.poll(final=True))
    finally:
        bus.close()


def test_hostile_indices_and_slots_are_reported_not_trusted():
    """Gen A, with the observer's view of a peer writing nonsense: an index out
    of range is a notice; a slot with an impossible msg_size is one whole-slot
    record flagged as such; nothing escapes as an exception."""
    region = Region.memfd(16384)
    ro = Region.from_fd(region.fd, region.size, readonly=True)
    try:
        obs = Observer(ro, layout="a")
        assert obs.poll()[0].up
        region.write(128, struct.pack("<BBHHH", 0, 7, 0, 1, 200) + bytes(56))   # msg_size 200
        region.write(128 + 64, encode(PingRequest(token=2, data=2)))
        region.store32(0, 2, "release")                                         # producer index 2
        recs = obs.poll()
        assert [(r.size_ok, len(r.data)) for r in recs] == [(False, 64), (True, 12)]
        region.store32(0, 1000, "release")
        recs = obs.poll()
        assert len(recs) == 1 and "producer index 1000 out of range" in recs[0].text
        assert obs.poll() == []                      # said once
        region.store32(0, 3, "release")              # sane again: followed from here
        assert obs.poll()[0].up
    finally:
        ro.close()
        region.close()


def test_a_broken_layout_is_a_notice():
    region = Region.memfd(16384)
    ro = Region.from_fd(region.fd, region.size, readonly=True)
    try:
        region.store16(2, 99)                          # length: should be 64
        region.store16(0, 0x4C4F, "release")           # magic "LO"
        recs = Observer(ro, layout="b").poll()
        assert len(recs) == 1 and "bad AMP layout: length" in recs[0].text and not recs[0].up
    finally:
        ro.close()
        region.close()


def test_the_observer_writes_nothing(bus):
    """A read-only mapping cannot be written; and the bytes do not change."""
    bus.start()
    bus.request(1)
    before = bus.region.read(0, bus.region.size)
    obs = _observer(bus)
    for _ in range(50):
        obs.poll()
    assert bus.region.read(0, bus.region.size) == before
    assert bus.ro.readonly
