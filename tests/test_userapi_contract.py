"""One test per rule of the user-API contract (docs/vmsg-lb.md, "Messages"
and "What the device side must answer"), against the fake kernel: first
that the fake keeps the rule (so the end-to-end tests mean something), then
that UserApiServer and the vmsg-lb carrier keep it, hazards included (a
stray response, malformed messages, a reset while buffers are held, a
model that stalls, a REMOVE that never returns)."""
from __future__ import annotations

import errno
import select
import struct
import threading

import pytest

from userapi_helpers import BASE, assert_one_response_per_read, loopback, message, status_of
from vmsgamp.carriers.vmsg_lb import (
    HEADER, IOCTL_VMSG_LB_ADD, MSG_SIZE, READ_SIZE, VmsgLbError,
)
from vmsgamp.devices.console import CallbackBackend, ConsoleDevice
from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import TransportMsgId as T
from vmsgamp.testing.fake_userapi import FakeUserApiKernel, KernelHang


def _in_thread(fn, *args):
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _poll(fd: int) -> int:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLOUT)
    return dict(p.poll(0)).get(fd, 0)


# ---- section "Messages": read / write / poll on the message node ------------------------------

def test_read_needs_50_bytes_and_never_blocks():
    with FakeUserApiKernel() as k:
        nodes = k.open_nodes()
        with pytest.raises(BlockingIOError):
            nodes.read(64)                       # nothing pending: EAGAIN at once
        t, out = _in_thread(k.transfer, message(T.GET_DEVICE_STATUS, 0))
        assert k.wait_until(lambda k: k.pending() == 1, 5)
        with pytest.raises(OSError) as e:
            nodes.read(49)
        assert e.value.errno == errno.EINVAL
        assert nodes.read(READ_SIZE) == message(T.GET_DEVICE_STATUS, 0)   # exactly msg_size bytes
        nodes.write(message(T.GET_DEVICE_STATUS, 0, bytes(4), mtype=1))
        t.join(5)
        assert out["value"][0][:12] == message(T.GET_DEVICE_STATUS, 0, bytes(4), mtype=1)
    assert READ_SIZE >= MSG_SIZE


def test_poll_in_only_while_a_message_is_pending_out_always():
    with FakeUserApiKernel() as k:
        nodes = k.open_nodes()
        fd = nodes.fileno()
        assert _poll(fd) == select.POLLOUT
        t, _ = _in_thread(k.transfer, message(T.GET_DEVICE_INFO, 2))
        assert k.wait_until(lambda k: k.pending() == 1, 5)
        assert _poll(fd) == select.POLLIN | select.POLLOUT
        nodes.read(64)
        assert _poll(fd) == select.POLLOUT        # consumed by the read, though unanswered
        nodes.write(message(T.GET_DEVICE_INFO, 2, mtype=1))
        t.join(5)


def test_write_needs_a_header_and_the_carrier_never_sends_less():
    with loopback(start=False) as (k, carrier, _):
        with pytest.raises(OSError) as e:
            carrier.nodes.write(b"\x01" * 7)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(ValueError):
            carrier.write_message(b"\x01" * 7)
        assert carrier.read_message() is None     # EAGAIN is "nothing pending", not an error
        assert not any(kind == "write" for kind, _ in k.transcript)


def test_response_releases_the_transfer_whatever_its_ids_token_mismatch_warns():
    with FakeUserApiKernel() as k:
        nodes = k.open_nodes()
        t, out = _in_thread(k.transfer, message(T.GET_DEVICE_STATUS, 5, token=1))
        assert k.wait_until(lambda k: k.pending() == 1, 5)
        nodes.read(64)
        nodes.write(message(T.GET_VQUEUE, 9, struct.pack("<I", 7), mtype=1, token=3))
        t.join(5)
        response, by_stray = out["value"]
        assert not by_stray and status_of(response) == 7
        assert k.stats["token_warnings"] == 1 and any("token 3" in line for line in k.log)


def test_event_used_interrupts_known_queues_and_other_writes_are_ignored():
    with loopback(check=False) as (k, carrier, server):
        server.add_device(0, RngDevice(), timeout=30)
        before = k.stats["events_used"]
        carrier.write_message(message(T.EVENT_USED, 9, struct.pack("<I", 0)))      # unknown dev: ignored
        carrier.write_message(message(T.EVENT_USED, 0, struct.pack("<I", 5)))      # unknown vq: logged
        carrier.write_message(message(T.EVENT_CONFIG, 0, bytes(16)))               # unsupported
        carrier.write_message(message(0x02, 0, mtype=2))                            # a bus message
        assert k.stats["events_used"] == before
        assert any("unknown vq 5" in line for line in k.log)
        assert k.stats["unsupported_writes"] == 2
        carrier.write_message(message(T.EVENT_USED, 0, struct.pack("<I", 0)))
        assert k.stats["events_used"] == before + 1


