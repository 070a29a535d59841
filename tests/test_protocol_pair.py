"""Driver and device state machines talking over an in-memory link."""
from __future__ import annotations

import dataclasses
import struct
from collections import deque
from typing import Iterable

import pytest

from vmsgamp.errors import LocalProtocolError
from vmsgamp.protocol import (PROBE_STATUS_SEQUENCE, VIRTIO_F_VERSION_1, ConfigRead, DeviceConnection,
                              DeviceStatus, DriverConnection, Event, EventAvail, EventConfig, EventDevice,
                              EventUsed, FeaturesRead, FeaturesWritten, GetConfigRequest, GetConfigResponse,
                              GetDeviceFeaturesRequest, GetDeviceFeaturesResponse, GetDeviceInfoRequest,
                              GetDeviceInfoResponse, GetDevicesRequest, GetDevicesResponse,
                              GetDeviceStatusRequest, GetDeviceStatusResponse, GetShmRequest, GetShmResponse,
                              GetVqueueRequest, GetVqueueResponse, Message, NotificationReceived,
                              OperationFailed, PingReceived, PingRequest, PingResponse, RequestCancelled,
                              RequestReceived, RequestTimedOut, ResetVqueueRequest, ResetVqueueResponse,
                              ResponseReceived, SetConfigRequest, SetConfigResponse, SetDeviceStatusRequest,
                              SetDeviceStatusResponse, SetDriverFeaturesRequest, SetDriverFeaturesResponse,
                              SetVqueueRequest, SetVqueueResponse, check_driver_status_write, decode,
                              device_status_after_write, encode)

S = DeviceStatus
RNG = 4


class ToyDevice:
    """Minimal device model behind a DeviceConnection, enough to answer every
    transport request like QEMU-RFC would."""

    def __init__(self, config: bytes = bytes(range(12)), features: int = 1 << VIRTIO_F_VERSION_1,
                 num_queues: int = 1) -> None:
        self.config = bytearray(config)
        self.generation = 0
        self.status = 0
        self.offered = features
        self.driver_features = 0
        self.queues: dict[int, SetVqueueRequest] = {}
        self.num_queues = num_queues
        self.bump_generation_on_read: int | None = None  # change config after N reads

    def answer(self, req: Message) -> Message | None:
        if isinstance(req, GetDeviceInfoRequest):
            return GetDeviceInfoResponse(device_id=RNG, vendor_id=0x554D4551, num_feature_bits=64,
                                         config_size=len(self.config), max_virtqueues=self.num_queues)
        if isinstance(req, GetDeviceFeaturesRequest):
            words = tuple((self.offered >> (32 * (req.block_index + i))) & 0xFFFFFFFF
                          for i in range(req.num_blocks))
            return GetDeviceFeaturesResponse(block_index=req.block_index, features=words)
        if isinstance(req, SetDriverFeaturesRequest):
            for i, w in enumerate(req.features):
                shift = 32 * (req.block_index + i)
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (w << shift)
            return SetDriverFeaturesResponse()
        if isinstance(req, GetConfigRequest):
            if self.bump_generation_on_read is not None:
                self.bump_generation_on_read -= 1
                if self.bump_generation_on_read < 0:
                    self.bump_generation_on_read = None
                    self.generation += 1
            data = bytes(self.config[req.offset:req.offset + req.length])
            return GetConfigResponse(generation=self.generation, offset=req.offset, data=data)
        if isinstance(req, SetConfigRequest):
            if req.generation != self.generation:
                return SetConfigResponse(generation=self.generation, offset=req.offset, length=0)
            self.config[req.offset:req.offset + req.length] = req.data
            self.generation += 1
            return SetConfigResponse(generation=self.generation, offset=req.offset, length=req.length)
        if isinstance(req, GetDeviceStatusRequest):
            return GetDeviceStatusResponse(status=self.status)
        if isinstance(req, SetDeviceStatusRequest):
            ok = not (self.driver_features & ~self.offered)
            self.status = device_status_after_write(self.status, req.status, features_acceptable=ok)
            if self.status == 0:
                self.queues.clear()
            return SetDeviceStatusResponse(status=self.status)
        if isinstance(req, GetVqueueRequest):
            q = self.queues.get(req.index)
            max_size = 256 if req.index < self.num_queues else 0
            if q is None:
                return GetVqueueResponse(index=req.index, max_size=max_size)
            return GetVqueueResponse(index=req.index, max_size=max_size, cur_size=q.size, desc_addr=q.desc_addr,
                                     driver_addr=q.driver_addr, device_addr=q.device_addr)
        if isinstance(req, SetVqueueRequest):
            self.queues[req.index] = req
            return SetVqueueResponse()
        if isinstance(req, ResetVqueueRequest):
            self.queues.pop(req.index, None)
            return ResetVqueueResponse()
        if isinstance(req, GetShmRequest):
            return GetShmResponse(index=req.index, length=0, address=0)
        return None


