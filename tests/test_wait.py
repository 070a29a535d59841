"""Adaptive waiting (vmsgamp.bus._wait): the Waiter's decisions with an
injected clock (deterministic, no timing asserts), then the loops that use
it: an idle serve sleeps, busy-poll still stops, every wait is bounded."""
from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest

from vmsgamp.bus._wait import (
    BACKOFF_START_S, BLOCK, SLEEP, SPIN, SPIN_SLICE_S, WaitPolicy, Waiter, policy_from,
)
from vmsgamp.devices._base import VirtioDevice
from vmsgamp.devices.rng import RngDevice
from vmsgamp.testing.amp import amp_pair


# ---- fakes ------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeDoorbell:
    def __init__(self, can_wait: bool) -> None:
        self.can_wait = can_wait

    def fileno(self) -> int:
        raise ValueError("no fd")


class FakeFifo:
    """A FIFO nobody writes to (unless ``arrive_at`` is set): its waits
    move the fake clock on by what they were given."""

    def __init__(self, clock: Clock, *, can_wait: bool = False, arrive_at: float = math.inf) -> None:
        self.clock = clock
        self.doorbell = FakeDoorbell(can_wait)
        self.sent = self.received = 0
        self.spin_ns = 0
        self.arrive_at = arrive_at
        self.waits: list[float | None] = []

    def pending(self) -> int:
        return int(self.clock.t >= self.arrive_at)

    def wait_readable(self, timeout: float | None) -> bool:
        self.waits.append(timeout)
        if self.clock.t + (timeout or 0) >= self.arrive_at:
            self.clock.t = max(self.clock.t, self.arrive_at)
            return True
        self.clock.t += math.inf if timeout is None else timeout
        return False


def make(policy: WaitPolicy, clock: Clock) -> tuple[Waiter, list[float]]:
    slept: list[float] = []

    def sleep(t: float) -> None:
        slept.append(t)
        clock.t += t

    return Waiter(policy, clock=clock, sleep=sleep), slept


# ---- the decision -----------------------------------------------------------------------

def test_policy_refuses_bad_values() -> None:
    for bad in (dict(spin_us=-1), dict(spin_us=math.inf), dict(idle_backoff_ms=0),
                dict(idle_backoff_ms=math.nan)):
        with pytest.raises(ValueError):
            WaitPolicy(**bad)
    assert policy_from(None, None) == WaitPolicy()
    assert policy_from(5, 2, True) == WaitPolicy(5, 2, True)


def test_spin_after_activity_then_block_or_sleep() -> None:
    clock = Clock()
    w, _ = make(WaitPolicy(spin_us=100, idle_backoff_ms=1), clock)
    # nothing has happened yet: no spin at all
    assert w.plan(0.0, can_block=True) == (BLOCK, math.inf)
    w.activity(1.0)
    kind, left = w.plan(1.0 + 40e-6, can_block=True)
    assert kind == SPIN and left == pytest.approx(60e-6)
    assert w.plan(1.0 + 101e-6, can_block=True) == (BLOCK, math.inf)
    assert w.plan(1.0 + 101e-6, can_block=False) == (SLEEP, BACKOFF_START_S)


def test_idle_backoff_doubles_to_the_cap_and_activity_resets_it() -> None:
    clock = Clock()
    w, _ = make(WaitPolicy(spin_us=0, idle_backoff_ms=0.5), clock)
    spans = []
    for _ in range(8):
        kind, span = w.plan(5.0, can_block=False)
        assert kind == SLEEP
        spans.append(span)
        w.slept()
    assert spans[0] == BACKOFF_START_S
    assert all(b == min(a * 2, 0.5e-3) for a, b in zip(spans, spans[1:]))
    assert spans[-1] == 0.5e-3
    w.activity(6.0)
    assert w.plan(6.0, can_block=False) == (SLEEP, BACKOFF_START_S)


def test_busy_poll_always_spins_in_bounded_slices() -> None:
    clock = Clock()
    w, _ = make(WaitPolicy(busy_poll=True), clock)
    for now in (0.0, 1.0, 1e6):
        assert w.plan(now, can_block=True) == (SPIN, SPIN_SLICE_S)
        assert w.spin_left(now) == SPIN_SLICE_S


def test_fifo_traffic_counts_as_activity() -> None:
    clock = Clock()
    fifo = FakeFifo(clock)
    w, _ = make(WaitPolicy(spin_us=100), clock)
    w.observe(fifo, 1.0)           # first look: the counters are news
    assert w.spin_left(1.0) > 0
    w.observe(fifo, 2.0)           # nothing new: the window has passed
    assert w.spin_left(2.0) < 0
    fifo.received += 1
    w.observe(fifo, 3.0)
    assert w.spin_left(3.0) == pytest.approx(100e-6)


