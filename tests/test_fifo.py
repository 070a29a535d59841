"""MsgFifo: behaviour, hostile peers, lifecycle."""
import os
import signal
import struct
import threading

import pytest

from conftest import start_pair
from vmsgamp._core.doorbell import EventfdDoorbell, PollingDoorbell
from vmsgamp._core.fifo import MsgFifo, default_layout, read_layout, validate_layout
from vmsgamp._core.region import Region
from vmsgamp.errors import (
    BadMessageSize, FifoBrokenError, FifoClosedError, HandshakeTimeout, LayoutError, PeerRestarted,
    PeerShutdown,
)
from vmsgamp.testing.fifo_model import PyFifoPeer, make_msg


def test_round_trip_both_directions(fifo_pair):
    dev, drv, _ = fifo_pair
    buf = bytearray(64)
    for size in (8, 9, 48, 63, 64):
        m = make_msg(size, size)
        assert drv.try_send(m)
        assert dev.try_recv(buf) == size and bytes(buf[:size]) == m
        assert dev.try_send(m)
        assert drv.recv(buf, timeout=1) == size and bytes(buf[:size]) == m
    assert dev.try_recv(buf) == 0 and drv.try_recv(buf) == 0



def test_per_message_calls_take_every_buffer_kind(fifo_pair):
    """try_send/try_recv read bytes and bytearray from their storage and any
    other buffer through an export; all of them carry the same message."""
    import array

    dev, drv, _ = fifo_pair
    m = make_msg(42, 48)
    big = bytearray(16) + bytearray(m) + bytearray(16)
    for msg in (m, bytearray(m), memoryview(m), memoryview(big)[16:64], array.array("B", m)):
        assert drv.try_send(msg)
    for kind in ("bytearray", "view", "offset view", "array", "bytearray"):
        store = bytearray(b"\xee" * 80)
        into = {"bytearray": store, "view": memoryview(store), "offset view": memoryview(store)[8:],
                "array": array.array("B", bytes(80))}[kind]
        assert dev.try_recv(into) == 48, kind
        got = bytes(into)[:48] if kind != "offset view" else bytes(store[8:56])
        assert got == m, kind
        if kind == "bytearray":
            assert store[48:] == b"\xee" * 32  # only the message's own bytes are written
    assert dev.try_recv(bytearray(64)) == 0
    # An empty or too-small bytearray: nothing written, the message stays queued.
    assert drv.try_send(m)
    for small in (bytearray(), bytearray(47)):
        with pytest.raises(ValueError, match="smaller"):
            dev.try_recv(small)
    with pytest.raises(BufferError):
        dev.try_recv(b"\0" * 64)  # read-only
    assert dev.try_recv(bytearray(64)) == 48
    with pytest.raises(TypeError):
        drv.try_send(12)  # not a buffer
    # Positional only (the .pyi says so): one-argument calls without keyword parsing.
    with pytest.raises(TypeError):
        drv.try_send(buf=m)


def test_per_message_calls_after_close(fifo_pair):
    dev, drv, _ = fifo_pair
    drv.close()
    with pytest.raises(FifoClosedError):
        drv.try_send(make_msg(1))
    with pytest.raises(FifoClosedError):
        drv.try_recv(bytearray(64))
    with pytest.raises(FifoClosedError):
        drv.recv(bytearray(64), timeout=0)
    with pytest.raises(FifoClosedError):
        drv.send(make_msg(1), timeout=0)

def test_capacity_is_n_minus_one_and_burst(fifo_pair):
    dev, drv, _ = fifo_pair
    n = dev.num_slots
    msgs = b"".join(make_msg(i) for i in range(2 * n))
    assert drv.send_burst(msgs, 64) == n - 1
    assert not drv.try_send(make_msg(0))
    into = bytearray(64 * 200)
    assert dev.recv_burst(into, max_count=5) == 5
    assert dev.recv_burst(into) == n - 6
    seqs = [struct.unpack_from("<Q", into, i * 64 + 8)[0] for i in range(n - 6)]
    assert seqs == list(range(5, n - 1))
    assert dev.recv_burst(into) == 0


def test_send_many_recv_many(fifo_pair):
    dev, drv, _ = fifo_pair
    msgs = [make_msg(i, 8 + i % 57) for i in range(20)]
    assert dev.send_many(msgs) == 20
    assert drv.recv_many() == msgs


