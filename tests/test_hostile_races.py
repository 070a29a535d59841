"""Races in the FIFO core, each reproduced with a hostile peer process writing
into the region or with our own threads:

* a peer rewriting msg_size while we receive (single-message path and the
  bad-size report), caught by checking every delivered message's length
  against its own header and every BadMessageSize against the valid range;
* our status word updated by two threads (state vs WAITING flag);
* close() while another thread waits inside the FIFO;
* a device rewriting its layout while a driver reads it.

The close() and layout tests fail on the code before the fix (crash, hang,
LayoutError).  The msg_size and status-word windows were a few nanoseconds
wide with the line in the reader's cache, so on an x86 host the stress tests
below seldom catch the old code; they check the invariants the fix makes
structural (one private copy decides everything; one locked shadow), and
are the guard on hosts with weaker ordering or uncached device memory.
"""
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import start_pair
from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region
from vmsgamp.errors import BadMessageSize, HandshakeTimeout, LayoutError
from vmsgamp.testing.fifo_model import PyFifoPeer, make_msg

CTL = 12288          # a control word beyond the 8 KiB FIFO window


def _fork(child):
    """Run ``child()`` in a forked process; it ends when it returns."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def _reap(pid):
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _flip_forever(region, first_slot_off, count, stride, a, b):
    """Child: rewrite the u16 at +6 (msg_size) of ``count`` slots, alternating
    a and b, as fast as numpy can store, until the control word changes."""
    words = np.frombuffer(region, dtype="<u2")
    sizes = words[first_slot_off // 2 + 3: (first_slot_off + count * stride) // 2: stride // 2]
    rows = 1024
    # A zero-stride destination: every row stores into the same msg_size
    # fields, so one numpy call flips each of them ``rows`` times.
    dst = np.lib.stride_tricks.as_strided(sizes, shape=(rows, count), strides=(0, sizes.strides[0]))
    src = np.empty((rows, count), dtype="<u2")
    src[0::2], src[1::2] = a, b
    ctl = np.frombuffer(region, dtype="<u4", count=1, offset=CTL)
    ctl[0] = 1
    while ctl[0] == 1:
        np.copyto(dst, src)


def _until(cond, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_peer_rewriting_msg_size_while_we_receive():
    """A peer flips msg_size of every slot between 64 (valid) and 5 (invalid)
    as fast as it can.  Whatever it does, a delivered message is exactly as
    long as the msg_size in its own header, and a dropped one is reported
    with a size that really is invalid (read before the slot went back)."""
    region = Region.memfd(16384)
    dev, drv = MsgFifo(region, role="device"), MsgFifo(region, role="driver")
    start_pair(dev, drv)
    rx_slots = 4112          # the driver's element array: what dev receives from
    n, slot = dev.num_slots, dev.slot_size

    pid = _fork(lambda: _flip_forever(region, rx_slots, n, slot, 64, 5))
    _until(lambda: region.load32(CTL, "acquire") == 1, "the flipper")
    msgs = b"".join(make_msg(i, 64) for i in range(n - 1))
    buf = bytearray(64)
    good = bad = 0
    wrong = []
    deadline = time.monotonic() + 60     # a busy machine may starve the flipper for a while
    try:
        while (good + bad < 60000 or bad < 10) and len(wrong) < 5 and time.monotonic() < deadline:
            drv.send_burst(msgs, 64)
            while True:
                try:
                    got = dev.try_recv(buf)
                except BadMessageSize as e:
                    bad += 1
                    if 8 <= e.msg_size <= 64:
                        wrong.append(f"dropped a message for msg_size {e.msg_size}")
                    continue
                if not got:
                    break
                good += 1
                header = struct.unpack_from("<H", buf, 6)[0]
                if header != got:
                    wrong.append(f"got {got} bytes whose header says {header}")
    finally:
        region.store32(CTL, 2, "release")
        _reap(pid)
    assert not wrong, wrong
    assert good and bad      # the peer really did interfere both ways
    dev.close()
    drv.close()
    region.close()


def test_recv_many_delivers_what_the_header_says():
    """The same check on recv_many (the other single-message path)."""
    region = Region.memfd(16384)
    dev, drv = MsgFifo(region, role="device"), MsgFifo(region, role="driver")
    start_pair(dev, drv)
    n, slot = dev.num_slots, dev.slot_size

    pid = _fork(lambda: _flip_forever(region, 4112, n, slot, 64, 16))   # both valid
    _until(lambda: region.load32(CTL, "acquire") == 1, "the flipper")
    msgs = b"".join(make_msg(i, 64) for i in range(n - 1))
    wrong, total = [], 0
    try:
        while total < 60000 and len(wrong) < 5:
            drv.send_burst(msgs, 64)
            for m in dev.recv_many():
                total += 1
                if struct.unpack_from("<H", m, 6)[0] != len(m):
                    wrong.append((len(m), struct.unpack_from("<H", m, 6)[0]))
    finally:
        region.store32(CTL, 2, "release")
        _reap(pid)
    assert not wrong, wrong
    dev.close()
    drv.close()
    region.close()


def test_status_state_and_waiting_flag_do_not_clobber_each_other():
    """The receiving thread sets and clears WAITING in its status word without
    the GIL while another thread changes the state (shutdown).  The state
    change must never be undone, in our shadow or in shared memory."""
    region = Region.memfd(16384)
    a, b = EventfdDoorbell.pair()
    dev = MsgFifo(region, role="device", doorbell=a, spin_us=0)
    drv = MsgFifo(region, role="driver", doorbell=b)
    start_pair(dev, drv)
    rx = a.fileno()

    def ringer():                 # keeps dev's doorbell readable: its wait loop spins through
        ctl = np.frombuffer(region, dtype="<u4", count=1, offset=CTL)   # set/clear WAITING
        ctl[0] = 1
        while ctl[0] == 1:
            os.eventfd_write(rx, 1)

    pid = _fork(ringer)
    _until(lambda: region.load32(CTL, "acquire") == 1, "the ringer")
    out = []

    def receiver():
        try:
            dev.recv(bytearray(64), timeout=3)
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=receiver)
    t.start()
    _until(lambda: dev.sleeps > 100, "the receiver's wait loop")
    clobbered = 0
    try:
        for _ in range(100000):
            dev.shutdown()                      # state SHUTDOWN, from this thread
            if dev.my_state() != "SHUTDOWN" or region.load16(66) & 0x1F != 3:
                clobbered += 1
            if not t.is_alive():
                break
    finally:
        region.store32(CTL, 2, "release")
        _reap(pid)
        t.join(10)
    assert not t.is_alive()
    assert clobbered == 0, f"{clobbered} state changes undone by the WAITING update"
    assert dev.my_state() == "SHUTDOWN" and region.load16(66) & 0x1F == 3
    for x in (dev, drv, a, b, region):
        x.close()


# ---- close() while another thread is inside the FIFO --------------------------------
# Run in a child interpreter: before the fix this crashed the process (the
# waiter dereferenced the pointers close() had cleared, or the unmapped region)
# or left the waiter hanging.

_CLOSE_WHILE_WAITING = textwrap.dedent("""
    import sys, threading, time
    from vmsgamp._core.doorbell import EventfdDoorbell, PollingDoorbell
    from vmsgamp._core.fifo import MsgFifo
    from vmsgamp._core.region import Region
    from vmsgamp.errors import FifoClosedError
    sys.path.insert(0, "tests")
    from conftest import start_pair
    from vmsgamp.testing.fifo_model import make_msg

    def scenario(what, layout, bell):
        region = Region.memfd(16384)
        if bell == "eventfd":
            a, b = EventfdDoorbell.pair()
        else:
            a, b = PollingDoorbell(), PollingDoorbell()
        dev = MsgFifo(region, role="device", layout=layout, doorbell=a, spin_us=0)
        drv = MsgFifo(region, role="driver", layout=layout, doorbell=b)
        if what == "start":
            victim, call = drv, lambda: drv.start(timeout=60)       # no device side: waits
        else:
            if layout == "a":
                dev.start(reset=True); drv.start()
            else:
                start_pair(dev, drv)
            if what == "recv":
                victim, call = dev, lambda: dev.recv(bytearray(64))  # forever
            else:
                while drv.try_send(make_msg(0)):
                    pass
                victim, call = drv, lambda: drv.send(make_msg(1))    # full: waits forever
        err = []
        def run():
            try:
                call()
            except BaseException as e:
                err.append(e)
        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.2)                      # let it settle into its wait loop
        victim.close()
        region.close()                       # the unmap must wait for the waiter
        t.join(10)
        assert not t.is_alive(), "the waiter hangs"
        assert len(err) == 1 and isinstance(err[0], FifoClosedError), err
        for x in (dev, drv, a, b):
            x.close()
        assert not region.mapped, "the region was never released"

    for spec in sys.argv[1:]:
        print("start", spec, flush=True)
        scenario(*spec.split(","))
        print("ok", spec, flush=True)