# ---- the doing, on fakes -----------------------------------------------------------------

def test_idle_wait_on_a_polled_carrier_sleeps_and_is_bounded() -> None:
    clock = Clock()
    fifo = FakeFifo(clock)
    w, slept = make(WaitPolicy(spin_us=100, idle_backoff_ms=1), clock)
    clock.t = 10.0
    assert w.wait(fifo, 0.05) == []
    assert clock.t == pytest.approx(10.05)             # the timeout, not more
    assert w.sleeps == len(slept) > 10 and w.blocks == 0
    assert max(slept) == pytest.approx(1e-3)          # never past the back-off cap
    assert slept[:3] == pytest.approx([BACKOFF_START_S, 2 * BACKOFF_START_S, 4 * BACKOFF_START_S])


def test_wait_spins_first_after_activity_and_catches_an_arrival() -> None:
    clock = Clock()
    fifo = FakeFifo(clock, arrive_at=10.0 + 50e-6)
    w, slept = make(WaitPolicy(spin_us=100), clock)
    clock.t = 10.0
    w.activity(10.0)
    assert w.wait(fifo, 1.0) == []
    assert w.spins == 1 and w.sleeps == 0 and not slept
    assert clock.t == pytest.approx(10.0 + 50e-6)


def test_wait_on_a_doorbell_blocks_once_for_the_rest() -> None:
    clock = Clock()
    fifo = FakeFifo(clock, can_wait=True)
    w, slept = make(WaitPolicy(spin_us=100), clock)
    clock.t = 3.0
    w.wait(fifo, 2.0)
    assert w.blocks == 1 and w.sleeps == 0 and not slept
    assert fifo.waits[-1] == pytest.approx(2.0, abs=1e-3) and fifo.spin_ns == 0   # no spin inside the block


def test_arm_check_and_cap() -> None:
    clock = Clock()
    fifo = FakeFifo(clock)
    w, slept = make(WaitPolicy(spin_us=0), clock)
    # arm says work is ready: no sleep at all
    assert w.wait(fifo, 1.0, arm=lambda: True) == [] and not slept and clock.t == 0.0
    # check (the watched rings) ends an idle sleep-poll
    looks = []
    assert w.wait(fifo, 1.0, check=lambda: looks.append(1) or len(looks) >= 3) == []
    assert len(slept) == 3 and clock.t < 1.0
    # cap shortens the wait (a request deadline nearer than the timeout)
    start = clock.t
    w.wait(fifo, 1.0, cap=lambda left: 0.01)
    assert clock.t - start == pytest.approx(0.01)


def test_busy_poll_wait_never_sleeps_and_ends_at_its_timeout() -> None:
    clock = Clock()
    fifo = FakeFifo(clock, can_wait=True)
    w, slept = make(WaitPolicy(busy_poll=True), clock)
    armed = []
    w.wait(fifo, 0.1, arm=lambda: armed.append(1) or False)
    assert not slept and w.blocks == 0 and w.sleeps == 0 and not armed
    assert clock.t == pytest.approx(0.1)
    assert w.spins >= 0.1 / SPIN_SLICE_S and max(fifo.waits) <= SPIN_SLICE_S


# ---- the loops ----------------------------------------------------------------------------

def _set_server_policy(policy: WaitPolicy, seen: list):
    def hook(server) -> None:
        server.bus.waiter = Waiter(policy)
        seen.append(server)
    return hook


@pytest.mark.parametrize("doorbell", ["polling", "eventfd"])
def test_idle_serve_sleeps_or_blocks(doorbell: str) -> None:
    """No traffic: the device loop sleeps (shm:) or blocks (ivshmem:); it
    does not spin.  Counted by the Waiter, not timed."""
    seen: list = []
    with amp_pair(lambda: [RngDevice()], process=False, doorbell=doorbell,
                  server_hook=_set_server_policy(WaitPolicy(), seen)) as drv:
        w = seen[0].bus.waiter
        done = threading.Event()
        # let the idle loop run while the driver waits too (its waits are counted as well)
        s0, b0, p0 = w.sleeps, w.blocks, w.spins
        for _ in range(1000):   # bounded: at most ~10 s on a loaded machine
            drv.pump(0.01)
            if (w.sleeps - s0 if doorbell == "polling" else w.blocks - b0) >= 5:
                done.set()
                break
        assert done.is_set(), (w.sleeps, w.blocks, w.spins)
        dw = drv.bus.waiter
        if doorbell == "polling":
            assert dw.sleeps > 0 and dw.blocks == 0
        else:
            assert dw.blocks > 0 and dw.sleeps == 0


@pytest.mark.parametrize("policy", [WaitPolicy(), WaitPolicy(spin_us=0), WaitPolicy(busy_poll=True),
                                    WaitPolicy(spin_us=0, idle_backoff_ms=0.05)])
