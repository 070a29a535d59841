"""vhost-user message codec: framing, payload parsers, packed base encoding, fuzz."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsgamp.errors import RemoteProtocolError
from vmsgamp.vhost_user._protocol import (
    FLAG_NEED_REPLY, FLAG_REPLY, HEADER, VERSION, VRING_NOFD, Decoder, MemoryRegion, Request,
    VhostMessage, VhostProtocolError, encode, encode_config, encode_memory_table, encode_reply,
    encode_u64, encode_vring_addr, encode_vring_state, expected_fds, packed_base, parse_config,
    parse_memory_region_single, parse_memory_table, parse_u64, parse_vring_addr, parse_vring_fd,
    parse_vring_state, unpack_packed_base,
)


def msg(req, payload=b"", fds=(), flags=VERSION):
    return VhostMessage(req, flags, payload, tuple(fds))


def test_header_layout_matches_the_spec():
    assert HEADER.size == 12
    raw = encode(Request.SET_VRING_NUM, encode_vring_state(1, 256), flags=VERSION | FLAG_NEED_REPLY)
    assert raw == struct.pack("<III", 8, 0x9, 8) + struct.pack("<II", 1, 256)
    assert encode_reply(Request.GET_FEATURES, encode_u64(5))[:12] == struct.pack("<III", 1, 0x5, 8)
    # SET_VRING_ADDR wire order: index, flags, desc, used, avail, log
    a = parse_vring_addr(msg(Request.SET_VRING_ADDR, encode_vring_addr(0, 0x1000, 0x3000, 0x2000, 0x4000)))
    assert (a.desc, a.used, a.avail, a.log) == (0x1000, 0x3000, 0x2000, 0x4000)
    assert struct.unpack("<IIQQQQ", encode_vring_addr(0, 1, 2, 3))[2:5] == (1, 2, 3)


def test_decoder_byte_by_byte_keeps_fds_with_their_message():
    d = Decoder()
    a = encode(Request.SET_VRING_KICK, encode_u64(0))
    b = encode(Request.GET_FEATURES)
    seen = []
    for i, byte in enumerate(a + b):
        # fds arrive with the first byte of the message they belong to
        d.feed(bytes([byte]), [42] if i == 0 else [])
        m = d.next_message()
        if m is not None:
            seen.append(m)
    assert [m.request for m in seen] == [Request.SET_VRING_KICK, Request.GET_FEATURES]
    assert seen[0].fds == (42,) and seen[1].fds == ()
    assert d.pending == 0


def test_decoder_needed_reads_exactly_one_message():
    d = Decoder()
    assert d.needed() == 12
    raw = encode(Request.SET_MEM_TABLE, encode_memory_table([MemoryRegion(0, 4096, 0x7000, 0)]))
    d.feed(raw[:12])
    assert d.needed() == len(raw) - 12
    d.feed(raw[12:])
    assert d.needed() == 0
    assert d.next_message().request == Request.SET_MEM_TABLE
    assert d.needed() == 12


@pytest.mark.parametrize("flags", [0, 2, 3])
def test_decoder_refuses_bad_version(flags):
    d = Decoder()
    d.feed(struct.pack("<III", 1, flags, 0))
    with pytest.raises(VhostProtocolError, match="version"):
        d.next_message()


def test_decoder_refuses_oversized_payload():
    d = Decoder()
    d.feed(struct.pack("<III", 5, VERSION, 1 << 20))
    with pytest.raises(VhostProtocolError, match="larger"):
        d.needed()
    assert issubclass(VhostProtocolError, RemoteProtocolError)


def test_flags():
    m = msg(Request.SET_MEM_TABLE, flags=VERSION | FLAG_NEED_REPLY)
    assert m.need_reply and not m.is_reply and m.name == "SET_MEM_TABLE"
    assert msg(1, flags=VERSION | FLAG_REPLY).is_reply
    assert msg(999).name == "request 999"


def test_scalar_payloads():
    assert parse_u64(msg(Request.SET_FEATURES, encode_u64(0x170000000))) == 0x170000000
    with pytest.raises(VhostProtocolError, match="expected 8"):
        parse_u64(msg(Request.SET_FEATURES, b"\0" * 4))
    st_ = parse_vring_state(msg(Request.SET_VRING_BASE, encode_vring_state(2, 0x80008000)))
    assert (st_.index, st_.num) == (2, 0x80008000)
    with pytest.raises(VhostProtocolError):
        parse_vring_state(msg(Request.SET_VRING_BASE, b"\0" * 12))


def test_vring_fd_payloads():
    v = parse_vring_fd(msg(Request.SET_VRING_CALL, encode_u64(3), [7]))
    assert (v.index, v.fd) == (3, 7)
    v = parse_vring_fd(msg(Request.SET_VRING_CALL, encode_u64(1 | VRING_NOFD)))
    assert (v.index, v.fd) == (1, None)
    with pytest.raises(VhostProtocolError, match="expected 1"):
        parse_vring_fd(msg(Request.SET_VRING_KICK, encode_u64(0)))
    with pytest.raises(VhostProtocolError, match="NOFD"):
        parse_vring_fd(msg(Request.SET_VRING_KICK, encode_u64(VRING_NOFD), [5]))
    with pytest.raises(VhostProtocolError, match="unknown bits"):
        parse_vring_fd(msg(Request.SET_VRING_KICK, encode_u64(0x10000), [5]))
    assert expected_fds(Request.SET_VRING_KICK, encode_u64(VRING_NOFD)) == 0
    assert expected_fds(Request.SET_VRING_KICK, encode_u64(0)) == 1


def test_memory_table_as_qemu_sends_it():
    regions = [MemoryRegion(0, 0xA0000, 0x7F0000000000, 0),
               MemoryRegion(0xC0000, 0x1FF40000, 0x7F00000C0000, 0xC0000)]
    payload = encode_memory_table(regions)
    assert len(payload) == 8 + 8 * 32      # QEMU sends the whole array
    assert parse_memory_table(msg(Request.SET_MEM_TABLE, payload, [10, 11])) == regions
    assert parse_memory_table(msg(Request.SET_MEM_TABLE, encode_memory_table(regions, pad_to=0), [1, 2]))
    assert expected_fds(Request.SET_MEM_TABLE, payload) == 2


@pytest.mark.parametrize("regions,fds,match", [
    ([], [], "0 regions"),
    ([MemoryRegion(i << 20, 1 << 20, i << 20, 0) for i in range(9)], list(range(9)), "9 regions"),
    ([MemoryRegion(0, 4096, 0, 0)], [], "but 0 fds"),
    ([MemoryRegion(0, 0, 0, 0)], [1], "size 0"),
    ([MemoryRegion(2 ** 64 - 4096, 8192, 0, 0)], [1], "wraps"),
    ([MemoryRegion(0, 8192, 0, 0), MemoryRegion(4096, 8192, 1 << 20, 0)], [1, 2], "overlap"),
    ([MemoryRegion(0, 8192, 0, 0), MemoryRegion(1 << 20, 8192, 4096, 0)], [1, 2], "overlap"),
])
def test_memory_table_refused(regions, fds, match):
    with pytest.raises(VhostProtocolError, match=match):
        parse_memory_table(msg(Request.SET_MEM_TABLE, encode_memory_table(regions), fds))


def test_memory_table_truncated():
    payload = encode_memory_table([MemoryRegion(0, 4096, 0, 0)] * 2, pad_to=0)[:-8]
    with pytest.raises(VhostProtocolError):
        parse_memory_table(msg(Request.SET_MEM_TABLE, payload, [1, 2]))


def test_single_region():
    r = MemoryRegion(0x100000, 0x1000, 0x7000, 0)
    payload = bytes(8) + struct.pack("<QQQQ", *vars(r).values())
    assert parse_memory_region_single(msg(Request.ADD_MEM_REG, payload, [3])) == r


def test_config_payload():
    c = parse_config(msg(Request.GET_CONFIG, encode_config(0, bytes(60))))
    assert (c.offset, c.size, c.data) == (0, 60, bytes(60))
    with pytest.raises(VhostProtocolError):
        parse_config(msg(Request.GET_CONFIG, encode_config(0, bytes(10), size=60)))
    with pytest.raises(VhostProtocolError, match="outside"):
        parse_config(msg(Request.GET_CONFIG, encode_config(250, bytes(10))))


def test_packed_base_encoding():
    assert packed_base(0, True, 0, True) == 0x80008000          # QEMU's initial value
    assert unpack_packed_base(0x80008000) == (0, True, 0, True)
    assert packed_base(0, False, 0, False) == 0                 # 4 buffers on a ring of 4
    assert unpack_packed_base(packed_base(5, False, 3, True)) == (5, False, 3, True)


# ---- fuzz: any input parses or raises a protocol error --------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 40))
def test_fuzz_decoder(data, chunk):
    d = Decoder()
    try:
        for i in range(0, len(data), chunk):
            d.feed(data[i:i + chunk])
            d.needed()
            while (m := d.next_message()) is not None:
                assert len(m.payload) <= d.max_payload
    except VhostProtocolError:
        pass


_PARSERS = [parse_u64, parse_vring_state, parse_vring_addr, parse_vring_fd, parse_memory_table,
            parse_memory_region_single, parse_config]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_PARSERS), st.binary(max_size=300), st.lists(st.integers(0, 100), max_size=9))
def test_fuzz_payload_parsers(parser, payload, fds):
    try:
        parser(msg(Request.SET_MEM_TABLE, payload, fds))
    except VhostProtocolError:
        pass
