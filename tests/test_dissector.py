"""The shipped Lua dissector, run in real tshark, against `vmsgamp decode --json`.

One capture holds every transport and bus message type, request and
response, in G2 and G1 (told apart by the interface description only), plus
malformed messages; every vmsg.* field tshark shows must equal what the
Python codec says for the same bytes, the Info column must equal
``vmsgamp.trace.summary``, and tshark must report no Lua error.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import struct

import pytest

from vmsgamp.protocol import (
    MESSAGE_CLASSES, EventAvail, EventConfig, EventDevice, EventUsed, GetConfigRequest,
    GetConfigResponse, GetDeviceFeaturesRequest, GetDeviceFeaturesResponse, GetDeviceInfoRequest,
    GetDeviceInfoResponse, GetDevicesRequest, GetDevicesResponse, GetDeviceStatusRequest,
    GetDeviceStatusResponse, GetShmRequest, GetShmResponse, GetVqueueRequest, GetVqueueResponse,
    PingRequest, PingResponse, ResetVqueueRequest, ResetVqueueResponse, SetConfigRequest,
    SetConfigResponse, SetDeviceStatusRequest, SetDeviceStatusResponse, SetDriverFeaturesRequest,
    SetDriverFeaturesResponse, SetVqueueRequest, SetVqueueResponse, encode, peek_header,
)
from vmsgamp.trace import (
    DIR_INBOUND, DIR_OUTBOUND, Interface, PcapngWriter, dissector_path, message_entry, summary,
)

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (apt-get install tshark)")

BIG = 0xFEDCBA9876543210   # above 2**53: a Lua double would lose it
U32 = 0xFFFFFFFF

# At least one instance of every message class; several where a field takes
# different shapes (empty and full tails, extreme values).
VALID = [
    GetDeviceInfoRequest(dev_num=3, token=5),
    GetDeviceInfoResponse(dev_num=3, token=5, device_id=4, vendor_id=0x554D4551, num_feature_bits=64,
                          config_size=0x100, max_virtqueues=2, admin_vq_start=1, admin_vq_count=0xFFFF),
    GetDeviceFeaturesRequest(dev_num=1, token=6, block_index=0, num_blocks=2),
    GetDeviceFeaturesResponse(dev_num=1, token=6, block_index=0, features=(0x30000000, 0x5)),
    GetDeviceFeaturesResponse(dev_num=1, token=7, block_index=1, features=()),
    GetDeviceFeaturesResponse(dev_num=1, token=8, block_index=U32, features=(U32,) * 10),
    SetDriverFeaturesRequest(dev_num=2, token=9, block_index=0, features=(0x1, 0x80000000)),
    SetDriverFeaturesResponse(dev_num=2, token=9),
    GetConfigRequest(dev_num=0, token=10, offset=4, length=8),
    GetConfigResponse(dev_num=0, token=10, generation=7, offset=4, data=bytes(range(8))),
    GetConfigResponse(dev_num=0, token=11, generation=0, offset=0, data=b""),
    SetConfigRequest(dev_num=0, token=12, generation=7, offset=0, data=b"\xff\x00\x10"),
    SetConfigRequest(dev_num=0, token=13, generation=7, offset=0, data=b""),
    SetConfigResponse(dev_num=0, token=12, generation=8, offset=0, length=3, data=b"\xff\x00\x10"),
    SetConfigResponse(dev_num=0, token=13, generation=8, offset=0, length=3),
    GetDeviceStatusRequest(dev_num=0xFFFF, token=0xFFFF),
    GetDeviceStatusResponse(dev_num=0xFFFF, token=0xFFFF, status=0x0F),
    SetDeviceStatusRequest(dev_num=0, token=14, status=0x80),
    SetDeviceStatusResponse(dev_num=0, token=14, status=0x8F),
    GetVqueueRequest(dev_num=0, token=15, index=1),
    GetVqueueResponse(dev_num=0, token=15, index=1, max_size=256, cur_size=128, desc_addr=BIG,
                      driver_addr=0x1000, device_addr=0xFFFFFFFFFFFFFFFF),
    SetVqueueRequest(dev_num=0, token=16, index=1, size=128, desc_addr=0x10000, driver_addr=BIG,
                     device_addr=0x30000),
    SetVqueueResponse(dev_num=0, token=16),
    ResetVqueueRequest(dev_num=0, token=17, index=U32),
    ResetVqueueResponse(dev_num=0, token=17),
    GetShmRequest(dev_num=0, token=18, index=0),
    GetShmResponse(dev_num=0, token=18, index=0, length=0x100000, address=0xC0000000),
    EventConfig(dev_num=1, device_status=0x0F, generation=3),
    EventConfig(dev_num=1, device_status=0x4F, generation=4, offset=2, data=b"\x01\x02"),
    EventAvail(dev_num=1, vq_index=0, next_offset_wrap=0x80000005),
    EventUsed(dev_num=1, vq_index=1),
    GetDevicesRequest(token=19, offset=0, count=32),
    GetDevicesResponse(token=19, offset=0, next_offset=32, bitmap=b"\x0f\x00\x00\x00"),
    GetDevicesResponse(token=20, offset=64, next_offset=0, bitmap=b""),
    PingRequest(token=21, data=0x5A000001),
    PingResponse(token=21, data=0x5A000001),
    EventDevice(device_number=3, device_bus_state=2),
]


def _g2(mtype: int, msg_id: int, dev: int, tok: int, size: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BBHHH", mtype, msg_id, dev, tok, size) + payload


def _g1(mtype: int, msg_id: int, dev: int, size: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BBHH", mtype, msg_id, dev, size) + payload


# (profile, bytes): every way decode() can refuse a message, and the odd but
# valid shapes around them.
ODD = [
    ("g2", b""),                                             # an empty record
    ("g2", b"\x00\x02\x00"),                                 # shorter than the header
    ("g1", b"\x00\x02\x00\x00\x05"),
    ("g2", _g2(0, 0x02, 0, 1, 7)),                           # msg_size below the header
    ("g2", _g2(0, 0x02, 0, 1, 65) + bytes(57)),              # msg_size above a slot
    ("g1", _g1(0, 0x02, 0, 5)),
    ("g2", _g2(0, 0x07, 0, 1, 16)),                          # msg_size beyond the bytes read
    ("g2", _g2(0, 0x20, 0, 1, 8)),                           # unknown transport request
    ("g2", _g2(1, 0x20, 0, 1, 8)),                           # unknown transport response
    ("g2", _g2(2, 0x10, 0, 1, 8)),                           # unknown bus request
    ("g2", _g2(1, 0x42, 0, 0, 12, bytes(4))),                # transport event flagged as response
    ("g2", _g2(3, 0x40, 0, 0, 12, bytes(4))),                # bus event flagged as response
    ("g2", _g2(1, 0x09, 0, 1, 16, bytes(8))),                # GET_VQUEUE response below its minimum
    ("g1", _g1(1, 0x09, 0, 40, bytes(34))),                  # G1: 36-byte payload needed
    ("g2", _g2(1, 0x03, 0, 1, 24, struct.pack("<II", 0, 5) + bytes(8))),   # num_blocks too big
    ("g2", _g2(1, 0x05, 0, 1, 24, struct.pack("<III", 0, 0, 9) + bytes(4))),  # config length too big
    ("g2", _g2(0, 0x40, 0, 0, 28, struct.pack("<IIII", 0, 0, 0, 5) + bytes(4))),  # EVENT_CONFIG length
    ("g2", _g2(2, 0x02, 0, 1, 12, struct.pack("<HH", 0, 12))),  # GET_DEVICES count not a multiple of 8
    ("g2", _g2(3, 0x02, 0, 1, 14, struct.pack("<HHH", 0, 12, 0))),
    ("g2", _g2(3, 0x02, 0, 1, 16, struct.pack("<HHH", 0, 64, 0) + b"\xff\xff")),  # bitmap short
    ("g2", _g2(1, 0x06, 0, 1, 22, struct.pack("<III", 0, 0, 4) + b"ab")),  # partial SET_CONFIG echo: valid
    ("g2", _g2(0xFC, 0x07, 0, 1, 8)),                        # reserved type bits: ignored
    ("g2", _g2(0, 0x0B, 0, 1, 12, struct.pack("<I", 1)) + bytes(52)),   # a whole slot: tail ignored
    ("g2", _g2(0, 0x0B, 0, 1, 16, struct.pack("<I", 1) + bytes(4))),    # padding inside msg_size
    ("g1", _g1(0, 0x08, 0, 10, struct.pack("<I", 0)) + bytes(54)),
]


def _cases() -> list[tuple[str, bytes, int]]:
    cases = []
    for msg in VALID:
        for profile in ("g2", "g1"):
            data = encode(msg, profile=profile)
            cases.append((profile, data, DIR_INBOUND if msg.IS_RESPONSE else DIR_OUTBOUND))
    cases += [(profile, data, DIR_OUTBOUND) for profile, data in ODD]
    return cases


def test_cases_cover_every_message_class():
    assert {type(m) for m in VALID} == set(MESSAGE_CLASSES)


def _write(path, cases):
    with PcapngWriter(path) as w:
        ifaces = {"g2": w.add_interface(Interface("shm:g2bus", "virtio-msg g2")),
                  "g1": w.add_interface(Interface("shm:g1bus", "virtio-msg g1"))}
        for i, (profile, data, direction) in enumerate(cases):
            w.write_packet(ifaces[profile], 1_700_000_000_000_000_000 + i * 1000, data, direction)


def _tshark(path, *args) -> tuple[str, str]:
    p = subprocess.run([TSHARK, "-X", f"lua_script:{dissector_path()}", "-r", str(path), *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout, p.stderr


def _no_lua_trouble(stdout: str, stderr: str) -> None:
    err = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Running as user")]
    assert not err, "tshark stderr:\n" + "\n".join(err)
    assert "Lua Error" not in stdout and "_ws.lua.error" not in stdout, stdout[:2000]


def _flatten(obj, out: dict[str, list], experts: list[dict]) -> None:
    """Every field of a tshark -T json layer, subtrees flattened; expert
    entries go to ``experts``."""
    for key, value in obj.items():
        if key == "_ws.expert":
            experts.extend(value if isinstance(value, list) else [value])
        elif isinstance(value, dict):
            _flatten(value, out, experts)
        elif isinstance(value, list):
            out.setdefault(key, []).extend(value)
        else:
            out.setdefault(key, []).append(value)


def _int(text: str) -> int:
    return int(text, 0)


def _expected_fields(profile: str, data: bytes) -> dict[str, list]:
    """The vmsg.* fields tshark should show, as tshark prints values."""
    entry = message_entry(data, profile)
    hdr = 6 if profile == "g1" else 8
    exp: dict[str, list] = {}
    if len(data) >= hdr:
        mtype, msg_id, dev, tok, size = peek_header(data, profile)
        exp.update({"vmsg.type": [mtype], "vmsg.msg_id": [msg_id], "vmsg.dev_num": [dev],
                    "vmsg.msg_size": [size]})
        if profile == "g2":
            exp["vmsg.token"] = [tok]
    if "error" in entry:
        exp["vmsg.error"] = [entry["error"]]
        return exp
    assert entry["msg_id"] == exp["vmsg.msg_id"][0] and entry["dev_num"] == exp["vmsg.dev_num"][0]
    assert entry["msg_size"] == exp["vmsg.msg_size"][0]
    if profile == "g2":
        assert entry["token"] == exp["vmsg.token"][0]
    exp["vmsg.kind"] = [entry["kind"]]
    exp["vmsg.response"] = [entry["response"]]
    exp["vmsg.name"] = [entry["name"]]
    prefix = f"vmsg.{entry['name'].lower()}."
    for key, value in entry["payload"].items():
        if isinstance(value, list):
            if value:                   # a repeated field: an empty list shows no occurrence
                exp[prefix + key] = value
        else:
            exp[prefix + key] = [value]
    return exp


def _normalise(key: str, values: list, expected: list) -> list:
    """tshark's text back into the Python types of the expectation."""
    out = []
    for v, e in zip(values, expected + [None] * len(values)):
        if isinstance(e, bool):
            out.append(v in ("1", "True", "true"))
        elif isinstance(e, int):
            out.append(_int(v))
        elif isinstance(e, str) and key not in ("vmsg.kind", "vmsg.name", "vmsg.error"):
            out.append(v.replace(":", ""))     # bytes: aa:bb:cc -> aabbcc
        else:
            out.append(v)
    return out