# ---- section "What the device side must answer" -------------------------------------------------

def test_one_transfer_in_flight_for_the_whole_bus():
    with FakeUserApiKernel() as k:
        nodes = k.open_nodes()
        first, second = message(T.GET_DEVICE_STATUS, 1), message(T.GET_DEVICE_STATUS, 2)
        ta, _ = _in_thread(k.transfer, first)
        assert k.wait_until(lambda k: k.pending() == 1, 5)
        tb, _ = _in_thread(k.transfer, second)
        assert tb.is_alive() and k.pending() == 1       # the second waits for the first's answer
        assert nodes.read(64) == first
        tb.join(0.05)
        assert tb.is_alive() and k.pending() == 0       # read is not enough: it waits for the RESPONSE
        nodes.write(message(T.GET_DEVICE_STATUS, 1, bytes(4), mtype=1))
        assert k.wait_until(lambda k: k.pending() == 1, 5)
        assert nodes.read(64) == second
        nodes.write(message(T.GET_DEVICE_STATUS, 2, bytes(4), mtype=1))
        ta.join(5)
        tb.join(5)
        assert not ta.is_alive() and not tb.is_alive()


def test_every_message_gets_one_response_and_event_avail_the_exact_ack():
    with loopback() as (k, carrier, server):
        server.add_device(0x0102, RngDevice(), timeout=30)
        k.read_entropy(0x0102, 256)
        assert_one_response_per_read(k)
        acks = [d for kind, d in k.transcript if kind == "write" and d[1] == T.EVENT_AVAIL]
        assert acks and all(a == bytes.fromhex("0141020100000800") for a in acks)
        assert server.stats["acks"] == len(acks) == sum(
            1 for kind, d in k.transcript if kind == "read" and d[1] == T.EVENT_AVAIL)


def test_a_stray_response_shifts_the_bus_by_one():
    # The hazard itself, in the fake: why the server must never write one.
    with loopback(check=False) as (k, carrier, server):
        carrier.write_message(message(T.GET_DEVICE_INFO, 0, bytes(24), mtype=1))
        with pytest.raises(VmsgLbError, match="answered GET_DEVICE_INFO with device_id 4: the bus is off "
                                              "by one") as e:
            server.add_device(0, RngDevice(), timeout=30)
        assert e.value.errno == errno.ENODEV
        # Our (correct) answer to the GET_DEVICE_INFO now has no transfer: a stray again.
        assert k.wait_until(lambda k: k.stats["strays"] == 2, 5)
        assert server.transports == {}


def test_a_missing_response_is_a_kernel_hang():
    with FakeUserApiKernel(hang_timeout=0.2) as k:
        with pytest.raises(KernelHang):
            k.transfer(message(T.GET_DEVICE_INFO, 0))
        assert k.violations and "unanswered" in k.violations[0]


def test_get_device_info_rules_enforced_by_the_kernel():
    with FakeUserApiKernel() as k:
        nodes = k.open_nodes()

        def answer(device_id: int, bits: int) -> None:
            while k.pending() == 0:
                k.wait_until(lambda k: k.pending() > 0, 5)
            nodes.read(64)
            nodes.write(message(T.GET_DEVICE_INFO, 0, struct.pack("<IIIII", device_id, 1, bits, 0, 1),
                                mtype=1))

        for device_id, bits, err in ((4, 32, errno.EINVAL), (0, 64, errno.ENODEV)):
            t, _ = _in_thread(answer, device_id, bits)
            with pytest.raises(OSError) as e:
                nodes.ioctl(IOCTL_VMSG_LB_ADD, struct.pack("<I", 0))
            assert e.value.errno == err
            t.join(5)


