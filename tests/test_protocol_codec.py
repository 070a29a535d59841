"""Codec: golden vectors both ways, round trips in g1 and g2, size rules."""
from __future__ import annotations

import ast
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from vmsgamp.errors import LocalProtocolError, RemoteProtocolError
from vmsgamp.protocol import (G1, G2, MESSAGE_CLASSES, EventAvail, EventConfig, EventDevice, EventUsed,
                              GetConfigRequest, GetConfigResponse, GetDeviceFeaturesRequest,
                              GetDeviceFeaturesResponse, GetDeviceInfoRequest, GetDeviceInfoResponse,
                              GetDevicesRequest, GetDevicesResponse, GetDeviceStatusRequest,
                              GetDeviceStatusResponse, GetShmRequest, GetShmResponse, GetVqueueRequest,
                              GetVqueueResponse, Message, PingRequest, PingResponse, ResetVqueueRequest,
                              ResetVqueueResponse, SetConfigRequest, SetConfigResponse,
                              SetDeviceStatusRequest, SetDeviceStatusResponse, SetDriverFeaturesRequest,
                              SetDriverFeaturesResponse, SetVqueueRequest, SetVqueueResponse, decode,
                              describe, encode, encoded_size, message_class)

REPO = Path(__file__).resolve().parents[1]
# Golden vectors (bytes and their decoded fields) kept in the repository.
VECTORS = Path(__file__).resolve().parent / "data" / "virtio-msg-g2-examples.json"
GOLDEN: list[dict[str, Any]] = json.loads(VECTORS.read_text())["messages"]
assert GOLDEN, f"no golden vectors in {VECTORS}"


# One instance of every message, with non-trivial values (tokens 0 so that the
# same instance is valid in g1, which has no token field).
SAMPLES: list[Message] = [
    GetDeviceInfoRequest(dev_num=3),
    GetDeviceInfoResponse(dev_num=3, device_id=4, vendor_id=0x554D4551, num_feature_bits=64, config_size=12,
                          max_virtqueues=2, admin_vq_start=1, admin_vq_count=1),
    GetDeviceFeaturesRequest(dev_num=1, block_index=0, num_blocks=2),
    GetDeviceFeaturesResponse(dev_num=1, block_index=0, features=(0x30000000, 0x1)),
    SetDriverFeaturesRequest(dev_num=1, block_index=1, features=(0x1,)),
    SetDriverFeaturesResponse(dev_num=1),
    GetConfigRequest(dev_num=2, offset=4, length=8),
    GetConfigResponse(dev_num=2, generation=7, offset=4, data=bytes(range(8))),
    SetConfigRequest(dev_num=2, generation=7, offset=0, data=b"\xaa\xbb\xcc"),
    SetConfigResponse(dev_num=2, generation=8, offset=0, length=3, data=b"\xaa\xbb\xcc"),
    SetConfigResponse(dev_num=2, generation=8, offset=0, length=0),
    GetDeviceStatusRequest(dev_num=5),
    GetDeviceStatusResponse(dev_num=5, status=0x0F),
    SetDeviceStatusRequest(dev_num=5, status=0x03),
    SetDeviceStatusResponse(dev_num=5, status=0x03),
    GetVqueueRequest(dev_num=0, index=1),
    GetVqueueResponse(dev_num=0, index=1, max_size=256, cur_size=128, desc_addr=0x1_0000_0000,
                      driver_addr=0x2000, device_addr=0xFFFF_FFFF_FFFF_F000),
    SetVqueueRequest(dev_num=0, index=1, size=128, desc_addr=0x12340000, driver_addr=0x12341000,
                     device_addr=0x12342000),
    SetVqueueResponse(dev_num=0),
    ResetVqueueRequest(dev_num=0, index=1),
    ResetVqueueResponse(dev_num=0),
    GetShmRequest(dev_num=0, index=0),
    GetShmResponse(dev_num=0, index=0, length=0x1000, address=0x80000000),
    EventConfig(dev_num=0, device_status=0x4F, generation=3),
    EventConfig(dev_num=0, device_status=0x0F, generation=3, offset=2, data=b"\x01\x02"),
    EventAvail(dev_num=0, vq_index=1),
    EventAvail(dev_num=0, vq_index=1, next_offset_wrap=0x8000_0005),
    EventUsed(dev_num=0, vq_index=1),
    GetDevicesRequest(offset=0, count=32),
    GetDevicesResponse.from_devices([0, 2, 5], offset=0, count=32),
    PingRequest(data=0xDEADBEEF),
    PingResponse(data=0xDEADBEEF),
    EventDevice(device_number=3, device_bus_state=1),
]