@pytest.mark.parametrize("doorbell", ["polling", "eventfd"])
def test_requests_and_used_buffers_with_every_policy(policy: WaitPolicy, doorbell: str) -> None:
    """The arm-before-sleep path (spin 0) and the busy path both see every
    completion; both ends use the policy."""
    seen: list = []
    with amp_pair(lambda: [RngDevice("pattern")], process=False, doorbell=doorbell,
                  server_hook=_set_server_policy(policy, seen)) as drv:
        drv.bus.waiter = Waiter(policy)
        assert drv.ping(5)["count"] == 5
        dev = drv.open(0)
        q = dev.queues[0]
        addr, view = dev.alloc(64)
        for _ in range(20):
            q.add([], [(addr, 64)], 0)
            dev.notify(0)
            assert dev.wait_used(0, 5)
            assert q.get_used()[1] == 64
        view.release()


class _Hoarder(VirtioDevice):
    """Takes chains and never uses them: a device that never answers."""
    device_id = 4
    name = "hoarder"

    def handle_queue(self, index, queue):
        while queue.pop() is not None:
            pass
        return False


@pytest.mark.parametrize("policy", [WaitPolicy(), WaitPolicy(busy_poll=True)])
def test_a_device_that_never_answers_is_a_timeout(policy: WaitPolicy) -> None:
    with amp_pair(lambda: [_Hoarder()], process=False, doorbell="polling") as drv:
        drv.bus.waiter = Waiter(policy)
        dev = drv.open(0)
        addr, view = dev.alloc(16)
        dev.queues[0].add([], [(addr, 16)], 0)
        dev.notify(0)
        assert dev.wait_used(0, 0.2) is False
        assert not drv._watched                 # nothing left armed for later waits
        view.release()


def test_busy_poll_server_stops_promptly() -> None:
    seen: list = []
    threads: list = []

    def hook(server) -> None:
        _set_server_policy(WaitPolicy(busy_poll=True), seen)(server)
        threads.append(threading.current_thread())

    with amp_pair(lambda: [RngDevice()], process=False, doorbell="eventfd", server_hook=hook) as drv:
        drv.ping(3)
    # amp_pair stops the loop and gives it 5 s to end (one busy slice is 10 ms)
    assert not threads[0].is_alive()
    w = seen[0].bus.waiter
    assert w.spins > 0 and w.blocks == 0 and w.sleeps == 0


def test_ctrl_c_ends_a_busy_poll_wait() -> None:
    with amp_pair(lambda: [RngDevice()], process=False, doorbell="polling") as drv:
        drv.bus.waiter = Waiter(WaitPolicy(busy_poll=True))
        # Python raises KeyboardInterrupt only where SIGINT was not ignored at
        # start-up (a background job of a script ignores it): say so here.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            deadline = time.monotonic() + 30
            with pytest.raises(KeyboardInterrupt):
                while time.monotonic() < deadline:   # an event may end one pump early
                    drv.pump(deadline - time.monotonic())   # the SIGINT ends it long before
        finally:
            timer.cancel()
            signal.signal(signal.SIGINT, previous)


def test_a_notification_queued_outside_any_event_is_sent() -> None:
    """Host input (a device fd) queues EVENT_USED with no bus event to
    handle: the serving loop must still send it (it used to stay queued
    until the driver's next message, and the driver waited out its slice)."""
    from vmsgamp.protocol import EventUsed

    seen: list = []
    with amp_pair(lambda: [RngDevice()], process=False, doorbell="eventfd",
                  server_hook=seen.append) as drv:
        dev = drv.open(0)
        server = seen[0]
        with server._lock:
            server._queue_event(EventUsed(dev_num=0, vq_index=0))
            server.handle_events([])
            assert not server._outbox
        assert dev.wait_until(lambda: dev.used_events[0] >= 1, (), 5)


def test_idle_sleep_poll_notices_a_shrunk_shared_object() -> None:
    """Sleep-polling reads only the queue heads: like the FIFO's own idle
    waits it must look at the object's size now and then (truncate(1))."""
    from vmsgamp.errors import SharedObjectLost

    class Region:
        def __init__(self) -> None:
            self.looks = 0

        def poll_size(self) -> bool:
            self.looks += 1
            return self.looks >= 3

        def check_alive(self) -> None:
            raise SharedObjectLost("shm:x")

    clock = Clock()
    fifo = FakeFifo(clock)
    fifo.region = Region()
    w, _ = make(WaitPolicy(spin_us=0), clock)
    with pytest.raises(SharedObjectLost):
        w.wait(fifo, 10.0)
    assert fifo.region.looks == 3 and clock.t < 1.0