def test_unknown_device_messages_get_well_formed_zero_answers():
    with loopback() as (k, carrier, server):
        resp, _ = k.transfer(message(T.GET_DEVICE_STATUS, 9))
        assert HEADER.unpack_from(resp) == (1, T.GET_DEVICE_STATUS, 9, 1, 12) and status_of(resp) == 0
        resp, _ = k.transfer(message(T.GET_DEVICE_INFO, 9))
        assert resp[1] == T.GET_DEVICE_INFO and struct.unpack_from("<I", resp, 8)[0] == 0
        resp, _ = k.transfer(message(T.EVENT_AVAIL, 9, bytes(8), token=0))
        assert resp[:8] == bytes.fromhex("0141090000000800")
        assert server.stats["unknown_device"] == 3
        # ADD of a dev_id no model serves: answered with device_id 0, so ENODEV, explained.
        with pytest.raises(VmsgLbError, match="device_id 0"):
            carrier.add_device(7)


MALFORMED = [
    message(0x33, 0),                                         # unknown transport msg_id
    message(T.GET_DEVICE_STATUS, 0, msg_size=40),             # msg_size beyond the bytes
    message(T.GET_DEVICE_STATUS, 0, msg_size=4),              # msg_size below a header
    message(T.SET_VQUEUE, 0, bytes(32)),                      # unpadded SET_VQUEUE (older API)
    message(T.EVENT_AVAIL, 0, token=0),                       # EVENT_AVAIL without its payload
    message(0x02, 0, bytes(8), mtype=2),                      # a bus message (GET_DEVICES)
    message(T.GET_DEVICE_STATUS, 0, bytes(4), mtype=1),       # a response, from the kernel
    message(T.EVENT_CONFIG, 0, bytes(16)),                    # an event the kernel never sends
    b"\xff" * 50,
    b"\x00\x07",                                              # shorter than a header
]


def test_malformed_messages_are_answered_counted_and_harmless():
    with loopback() as (k, carrier, server):
        server.add_device(0, RngDevice(), timeout=30)
        for raw in MALFORMED:
            resp, by_stray = k.transfer(raw)
            assert not by_stray
            want = bytes(raw[:8]).ljust(8, b"\0")
            if raw[1:2] == bytes([T.EVENT_AVAIL]):
                assert resp[:8] == bytes.fromhex("0141000000000800")
            else:
                assert resp[0] == want[0] | 1 and resp[1:6] == want[1:6]
        assert server.stats["malformed"] + server.stats["unexpected"] == len(MALFORMED)
        assert server.last_malformed is not None
        assert len(k.read_entropy(0, 32)) == 32           # the device is unharmed
        assert_one_response_per_read(k)


def test_addresses_outside_the_region_are_refused_not_followed():
    with loopback() as (k, carrier, server):
        server.add_device(0, RngDevice(), timeout=30)
        assert [w[:2] for w in server.aspace.windows] == [(BASE, carrier.region)]
        bad = struct.pack("<IIQQQ", 0, 16, BASE - 0x1000, BASE, BASE + 0x1000) + bytes(8)
        resp, _ = k.transfer(message(T.SET_VQUEUE, 0, bad))
        assert resp[:2] == bytes([1, T.SET_VQUEUE])
        assert server.transports[0].status & 0x40              # DEVICE_NEEDS_RESET
        assert server.stats["events_not_sent"] == 1            # its EVENT_CONFIG has no place on this bus
        assert k.stats["unsupported_writes"] == 0


def test_the_region_is_mapped_whole_and_never_beyond_lseek():
    with loopback(start=False) as (k, carrier, _):
        assert k.maps == [(0, k.size)] and carrier.size == k.size and carrier.region.size == k.size


def test_reset_while_the_device_holds_buffers():
    backend = CallbackBackend()
    with loopback() as (k, carrier, server):
        server.add_device(0, ConsoleDevice(backend, emerg_write=False), timeout=30)
        backend.feed(b"before\n")
        with k.locked():
            assert k.client(0).readline(timeout=5) == b"before\n"
        rx = k.devices[0].driver.queues[0]
        used = k.stats["events_used"]
        k.poweroff()                                   # SET_DEVICE_STATUS 0 while rx buffers are held
        assert server.transports[0].status == 0 and not server.transports[0].queues
        backend.feed(b"after\n")
        k.transfer(message(T.GET_DEVICE_STATUS, 0))    # the responder has looked at the input by now
        assert k.stats["events_used"] == used and not rx.has_used()
        assert_one_response_per_read(k)


def test_a_message_left_by_a_previous_responder_is_answered():
    with loopback(start=False) as (k, carrier, server):
        t, out = _in_thread(k.transfer, message(T.GET_DEVICE_STATUS, 3))
        assert k.wait_until(lambda k: k.pending() == 1, 5)
        server.start()
        t.join(10)
        assert HEADER.unpack_from(out["value"][0])[:2] == (1, T.GET_DEVICE_STATUS)