""")

_SCENARIOS = ["recv,b,eventfd", "recv,b,polling", "recv,a,eventfd", "send,b,polling",
              "send,a,eventfd", "start,b,polling"]


def test_close_while_another_thread_waits():
    """A waiter in recv() (eventfd or polling doorbell, both layouts), in
    send() on a full FIFO and in start() without a peer: close() from another
    thread wakes it with FifoClosedError, and the region is unmapped only
    after it has left."""
    p = subprocess.run([sys.executable, "-c", _CLOSE_WHILE_WAITING, *_SCENARIOS],
                       capture_output=True, text=True, timeout=300)
    done = [ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("ok ")]
    assert p.returncode == 0 and done == _SCENARIOS, (p.returncode, p.stdout, p.stderr[-2000:])


def test_closing_the_doorbell_under_a_waiter():
    """The doorbell's fds stay open while a waiter polls them; the waiter
    then gets a clear error instead of polling a closed (or reused) fd."""
    region = Region.memfd(16384)
    a, b = EventfdDoorbell.pair()
    dev = MsgFifo(region, role="device", doorbell=a, spin_us=0)
    drv = MsgFifo(region, role="driver", doorbell=b)
    start_pair(dev, drv)
    err = []

    def run():
        try:
            dev.recv(bytearray(64), timeout=30)
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    _until(lambda: dev.sleeps > 0, "the receiver to sleep")
    a.close()
    t.join(10)
    assert not t.is_alive()
    assert len(err) == 1 and isinstance(err[0], ValueError) and "closed" in str(err[0])
    with pytest.raises(ValueError, match="closed"):
        a.ring()
    for x in (dev, drv, b, region):
        x.close()


# ---- a device rewriting its layout while the driver reads it ------------------------

_LAYOUTS = {(63, 64), (126, 32)}     # (num_queue_elements, size_queue_elements)


def test_driver_never_takes_a_half_rewritten_layout():
    """A device rewrites its layout over and over, switching between two valid
    geometries, in the order the protocol prescribes (magic cleared first,
    set last).  A driver attaching meanwhile must take one geometry or the
    other, never a mix (a mix is out of bounds or silently wrong)."""
    region = Region.memfd(16384)
    peer = PyFifoPeer(region.view(), role="device")
    peer.write_layout()          # the first layout, as a device writes it

    def rewriter():
        mem = memoryview(region).cast("B")
        ctl = np.frombuffer(region, dtype="<u4", count=1, offset=CTL)
        ctl[0] = 1
        i = 0
        while ctl[0] == 1:
            n, slot = (126, 32) if i & 1 else (63, 64)
            struct.pack_into("<H", mem, 0, 0)              # invalidate first
            struct.pack_into("<H", mem, 10, n)
            struct.pack_into("<H", mem, 12, slot)
            struct.pack_into("<Q", mem, 56, 80 + n * slot)
            struct.pack_into("<H", mem, 0, 0x4C4F)         # magic last
            i += 1

    pid = _fork(rewriter)
    _until(lambda: region.load32(CTL, "acquire") == 1, "the rewriter")
    seen, errors = set(), []
    try:
        for _ in range(300):
            drv = MsgFifo(region, role="driver")
            try:
                drv.start(timeout=0.001)        # the rewriter never runs the handshake
            except HandshakeTimeout:
                if drv.num_slots:
                    seen.add((drv.num_slots, drv.slot_size))
            except LayoutError as e:
                errors.append(str(e))
            drv.close()
    finally:
        region.store32(CTL, 2, "release")
        _reap(pid)
    assert not errors, errors[:3]
    assert seen <= _LAYOUTS, seen
    peer.release()
    region.close()