@pytest.fixture(scope="module")
def dissected(tmp_path_factory):
    cases = _cases()
    path = tmp_path_factory.mktemp("dissector") / "all.pcapng"
    _write(path, cases)
    out, err = _tshark(path, "-2", "-Y", "frame", "-T", "json", "--no-duplicate-keys")
    _no_lua_trouble(out, err)
    packets = json.loads(out)
    info_out, err = _tshark(path, "-T", "fields", "-e", "frame.number", "-e", "_ws.col.Info")
    _no_lua_trouble(info_out, err)
    info = {}
    for ln in info_out.splitlines():
        num, _, text = ln.partition("\t")
        info[int(num)] = text
    assert len(packets) == len(cases) == len(info)
    return cases, packets, info


def _case_ids():
    return [f"{i}-{p}-{d[:8].hex() or 'empty'}" for i, (p, d, _dir) in enumerate(_cases())]


@pytest.mark.parametrize("index", range(len(_cases())), ids=_case_ids())
def test_every_field_equals_decode_json(dissected, index):
    cases, packets, info = dissected
    profile, data, _direction = cases[index]
    layers = packets[index]["_source"]["layers"]
    shown: dict[str, list] = {}
    experts: list[dict] = []
    _flatten(layers.get("vmsg", {}), shown, experts)
    fields = {k: v for k, v in shown.items() if k.startswith("vmsg.")}
    # pairing fields are checked in their own test
    for k in ("vmsg.response_in", "vmsg.request_in", "vmsg.time"):
        fields.pop(k, None)
    expected = _expected_fields(profile, data)
    assert set(fields) == set(expected), (profile, data.hex())
    for key, exp in expected.items():
        assert _normalise(key, fields[key], exp) == exp, (key, profile, data.hex())
    entry = message_entry(data, profile)
    assert info[index + 1] == summary(entry, profile)
    if "error" in entry:
        assert len(experts) == 1 and "vmsg.malformed" in experts[0]
        assert experts[0]["_ws.expert.message"] == entry["error"]
        assert experts[0]["_ws.expert.group"] == str(0x07000000)     # PI_MALFORMED
    else:
        assert not experts