def test_samples_cover_every_message_class() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_CLASSES)
    assert len(MESSAGE_CLASSES) == 30  # 11 transport req/resp pairs + 3 events + 2 bus pairs + 1 bus event


# -- golden vectors -----------------------------------------------------------------


@pytest.mark.parametrize("vec", GOLDEN, ids=lambda v: f"{v['name']}-{'resp' if v['response'] else 'req'}")
def test_golden_decode(vec: dict[str, Any]) -> None:
    msg = decode(bytes.fromhex(vec["hex"]))
    hdr = vec["header"]
    assert msg.NAME == vec["name"]
    assert msg.IS_RESPONSE == vec["response"]
    assert msg.IS_BUS == vec["bus"]
    assert (msg.type_byte, msg.MSG_ID, msg.dev_num, msg.token, msg.msg_size) == (
        hdr["type"], hdr["msg_id"], hdr["dev_num"], hdr["token"], hdr["msg_size"])
    d = describe(msg)
    assert d["payload"] == vec["fields"]
    assert d["kind"] == ("bus" if vec["bus"] else "transport")
    assert d["msg_size"] == hdr["msg_size"] == len(bytes.fromhex(vec["hex"]))


@pytest.mark.parametrize("vec", GOLDEN, ids=lambda v: f"{v['name']}-{'resp' if v['response'] else 'req'}")
def test_golden_encode_from_fields(vec: dict[str, Any]) -> None:
    """Build the message from the vector's fields (not from decode) and encode."""
    hdr = vec["header"]
    cls = message_class(bus=vec["bus"], response=vec["response"], msg_id=hdr["msg_id"])
    assert cls is not None
    kwargs = dict(vec["fields"])
    if cls is GetDevicesResponse:
        kwargs["bitmap"] = bytes.fromhex(kwargs.pop("bitmap"))
        assert kwargs.pop("count") == 8 * len(kwargs["bitmap"])
    msg = cls(dev_num=hdr["dev_num"], token=hdr["token"], **kwargs)
    assert encode(msg).hex() == vec["hex"]
    assert encoded_size(msg) == hdr["msg_size"]


def test_reference_1_11_examples_not_in_json() -> None:
    # G1 GET_DEVICE_INFO request: the 6-byte header alone (docs/virtio-msg.md#messages).
    assert encode(GetDeviceInfoRequest(), profile="g1") == bytes.fromhex("000200000600")
    assert decode(bytes.fromhex("000200000600"), profile=G1) == GetDeviceInfoRequest()
    # Spec GET_DEVICES example: offset 0, count 16, bitmap 0b00100101 0x00 -> devices 0, 2, 5.
    resp = GetDevicesResponse(offset=0, next_offset=16, bitmap=bytes([0b00100101, 0]))
    assert resp.count == 16 and resp.devices() == [0, 2, 5]
    assert GetDevicesResponse.from_devices([0, 2, 5], count=16, next_offset=16) == resp


# -- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["g2", "g1"])
@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: f"{type(m).__name__}")
def test_round_trip(msg: Message, profile: str) -> None:
    data = encode(msg, profile=profile)
    back = decode(data, profile=profile)
    assert back == msg
    assert back.msg_size == len(data) == encoded_size(msg, profile)
    assert encode(back, profile=profile) == data


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: f"{type(m).__name__}")
def test_g2_token_round_trip_and_g1_drops_it(msg: Message) -> None:
    import dataclasses

    with_token = dataclasses.replace(msg, token=0xBEEF)
    assert decode(encode(with_token)).token == 0xBEEF
    assert decode(encode(with_token, profile="g1"), profile="g1").token == 0
    # Same payload bytes apart from the header (and the VQUEUE padding).
    assert len(encode(msg, profile="g2")) - len(encode(msg, profile="g1")) in (2, 6, 8)


