"""virtio-rng sources: zero and pattern (benchmark sources) through a mock driver."""
import pytest

from vmsgamp._core.region import Region
from vmsgamp.devices._base import parse_device_list
from vmsgamp.devices.rng import PatternSource, RngDevice, ZeroSource
from vmsgamp.testing.virtq_mock import MockDriver


def _rig(dev):
    drv = MockDriver(Region.memfd(1 << 20), "split", 16, buf_size=8192, nbufs=16)
    q = drv.device_queue()
    dev.activate([q], 0)
    return drv, q


def _request(dev, drv, q, sizes):
    assert drv.add_chain([], sizes, token="t")
    assert dev.handle_queue(0, q)
    token, n, data = drv.get_used()
    return n, data


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_pattern_continues_across_requests_and_segments(fmt):
    dev = RngDevice("pattern")
    drv = MockDriver(Region.memfd(1 << 20), fmt, 16, buf_size=8192, nbufs=16)
    q = drv.device_queue()
    dev.activate([q], 0)
    stream = b""
    for sizes in ([100], [300, 7], [4096], [1], [1000, 1000]):
        n, data = _request(dev, drv, q, sizes)
        assert n == sum(sizes) == len(data)
        stream += data
    assert stream == bytes(i & 0xFF for i in range(len(stream)))
    assert dev.bytes_served == len(stream)
    assert dev.describe()["source"] == "pattern"


def test_zero_source_reports_the_full_length():
    dev = RngDevice("zero")
    drv, q = _rig(dev)
    for sizes in ([64], [5000, 3000], [1]):
        n, data = _request(dev, drv, q, sizes)
        assert n == sum(sizes) and data == bytes(n)
    assert dev.describe()["source"] == "zero"


def test_sources_reuse_their_buffers():
    z, p = ZeroSource(), PatternSource()
    a = z(4096)
    assert bytes(z(100)) == bytes(100) and z(4096).obj is a.obj   # no allocation per request
    assert bytes(p(3)) == b"\x00\x01\x02" and bytes(p(2)) == b"\x03\x04"
    big = p(70_000)
    assert len(big) == 70_000 and big[0] == 5 and big[-1] == (5 + 69_999) & 0xFF


def test_registry_accepts_the_benchmark_sources(tmp_path):
    (dev,) = parse_device_list("rng:source=zero")
    assert isinstance(dev.source, ZeroSource)
    (dev,) = parse_device_list("rng:source=pattern")
    assert isinstance(dev.source, PatternSource)
    f = tmp_path / "entropy"
    f.write_bytes(b"abc")
    (dev,) = parse_device_list(f"rng:source={f}")
    assert dev.source(5) == b"abcab"
    dev.close()
