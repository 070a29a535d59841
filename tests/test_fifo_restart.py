"""A driver that ends its session and starts a new one at once, while the
device side is busy elsewhere and still shows RUN from the old session.

The device has not seen the old session end yet, so it still holds that
session's consumer index.  A driver that went straight to RUN would have the
device read its new ring from the old position (zeroed slots: malformed
messages, then a request that never gets its answer).  The driver must wait
for the device to leave RUN first (docs/virtio-msg.md); this test runs the
two endpoints in two processes, as in real use."""
import multiprocessing as mp
import os
import struct
import threading

import pytest

from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region
from vmsgamp.errors import HandshakeTimeout, PeerRestarted, PeerShutdown
from vmsgamp.testing.fifo_model import make_msg

FIRST = 5           # messages of the first session (the device consumes them all)
SECOND = 1000       # sequence number of the first message of the second session


def _seq(buf) -> int:
    return struct.unpack_from("<Q", buf, 8)[0]


def _driver(region, bell, conn):
    try:
        drv = MsgFifo(region, role="driver", doorbell=bell)
        drv.start(10)
        for i in range(FIRST):
            drv.send(make_msg(i), timeout=10)
        assert conn.recv() == "busy"
        drv.close()                                 # the old session ends (SHUTDOWN) ...
        drv = MsgFifo(region, role="driver", doorbell=bell)
        drv.start(10)                               # ... and a new one starts at once
        conn.send("started")
        drv.send(make_msg(SECOND), timeout=10)
        reply = drv.recv_bytes(timeout=10)
        conn.send(("ok", _seq(reply)))
        drv.close()
    except BaseException as e:  # report to the parent, never hang it
        conn.send(("error", repr(e)))
    finally:
        conn.close()
        os._exit(0)


def test_driver_restarting_at_once_waits_for_a_busy_device_to_leave_run():
    region = Region.memfd(16384)
    dev_bell, drv_bell = EventfdDoorbell.pair()
    dev = MsgFifo(region, role="device", doorbell=dev_bell)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_driver, args=(region, drv_bell, child))
    p.start()
    try:
        dev.start(10)
        buf = bytearray(64)
        for i in range(FIRST):
            assert dev.recv(buf, timeout=10) == 64 and _seq(buf) == i
        # The device is busy: it does not look at the FIFO while the driver
        # ends its session and starts the next.  A driver that does not wait
        # reports "started" at once; one that waits for us stays in its
        # handshake, so give it a moment to get there.
        parent.send("busy")
        started_early = parent.poll(1.0)
        # Back from work, the device sees that the old session ended ...
        with pytest.raises((PeerRestarted, PeerShutdown)):
            dev.recv(buf, timeout=10)
        assert dev.dropped == 0
        assert not started_early, "the driver went to RUN while the device still showed RUN"
        # ... and runs the handshake of the new one, whose first message is
        # the first it receives.
        dev.start(10)
        assert dev.recv(buf, timeout=10) == 64 and _seq(buf) == SECOND
        dev.send(make_msg(SECOND + 1), timeout=10)
        assert parent.poll(10) and parent.recv() == "started"
        assert parent.poll(10)
        assert parent.recv() == ("ok", SECOND + 1)
        assert dev.dropped == 0
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
        dev.close()
        region.close()


def test_driver_gives_up_on_a_device_that_never_leaves_run():
    """Bounded: a device that keeps showing RUN while ignoring the driver's
    new session costs the driver its handshake timeout, and the message says
    why."""
    region = Region.memfd(16384)
    dev = MsgFifo(region, role="device")
    drv = MsgFifo(region, role="driver")
    t = threading.Thread(target=dev.start, args=(10,))
    t.start()
    drv.start(10)
    t.join()
    drv.close()                       # the device never looks: it stays RUN
    drv = MsgFifo(region, role="driver")
    with pytest.raises(HandshakeTimeout, match="still shows RUN from an earlier session"):
        drv.start(0.3)
    assert drv.my_state() == "INIT"   # and the driver is back at INIT, waiting for nothing
    drv.close()
    dev.close()
    region.close()