def test_g1_vqueue_layouts_are_unpadded() -> None:
    setq = SetVqueueRequest(index=1, size=128, desc_addr=0x1111, driver_addr=0x2222, device_addr=0x3333)
    g1 = encode(setq, profile="g1")
    g2 = encode(setq, profile="g2")
    assert len(g1) == 42 and len(g2) == 48
    # G1: index@0 unused@4 size@8 desc@12 driver@20 device@28 (payload at 6).
    assert struct.unpack_from("<IIIQQQ", g1, 6) == (1, 0, 128, 0x1111, 0x2222, 0x3333)
    # G2: index@0 reserved0@4 size@8 reserved1@12 desc@16 driver@24 device@32 (payload at 8).
    assert struct.unpack_from("<IIIIQQQ", g2, 8) == (1, 0, 128, 0, 0x1111, 0x2222, 0x3333)
    getq = GetVqueueResponse(index=2, max_size=256, cur_size=64, desc_addr=1, driver_addr=2, device_addr=3)
    assert struct.unpack_from("<IIIQQQ", encode(getq, profile="g1"), 6) == (2, 256, 64, 1, 2, 3)
    assert struct.unpack_from("<IIIIQQQ", encode(getq), 8) == (2, 256, 64, 0, 1, 2, 3)


def test_reserved_words_ignored_on_receive() -> None:
    data = bytearray(encode(SetVqueueRequest(index=1, size=8, desc_addr=1, driver_addr=2, device_addr=3)))
    data[12:16] = b"\xff" * 4  # reserved0
    data[20:24] = b"\xff" * 4  # reserved1
    msg = decode(bytes(data))
    assert msg == SetVqueueRequest(index=1, size=8, desc_addr=1, driver_addr=2, device_addr=3)


# -- header rules -------------------------------------------------------------------


@pytest.mark.parametrize("high_bits", [0x04, 0x80, 0xFC])
def test_reserved_type_bits_ignored(high_bits: int) -> None:
    for msg in (PingRequest(data=1, token=3), GetDeviceInfoResponse(
            device_id=1, vendor_id=2, num_feature_bits=64, config_size=0, max_virtqueues=1, token=9)):
        data = bytearray(encode(msg))
        data[0] |= high_bits
        assert decode(bytes(data)) == msg


def test_bytes_beyond_msg_size_ignored() -> None:
    data = encode(EventUsed(vq_index=1))
    slot = data + b"\xee" * (64 - len(data))  # leftovers of an earlier message
    msg = decode(slot)
    assert msg == EventUsed(vq_index=1) and msg.msg_size == 12


def test_padding_inside_msg_size_tolerated() -> None:
    data = bytearray(encode(GetDeviceInfoRequest(token=2)) + bytes(8))
    struct.pack_into("<H", data, 6, 16)
    assert decode(bytes(data)).msg_size == 16


# -- malformed input ----------------------------------------------------------------


def _with_size(msg: Message, size: int, extra: bytes = b"") -> bytes:
    data = bytearray(encode(msg) + extra)
    struct.pack_into("<H", data, 6, size)
    return bytes(data)


@pytest.mark.parametrize("data, why", [
    (b"", "too short"),
    (bytes.fromhex("00020000050008"), "7 bytes"),
    (_with_size(GetDeviceInfoRequest(), 7), "below header"),
    (_with_size(GetDeviceInfoRequest(), 0), "zero size"),
    (_with_size(GetDeviceInfoRequest(), 12), "msg_size beyond data"),
    (_with_size(GetDeviceInfoRequest(), 66, bytes(60)), "above slot max"),
    (_with_size(EventUsed(vq_index=1), 11), "below per-id minimum"),
    (_with_size(SetVqueueRequest(index=0, size=1, desc_addr=0, driver_addr=0, device_addr=0), 44),
     "SET_VQUEUE cut at 44 (a G1 size) in G2"),
    (bytes.fromhex("0001000001000800"), "reserved id 0x01"),
    (bytes.fromhex("0080000001000800"), "implementation-defined id"),
    (bytes.fromhex("0141000000001000" "0100000000000000"), "EVENT_AVAIL flagged as response"),
    (bytes.fromhex("0202000001000c00" "00000c00"), "GET_DEVICES count 12"),
    (bytes.fromhex("0302000000001000" "0000040000000000"), "GET_DEVICES resp count 4"),
    (bytes.fromhex("0302000000001000" "0000200020000100"), "GET_DEVICES resp bitmap cut short"),
    (_with_size(GetConfigResponse(generation=1, offset=0, data=b"abcd"), 22), "config data cut short"),
    (_with_size(EventConfig(device_status=1, generation=1, data=b"ab"), 24), "event config data missing"),
    (bytes.fromhex("0103000001001400" "0000000003000000" "01000000"), "num_blocks 3 with one word"),
    (bytes.fromhex("0004000001001000" "00000000ffffffff"), "num_blocks 2^32-1"),
])
def test_malformed_raises_remote_error(data: bytes, why: str) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(data)