def test_message_validation_is_local_error(fifo_pair):
    dev, drv, _ = fifo_pair
    with pytest.raises(ValueError, match="does not fit"):
        dev.try_send(b"\0" * 65)
    with pytest.raises(ValueError, match="does not fit"):
        dev.try_send(b"\0" * 4)
    with pytest.raises(ValueError, match="msg_size"):
        dev.try_send(struct.pack("<BBHHH", 0, 2, 0, 1, 40) + b"\0" * 8)  # says 40, gives 16
    # too-small receive buffer: error, and the message stays queued
    assert drv.try_send(make_msg(1, 64))
    with pytest.raises(ValueError, match="smaller"):
        dev.try_recv(bytearray(16))
    assert dev.try_recv(bytearray(64)) == 64


def test_blocking_recv_wakes_on_send_and_times_out(fifo_pair):
    dev, drv, _ = fifo_pair
    dev.spin_ns = 0  # go to sleep at once so the doorbell path is used
    t = threading.Timer(0.05, lambda: drv.try_send(make_msg(7)))
    t.start()
    buf = bytearray(64)
    assert dev.recv(buf, timeout=5) == 64
    t.join()
    assert dev.sleeps >= 1 and drv.rings >= 1
    with pytest.raises(TimeoutError):
        dev.recv(buf, timeout=0.02)


def test_no_ring_while_receiver_is_busy(fifo_pair):
    """Suppression: a receiver that is not asleep costs the sender no syscall."""
    dev, drv, _ = fifo_pair
    for i in range(10):
        assert drv.try_send(make_msg(i))
        assert dev.try_recv(bytearray(64)) == 64
    assert drv.rings == 0


def test_lost_wakeup_race_many_times():
    """Receiver goes to sleep while the sender publishes: must always wake."""
    region = Region.memfd(16384)
    a, b = EventfdDoorbell.pair()
    dev = MsgFifo(region, role="device", doorbell=a, spin_us=0)
    drv = MsgFifo(region, role="driver", doorbell=b, spin_us=0)
    start_pair(dev, drv)
    rounds = 2000
    done = []

    def sender():
        for i in range(rounds):
            while not drv.try_send(make_msg(i)):
                pass
        done.append(True)

    t = threading.Thread(target=sender)
    t.start()
    buf = bytearray(64)
    for i in range(rounds):
        assert dev.recv(buf, timeout=5) == 64   # a lost wake-up would time out
        assert struct.unpack_from("<Q", buf, 8)[0] == i
    t.join()
    assert done


def test_polling_doorbell_blocking_recv():
    region = Region.memfd(16384)
    dev = MsgFifo(region, role="device", doorbell=PollingDoorbell(), spin_us=10)
    drv = MsgFifo(region, role="driver")
    start_pair(dev, drv)
    threading.Timer(0.03, lambda: drv.try_send(make_msg(3))).start()
    assert dev.recv_bytes(timeout=5) == make_msg(3)
    with pytest.raises(TimeoutError):
        dev.recv_bytes(timeout=0.01)


@pytest.mark.parametrize("layout", ["b", "a"])
def test_blocking_recv_is_interruptible(layout):
    region = Region.memfd(16384)
    a, b = EventfdDoorbell.pair()
    dev = MsgFifo(region, role="device", layout=layout, doorbell=a)
    drv = MsgFifo(region, role="driver", layout=layout, doorbell=b)
    start_pair(dev, drv)

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        with pytest.raises(Interrupted):
            dev.recv(bytearray(64), timeout=30)
    finally:
        signal.signal(signal.SIGUSR1, old)


# ---- Gen B layout and handshake ------------------------------------------------

def test_default_layout_matches_reference():
    lay = default_layout(8192)
    assert lay["num_queue_elements"] == 63
    assert lay["dev_queue_elements_offset"] == 80
    assert lay["drv_queue_elements_offset"] == 4112
    assert lay["dev_queue_head_offset"] == 64 and lay["drv_queue_head_offset"] == 72


def test_layout_bytes_as_written_by_device():
    region = Region.memfd(8192)
    dev, drv = MsgFifo(region, role="device"), MsgFifo(region, role="driver")
    start_pair(dev, drv)
    raw = region.read(0, 16)
    assert raw[:2] == b"\x4f\x4c" and raw[2:8] == bytes([64, 0, 1, 0, 0, 0])
    assert region.read(64, 2) == b"\x4f\x51" and region.read(72, 2) == b"\x4f\x51"
    assert region.load16(66) & 0x1F == 2 and region.load16(74) & 0x1F == 2  # RUN, RUN