class Link:
    """Carries bytes between the two connections and records the wire."""

    def __init__(self, drv: DriverConnection, dev: DeviceConnection, devices: dict[int, ToyDevice]) -> None:
        self.drv = drv
        self.dev = dev
        self.devices = devices
        self.to_dev: deque[bytes] = deque()
        self.to_drv: deque[bytes] = deque()
        self.wire: list[tuple[str, Message]] = []  # ("drv>dev" | "dev>drv", decoded message)
        self.drv_events: list[Event] = []
        self.dev_events: list[Event] = []
        self.now = 0.0
        self.auto_answer = True
        self.auto_used = True

    def from_drv(self, out: Iterable[bytes]) -> None:
        for b in out:
            self.to_dev.append(b)
            self.wire.append(("drv>dev", decode(b, profile=self.drv.profile)))

    def from_dev(self, out: Iterable[bytes]) -> None:
        for b in out:
            self.to_drv.append(b)
            self.wire.append(("dev>drv", decode(b, profile=self.dev.profile)))

    def pump(self) -> list[Event]:
        """Run until both directions are empty; returns the new driver events."""
        start = len(self.drv_events)
        while self.to_dev or self.to_drv:
            while self.to_dev:
                for ev in self.dev.receive_bytes(self.to_dev.popleft(), self.now):
                    self.dev_events.append(ev)
                    self._device_side(ev)
                self.from_dev(self.dev.data_to_send())
            while self.to_drv:
                self.drv_events.extend(self.drv.receive_bytes(self.to_drv.popleft(), self.now))
                self.from_drv(self.drv.data_to_send())
        return self.drv_events[start:]

    def _device_side(self, ev: Event) -> None:
        if isinstance(ev, RequestReceived) and self.auto_answer:
            req = ev.request
            if isinstance(req, GetDevicesRequest):
                self.from_dev(self.dev.answer_get_devices(req, self.devices))
                return
            resp = self.devices[req.dev_num].answer(req)
            assert resp is not None
            self.from_dev(self.dev.respond(req, resp))
        elif isinstance(ev, NotificationReceived) and isinstance(ev.message, EventAvail) and self.auto_used:
            self.from_dev(self.dev.notify_used(ev.message.dev_num, ev.message.vq_index, self.now))

    def call(self, out: list[bytes]) -> list[Event]:
        self.from_drv(out)
        return self.pump()

    def request(self, msg: Message) -> Message:
        """Send one request and return its response."""
        events = self.call(self.drv.send(msg, self.now))
        responses = [e.response for e in events if isinstance(e, ResponseReceived)]
        assert len(responses) == 1, events
        return responses[0]


def make_link(profile: str = "g2", max_msg_size: int = 64, devices: dict[int, ToyDevice] | None = None,
              **drv_kwargs: object) -> Link:
    drv = DriverConnection(profile=profile, max_msg_size=max_msg_size, **drv_kwargs)  # type: ignore[arg-type]
    dev = DeviceConnection(profile=profile)
    return Link(drv, dev, devices if devices is not None else {0: ToyDevice()})


