"""The fast codec (precompiled structs, generated encoders, direct-store
constructors) against the straightforward oracle in protocol_reference.py:
same bytes out, same fields in, same accept/reject on hostile input."""
from __future__ import annotations

import dataclasses
import inspect
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol_reference as ref
from vmsgamp.errors import RemoteProtocolError
from vmsgamp.protocol import (MESSAGE_CLASSES, Event, GetDevicesRequest, Message, OperationFailed,
                              PingRequest, RequestReceived, decode, encode, message_class)
from vmsgamp.protocol._messages import replace_header

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG = 4096


def _uint(width: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << (8 * width)) - 1)


@st.composite
def wire_messages(draw: st.DrawFn, profile: str = "g2") -> tuple[ref.Layout, dict, int, int]:
    """(layout, wire values incl. tail, dev_num, token) of a valid message."""
    lay = draw(st.sampled_from(ref.LAYOUTS))
    values: dict = {}
    for name, width in lay.words(profile):
        if name != "rsv":
            values[name] = draw(_uint(width))
    kind, count = ref.tail_field(lay)
    if kind == "words":
        values["features"] = tuple(draw(st.lists(_uint(4), max_size=12)))
        values[count] = len(values["features"])
    elif kind == "bytes":
        values["data"] = draw(st.binary(max_size=40))
        values[count] = len(values["data"])
    elif kind == "echo":
        values["data"] = draw(st.binary(max_size=40))
        if values["data"]:
            values[count] = len(values["data"])
    elif kind == "bitmap":
        values["bitmap"] = draw(st.binary(max_size=12))
        values[count] = 8 * len(values["bitmap"])
    if lay.name == "GET_DEVICES" and not lay.response:
        values["count"] = 8 * draw(st.integers(0, 0x1FFF))
    token = draw(_uint(2)) if profile == "g2" else 0
    return lay, values, draw(_uint(2)), token


def _cls(lay: ref.Layout) -> type[Message]:
    cls = message_class(bus=lay.bus, response=lay.response, msg_id=lay.msg_id)
    assert cls is not None and cls.NAME == lay.name
    return cls


def _build(lay: ref.Layout, values: dict, dev_num: int, token: int) -> Message:
    """The message from its wire values, through the public constructor."""
    cls = _cls(lay)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(dev_num=dev_num, token=token, **{k: v for k, v in values.items() if k in names})


def _check_fields(msg: Message, lay: ref.Layout, header: dict, values: dict) -> None:
    assert type(msg) is _cls(lay)
    assert (msg.dev_num, msg.token, msg.msg_size) == (header["dev_num"], header["token"], header["msg_size"])
    for name, value in values.items():
        assert getattr(msg, name) == value, name  # derived counts are properties


def test_reference_covers_every_class() -> None:
    assert {_cls(lay) for lay in ref.LAYOUTS} == set(MESSAGE_CLASSES)
    for lay in ref.LAYOUTS:  # the fixed sizes agree with the classes' struct formats
        for profile in ("g2", "g1"):
            cls = _cls(lay)
            fmt = cls._FMT_G1 if (profile == "g1" and cls._FMT_G1) else cls._FMT
            assert ref.fixed_size(lay, profile) == ref.header_size(profile) + struct.calcsize(fmt)


@FUZZ
@given(case=wire_messages("g2"), pad=st.integers(0, 8))
def test_encode_matches_reference_g2(case: tuple, pad: int) -> None:
    lay, values, dev_num, token = case
    expected = ref.encode(lay, values, dev_num=dev_num, token=token, profile="g2")
    msg = _build(lay, values, dev_num, token)
    assert encode(msg, max_size=BIG) == expected
    assert encode(msg, max_size=BIG, pad_to=len(expected) + pad) == expected + bytes(pad)


@FUZZ
@given(case=wire_messages("g1"))
def test_encode_matches_reference_g1(case: tuple) -> None:
    lay, values, dev_num, token = case
    expected = ref.encode(lay, values, dev_num=dev_num, token=token, profile="g1")
    assert encode(_build(lay, values, dev_num, token), profile="g1", max_size=BIG) == expected


@FUZZ
@given(case=wire_messages("g2"), leftovers=st.binary(max_size=16))
def test_decode_matches_reference_on_valid_messages(case: tuple, leftovers: bytes) -> None:
    lay, values, dev_num, token = case
    data = ref.encode(lay, values, dev_num=dev_num, token=token, profile="g2") + leftovers
    rlay, header, rvalues = ref.decode(data, profile="g2", max_size=BIG)
    assert rlay == lay
    _check_fields(decode(data, max_size=BIG), lay, header, rvalues)


