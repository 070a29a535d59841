"""Tracer: every message an AmpBus sends and receives, in a pcapng capture."""
from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import PingRequest, decode, encode
from vmsgamp.testing.amp import amp_pair
from vmsgamp.trace import DIR_INBOUND, DIR_OUTBOUND, Tracer, interface_name, read_capture
from vmsgamp.trace._pcapng import encode_packets
from vmsgamp.trace._sink import EpbSink


def _by_iface(path):
    ifaces, packets = read_capture(path)
    out = {}
    for i, iface in enumerate(ifaces):
        role = "driver" if "driver side" in iface.comment else "device"
        out[role] = (iface, [p for p in packets if p.interface == i])
    return out


def _dir(packets, d):
    return [p.data for p in packets if p.direction == d]


def test_both_ends_of_a_bus_match_their_counters(tmp_path):
    path = tmp_path / "bus.pcapng"
    servers = []
    with Tracer(path) as tr:
        def hook(server):
            servers.append(server)
            server.bus.attach_tracer(tr, "memfd:pair#size=4M")

        with amp_pair(lambda: [RngDevice(), RngDevice()], process=False, server_hook=hook) as drv:
            drv.bus.attach_tracer(tr, "memfd:pair")
            for n in drv.enumerate():
                drv.info(n)
            drv.ping(5)
            drv_c = drv.bus.conn.counters
            drv_tx, drv_rx = drv_c.tx_messages, drv_c.rx_messages
        dev_c = servers[0].bus.conn.counters
    ends = _by_iface(path)
    assert set(ends) == {"driver", "device"}
    (di, dpk), (vi, vpk) = ends["driver"], ends["device"]
    assert di.name == vi.name == "memfd:pair"          # creation options are not part of the name
    assert di.description == vi.description == "virtio-msg g2"
    assert len(_dir(dpk, DIR_OUTBOUND)) == drv_tx and len(_dir(dpk, DIR_INBOUND)) == drv_rx
    assert len(_dir(vpk, DIR_INBOUND)) == dev_c.tx_messages
    assert len(_dir(vpk, DIR_OUTBOUND)) == dev_c.rx_messages + dev_c.rx_malformed
    # Same messages seen from both ends, in the same order.
    assert _dir(dpk, DIR_OUTBOUND) == _dir(vpk, DIR_OUTBOUND)
    assert _dir(dpk, DIR_INBOUND) == _dir(vpk, DIR_INBOUND)
    names = [decode(d).NAME for d in _dir(dpk, DIR_OUTBOUND)]
    assert names[0] == "GET_DEVICES" and names.count("PING") == 5
    assert all(p.time_ns > 0 for p in dpk) and [p.time_ns for p in dpk] == sorted(p.time_ns for p in dpk)


def test_attach_and_detach_while_running(tmp_path):
    path = tmp_path / "live.pcapng"
    with Tracer(path) as tr:
        with amp_pair(lambda: [RngDevice()], process=False) as drv:
            drv.ping(2)                      # not traced
            drv.bus.attach_tracer(tr)
            drv.ping(3)
            drv.bus.detach_tracer()
            drv.ping(4)                      # not traced
            drv.bus.attach_tracer(tr)
            drv.ping(1)
    ifaces, packets = read_capture(path)
    assert len(ifaces) == 1                  # re-attaching reuses the interface
    sent = [decode(p.data) for p in packets if p.direction == DIR_OUTBOUND]
    assert [m.data & 0xFFFF for m in sent] == [0, 1, 2, 0]     # ping() numbers its pings from 0
    assert all(isinstance(m, PingRequest) for m in sent)
    assert sum(p.direction == DIR_INBOUND for p in packets) == 4


def test_device_role_sends_inbound():
    buf = io.BytesIO()
    tr = Tracer(buf, background=False)
    tap = tr.tap("shm:x", profile="g1", role="device")
    tap.tx(b"tx-bytes")
    tap.rx(b"rx-bytes")
    tr.flush()
    ifaces, packets = read_capture(buf.getvalue())
    assert ifaces[0].profile == "g1"
    assert [(p.data, p.direction) for p in packets] == [(b"tx-bytes", DIR_INBOUND), (b"rx-bytes", DIR_OUTBOUND)]
    tr.close()


def test_flushed_capture_is_readable_while_open_and_close_is_idempotent(tmp_path):
    path = tmp_path / "open.pcapng"
    tr = Tracer(path)
    tap = tr.tap("shm:x", role="driver")
    msg = encode(PingRequest(token=1, data=1))
    for _ in range(1000):
        tap.tx(msg)
    assert tr.flush() == 1000
    assert len(read_capture(path)[1]) == 1000
    tr.close()
    tr.close()
    tap.tx(msg)                               # a closed tracer's taps do nothing
    assert tr.pending == 0
    assert tr.summary() == {"file": str(path), "messages": 1000, "driver_to_device": 1000,
                            "device_to_driver": 0}
    with pytest.raises(ValueError, match="closed"):
        tr.tap("shm:y")


def test_interface_name_drops_creation_options():
    assert interface_name("shm:bus#create=1&size=1M") == "shm:bus"
    assert interface_name("shm:bus#size=1M&offset=0x1000") == "shm:bus#offset=0x1000"
    assert interface_name("ivshmem:/tmp/s#wait_peer=0&peer=2") == "ivshmem:/tmp/s#peer=2"
    assert interface_name(None) == "region"