def probe(link: Link, dev_num: int = 0) -> None:
    """The Linux probe sequence (docs/virtio-msg.md#the-probe-sequence)."""
    resp = link.request(GetDevicesRequest(offset=0, count=32))
    assert isinstance(resp, GetDevicesResponse) and dev_num in resp.devices()
    info = link.request(GetDeviceInfoRequest(dev_num=dev_num))
    assert isinstance(info, GetDeviceInfoResponse) and info.num_feature_bits == 64 and info.device_id == RNG
    link.call(link.drv.set_status(dev_num, 0, link.now))
    for status in PROBE_STATUS_SEQUENCE[:2]:
        link.request(GetDeviceStatusRequest(dev_num=dev_num))
        link.call(link.drv.set_status(dev_num, status, link.now))
    [feat] = link.call(link.drv.read_features(dev_num, link.now))
    assert isinstance(feat, FeaturesRead) and feat.features == 1 << VIRTIO_F_VERSION_1
    [done] = link.call(link.drv.write_features(dev_num, feat.features, link.now))
    assert isinstance(done, FeaturesWritten)
    link.call(link.drv.set_status(dev_num, PROBE_STATUS_SEQUENCE[2], link.now))
    st = link.request(GetDeviceStatusRequest(dev_num=dev_num))
    assert isinstance(st, GetDeviceStatusResponse) and st.status & S.FEATURES_OK
    q = link.request(GetVqueueRequest(dev_num=dev_num, index=0))
    assert isinstance(q, GetVqueueResponse) and q.max_size == 256
    link.request(SetVqueueRequest(dev_num=dev_num, index=0, size=128, desc_addr=0x1000, driver_addr=0x2000,
                                  device_addr=0x3000))
    link.call(link.drv.set_status(dev_num, PROBE_STATUS_SEQUENCE[3], link.now))
    assert link.drv.device_status(dev_num) == PROBE_STATUS_SEQUENCE[3]


PROBE_WIRE = [  # (direction, name) of Linux's probe sequence, requests and their responses
    "GET_DEVICES", "GET_DEVICE_INFO", "SET_DEVICE_STATUS",
    "GET_DEVICE_STATUS", "SET_DEVICE_STATUS", "GET_DEVICE_STATUS", "SET_DEVICE_STATUS",
    "GET_DEVICE_FEATURES", "SET_DRIVER_FEATURES", "SET_DEVICE_STATUS", "GET_DEVICE_STATUS",
    "GET_VQUEUE", "SET_VQUEUE", "SET_DEVICE_STATUS",
]


@pytest.mark.parametrize("profile", ["g2", "g1"])
def test_probe_sequence_like_linux(profile: str) -> None:
    link = make_link(profile)
    probe(link)
    events = link.call(link.drv.notify(0, 0, link.now))
    assert [type(e) for e in events] == [NotificationReceived]
    assert events[0].message == EventUsed(vq_index=0, msg_size=events[0].message.msg_size)

    requests = [m for d, m in link.wire if d == "drv>dev" and m.is_request()]
    responses = [m for d, m in link.wire if d == "dev>drv" and m.IS_RESPONSE]
    assert [m.NAME for m in requests] == PROBE_WIRE
    assert [m.NAME for m in responses] == PROBE_WIRE
    # 14 request/response pairs + EVENT_AVAIL + EVENT_USED (Linux: 34 with its extra reads).
    assert len(link.wire) == 2 * len(PROBE_WIRE) + 2
    for req, resp in zip(requests, responses):
        assert resp.token == req.token and resp.dev_num == req.dev_num
        if profile == "g2":
            assert req.token != 0
    for _, m in link.wire:
        if m.is_event():
            assert m.token == 0
    set_vq = next(m for m in requests if isinstance(m, SetVqueueRequest))
    assert set_vq.msg_size == (48 if profile == "g2" else 42)
    dev = link.devices[0]
    assert dev.status == PROBE_STATUS_SEQUENCE[3] and dev.queues[0].size == 128
    assert link.drv.counters.rx_malformed == link.dev.counters.rx_malformed == 0


