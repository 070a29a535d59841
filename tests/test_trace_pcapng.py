"""The pcapng writer and reader, checked against Wireshark's own tools."""
from __future__ import annotations

import io
import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsgamp.protocol import GetDeviceInfoRequest, PingRequest, PingResponse, encode
from vmsgamp.trace import (
    DIR_INBOUND, DIR_OUTBOUND, DIR_UNKNOWN, LINKTYPE_USER0, CaptureFormatError, Interface, PcapngWriter,
    read_capture,
)

CAPINFOS = shutil.which("capinfos")
TSHARK = shutil.which("tshark")
EDITCAP = shutil.which("editcap")
needs = pytest.mark.skipif(not (CAPINFOS and TSHARK and EDITCAP), reason="Wireshark tools not installed")

T0 = 1_700_000_000_123_456_789

MESSAGES = [
    (0, T0, encode(GetDeviceInfoRequest(dev_num=0, token=5)), DIR_OUTBOUND),
    (1, T0 + 1, encode(PingRequest(token=1, data=7), profile="g1"), DIR_OUTBOUND),
    (0, T0 + 1_000_000_007, encode(PingResponse(token=1, data=7)), DIR_INBOUND),
    (0, T0 + 2_000_000_000, bytes(range(64)), DIR_OUTBOUND),     # a whole slot (malformed message)
    (1, T0 + 3_000_000_001, b"\x01\x02\x03", DIR_UNKNOWN),        # 3 bytes: padding in the block
]


def _write(dst) -> None:
    with PcapngWriter(dst) as w:
        assert w.add_interface(Interface("shm:bus0", "virtio-msg g2", comment="driver end")) == 0
        assert w.add_interface(Interface("ivshmem:/tmp/s#peer=1", "virtio-msg g1")) == 1
        for iface, ts, data, d in MESSAGES:
            w.write_packet(iface, ts, data, d)


def test_round_trip(tmp_path):
    path = tmp_path / "c.pcapng"
    _write(path)
    ifaces, packets = read_capture(path)
    assert [(i.name, i.description, i.linktype, i.tsresol, i.comment) for i in ifaces] == [
        ("shm:bus0", "virtio-msg g2", LINKTYPE_USER0, 9, "driver end"),
        ("ivshmem:/tmp/s#peer=1", "virtio-msg g1", LINKTYPE_USER0, 9, "")]
    assert [i.profile for i in ifaces] == ["g2", "g1"]
    assert [(p.interface, p.time_ns, p.data, p.direction) for p in packets] == MESSAGES
    assert all(p.orig_len == len(p.data) for p in packets)
    # Every block is 4-byte aligned and its two lengths agree (the reader checks both).
    assert path.stat().st_size % 4 == 0


@needs
def test_capinfos_and_tshark_read_what_we_wrote(tmp_path):
    path = tmp_path / "c.pcapng"
    _write(path)
    info = subprocess.run([CAPINFOS, "-M", str(path)], capture_output=True, text=True, check=True).stdout
    for needle in ("File type:           pcapng", "File encapsulation:  user0", "Number of packets:   5",
                   "Strict time order:   True", "Capture application: vmsgamp",
                   "Number of interfaces in file: 2", "Name = shm:bus0", "Description = virtio-msg g2",
                   "Encapsulation = USER 0 (45 - user0)", "Time precision = nanoseconds (9)",
                   "Comment = driver end", "Number of packets = 3", "Name = ivshmem:/tmp/s#peer=1",
                   "Description = virtio-msg g1", "Number of packets = 2"):
        assert needle in info, needle
    out = subprocess.run([TSHARK, "-r", str(path), "-T", "fields", "-e", "frame.interface_id",
                          "-e", "frame.time_epoch", "-e", "frame.packet_flags_direction", "-e", "frame.len",
                          "-e", "data"], capture_output=True, text=True, check=True).stdout
    rows = [ln.split("\t") for ln in out.splitlines()]
    assert len(rows) == len(MESSAGES)
    for row, (iface, ts, data, d) in zip(rows, MESSAGES):
        assert int(row[0]) == iface
        sec, frac = row[1].split(".")
        assert int(sec) * 10**9 + int(frac.ljust(9, "0")) == ts
        assert int(row[2], 16) == d
        assert int(row[3]) == len(data)
        assert row[4] == data.hex()