def _agree(data: bytes, profile: str, max_size: int) -> None:
    try:
        expected = ref.decode(data, profile=profile, max_size=max_size)
    except ref.Malformed:
        expected = None
    try:
        got = decode(data, profile=profile, max_size=max_size)
    except RemoteProtocolError:
        got = None
    assert (got is None) == (expected is None), (data.hex(), got, expected)
    if got is not None and expected is not None:
        lay, header, values = expected
        _check_fields(got, lay, header, values)
        if memoryview(data).nbytes:  # a view or a bytearray decodes the same
            assert decode(bytearray(data), profile=profile, max_size=max_size) == got


@FUZZ
@given(data=st.binary(max_size=72), profile=st.sampled_from(["g2", "g1"]),
       max_size=st.sampled_from([44, 48, 64, 512]))
def test_decode_agrees_with_reference_on_any_bytes(data: bytes, profile: str, max_size: int) -> None:
    _agree(data, profile, max_size)


@st.composite
def damaged(draw: st.DrawFn) -> tuple[bytes, str]:
    profile = draw(st.sampled_from(["g2", "g1"]))
    lay, values, dev_num, token = draw(wire_messages(profile))
    data = bytearray(ref.encode(lay, values, dev_num=dev_num, token=token, profile=profile))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "grow", "size", "type"]))
        if op == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(_uint(1))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))):]
        elif op == "grow":
            data += draw(st.binary(min_size=1, max_size=16))
        elif op == "size" and len(data) >= ref.header_size(profile):
            off = ref.header_size(profile) - 2
            data[off:off + 2] = draw(_uint(2)).to_bytes(2, "little")
        elif op == "type" and data:
            data[0] = draw(_uint(1))
    return bytes(data), profile


@FUZZ
@given(case=damaged(), max_size=st.sampled_from([48, 64, BIG]))
def test_decode_agrees_with_reference_on_damaged_messages(case: tuple[bytes, str], max_size: int) -> None:
    data, profile = case
    _agree(data, profile, max_size)


@FUZZ
@given(case=wire_messages("g2"), dev_num=_uint(2), token=_uint(2))
def test_replace_header_is_dataclasses_replace(case: tuple, dev_num: int, token: int) -> None:
    msg = _build(*case)
    fast = replace_header(msg, dev_num, token)
    slow = dataclasses.replace(msg, dev_num=dev_num, token=token)
    assert fast == slow and type(fast) is type(slow)
    assert [getattr(fast, f.name) for f in dataclasses.fields(msg)] == \
           [getattr(slow, f.name) for f in dataclasses.fields(msg)]
    assert msg.token == case[3]  # the original is untouched


# ---- the direct-store constructors keep the dataclass contract --------------------------------

EVENT_CLASSES = [c for c in vars(__import__("vmsgamp.protocol._events", fromlist=["x"])).values()
                 if isinstance(c, type) and issubclass(c, Event) and dataclasses.is_dataclass(c)]


@pytest.mark.parametrize("cls", [Message, *MESSAGE_CLASSES, *EVENT_CLASSES], ids=lambda c: c.__name__)
def test_constructor_signature_matches_fields(cls: type) -> None:
    params = list(inspect.signature(cls).parameters.values())
    flds = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in flds]
    for p, f in zip(params, flds):
        assert p.kind == (p.KEYWORD_ONLY if f.kw_only else p.POSITIONAL_OR_KEYWORD)
        assert p.default == (p.empty if f.default is dataclasses.MISSING else f.default)
    assert cls._make.__code__.co_varnames[:len(flds)] == tuple(f.name for f in flds)


def test_constructors_reject_what_dataclasses_reject() -> None:
    with pytest.raises(TypeError):
        PingRequest()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        PingRequest(1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        PingRequest(data=1, bogus=2)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        RequestReceived(PingRequest(data=1)).request = None  # type: ignore[misc]
    ev = OperationFailed(1, "op", "why")
    assert ev.request is None and ev == OperationFailed(dev_num=1, operation="op", reason="why")
    assert GetDevicesRequest() == GetDevicesRequest(offset=0, count=32)
    assert hash(PingRequest(data=1)) == hash(PingRequest(data=1, msg_size=12))  # msg_size not compared
    assert repr(PingRequest(data=1)) == "PingRequest(dev_num=0, token=0, msg_size=0, data=1)"