def test_every_transport_message_crosses_the_link() -> None:
    dev = ToyDevice(config=bytes(16))
    link = make_link(devices={0: dev, 3: ToyDevice()})
    probe(link, 3)
    # SET_CONFIG with the right generation applies, with a stale one is rejected.
    ok = link.request(SetConfigRequest(dev_num=0, generation=0, offset=2, data=b"\x01\x02"))
    assert isinstance(ok, SetConfigResponse) and ok.length == 2 and ok.generation == 1
    stale = link.request(SetConfigRequest(dev_num=0, generation=0, offset=2, data=b"\x03"))
    assert isinstance(stale, SetConfigResponse) and stale.length == 0
    [cfg] = link.call(link.drv.read_config(0, 0, 4, link.now))
    assert cfg == ConfigRead(0, 0, 1, b"\x00\x00\x01\x02")
    shm = link.request(GetShmRequest(dev_num=0, index=0))
    assert isinstance(shm, GetShmResponse) and shm.length == 0
    assert isinstance(link.request(ResetVqueueRequest(dev_num=3, index=0)), ResetVqueueResponse)
    assert 0 not in link.devices[3].queues
    # Device-originated events.
    link.from_dev(link.dev.config_changed(0, S.DRIVER_OK | S.DEVICE_NEEDS_RESET, 2, link.now))
    link.from_dev(link.dev.device_ready(5, link.now))
    link.from_dev(link.dev.device_removed(5, link.now))
    events = link.pump()
    msgs = [e.message for e in events if isinstance(e, NotificationReceived)]
    assert [type(m) for m in msgs] == [EventConfig, EventDevice, EventDevice]
    assert [m.device_bus_state for m in msgs[1:]] == [1, 2]  # type: ignore[attr-defined]
    assert link.drv.device_status(0) == S.DRIVER_OK | S.DEVICE_NEEDS_RESET  # taken from EVENT_CONFIG
    names = {(d, m.NAME, m.IS_RESPONSE) for d, m in link.wire}
    for req_name in ("GET_DEVICE_INFO", "GET_DEVICE_FEATURES", "SET_DRIVER_FEATURES", "GET_CONFIG", "SET_CONFIG",
                     "GET_DEVICE_STATUS", "SET_DEVICE_STATUS", "GET_VQUEUE", "SET_VQUEUE", "RESET_VQUEUE",
                     "GET_SHM", "GET_DEVICES"):
        assert ("drv>dev", req_name, False) in names and ("dev>drv", req_name, True) in names


def test_ping_both_ways() -> None:
    link = make_link()
    events = link.call(link.drv.ping(0x1234, link.now))
    [ev] = events
    assert isinstance(ev, ResponseReceived) and ev.response == PingResponse(
        data=0x1234, token=ev.request.token, msg_size=12)
    assert isinstance(link.dev_events[-1], PingReceived)
    # Device pings the driver, the driver answers by itself.
    link.from_dev(link.dev.ping(77, link.now))
    link.pump()
    assert isinstance(link.drv_events[-1], PingReceived)
    got = [e for e in link.dev_events if isinstance(e, ResponseReceived)]
    assert got and got[-1].response.data == 77  # type: ignore[attr-defined]
    assert link.drv.counters.pings_answered == 1 and link.dev.counters.pings_answered == 1


@pytest.mark.parametrize("max_msg_size, chunk, n_requests", [(48, 28, 4), (64, 44, 3)])
def test_config_read_is_chunked(max_msg_size: int, chunk: int, n_requests: int) -> None:
    config = bytes(range(100))
    link = make_link(max_msg_size=max_msg_size, devices={0: ToyDevice(config=config)})
    assert link.drv.max_config_chunk == chunk
    [ev] = link.call(link.drv.read_config(0, 0, 100, link.now))
    assert ev == ConfigRead(0, 0, 0, config)
    reads = [m for d, m in link.wire if isinstance(m, GetConfigRequest)]
    assert len(reads) == n_requests and max(r.length for r in reads) == chunk
    assert all(m.msg_size <= max_msg_size for _, m in link.wire)