def _good_layout():
    lay = default_layout(8192)
    lay.update(magic=0x4C4F, length=64, version=1, features=0, num_notif=0,
               num_vq_notif_per_device=0, reserved=0, dev_notif_offset=0, drv_notif_offset=0)
    return lay


@pytest.mark.parametrize("field,value", [
    ("magic", 0x1234), ("length", 32), ("version", 2), ("features", 0x8),
    ("reserved", 1), ("num_notif", 65), ("num_queue_elements", 1),
    ("size_queue_elements", 0), ("dev_queue_head_offset", 0),
    ("dev_queue_head_offset", 65), ("drv_queue_elements_offset", 8000),
    ("drv_queue_head_offset", 100), ("dev_queue_elements_offset", 8100),
    ("drv_notif_offset", 8),
])
def test_layout_validation_names_the_field(field, value):
    lay = _good_layout()
    lay[field] = value
    with pytest.raises(LayoutError) as ei:
        validate_layout(lay, 8192)
    assert ei.value.field == field


def test_num_notif_checks_vq_notif_per_device():
    lay = _good_layout()
    lay.update(num_notif=1, num_vq_notif_per_device=3, dev_notif_offset=8144, drv_notif_offset=8160)
    with pytest.raises(LayoutError) as ei:
        validate_layout(lay, 8192)
    assert ei.value.field == "num_vq_notif_per_device"


def test_driver_rejects_corrupt_layout_from_device():
    region = Region.memfd(8192)
    peer = PyFifoPeer(region.view(), role="device")
    peer.write_layout()
    region.store64(56, 1 << 40)  # drv_queue_elements_offset far outside
    drv = MsgFifo(region, role="driver")
    with pytest.raises(LayoutError, match="drv_queue_elements_offset"):
        drv.start(timeout=1)
    peer.release()


def test_handshake_timeouts_are_clear():
    region = Region.memfd(8192)
    drv = MsgFifo(region, role="driver")
    with pytest.raises(HandshakeTimeout, match="is the device side running"):
        drv.start(timeout=0.05)
    dev = MsgFifo(region, role="device")
    with pytest.raises(HandshakeTimeout, match="never came up"):
        dev.start(timeout=0.05)
    assert dev.my_state() == "INIT"


def test_interop_with_python_reference_peer():
    """The Cython device and the pure-Python driver agree on every byte."""
    region = Region.memfd(8192)
    dev = MsgFifo(region, role="device")
    peer = PyFifoPeer(region.view(), role="driver")
    t = threading.Thread(target=peer.handshake)
    t.start()
    dev.start(5)
    t.join()
    buf = bytearray(64)
    for i in range(300):  # several wraps of the 63-slot ring
        assert peer.send(make_msg(i, 8 + i % 57))
        assert dev.try_recv(buf) == 8 + i % 57 and bytes(buf[:8 + i % 57]) == make_msg(i, 8 + i % 57)
        assert dev.try_send(make_msg(i))
        assert peer.recv() == make_msg(i)
    peer.release()


# ---- hostile peer ------------------------------------------------------------

def _dev_with_peer(layout="b"):
    region = Region.memfd(16384)
    dev = MsgFifo(region, role="device", layout=layout)
    peer = PyFifoPeer(region.view(), role="driver", layout=layout)
    if layout == "b":
        t = threading.Thread(target=peer.handshake)
        t.start()
        dev.start(5)
        t.join()
    else:
        dev.start()
    return dev, peer


@pytest.mark.parametrize("layout,bad", [("b", 63), ("b", 64), ("b", 0xFFFF), ("a", 62), ("a", 1000),
                                        ("a", 0xFFFFFFFF)])
def test_peer_producer_index_out_of_range(layout, bad):
    dev, peer = _dev_with_peer(layout)
    peer.poke_prod(bad)
    with pytest.raises(FifoBrokenError, match="producer index"):
        dev.try_recv(bytearray(64))
    with pytest.raises(FifoBrokenError):  # stays broken
        dev.try_send(make_msg(0))
    assert dev.state == "broken"


@pytest.mark.parametrize("layout", ["b", "a"])
def test_peer_consumer_index_jumping_is_detected(layout):
    dev, peer = _dev_with_peer(layout)
    for i in range(3):
        assert dev.try_send(make_msg(i))
    assert dev.free_slots() == dev.num_slots - 4
    peer.poke_cons(10)  # claims to have consumed messages we never sent
    with pytest.raises(FifoBrokenError, match="jumped"):
        dev.free_slots()
    with pytest.raises(FifoBrokenError):
        dev.try_send(make_msg(0))