def test_a_malformed_slot_is_in_the_capture_as_it_was_read(tmp_path):
    """The bus drops a slot whose msg_size is impossible (counted as
    rx_malformed); the capture still holds it, the whole slot as read, so the
    capture and the counters agree."""
    import threading

    from vmsgamp._core.fifo import MsgFifo
    from vmsgamp._core.region import Region
    from vmsgamp.bus import AmpBus
    from vmsgamp.protocol import DeviceConnection
    from vmsgamp.testing.fifo_model import PyFifoPeer

    region = Region.memfd(16384)
    dev = MsgFifo(region, role="device", layout="b")
    peer = PyFifoPeer(region.view(), role="driver", layout="b")
    t = threading.Thread(target=peer.handshake)
    t.start()
    dev.start(5)
    t.join()
    path = tmp_path / "bad.pcapng"
    ping = encode(PingRequest(data=7, token=1))
    with Tracer(path, background=False) as tr:
        bus = AmpBus(dev, DeviceConnection(), tracer=tr, trace_name="memfd:bad")
        assert peer.send(ping)
        peer.poke_slot_size(0, 0xFFFF)
        assert peer.send(ping)
        bus.poll(0.5)
        c = bus.conn.counters
        assert (c.rx_malformed, c.rx_messages) == (1, 1)
        bus.close()
    _, packets = read_capture(path)
    got = _dir(packets, DIR_OUTBOUND)
    assert len(got) == 2 and len(got[0]) == dev.slot_size and got[1] == ping
    peer.release()


# ---- the hot path: encoded by the tap, handed over whole to the writer -------------------

_MESSAGES = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3), st.binary(max_size=300),
                               st.integers(0, 2**64 - 1)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(_MESSAGES)
def test_the_sink_encodes_exactly_as_the_reference_encoder(messages):
    """EpbSink (C) against encode_packets (pure Python, the oracle)."""
    sink = EpbSink()
    for iface, direction, data, ts in messages:
        sink.record(iface, direction, data, ts)
    ref = bytearray()
    encode_packets([(ts, iface << 2 | direction, data) for iface, direction, data, ts in messages], ref)
    assert sink.pending == len(messages) and sink.pending_bytes == len(ref)
    buf, count = sink.take()
    assert (bytes(buf), count) == (bytes(ref), len(messages))
    assert (sink.pending, sink.pending_bytes, sink.take()) == (0, 0, (bytearray(), 0))


def test_taps_encode_as_they_record_and_the_writer_writes_each_buffer_whole():
    """The writer thread shares the GIL with the bus thread: the taps leave
    it nothing to do per message.  By the time tx/rx return the message is
    an encoded block; a flush is one write() of the buffer as taken (the
    Python writer encoded 512 messages per write while the bus waited)."""
    class Recorder(io.BytesIO):
        def __init__(self):
            super().__init__()
            self.writes = []

        def write(self, b):
            self.writes.append(len(b))
            return super().write(b)

    f = Recorder()
    tr = Tracer(f, background=False)
    tap = tr.tap("memfd:hot", role="driver")
    f.writes.clear()
    sizes = [12 + i % 50 for i in range(3000)]
    expect = 0
    for i, n in enumerate(sizes):
        (tap.tx if i % 3 else tap.rx)(bytes(n))
        expect += 44 + n + (-n & 3)
    assert tr.pending == 3000 and tr._sink.pending_bytes == expect
    assert tr.flush() == 3000 and f.writes == [expect] and tr.flushes == 1
    assert tr.flush() == 0 and f.writes == [expect]          # nothing pending: no write
    _, packets = read_capture(io.BytesIO(f.getvalue()))
    assert [len(p.data) for p in packets] == sizes
    assert [p.direction for p in packets] == [DIR_OUTBOUND if i % 3 else DIR_INBOUND for i in range(3000)]
    assert tr.counts == {(0, DIR_OUTBOUND): 2000, (0, DIR_INBOUND): 1000}
    tr.close()


def test_a_buffer_taken_by_the_writer_is_never_written_again():
    """take() hands the bytearray over: records after it go to a new one,
    even while the old one is still being written (exported)."""
    sink = EpbSink()
    for i in range(2000):                     # past the first buffer's size: it grows
        sink.record(0, 2, bytes(100), i)
    first, n = sink.take()
    assert n == 2000
    before = bytes(first)
    with memoryview(first):                   # the writer's write() in progress
        for i in range(3000):
            sink.record(1, 1, b"\xff" * 100, i)
    assert bytes(first) == before
    second, m = sink.take()
    assert m == 3000 and len(second) == 3000 * 144 and second[:4] == b"\x06\x00\x00\x00"


def test_taps_take_any_bytes_like_object_and_nothing_else():
    """A tap never breaks the bus over a type: bytes-likes are copied; what
    is not bytes-like is refused before anything is recorded."""
    f = io.BytesIO()
    tr = Tracer(f, background=False)
    tap = tr.tap("memfd:x")
    data = bytearray(b"abcd")
    tap.tx(data)
    tap.rx(memoryview(b"wxyz")[1:])
    data[:] = b"ZZZZ"                          # recorded as it was at the call
    tr.record(0, DIR_INBOUND, bytearray(b"ef"))
    for bad in (None, "ab", 3):
        with pytest.raises(TypeError):
            tap.tx(bad)
        with pytest.raises(TypeError):
            tr.record(0, DIR_INBOUND, bad)
    assert tr.pending == 3
    tr.close()
    _, packets = read_capture(io.BytesIO(f.getvalue()))
    assert [(p.data, p.direction) for p in packets] == [
        (b"abcd", DIR_OUTBOUND), (b"xyz", DIR_INBOUND), (b"ef", DIR_INBOUND)]