def test_qemu_preset_caps_config_at_28() -> None:
    drv = DriverConnection.for_qemu()
    assert drv.max_msg_size == 48 and drv.max_config_chunk == 28
    assert DriverConnection(max_config_chunk=8).max_config_chunk == 8  # QEMU-6B-style u64 config


def test_config_read_restarts_when_generation_moves() -> None:
    dev = ToyDevice(config=bytes(range(60)))
    dev.bump_generation_on_read = 1  # the second chunk sees a new generation
    link = make_link(max_msg_size=48, devices={0: dev})
    [ev] = link.call(link.drv.read_config(0, 0, 60, link.now))
    assert ev == ConfigRead(0, 0, 1, bytes(range(60)))
    reads = [m for _, m in link.wire if isinstance(m, GetConfigRequest)]
    assert [r.offset for r in reads] == [0, 28, 0, 28, 56]


def test_generation_only_read() -> None:
    link = make_link()
    [ev] = link.call(link.drv.read_config(0, 0, 0, link.now))  # Linux's generation read
    assert ev == ConfigRead(0, 0, 0, b"")


def test_feature_blocks_are_split_to_fit() -> None:
    offered = (1 << VIRTIO_F_VERSION_1) | (1 << 300) | 1
    link = make_link(max_msg_size=48, devices={0: ToyDevice(features=offered)})
    assert link.drv.max_feature_blocks == 8
    [ev] = link.call(link.drv.read_features(0, link.now, num_bits=512))
    assert ev == FeaturesRead(0, offered, 512)
    asks = [m for _, m in link.wire if isinstance(m, GetDeviceFeaturesRequest)]
    assert [(a.block_index, a.num_blocks) for a in asks] == [(0, 8), (8, 8)]
    [ev] = link.call(link.drv.write_features(0, offered, link.now, num_bits=512))
    assert ev == FeaturesWritten(0, offered, 512) and link.devices[0].driver_features == offered
    with pytest.raises(LocalProtocolError):
        link.drv.write_features(0, 1 << 64, link.now)


def test_bus_response_with_token_zero_is_accepted() -> None:
    drv = DriverConnection()
    [out] = drv.get_devices(0.0)
    assert decode(out).token != 0
    # QEMU-RFC packs bus responses with token 0 (docs/virtio-msg.md#requests-responses-events-and-tokens).
    qemu_reply = bytes.fromhex("030200000000120000002000200001000000")
    [ev] = drv.receive_bytes(qemu_reply, 0.1)
    assert isinstance(ev, ResponseReceived) and ev.response.devices() == [0]  # type: ignore[attr-defined]
    assert drv.counters.token_mismatches == 0
    [out] = drv.ping(9, 0.2)
    [ev] = drv.receive_bytes(encode(PingResponse(data=9, token=0)), 0.3)
    assert isinstance(ev, ResponseReceived)


def test_transport_token_mismatch_accepted_like_linux_or_dropped_when_strict() -> None:
    for strict in (False, True):
        drv = DriverConnection(strict_tokens=strict)
        [out] = drv.send(GetDeviceStatusRequest(dev_num=2), 0.0)
        token = decode(out).token
        events = drv.receive_bytes(encode(GetDeviceStatusResponse(dev_num=2, token=token + 1, status=1)), 0.1)
        assert drv.counters.token_mismatches == 1
        assert len(events) == (0 if strict else 1)