def test_requests_and_responses_are_paired(tmp_path):
    g2 = [  # frame: (message, direction)
        (PingRequest(token=1, data=1), DIR_OUTBOUND),                         # 1
        (GetDeviceInfoRequest(dev_num=0, token=2), DIR_OUTBOUND),             # 2
        (GetDeviceInfoRequest(dev_num=1, token=3), DIR_OUTBOUND),             # 3
        (GetDeviceInfoResponse(dev_num=1, token=3, device_id=4, vendor_id=0, num_feature_bits=64,
                               config_size=0, max_virtqueues=1), DIR_INBOUND),  # 4 answers 3
        (PingResponse(token=1, data=1), DIR_INBOUND),                         # 5 answers 1
        (EventUsed(dev_num=0, vq_index=0), DIR_INBOUND),                      # 6 event: no pairing
        (PingRequest(token=7, data=2), DIR_OUTBOUND),                         # 7
        (PingResponse(token=0, data=2), DIR_INBOUND),                         # 8 QEMU-style token 0
        (GetDeviceStatusRequest(dev_num=0, token=9), DIR_OUTBOUND),           # 9 never answered
    ]
    path = tmp_path / "pairs.pcapng"
    with PcapngWriter(path) as w:
        a = w.add_interface(Interface("shm:a", "virtio-msg g2"))
        b = w.add_interface(Interface("shm:b", "virtio-msg g1"))
        for i, (msg, d) in enumerate(g2):
            w.write_packet(a, 10**18 + i * 1000, encode(msg), d)
        # G1 has no token: a response pairs with the newest open request of its kind.
        w.write_packet(b, 10**18 + 20_000, encode(GetDeviceStatusRequest(dev_num=0), profile="g1"),
                       DIR_OUTBOUND)                                          # 10
        w.write_packet(b, 10**18 + 25_000, encode(GetDeviceStatusResponse(dev_num=0, status=1),
                                                  profile="g1"), DIR_INBOUND)   # 11 answers 10, not 9
    out, err = _tshark(path, "-2", "-Y", "vmsg", "-T", "fields", "-e", "frame.number", "-e", "vmsg.name",
                       "-e", "vmsg.response_in", "-e", "vmsg.request_in", "-e", "vmsg.time")
    _no_lua_trouble(out, err)
    rows = {int(r[0]): r[2:] for r in (ln.split("\t") for ln in out.splitlines())}
    assert rows[1] == ["5", "", ""]
    assert rows[2] == ["", "", ""]
    assert rows[3] == ["4", "", ""]
    assert rows[4] == ["", "3", "0.000001000"]
    assert rows[5] == ["", "1", "0.000004000"]
    assert rows[6] == ["", "", ""]
    assert rows[7] == ["8", "", ""]
    assert rows[8] == ["", "7", "0.000001000"]
    assert rows[9] == ["", "", ""]
    assert rows[10] == ["11", "", ""]
    assert rows[11] == ["", "10", "0.000005000"]
    # One pass (tshark without -2): responses still point back at their requests.
    out, err = _tshark(path, "-T", "fields", "-e", "frame.number", "-e", "vmsg.name", "-e", "vmsg.request_in")
    _no_lua_trouble(out, err)
    back = {int(r[0]): r[2] for r in (ln.split("\t") for ln in out.splitlines())}
    assert (back[4], back[5], back[8], back[11]) == ("3", "1", "7", "10")


def test_source_and_destination_follow_the_direction_flag(tmp_path):
    path = tmp_path / "dir.pcapng"
    with PcapngWriter(path) as w:
        i = w.add_interface(Interface("shm:x", "virtio-msg g2"))
        w.write_packet(i, 10**18, encode(PingRequest(token=1, data=0)), DIR_OUTBOUND)
        w.write_packet(i, 10**18 + 1, encode(PingResponse(token=1, data=0)), DIR_INBOUND)
    out, err = _tshark(path, "-T", "fields", "-e", "_ws.col.Source", "-e", "_ws.col.Destination")
    _no_lua_trouble(out, err)
    assert out.splitlines() == ["driver\tdevice", "device\tdriver"]
