"""Property tests: the decoder only ever returns a message or raises
RemoteProtocolError; encode and decode are inverse on generated messages."""
from __future__ import annotations

import dataclasses
import re
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsgamp.errors import RemoteProtocolError
from vmsgamp.protocol import (MESSAGE_CLASSES, DeviceConnection, DriverConnection, GetDevicesRequest,
                              GetDevicesResponse, Message, SetConfigResponse, decode, encode)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG = 4096  # size limit for the identity tests: every generated message fits

_WIDTH = {"B": 1, "H": 2, "I": 4, "Q": 8}


def _field_widths(cls: type[Message]) -> dict[str, int]:
    """Byte width of each fixed field, read from the class's struct format."""
    widths = [_WIDTH[c] for n, c in re.findall(r"(\d*)([BHIQx])", cls._FMT) if c != "x"]
    return dict(zip(cls._FIELDS, widths))


def _uint(width: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << (8 * width)) - 1)


@st.composite
def messages(draw: st.DrawFn, cls: type[Message] | None = None, with_token: bool = True) -> Message:
    if cls is None:
        cls = draw(st.sampled_from(MESSAGE_CLASSES))
    widths = _field_widths(cls)
    kwargs: dict[str, object] = {"dev_num": draw(_uint(2))}
    kwargs["token"] = draw(_uint(2)) if with_token else 0
    for f in dataclasses.fields(cls):
        if f.name in ("dev_num", "token", "msg_size"):
            continue
        if f.name == "features":
            kwargs[f.name] = tuple(draw(st.lists(_uint(4), max_size=12)))
        elif f.name == "data" and f.type in ("bytes", bytes):
            kwargs[f.name] = draw(st.binary(max_size=48))
        elif f.name == "bitmap":
            kwargs[f.name] = draw(st.binary(max_size=12))
        elif cls is GetDevicesRequest and f.name == "count":
            kwargs[f.name] = 8 * draw(st.integers(0, 0x1FFF))
        else:
            kwargs[f.name] = draw(_uint(widths[f.name]))
    if cls is SetConfigResponse and kwargs["data"]:
        kwargs["length"] = len(kwargs["data"])  # type: ignore[arg-type]
    return cls(**kwargs)  # type: ignore[arg-type]


def _decode_or_remote_error(data: bytes, profile: str, max_size: int) -> Message | None:
    try:
        msg = decode(data, profile=profile, max_size=max_size)
    except RemoteProtocolError:
        return None
    assert isinstance(msg, Message)
    return msg


@FUZZ
@given(data=st.binary(max_size=80), profile=st.sampled_from(["g2", "g1"]),
       max_size=st.sampled_from([44, 48, 64, 512]))
def test_any_bytes_decode_or_remote_error(data: bytes, profile: str, max_size: int) -> None:
    msg = _decode_or_remote_error(data, profile, max_size)
    if msg is not None:
        # Whatever decodes re-encodes to something that decodes to the same message.
        again = encode(msg, profile=profile, max_size=BIG)
        assert decode(again, profile=profile, max_size=BIG) == msg
        assert len(again) <= msg.msg_size  # canonical form is never longer than what we got


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid message with a few bytes changed, cut or extended: reaches far
    deeper into the payload parsers than random bytes do."""
    profile = draw(st.sampled_from(["g2", "g1"]))
    msg = draw(messages(with_token=profile == "g2"))
    data = bytearray(encode(msg, profile=profile, max_size=BIG))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "grow", "size"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(_uint(1))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))):]
        elif op == "grow":
            data += draw(st.binary(min_size=1, max_size=16))
        elif op == "size" and len(data) >= 8:
            off = 6 if profile == "g2" else 4
            struct.pack_into("<H", data, off, draw(_uint(2)))
    return bytes(data), profile


@FUZZ
@given(case=mutated())
def test_mutated_messages_decode_or_remote_error(case: tuple[bytes, str]) -> None:
    data, profile = case
    _decode_or_remote_error(data, profile, BIG)
    _decode_or_remote_error(data, profile, 64)


@FUZZ
@given(msg=messages(), pad=st.integers(0, 16))
def test_encode_decode_identity_g2(msg: Message, pad: int) -> None:
    data = encode(msg, max_size=BIG)
    back = decode(data + bytes(pad), max_size=BIG)  # slot leftovers ignored
    assert back == msg
    assert back.msg_size == len(data)
    assert encode(back, max_size=BIG) == data


@FUZZ
@given(msg=messages(with_token=False))
def test_encode_decode_identity_g1(msg: Message) -> None:
    data = encode(msg, profile="g1", max_size=BIG)
    assert decode(data, profile="g1", max_size=BIG) == msg


@FUZZ
@given(devices=st.sets(st.integers(0, 63)), window=st.integers(0, 7))
def test_get_devices_bitmap_round_trip(devices: set[int], window: int) -> None:
    offset = 8 * window
    resp = GetDevicesResponse.from_devices(devices, offset=offset, count=32)
    assert resp.devices() == sorted(d for d in devices if offset <= d < offset + 32)


@FUZZ
@given(chunks=st.lists(st.binary(max_size=70), max_size=6), profile=st.sampled_from(["g2", "g1"]))
def test_connections_never_raise_on_garbage(chunks: list[bytes], profile: str) -> None:
    drv = DriverConnection(profile=profile)
    dev = DeviceConnection(profile=profile)
    drv.get_devices(0.0)
    for i, chunk in enumerate(chunks):
        drv.receive_bytes(chunk, float(i))
        dev.receive_bytes(chunk, float(i))
        drv.data_to_send()
        dev.data_to_send()
    c = drv.counters
    assert c.rx_messages == len(chunks)