def test_one_request_in_flight_per_device_plus_bus() -> None:
    link = make_link(devices={0: ToyDevice(), 1: ToyDevice()})
    drv = link.drv
    out: list[bytes] = []
    out += drv.send(GetDeviceStatusRequest(dev_num=0), 0.0)
    out += drv.send(GetDeviceInfoRequest(dev_num=0), 0.0)
    out += drv.send(GetVqueueRequest(dev_num=0, index=0), 0.0)
    out += drv.send(GetDeviceInfoRequest(dev_num=1), 0.0)
    out += drv.get_devices(0.0)
    out += drv.ping(1, 0.0)
    first = [decode(b) for b in out]
    assert [(m.dev_num, m.NAME) for m in first] == [(0, "GET_DEVICE_STATUS"), (1, "GET_DEVICE_INFO"),
                                                     (0, "GET_DEVICES")]
    assert drv.pending_requests() == 6
    tokens = [m.token for m in first]
    assert len(set(tokens)) == 3 and 0 not in tokens
    events = link.call(out)
    got = [(e.response.dev_num, e.response.NAME) for e in events if isinstance(e, ResponseReceived)]
    assert sorted(got) == sorted([(0, "GET_DEVICE_STATUS"), (0, "GET_DEVICE_INFO"), (0, "GET_VQUEUE"),
                                  (1, "GET_DEVICE_INFO"), (0, "GET_DEVICES"), (0, "PING")])
    # Per device, responses in request order.
    dev0 = [n for d, n in got if d == 0 and n not in ("GET_DEVICES", "PING")]
    assert dev0 == ["GET_DEVICE_STATUS", "GET_DEVICE_INFO", "GET_VQUEUE"]
    assert drv.pending_requests() == 0 and drv.next_deadline() is None


def test_timeouts_release_the_queue_and_late_responses_are_dropped() -> None:
    drv = DriverConnection(request_timeout=2.0)
    [out1] = drv.send(GetDeviceStatusRequest(dev_num=0), 10.0)
    assert drv.send(GetDeviceInfoRequest(dev_num=0), 10.5, timeout=1.0) == []  # queued
    assert drv.next_deadline() == 12.0
    assert drv.handle_timeout(11.9) == []
    [ev] = drv.handle_timeout(12.0)
    assert isinstance(ev, RequestTimedOut) and ev.request == decode(out1)
    [out2] = drv.data_to_send()  # the queued request went out when the first gave up
    req2 = decode(out2)
    assert isinstance(req2, GetDeviceInfoRequest) and req2.token != decode(out1).token
    assert drv.next_deadline() == 13.0  # its own timeout, counted from when it was sent
    # The late answer to the first request does not match the second.
    assert drv.receive_bytes(encode(GetDeviceStatusResponse(token=decode(out1).token, status=0)), 12.5) == []
    assert drv.counters.rx_unsolicited == 1 and drv.counters.timeouts == 1
    [ev] = drv.handle_timeout(13.0)
    assert isinstance(ev, RequestTimedOut) and drv.next_deadline() is None


def test_operation_timeout_reports_failure() -> None:
    drv = DriverConnection(request_timeout=1.0)
    drv.read_config(0, 0, 100, 0.0)
    [ev] = drv.handle_timeout(5.0)
    assert isinstance(ev, OperationFailed) and ev.operation == "read_config"


def test_unknown_and_unsolicited_responses_dropped() -> None:
    drv = DriverConnection()
    assert drv.receive_bytes(encode(GetDeviceInfoResponse(
        device_id=1, vendor_id=0, num_feature_bits=64, config_size=0, max_virtqueues=1, token=1)), 0.0) == []
    [out] = drv.send(GetDeviceStatusRequest(dev_num=0), 0.0)
    token = decode(out).token
    # Right device, wrong msg_id; wrong device, right msg_id.
    assert drv.receive_bytes(encode(SetDeviceStatusResponse(token=token, status=1)), 0.1) == []
    assert drv.receive_bytes(encode(GetDeviceStatusResponse(dev_num=1, token=token, status=1)), 0.1) == []
    assert drv.counters.rx_unsolicited == 3
    [ev] = drv.receive_bytes(encode(GetDeviceStatusResponse(token=token, status=1)), 0.2)
    assert isinstance(ev, ResponseReceived)
    assert drv.receive_bytes(encode(GetDeviceStatusResponse(token=token, status=1)), 0.3) == []  # duplicate
    assert drv.counters.rx_unsolicited == 4


