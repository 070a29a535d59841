"""The region opener registry: URI grammar, options, and the file-like schemes
(shm:, file:/bare path, fd:/memfd:)."""
from __future__ import annotations

import multiprocessing
import os
import struct
import uuid

import pytest

from vmsgamp._core.doorbell import PollingDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import MEM_DEVICE, Region
from vmsgamp.carriers import (
    Carrier, open_carrier, open_region, parse_size, parse_uri, register_scheme, schemes,
)


@pytest.fixture
def shm_name():
    name = f"vmsgamp-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        os.unlink("/dev/shm/" + name)
    except FileNotFoundError:
        pass


# ---- grammar and registry ---------------------------------------------------------

def test_builtin_schemes_registered():
    assert {"shm", "file", "fd", "memfd", "ivshmem"} <= set(schemes())


@pytest.mark.parametrize("uri, expect", [
    ("shm:x", ("shm", "x", {})),
    ("SHM:x#size=4K&create", ("shm", "x", {"size": "4K", "create": "1"})),
    ("/dev/shm/x", ("file", "/dev/shm/x", {})),
    ("./a:b.bin#size=1", ("file", "./a:b.bin", {"size": "1"})),
    ("../x", ("file", "../x", {})),
    ("ivshmem:/tmp/s#peer=1&offset=0x1000", ("ivshmem", "/tmp/s", {"peer": "1", "offset": "0x1000"})),
    ("fd:3", ("fd", "3", {})),
])
def test_parse_uri(uri, expect):
    assert parse_uri(uri) == expect


def test_parse_uri_home():
    assert parse_uri("~/x")[1] == os.path.expanduser("~/x")


@pytest.mark.parametrize("bad", ["", "   ", "region.bin", ":x", "shm:x#=1", "shm:x#a=1&a=2"])
def test_parse_uri_rejects(bad):
    with pytest.raises(ValueError):
        parse_uri(bad)


def test_unknown_scheme_lists_known():
    with pytest.raises(ValueError) as ei:
        open_carrier("nosuch:thing")
    msg = str(ei.value)
    assert "nosuch" in msg
    for name in ("shm", "file", "fd", "memfd", "ivshmem"):
        assert name in msg


def test_unknown_option_lists_known(shm_name):
    with pytest.raises(ValueError, match="unknown option.*bogus.*known:.*size"):
        open_carrier(f"shm:{shm_name}#bogus=1")


@pytest.mark.parametrize("text, value", [
    ("4096", 4096), ("0x1000", 4096), ("64K", 65536), ("64k", 65536), ("4M", 4 << 20),
    ("4MiB", 4 << 20), ("1G", 1 << 30), (123, 123), (" 2K ", 2048),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "4Q", "-1", "1.5M", "M", True, -5])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_register_custom_scheme():
    seen = {}

    def opener(target, *, uri, flavour="plain", **opts):
        seen.update(target=target, uri=uri, flavour=flavour, opts=opts)
        region = Region.memfd(4096)
        return Carrier(region, PollingDoorbell(), uri=uri)

    register_scheme("testscheme", opener, options=("flavour",), summary="for a test")
    try:
        with open_carrier("testscheme:abc#flavour=sour", bus_base=0x1000) as c:
            assert c.region.size == 4096
        assert seen == {"target": "abc", "uri": "testscheme:abc#flavour=sour",
                        "flavour": "sour", "opts": {"bus_base": 0x1000}}
        assert c.closed and c.region.closed
        with pytest.raises(ValueError, match="already registered"):
            register_scheme("testscheme", opener)
        with pytest.raises(ValueError, match="bad scheme name"):
            register_scheme("9bad", opener)
    finally:
        from vmsgamp.carriers import _registry
        _registry._SCHEMES.pop("testscheme", None)


# ---- shm: ---------------------------------------------------------------------------

def test_shm_create_and_open(shm_name):
    with open_carrier(f"shm:{shm_name}#size=64K&create=1") as a:
        assert a.region.size == 65536
        assert isinstance(a.doorbell, PollingDoorbell)
        assert os.path.exists("/dev/shm/" + shm_name)
        a.region.store64(8, 0x1122334455667788)
        # Opening without size= maps the whole object; a leading / is allowed.
        with open_carrier(f"shm:/{shm_name}") as b:
            assert b.region.size == 65536
            assert b.region.load64(8) == 0x1122334455667788
            b.region.store32(0, 7)
        assert a.region.load32(0) == 7
    assert os.path.exists("/dev/shm/" + shm_name)   # persists unless unlink=1


def test_shm_unlink_option(shm_name):
    c = open_carrier(f"shm:{shm_name}", size="4K", create=True, unlink=True)
    c.close()
    c.close()   # idempotent
    assert not os.path.exists("/dev/shm/" + shm_name)


def test_shm_create_existing_is_clear_error(shm_name):
    with open_carrier(f"shm:{shm_name}#size=4K&create=1"):
        with pytest.raises(FileExistsError, match="already exists"):
            open_carrier(f"shm:{shm_name}#size=4K&create=1")


def test_shm_missing_is_clear_error(shm_name):
    with pytest.raises(FileNotFoundError, match=f"shm:{shm_name}.*create=1"):
        open_carrier(f"shm:{shm_name}")


