"""The connections' fast paths (PING: start_ping / ping_response /
ping_answer; kicks: DriverConnection.notify's cached bytes and
DeviceConnection.event_avail) against the generic machinery as the oracle:
the same bytes on the wire, the same counters, the same events on timeout
and reset, and every message the fast check refuses still taken by
receive_bytes."""
from __future__ import annotations

import struct

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from vmsgamp.errors import LocalProtocolError
from vmsgamp.protocol import (DeviceConnection, DriverConnection, EventAvail, GetDevicesRequest,
                              NotificationReceived, PingRequest, PingResponse, RequestCancelled,
                              RequestTimedOut, ResponseReceived, decode, encode)

PROFILES = ("g2", "g1")


def _pair(profile: str, pad_to: int | None = None) -> tuple[DriverConnection, DeviceConnection]:
    return (DriverConnection(profile=profile, pad_to=pad_to), DeviceConnection(profile=profile, pad_to=pad_to))


@settings(max_examples=60, deadline=None)
@given(profile=st.sampled_from(PROFILES), pad_to=st.sampled_from([None, 64, 96]),
       data=st.integers(0, 0xFFFFFFFF))
def test_start_ping_sends_the_bytes_send_would(profile: str, pad_to: int | None, data: int) -> None:
    fast, generic = DriverConnection(profile=profile, pad_to=pad_to), DriverConnection(profile=profile, pad_to=pad_to)
    out = fast.start_ping(data, 0.0)
    assert out == generic.send(PingRequest(data=data), 0.0)
    assert fast.counters == generic.counters
    assert fast.ping_pending and fast.pending_requests() == 1


@settings(max_examples=60, deadline=None)
@given(profile=st.sampled_from(PROFILES), pad_to=st.sampled_from([None, 64, 96]),
       data=st.integers(0, 0xFFFFFFFF), token=st.integers(1, 0xFFFF), dev_num=st.integers(0, 0xFFFF))
def test_ping_answer_is_what_receive_bytes_answers(profile: str, pad_to: int | None, data: int,
                                                   token: int, dev_num: int) -> None:
    wire = encode(PingRequest(dev_num=dev_num, token=token, data=data), profile=profile, pad_to=pad_to)
    fast, generic = DeviceConnection(profile=profile, pad_to=pad_to), DeviceConnection(profile=profile, pad_to=pad_to)
    answer = fast.ping_answer(wire)
    generic.receive_bytes(wire, 0.0)
    assert [answer] == generic.data_to_send()
    assert fast.counters.pings_answered == generic.counters.pings_answered == 1
    assert fast.counters.rx_messages == generic.counters.rx_messages
    assert fast.counters.tx_messages == generic.counters.tx_messages


@pytest.mark.parametrize("profile", PROFILES)
def test_round_trip_through_both_fast_paths(profile: str) -> None:
    drv, dev = _pair(profile, pad_to=64)
    for data in (0, 1, 0xFFFFFFFF, 0x5A000007):
        (wire,) = drv.start_ping(data, 1.0)
        answer = dev.ping_answer(wire)
        assert answer is not None and len(answer) == 64
        assert drv.ping_response(answer, 1.0)
        assert not drv.ping_pending and drv.ping_result == data
        assert drv.pending_requests() == 0
    assert drv.counters.rx_messages == 4 and drv.counters.tx_messages == 4


def test_start_ping_waits_its_turn_behind_a_bus_request() -> None:
    drv = DriverConnection()
    drv.send(GetDevicesRequest(offset=0, count=32), 0.0)
    assert drv.start_ping(1, 0.0) is None          # nothing done: the caller uses send()
    assert drv.pending_requests() == 1 and not drv.ping_pending


def test_a_request_sent_while_the_ping_waits_goes_out_after_its_answer() -> None:
    drv, dev = _pair("g2")
    (wire,) = drv.start_ping(7, 0.0)
    assert drv.send(GetDevicesRequest(offset=0, count=32), 0.0) == []   # queued behind the PING
    assert drv.ping_response(dev.ping_answer(wire), 0.0)
    (queued,) = drv.data_to_send()
    assert isinstance(decode(queued), GetDevicesRequest)


def test_answers_the_fast_check_refuses_go_the_generic_way() -> None:
    drv = DriverConnection()
    (wire,) = drv.start_ping(9, 0.0)
    token = decode(wire).token
    # QEMU answers bus requests with token 0: not ours by the fast check, accepted by the generic one
    qemu = encode(PingResponse(token=0, data=9))
    assert not drv.ping_response(qemu, 0.0)
    assert drv.receive_bytes(qemu, 0.0) == []       # no event: the PING was a start_ping one
    assert not drv.ping_pending and drv.ping_result == 9
    # another token: counted as a mismatch, and (not strict) still the answer
    (wire,) = drv.start_ping(10, 0.0)
    other = encode(PingResponse(token=decode(wire).token ^ 0x55, data=10))
    assert not drv.ping_response(other, 0.0)
    drv.receive_bytes(other, 0.0)
    assert drv.ping_result == 10 and drv.counters.token_mismatches == 1
    assert token != decode(wire).token