def test_malformed_and_misdirected_messages_are_counted_not_answered() -> None:
    dev = DeviceConnection()
    assert dev.receive_bytes(b"\x00\x02", 0.0) == []
    assert dev.receive_bytes(bytes.fromhex("0099000001000800"), 0.0) == []
    assert dev.receive_bytes(encode(EventUsed(vq_index=0)), 0.0) == []  # a driver->device event it is not
    assert dev.receive_bytes(encode(GetDevicesResponse.from_devices([0])), 0.0) == []
    assert dev.data_to_send() == []
    c = dev.counters
    assert (c.rx_messages, c.rx_malformed, c.rx_unexpected) == (4, 2, 2) and c.last_error
    drv = DriverConnection()
    assert drv.receive_bytes(encode(EventAvail(vq_index=0)), 0.0) == []
    assert drv.receive_bytes(encode(GetDeviceInfoRequest()), 0.0) == []
    assert drv.receive_bytes(bytes.fromhex("0202000001000c0000002000"), 0.0) == []  # GET_DEVICES request
    assert drv.counters.rx_unexpected == 3 and drv.data_to_send() == []
    with pytest.raises(LocalProtocolError):
        drv.send(GetDevicesResponse.from_devices([0]), 0.0)


def test_device_echoes_token_and_dev_num() -> None:
    dev = DeviceConnection()
    [ev] = dev.receive_bytes(encode(GetDeviceStatusRequest(dev_num=7, token=0x1234)), 0.0)
    assert isinstance(ev, RequestReceived)
    # send(): the response names its device, the token is copied from the request.
    [out] = dev.send(GetDeviceStatusResponse(dev_num=7, status=3), 0.0)
    assert out[:8] == bytes.fromhex("0107070034120c00")
    assert dev.unanswered_requests() == []
    # respond(): both header fields come from the request.
    [ev] = dev.receive_bytes(encode(GetDeviceStatusRequest(dev_num=9, token=0x55)), 0.0)
    [out] = dev.respond(ev.request, GetDeviceStatusResponse(status=3))  # type: ignore[attr-defined]
    assert out[:8] == bytes.fromhex("0107090055000c00")
    # Events always go out with token 0, whatever the caller put there.
    [out] = dev.send(EventUsed(dev_num=7, vq_index=1, token=99), 0.0)
    assert decode(out).token == 0
    # GET_DEVICES answered with exactly the count asked and the token echoed (Linux needs both).
    [ev] = dev.receive_bytes(bytes.fromhex("0202000001000c0000002000"), 0.0)
    [out] = dev.answer_get_devices(ev.request, [0, 7])  # type: ignore[attr-defined]
    resp = decode(out)
    assert isinstance(resp, GetDevicesResponse) and resp.count == 32 and resp.token == 1
    assert resp.devices() == [0, 7] and resp.msg_size == 18


def test_local_errors() -> None:
    drv = DriverConnection()
    dev = DeviceConnection()
    with pytest.raises(LocalProtocolError):
        drv.send(GetDeviceStatusResponse(status=1), 0.0)  # a driver does not answer transport requests
    with pytest.raises(LocalProtocolError):
        drv.send(EventUsed(vq_index=0), 0.0)
    with pytest.raises(LocalProtocolError):
        dev.send(EventAvail(vq_index=0), 0.0)
    with pytest.raises(LocalProtocolError):
        dev.send(GetDeviceStatusRequest(), 0.0)
    with pytest.raises(LocalProtocolError):
        dev.send(GetDeviceStatusResponse(status=1), 0.0)  # nothing to answer
    [ev] = dev.receive_bytes(encode(GetDeviceStatusRequest(token=1)), 0.0)
    with pytest.raises(LocalProtocolError):
        dev.respond(ev.request, SetDeviceStatusResponse(status=0))  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError):
        dev.respond(GetDeviceStatusRequest(token=1), GetDeviceStatusResponse(status=0))  # not the delivered one
    dev.ignore(ev.request)  # type: ignore[attr-defined]
    assert dev.unanswered_requests() == []
    with pytest.raises(LocalProtocolError):  # SET_VQUEUE does not fit in a 44-byte limit
        DriverConnection(max_msg_size=44).send(
            SetVqueueRequest(index=0, size=1, desc_addr=0, driver_addr=0, device_addr=0), 0.0)