def test_shm_too_small(shm_name):
    with open_carrier(f"shm:{shm_name}#size=4K&create=1"):
        with pytest.raises(ValueError, match="too small: 4096 bytes, 8192 wanted"):
            open_carrier(f"shm:{shm_name}#size=8K")


def test_shm_create_needs_size(shm_name):
    with pytest.raises(ValueError, match="size="):
        open_carrier(f"shm:{shm_name}#create=1")


@pytest.mark.parametrize("name", ["a/b", "/", "..", ""])
def test_shm_bad_names(name):
    with pytest.raises(ValueError):
        open_carrier(f"shm:{name}")


def test_common_options_apply(shm_name):
    with open_carrier(f"shm:{shm_name}#size=8K&create=1&bus_base=0x40000000&memtype=device"
                      f"&offset=0x1000") as c:
        assert c.region.bus_base == 0x40000000
        assert c.region.memtype == MEM_DEVICE
        assert c.offset == 0x1000
    with open_carrier(f"shm:{shm_name}", readonly=True) as r:
        assert r.region.load8(0) == 0
        with pytest.raises(Exception):
            r.region.store8(0, 1)
    with pytest.raises(ValueError, match="offset"):
        open_carrier(f"shm:{shm_name}#offset=8K")
    with pytest.raises(ValueError, match="memtype"):
        open_carrier(f"shm:{shm_name}#memtype=weird")


def test_open_region_keeps_only_the_region(shm_name):
    region = open_region(f"shm:{shm_name}#size=4K&create=1")
    try:
        region.store32(4, 99)
        assert region.load32(4) == 99
        assert not region.closed
    finally:
        region.close()
    assert region.closed


def _msg(seq: int) -> bytes:
    # 8-byte G2 header with msg_size (bytes 6..7) = 16, then the sequence number.
    return bytes(6) + struct.pack("<HQ", 16, seq)


def _shm_peer(name: str, count: int, done) -> None:
    with open_carrier(f"shm:{name}", timeout=10) as c:
        fifo = MsgFifo(c.region, role="driver", doorbell=c.doorbell)
        fifo.start(10)
        for i in range(count):
            got = fifo.recv_bytes(10)
            assert got == _msg(i), (i, got)
            fifo.send(_msg(i + 1_000_000), 10)
        # A FIFO that sees its peer shut down stops delivering, so leave only
        # once the other side has read our last reply.
        assert done.wait(10)
        fifo.close()


def test_two_processes_through_a_named_shm_object_only(shm_name):
    """Nothing but the shm name connects the two sides; the doorbell polls."""
    count = 300
    ctx = multiprocessing.get_context("fork")
    with open_carrier(f"shm:{shm_name}#size=16K&create=1") as dev:
        done = ctx.Event()
        child = ctx.Process(target=_shm_peer, args=(shm_name, count, done))
        child.start()
        try:
            fifo = MsgFifo(dev.region, role="device", doorbell=dev.doorbell)
            fifo.start(10)
            for i in range(count):
                fifo.send(_msg(i), 10)
                assert fifo.recv_bytes(10) == _msg(i + 1_000_000)
            done.set()
            fifo.close()
        finally:
            done.set()
            child.join(10)
            if child.is_alive():
                child.kill()
        assert child.exitcode == 0


# ---- file: and bare paths ---------------------------------------------------------

def test_file_bare_path_and_file_url(tmp_path, monkeypatch):
    path = tmp_path / "mem.bin"
    path.write_bytes(b"\xab" * 8192)
    monkeypatch.chdir(tmp_path)
    for uri in (str(path), "./mem.bin", f"file:{path}", f"file://{path}"):
        with open_carrier(uri) as c:
            assert c.region.size == 8192
            assert c.region.load8(100) == 0xAB
            assert c.uri == uri
    with open_carrier("./mem.bin#size=4K") as c:
        assert c.region.size == 4096
        c.region.store8(0, 0x5A)
    assert path.read_bytes()[0] == 0x5A


def test_file_create(tmp_path):
    path = tmp_path / "new.bin"
    with open_carrier(f"file:{path}#create=1&size=12K"):
        pass
    assert path.stat().st_size == 12 * 1024
    with pytest.raises(FileExistsError):
        open_carrier(f"file:{path}#create=1&size=12K")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        open_carrier(str(tmp_path / "nope.bin"))
    with pytest.raises(IsADirectoryError):
        open_carrier(str(tmp_path))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        open_carrier(str(empty))


# ---- fd: / memfd: ---------------------------------------------------------------------

def test_fd_scheme_shares_memory_and_leaves_callers_fd_open():
    with Region.memfd(8192) as mine:
        mine.store32(16, 0xCAFE)
        for scheme in ("fd", "memfd"):
            with open_carrier(f"{scheme}:{mine.fd}") as c:
                assert c.region.size == 8192
                assert c.region.load32(16) == 0xCAFE
                c.region.store32(20, 5)
            os.fstat(mine.fd)     # still open: the carrier closed only its dup
        assert mine.load32(20) == 5
        with pytest.raises(ValueError, match="too small"):
            open_carrier(f"fd:{mine.fd}#size=16K")


def test_fd_scheme_errors():
    with pytest.raises(ValueError, match="file-descriptor number"):
        open_carrier("memfd:vmsgamp")
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError, match="not open"):
        open_carrier(f"fd:{r}")