def test_a_failing_model_still_gets_its_message_answered():
    class BadConfig(RngDevice):
        def config_size(self) -> int:
            return 8

        def read_config(self, offset: int, length: int) -> bytes:
            raise RuntimeError("model bug")

    with loopback() as (k, carrier, server):
        server.add_device(0, BadConfig(), timeout=30)
        resp, _ = k.transfer(message(T.GET_CONFIG, 0, struct.pack("<III", 0, 0, 8)))
        assert HEADER.unpack_from(resp)[:2] == (1, T.GET_CONFIG)
        assert server.stats["handler_errors"] == 1
        assert len(k.read_entropy(0, 16)) == 16


def test_add_needs_a_running_responder():
    with loopback(start=False) as (k, carrier, server):
        with pytest.raises(RuntimeError, match="responder"):
            server.begin_add(0, RngDevice())
        assert k.ioctls == []


def test_watchdog_reports_a_late_response_loudly():
    gate = threading.Event()
    entered = threading.Event()

    class Slow(RngDevice):
        def features_ok(self, features: int) -> bool:
            entered.set()
            gate.wait(30)
            return True

    reports: list[str] = []
    with loopback() as (k, carrier, server):
        server.on_late = reports.append
        server.watchdog_interval = 3600        # only our explicit looks
        call = server.begin_add(0, Slow())
        assert entered.wait(10)
        assert not call.done                   # ADD returns only once the probe is answered
        busy = server._busy
        assert busy is not None
        assert server.check_late(busy.since + server.late_after / 2) is None
        report = server.check_late(busy.since + server.late_after + 0.1)
        assert report is not None and "SET_DEVICE_STATUS for dev_id 0" in report and "LATE" in report
        assert reports == [report] and server.stats["late"] == 1
        gate.set()
        call.result(30)
        assert server.check_late() is None


def test_watchdog_reports_a_responder_that_stopped_reading():
    import os

    gate = threading.Event()
    entered = threading.Event()
    r, w = os.pipe()

    class Stuck(RngDevice):
        def poll_fds(self):
            return (r,)

        def on_fd_ready(self, fd: int) -> None:
            os.read(fd, 1)
            entered.set()
            gate.wait(30)

    with loopback() as (k, carrier, server):
        server.watchdog_interval = 3600
        server.add_device(0, Stuck(), timeout=30)
        os.write(w, b"x")
        assert entered.wait(10)
        t, _ = _in_thread(k.transfer, message(T.GET_DEVICE_STATUS, 0))
        assert k.wait_until(lambda k: k.pending() == 1, 5)
        now = 1000.0
        assert server.check_late(now) is None                      # first look: remembered
        report = server.check_late(now + server.late_after)
        assert report is not None and "STALLED" in report and server.stats["stalls"] == 1
        gate.set()
        t.join(10)
        assert not t.is_alive()
    os.close(r)
    os.close(w)


def test_remove_that_never_returns_does_not_stop_the_answers():
    with loopback(remove_deadlocks=True) as (k, carrier, server):
        server.add_device(0, RngDevice(), timeout=30)
        call = server.begin_remove(0)
        assert not call.wait(0.2)
        assert len(k.read_entropy(0, 16)) == 16           # still answered meanwhile
        assert 0 in server.transports


def test_ioctl_errors_are_explained():
    with loopback(start=False) as (k, carrier, _):
        with pytest.raises(OSError) as e:
            carrier.nodes.ioctl(0x1234, struct.pack("<I", 0))
        assert e.value.errno == errno.ENOTTY
        with pytest.raises(OSError) as e:
            carrier.nodes.ioctl(IOCTL_VMSG_LB_ADD, b"\0")
        assert e.value.errno == errno.EFAULT
        with pytest.raises(VmsgLbError, match="is not on the bus"):
            carrier.remove_device(4)
        with pytest.raises(ValueError):
            carrier.add_device(0x10000)


def test_a_model_with_a_closed_fd_does_not_stop_the_responder():
    import os

    r = 4000                  # far above anything this test opens
    with pytest.raises(OSError):
        os.fstat(r)

    class Leaky(RngDevice):
        def poll_fds(self):
            return (r,)

    with loopback() as (k, carrier, server):
        server.add_device(0, Leaky(), timeout=30)
        assert len(k.read_entropy(0, 16)) == 16
        assert r in server._bad_fds