def test_status_rules() -> None:
    link = make_link()
    probe(link)
    with pytest.raises(LocalProtocolError):
        link.drv.set_status(0, S.ACKNOWLEDGE, link.now)  # clearing DRIVER_OK etc. without a reset
    link.call(link.drv.set_status(0, 0, link.now))
    assert link.drv.device_status(0) == 0
    for bad in (S.DRIVER, S.ACKNOWLEDGE | S.FEATURES_OK, S.ACKNOWLEDGE | S.DRIVER_OK, 0x100):
        with pytest.raises(LocalProtocolError):
            check_driver_status_write(0, bad)
    check_driver_status_write(S.ACKNOWLEDGE | S.DRIVER, S.ACKNOWLEDGE | S.DRIVER | S.FAILED)
    check_driver_status_write(None, S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK)  # legacy: no FEATURES_OK


def test_device_refuses_features_it_does_not_offer() -> None:
    assert device_status_after_write(3, 11, features_acceptable=False) == 3
    assert device_status_after_write(3, 11) == 11
    assert device_status_after_write(S.DEVICE_NEEDS_RESET | 15, 15) == S.DEVICE_NEEDS_RESET | 15
    assert device_status_after_write(S.DEVICE_NEEDS_RESET | 15, 0) == 0
    link = make_link(devices={0: ToyDevice(features=1 << VIRTIO_F_VERSION_1)})
    link.call(link.drv.set_status(0, S.ACKNOWLEDGE, 0.0))
    link.call(link.drv.set_status(0, S.ACKNOWLEDGE | S.DRIVER, 0.0))
    link.call(link.drv.write_features(0, (1 << VIRTIO_F_VERSION_1) | (1 << 38), 0.0))  # NOTIFICATION_DATA
    link.call(link.drv.set_status(0, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK, 0.0))
    assert link.drv.device_status(0) == S.ACKNOWLEDGE | S.DRIVER  # FEATURES_OK refused


def test_reset_cancels_everything() -> None:
    drv = DriverConnection()
    drv.send(GetDeviceStatusRequest(dev_num=0), 0.0)
    drv.send(GetDeviceInfoRequest(dev_num=0), 0.0)
    drv.read_config(1, 0, 4, 0.0)
    events = drv.reset()
    assert len(events) == 3 and all(isinstance(e, RequestCancelled) for e in events)
    assert drv.pending_requests() == 0 and drv.next_deadline() is None and drv.data_to_send() == []
    dev = DeviceConnection()
    dev.receive_bytes(encode(GetDeviceStatusRequest(token=1)), 0.0)
    dev.reset()
    assert dev.unanswered_requests() == []


def test_slot_padding_on_the_connection() -> None:
    drv = DriverConnection(pad_to=64)
    [out] = drv.send(GetDeviceInfoRequest(), 0.0)
    assert len(out) == 64 and struct.unpack_from("<H", out, 6)[0] == 8


def test_g1_peer_has_no_token() -> None:
    link = make_link("g1")
    [out] = link.drv.send(GetDeviceInfoRequest(dev_num=0, token=5), 0.0)
    assert len(out) == 6 and decode(out, profile="g1").token == 0
    link.from_drv([out])
    [ev] = link.pump()
    assert isinstance(ev, ResponseReceived) and ev.response.msg_size == 30


def test_user_token_is_kept() -> None:
    drv = DriverConnection()
    [out] = drv.send(dataclasses.replace(GetDeviceInfoRequest(), token=5), 0.0)
    assert out == bytes.fromhex("0002000005000800")  # the first golden vector


def test_config_read_fails_when_device_answers_another_range() -> None:
    link = make_link(devices={0: ToyDevice(config=bytes(10))})
    [ev] = link.call(link.drv.read_config(0, 4, 20, link.now))  # the toy device returns only 6 bytes
    assert isinstance(ev, OperationFailed) and "4+6 for 4+20" in ev.reason
    assert link.drv.pending_requests() == 0
