"""The driver-side exercises behind `emulate` and `bench devices`."""
import itertools

from vmsgamp.bus import exercise
from vmsgamp.devices.rng import RngDevice
from vmsgamp.testing.amp import amp_pair


def test_rng_buffers_added_just_before_the_deadline_are_still_kicked(monkeypatch):
    """Buffers re-added while time < end must be kicked even when the loop
    then finds the deadline passed (a stall of every in-flight buffer
    otherwise)."""
    ticks = itertools.chain([0.0, 0.0], itertools.repeat(0.4, 40), itertools.repeat(9.0))
    monkeypatch.setattr(exercise.time, "perf_counter", lambda: next(ticks))
    with amp_pair(lambda: [RngDevice()], process=False) as drv:
        r = exercise.rng(drv, 0, duration=0.5, in_flight=8, request=64, packed=True)
    assert r["requests"] >= 8 and r["bytes"] == 64 * r["requests"]