def test_max_size_is_configurable_on_decode() -> None:
    data = encode(SetVqueueRequest(index=0, size=1, desc_addr=0, driver_addr=0, device_addr=0))
    assert decode(data, max_size=48)
    with pytest.raises(RemoteProtocolError):
        decode(data, max_size=44)


def test_memoryview_and_bytearray_accepted() -> None:
    data = encode(PingRequest(data=5, token=1))
    assert decode(memoryview(bytearray(data))) == decode(data)


# -- encoding rules -----------------------------------------------------------------


def test_encode_respects_max_size() -> None:
    setq = SetVqueueRequest(index=0, size=1, desc_addr=0, driver_addr=0, device_addr=0)
    assert len(encode(setq, max_size=48)) == 48
    with pytest.raises(LocalProtocolError):
        encode(setq, max_size=44)
    assert len(encode(GetConfigResponse(generation=0, offset=0, data=bytes(28)), max_size=48)) == 48
    with pytest.raises(LocalProtocolError):
        encode(GetConfigResponse(generation=0, offset=0, data=bytes(29)), max_size=48)
    assert len(encode(GetConfigResponse(generation=0, offset=0, data=bytes(44)))) == 64
    with pytest.raises(LocalProtocolError):
        encode(GetConfigResponse(generation=0, offset=0, data=bytes(45)))


def test_encode_pads_to_slot() -> None:
    data = encode(EventUsed(vq_index=2), pad_to=64)
    assert len(data) == 64 and data[12:] == bytes(52)
    assert struct.unpack_from("<H", data, 6)[0] == 12  # msg_size is the real size
    assert decode(data) == EventUsed(vq_index=2)
    with pytest.raises(LocalProtocolError):
        encode(EventUsed(vq_index=2), pad_to=8)


@pytest.mark.parametrize("msg", [
    EventUsed(vq_index=-1),
    EventUsed(vq_index=1 << 32),
    EventUsed(vq_index=1, dev_num=1 << 16),
    EventUsed(vq_index=1, token=-1),
    GetDevicesRequest(offset=0, count=12),
    SetConfigResponse(generation=0, offset=0, length=4, data=b"ab"),
    GetDeviceFeaturesResponse(block_index=0, features=(1 << 32,)),
])
def test_encode_rejects_bad_fields(msg: Message) -> None:
    with pytest.raises(LocalProtocolError):
        encode(msg)


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(LocalProtocolError):
        encode("hello")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        encode(PingRequest(data=1), profile="g3")


def test_set_config_response_echo_is_optional() -> None:
    short = bytes.fromhex("0106000001001400" "01000000" "00000000" "04000000")  # no echo
    msg = decode(short)
    assert isinstance(msg, SetConfigResponse) and msg.length == 4 and msg.data == b""


def test_features_as_int() -> None:
    resp = GetDeviceFeaturesResponse(block_index=0, features=(0x30000000, 0x1))
    assert resp.as_int() == (1 << 32) | (1 << 28) | (1 << 29)
    assert resp.num_blocks == 2


def test_event_avail_fields() -> None:
    ev = EventAvail(vq_index=0, next_offset_wrap=0x8000_0007)
    assert ev.next_offset == 7 and ev.wrap


def test_describe_shape() -> None:
    d = describe(GetConfigResponse(dev_num=1, token=4, generation=2, offset=0, data=b"\x01\x02"))
    assert d == {
        "kind": "transport", "response": True, "msg_id": 5, "name": "GET_CONFIG", "dev_num": 1,
        "token": 4, "msg_size": 22,
        "payload": {"generation": 2, "offset": 0, "length": 2, "data": "0102"},
    }
    assert type(d["msg_id"]) is int  # not an IntEnum: JSON and equality stay plain
    d = describe(SetDriverFeaturesRequest(block_index=0, features=(1, 2)), "g1")
    assert d["msg_size"] == 6 + 16 and d["payload"] == {"block_index": 0, "num_blocks": 2, "features": [1, 2]}
    json.dumps([describe(m) for m in SAMPLES])  # everything is JSON-ready


def test_messages_are_frozen() -> None:
    import dataclasses

    msg = PingRequest(data=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.data = 2  # type: ignore[misc]


def test_protocol_package_imports_no_io() -> None:
    forbidden = {"os", "select", "socket", "asyncio", "threading", "time", "vmsgamp._core"}
    for path in sorted((REPO / "vmsgamp" / "protocol").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in forbidden and not name.startswith("vmsgamp._core"), f"{path.name} imports {name}"