@needs
@pytest.mark.parametrize("fmt", ["pcap", "nsecpcap"])
def test_reads_classic_pcap_as_converted_by_editcap(tmp_path, fmt):
    src = tmp_path / "c.pcapng"
    with PcapngWriter(src) as w:
        w.add_interface(Interface("shm:bus0", "virtio-msg g2"))
        for _iface, ts, data, d in MESSAGES:
            w.write_packet(0, ts, data, d)
    dst = tmp_path / f"c.{fmt}"
    subprocess.run([EDITCAP, "-F", fmt, str(src), str(dst)], check=True, capture_output=True)
    ifaces, packets = read_capture(dst)
    assert ifaces[0].linktype == LINKTYPE_USER0 and ifaces[0].profile == "g2"
    assert [p.data for p in packets] == [m[2] for m in MESSAGES]
    scale = 1 if fmt == "nsecpcap" else 1000
    assert [p.time_ns for p in packets] == [m[1] // scale * scale for m in MESSAGES]


def _be_pcapng() -> bytes:
    """A big-endian capture, built by hand (some capture hosts are big-endian)."""
    def block(btype, body):
        return struct.pack(">II", btype, 12 + len(body)) + body + struct.pack(">I", 12 + len(body))

    def opt(code, value):
        return struct.pack(">HH", code, len(value)) + value + bytes(-len(value) & 3)

    shb = block(0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = block(1, struct.pack(">HHI", 147, 0, 0) + opt(2, b"shm:be") + opt(3, b"virtio-msg g1")
                + opt(9, b"\x06") + opt(0, b""))
    data = encode(PingRequest(token=0, data=9), profile="g1")
    epb = block(6, struct.pack(">IIIII", 0, 0, 1_000_000, len(data), len(data)) + data + bytes(-len(data) & 3)
                + opt(2, struct.pack(">I", 1)) + opt(0, b""))
    return shb + idb + epb


def test_reads_big_endian_sections_and_microsecond_resolution():
    ifaces, packets = read_capture(_be_pcapng())
    assert ifaces[0].name == "shm:be" and ifaces[0].profile == "g1" and ifaces[0].tsresol == 6
    assert len(packets) == 1 and packets[0].direction == DIR_INBOUND
    assert packets[0].time_ns == 1_000_000 * 1000


@pytest.mark.parametrize("cut", [1, 5, 27, 40, 100, -1])
def test_truncated_files_are_clear_errors(cut):
    buf = io.BytesIO()
    _write(buf)
    data = buf.getvalue()[:cut] if cut > 0 else buf.getvalue()[:-1]
    with pytest.raises(CaptureFormatError):
        read_capture(data)


@pytest.mark.parametrize("data,needle", [
    (b"", "empty"),
    (b"GIF89a....", "not a pcapng or pcap"),
    (b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00\x11\x22\x33\x44" + bytes(16), "byte-order magic"),
])
def test_not_a_capture(data, needle):
    with pytest.raises(CaptureFormatError, match=needle):
        read_capture(data)


def test_packet_naming_an_undescribed_interface_is_an_error():
    buf = io.BytesIO()
    with PcapngWriter(buf) as w:
        w.add_interface(Interface("x", "virtio-msg g2"))
        w.write_packet(0, 1, b"\x00" * 8)
    data = bytearray(buf.getvalue())
    epb = data.rfind(struct.pack("<I", 6) + struct.pack("<I", 44 + 8))
    struct.pack_into("<I", data, epb + 8, 3)      # interface 3
    with pytest.raises(CaptureFormatError, match="interface 3"):
        read_capture(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 399))
def test_any_corruption_is_a_format_error_or_a_capture(noise, where):
    """The reader treats a file as untrusted: damage anywhere gives packets or
    CaptureFormatError, nothing else."""
    buf = io.BytesIO()
    _write(buf)
    data = bytearray(buf.getvalue())
    where %= len(data)
    data[where:where + len(noise)] = noise
    try:
        read_capture(bytes(data))
    except CaptureFormatError:
        pass