@pytest.mark.parametrize("bad", [
    b"",                                                       # empty
    struct.pack("<BBHHHI", 3, 2, 0, 1, 40, 5),                 # msg_size past the bytes given
    struct.pack("<BBHHHI", 3, 2, 0, 1, 4, 5),                  # msg_size below a PING's
    struct.pack("<BBHHH", 3, 2, 0, 1, 12),                     # cut short
    struct.pack("<BBHHHI", 1, 2, 0, 1, 12, 5),                 # transport, not bus
    struct.pack("<BBHHHI", 2, 2, 0, 1, 12, 5),                 # a request, not an answer
])
def test_malformed_answers_are_not_taken(bad: bytes) -> None:
    drv = DriverConnection()
    drv.start_ping(5, 0.0)
    assert not drv.ping_response(bad, 0.0)
    assert drv.ping_pending
    dev = DeviceConnection()
    assert dev.ping_answer(bad) is None and dev.counters.pings_answered == 0


def test_timeout_and_reset_report_the_ping_like_any_request() -> None:
    drv = DriverConnection(request_timeout=1.0)
    drv.start_ping(0x77, 0.0)
    (ev,) = drv.handle_timeout(2.0)
    assert isinstance(ev, RequestTimedOut) and ev.request.data == 0x77
    assert not drv.ping_pending and drv.ping_result is None
    drv.start_ping(0x78, 3.0)
    (ev,) = drv.reset()
    assert isinstance(ev, RequestCancelled) and ev.request == PingRequest(data=0x78, token=ev.request.token)
    assert not drv.ping_pending and drv.ping_result is None


def test_a_generic_ping_is_not_taken_by_the_fast_check() -> None:
    drv, dev = _pair("g2")
    (wire,) = drv.send(PingRequest(data=3), 0.0)
    answer = dev.ping_answer(wire)
    assert not drv.ping_response(answer, 0.0)      # not a start_ping PING: its event is owed
    (ev,) = drv.receive_bytes(answer, 0.0)
    assert isinstance(ev, ResponseReceived) and ev.response.data == 3


def test_ping_data_must_fit() -> None:
    with pytest.raises(LocalProtocolError):
        DriverConnection().start_ping(1 << 32, 0.0)


@settings(max_examples=60, deadline=None)
@given(profile=st.sampled_from(PROFILES), pad_to=st.sampled_from([None, 64]),
       dev_num=st.integers(0, 0xFFFF), vq=st.integers(0, 0xFFFFFFFF))
def test_notify_sends_the_bytes_send_would(profile: str, pad_to: int | None, dev_num: int, vq: int) -> None:
    fast, generic = DriverConnection(profile=profile, pad_to=pad_to), DriverConnection(profile=profile, pad_to=pad_to)
    for _ in range(2):   # made once, then from the cache
        assert fast.notify(dev_num, vq, 0.0) == generic.send(EventAvail(dev_num=dev_num, vq_index=vq), 0.0)
    assert fast.notify(dev_num, vq, 0.0, next_offset_wrap=5) == generic.send(
        EventAvail(dev_num=dev_num, vq_index=vq, next_offset_wrap=5), 0.0)
    assert fast.counters == generic.counters


@settings(max_examples=60, deadline=None)
@given(profile=st.sampled_from(PROFILES), pad_to=st.sampled_from([None, 64]),
       dev_num=st.integers(0, 0xFFFF), vq=st.integers(0, 0xFFFFFFFF), wrap=st.integers(0, 0xFFFFFFFF))
def test_event_avail_reports_what_receive_bytes_reports(profile: str, pad_to: int | None, dev_num: int,
                                                        vq: int, wrap: int) -> None:
    wire = encode(EventAvail(dev_num=dev_num, vq_index=vq, next_offset_wrap=wrap), profile=profile, pad_to=pad_to)
    fast, generic = DeviceConnection(profile=profile), DeviceConnection(profile=profile)
    (ev,) = generic.receive_bytes(wire, 0.0)
    assert isinstance(ev, NotificationReceived)
    assert fast.event_avail(wire) == (ev.message.dev_num, ev.message.vq_index)
    assert fast.counters == generic.counters


@pytest.mark.parametrize("bad", [
    b"",
    struct.pack("<BBHHHII", 0, 0x41, 0, 0, 40, 1, 0),          # msg_size past the bytes given
    struct.pack("<BBHHHI", 0, 0x41, 0, 0, 12, 1),              # cut short: no next_offset_wrap
    struct.pack("<BBHHHII", 0, 0x41, 0, 0, 12, 1, 0),          # msg_size below an EVENT_AVAIL's
    struct.pack("<BBHHHII", 1, 0x41, 0, 0, 16, 1, 0),          # flagged as a response
    struct.pack("<BBHHHII", 2, 0x41, 0, 0, 16, 1, 0),          # a bus message
    struct.pack("<BBHHHII", 0, 0x42, 0, 0, 16, 1, 0),          # EVENT_USED
])
def test_event_avail_refuses_what_is_not_a_well_formed_kick(bad: bytes) -> None:
    dev = DeviceConnection()
    assert dev.event_avail(bad) is None
    assert dev.counters.rx_messages == 0