@pytest.mark.parametrize("layout", ["b", "a"])
@pytest.mark.parametrize("bad_size", [0, 5, 65, 0xFFFF])
def test_bad_msg_size_is_dropped_and_nothing_else_lost(layout, bad_size):
    dev, peer = _dev_with_peer(layout)
    assert peer.send(make_msg(1))
    assert peer.send(make_msg(2))
    assert peer.send(make_msg(3))
    peer.poke_slot_size(1, bad_size)
    buf = bytearray(64 * 8)
    assert dev.try_recv(buf) == 64
    with pytest.raises(BadMessageSize):
        dev.try_recv(buf)
    assert dev.try_recv(buf) == 64 and struct.unpack_from("<Q", buf, 8)[0] == 3
    # in a burst: the good ones come out first, the bad one is reported next call
    for i in range(3):
        peer.send(make_msg(10 + i))
    peer.poke_slot_size((3 + 1) % dev.num_slots, bad_size)
    assert dev.recv_burst(buf) == 1
    with pytest.raises(BadMessageSize):
        dev.recv_burst(buf)
    assert dev.recv_burst(buf) == 1
    assert dev.dropped == 2


def _slot_as_written(dev, peer, i, bad_size):
    """Slot ``i`` of the peer's ring as our FIFO must report it: the message
    the peer wrote, with the impossible msg_size poked in."""
    want = bytearray(make_msg(i).ljust(dev.slot_size, b"\0"))
    struct.pack_into("<H", want, peer.msg_size_off, bad_size & 0xFFFF)
    return bytes(want)


@pytest.mark.parametrize("layout", ["b", "a"])
def test_bad_msg_size_carries_the_slot_that_was_read(layout):
    """The dropped message goes with its report: the whole slot, as read (a
    tracer records it; the capture format says "at most one slot")."""
    dev, peer = _dev_with_peer(layout)
    buf = bytearray(64 * 8)
    for i in range(3):
        assert peer.send(make_msg(i))
    peer.poke_slot_size(0, 0xFFFF)
    with pytest.raises(BadMessageSize) as e:
        dev.try_recv(buf)
    assert e.value.msg_size == 0xFFFF
    assert e.value.data == _slot_as_written(dev, peer, 0, 0xFFFF)
    # in a burst: reported by the next call, from our own copy
    peer.poke_slot_size(2, 3)
    assert dev.recv_burst(buf) == 1
    for i in range(3, 6):                  # the burst buffer is reused meanwhile
        assert peer.send(make_msg(i))
    with pytest.raises(BadMessageSize) as e:
        dev.recv_burst(buf, max_count=1)
    assert e.value.msg_size == 3 and e.value.data == _slot_as_written(dev, peer, 2, 3)
    # recv_many: good messages first, the bad one (and its bytes) next call
    peer.poke_slot_size(4, 0)
    assert len(dev.recv_many()) == 1
    with pytest.raises(BadMessageSize) as e:
        dev.recv_many()
    assert e.value.data == _slot_as_written(dev, peer, 4, 0)
    assert dev.dropped == 3


def test_a_tracer_records_the_malformed_slot_as_read(tmp_path):
    """What BadMessageSize carries is what the capture holds for a malformed
    slot (pcapng: "the bytes that were read, at most one slot"), and it reads
    back as malformed."""
    from vmsgamp.trace import DIR_OUTBOUND, Tracer, line, message_entry, read_capture

    dev, peer = _dev_with_peer("b")
    assert peer.send(make_msg(7))
    peer.poke_slot_size(0, 0xFFFF)
    with pytest.raises(BadMessageSize) as e:
        dev.try_recv(bytearray(64))
    path = tmp_path / "bad.pcapng"
    with Tracer(path, background=False) as tr:
        tap = tr.tap("memfd:bad", role="device")
        tap.rx(e.value.data)
    _, packets = read_capture(path)
    assert [p.data for p in packets] == [e.value.data]
    assert len(packets[0].data) == dev.slot_size and packets[0].direction == DIR_OUTBOUND
    entry = message_entry(packets[0].data)
    assert "malformed" in line(packets[0].time_ns, packets[0].direction, entry)


