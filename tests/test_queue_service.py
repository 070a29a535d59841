"""The one device-side queue-service routine (vmsgamp.devices._service),
and that both transports really go through it."""
from __future__ import annotations

import pytest

from vmsgamp._core.region import Region
from vmsgamp.devices import _service
from vmsgamp.devices._base import VirtioDevice
from vmsgamp.devices._service import MAX_ROUNDS, service_queue
from vmsgamp.testing.virtq_mock import MockDriver


class Echo(VirtioDevice):
    """Completes every chain; optionally adds more chains while it runs (a
    driver that keeps the queue busy) or fails."""

    device_id = 4
    name = "echo"

    def __init__(self, drv: MockDriver | None = None, refill: int = 0, fail: bool = False):
        super().__init__()
        self.drv, self.refill, self.fail, self.calls = drv, refill, fail, 0

    def handle_queue(self, index, q):
        self.calls += 1
        if self.fail:
            raise RuntimeError("model bug")
        used = False
        while (chain := q.pop()) is not None:
            q.add_used(chain.head, 0)
            used = True
        if self.refill:
            self.refill -= 1
            self.drv.add_chain([b"x"], [])
        return used


@pytest.fixture(params=["split", "packed"])
def drv(request):
    with MockDriver(Region.memfd(1 << 20), request.param, size=16, event_idx=True) as d:
        yield d


def test_serves_and_asks_for_a_notification(drv):
    q = drv.device_queue()
    drv.add_chain([b"a"], [])
    done = service_queue(Echo(), 0, q)
    assert (done.notify, done.more, done.broken) == (True, False, None)
    assert drv.get_used() is not None


def test_chains_added_while_kicks_are_off_get_another_round(drv):
    q = drv.device_queue()
    drv.add_chain([b"a"], [])
    dev = Echo(drv, refill=2)
    done = service_queue(dev, 0, q)
    assert dev.calls == 3 and not done.more
    assert sum(1 for _ in iter(drv.get_used, None)) == 3


def test_a_flooded_queue_yields_after_the_round_limit(drv):
    q = drv.device_queue()
    drv.add_chain([b"a"], [])
    dev = Echo(drv, refill=100)
    done = service_queue(dev, 0, q, max_rounds=4)
    assert dev.calls == 4 and done.more and done.broken is None
    assert MAX_ROUNDS >= 4


def test_a_model_error_breaks_the_queue_not_the_caller(drv):
    q = drv.device_queue()
    drv.add_chain([b"a"], [])
    done = service_queue(Echo(fail=True), 0, q)
    assert done.broken == "device model error: model bug" and q.broken and not done.notify


def test_a_corrupted_ring_is_reported(drv):
    q = drv.device_queue()
    drv.add_chain([b"a"], [])
    if drv.fmt == "split":
        drv.set_avail_idx(0x7777)                    # an impossible avail index
    else:
        for i in range(16):                          # a chain longer than the ring
            drv.write_desc(i, drv.buffer(), 16, 0x0081)   # AVAIL | NEXT
    done = service_queue(Echo(), 0, q)
    assert done.broken and q.broken


def test_both_transports_use_the_routine(monkeypatch):
    """A change to the routine reaches the AMP bus and vhost-user alike."""
    import vmsgamp.bus._device_side as amp
    import vmsgamp.vhost_user._backend as vhost

    assert amp.service_queue is _service.service_queue
    assert vhost.service_queue is _service.service_queue
    assert amp.needs_notification is _service.needs_notification
    assert vhost.needs_notification is _service.needs_notification