def test_peer_silent_restart_is_reported_not_mixed():
    dev, peer = _dev_with_peer("b")
    assert peer.send(make_msg(1))
    assert dev.try_recv(bytearray(64)) == 64
    # The peer restarts: INIT with zeroed indices, then READY again.
    peer.set_state(0)
    peer.poke_prod(0)
    peer.poke_cons(0)
    with pytest.raises(PeerRestarted) as ei:
        dev.try_recv(bytearray(64))
    assert ei.value.event == "restart"
    assert dev.my_state() == "INIT" and dev.state == "stopped"
    with pytest.raises(RuntimeError, match="start"):
        dev.try_send(make_msg(0))
    # Both sides come back; old traffic is gone, new traffic flows.
    t = threading.Thread(target=peer.handshake)
    t.start()
    dev.start(5)
    t.join()
    assert dev.try_recv(bytearray(64)) == 0
    assert peer.send(make_msg(9)) and dev.recv_bytes(timeout=1) == make_msg(9)


@pytest.mark.parametrize("state,cls,event", [(3, PeerShutdown, "shutdown"), (4, PeerShutdown, "dead"),
                                             (17, FifoBrokenError, None)])
def test_peer_shutdown_and_garbage_state(state, cls, event):
    dev, peer = _dev_with_peer("b")
    peer.set_state(state)
    with pytest.raises(cls) as ei:
        dev.try_recv(bytearray(64))
    if event:
        assert ei.value.event == event


def test_blocked_receiver_notices_peer_shutdown():
    """A waiter never hangs on a peer that went away without ringing."""
    dev, peer = _dev_with_peer("b")
    threading.Timer(0.05, peer.set_state, (3,)).start()
    with pytest.raises(PeerShutdown):
        dev.recv(bytearray(64), timeout=10)


def test_close_shuts_down_and_releases_region():
    region = Region.memfd(16384)
    dev = MsgFifo(region, role="device")
    drv = MsgFifo(region, role="driver")
    start_pair(dev, drv)
    region.close()
    assert region.mapped  # pinned by the FIFOs
    assert dev.try_send(make_msg(1)) and drv.try_recv(bytearray(64)) == 64
    drv.close()
    with pytest.raises(PeerShutdown):
        dev.try_recv(bytearray(64))
    dev.close()
    assert not region.mapped
    dev.close()  # idempotent


def test_not_started_and_bad_arguments():
    region = Region.memfd(16384)
    f = MsgFifo(region, role="device")
    with pytest.raises(RuntimeError, match="start"):
        f.try_send(make_msg(0))
    with pytest.raises(ValueError):
        MsgFifo(region, role="both")
    with pytest.raises(ValueError):
        MsgFifo(region, layout="c")
    with pytest.raises(IndexError):
        MsgFifo(region, offset=12000)
    small = Region.memfd(4096)
    with pytest.raises(ValueError, match="placement"):
        MsgFifo(small, layout="a", placement="4k/8k", window=4096)


def test_gen_a_placements_and_g1_header():
    region = Region.memfd(16384)
    dev = MsgFifo(region, role="device", layout="a", placement="4k/8k", header="g1")
    drv = MsgFifo(region, role="driver", layout="a", placement="4k/8k", header="g1")
    dev.start(reset=True)
    drv.start()
    m = make_msg(5, 44, header="g1")
    assert drv.try_send(m)
    # driver->device block sits at +4 KiB: head index there is now 1
    assert region.load32(4096) == 1 and region.load32(8192) == 0
    assert dev.recv_bytes(timeout=1) == m
    assert read_layout(region)["magic"] == 0  # Gen A writes no descriptor


def test_arm_wait_makes_the_sender_ring(fifo_pair):
    dev, drv, _ = fifo_pair
    assert dev.arm_wait() is False          # empty: we may sleep
    assert drv.try_send(make_msg(1))
    assert drv.rings == 1                   # the sender saw WAITING and rang
    assert dev.doorbell.wait(1)
    dev.disarm_wait()
    assert drv.try_send(make_msg(2))
    assert drv.rings == 1                   # not waiting any more: no ring
    assert dev.arm_wait() is True           # already readable: do not sleep
    assert len(dev.recv_many()) == 2


def test_messages_sent_before_shutdown_are_delivered_first():
    dev, peer = _dev_with_peer("b")
    assert peer.send(make_msg(1)) and peer.send(make_msg(2))
    peer.set_state(3)  # SHUTDOWN right after its last messages
    assert dev.recv_bytes(timeout=1) == make_msg(1)
    assert dev.recv_bytes(timeout=1) == make_msg(2)
    with pytest.raises(PeerShutdown):
        dev.recv_bytes(timeout=1)


def test_restart_drops_stale_messages():
    dev, peer = _dev_with_peer("b")
    assert peer.send(make_msg(1))
    peer.set_state(0)  # silent restart: what is left is the old session's
    with pytest.raises(PeerRestarted):
        dev.try_recv(bytearray(64))
