"""A peer that shrinks the shared object: refused at map time, sealed where we
create it, and an orderly SharedObjectLost (never SIGBUS) when it happens
under a live mapping."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from conftest import start_pair
from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import SEALS, Region, sealed_memfd
from vmsgamp.carriers import open_carrier
from vmsgamp.carriers.ivshmem import IvshmemServer
from vmsgamp.errors import ObjectTooSmall, SharedObjectLost
from vmsgamp.testing.fifo_model import make_msg


@pytest.fixture
def shm_file():
    """A fresh /dev/shm object of 64 KiB: (path, fd we keep to truncate it)."""
    path = f"/dev/shm/vmsgamp-test-{uuid.uuid4().hex[:12]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 65536)
    yield path, fd
    os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---- at map time ------------------------------------------------------------------

@pytest.mark.parametrize("size,offset,map_offset", [
    (65536 + 1, 0, 0),          # one byte too many
    (4096, 65536, 0),           # starts at the end
    (65536, 4096, 0),           # offset + size past the end
    (61440, 0, 8192),           # vhost-user style: size + mmap_offset past the end
])
def test_mapping_past_the_end_is_refused(shm_file, size, offset, map_offset):
    path, fd = shm_file
    with pytest.raises(ObjectTooSmall, match=r"only 0x10000 bytes"):
        Region.from_fd(fd, size, offset=offset, map_offset=map_offset, uri="shm:x")
    end = min(offset, 61440)
    with Region.from_fd(fd, 65536 - end - map_offset, offset=end, map_offset=map_offset) as r:
        assert r.load8(r.size - 1) == 0      # exactly to the end is fine


def test_carriers_and_vhost_user_get_the_check_from_region(shm_file):
    path, fd = shm_file
    # fd: checks sizes itself; the root check in Region.from_fd covers any
    # caller that does not (vhost-user maps memory_size + mmap_offset).
    from vmsgamp.vhost_user._backend import GuestMemory
    from vmsgamp.vhost_user._protocol import MemoryRegion
    reg = MemoryRegion(guest_phys_addr=0, memory_size=65536, userspace_addr=0x7000_0000,
                       mmap_offset=4096)
    with pytest.raises(ObjectTooSmall):
        GuestMemory([reg], (os.dup(fd),))
    with open_carrier(f"fd:{fd}") as c:
        assert c.region.size == 65536


def test_memfds_we_create_are_sealed():
    with Region.memfd(8192) as r:
        assert fcntl.fcntl(r.fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        for size in (0, 4096, 16384):
            with pytest.raises(PermissionError):
                os.ftruncate(r.fd, size)
    fd = sealed_memfd(4096, "t")
    try:
        assert os.fstat(fd).st_size == 4096
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)   # F_SEAL_SEAL
    finally:
        os.close(fd)


def test_ivshmem_server_memory_is_sealed(tmp_path):
    server = IvshmemServer(str(tmp_path / "ivshmem.sock"), 65536)
    try:
        assert fcntl.fcntl(server.shm_fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        with pytest.raises(PermissionError):
            os.ftruncate(server.shm_fd, 0)
    finally:
        server.close()


# ---- under a live mapping, in this process ------------------------------------------

def test_region_accessors_raise_after_the_object_shrank(shm_file):
    path, fd = shm_file
    r = Region.from_fd(os.dup(fd), 65536, own_fd=True, uri="shm:victim")
    other = Region.from_fd(os.dup(fd), 4096, own_fd=True, uri="shm:other")   # first page only
    r.store32(60000, 7)
    os.ftruncate(fd, 4096)
    with pytest.raises(SharedObjectLost, match="the shared object shrank: shm:victim"):
        r.load32(60000)                      # the faulting access itself reports it
    assert r.lost and not other.lost
    for call in (lambda: r.load8(0), lambda: r.read(0, 16), lambda: r.write(0, b"x"),
                 lambda: r.store64(8, 1), lambda: r.view(), lambda: r.check_alive()):
        with pytest.raises(SharedObjectLost):
            call()
    assert other.load32(0) == 0              # a mapping that did not fault keeps working
    other.store32(0, 5)
    assert os.pread(fd, 4, 0) == b"\x05\0\0\0"
    r.close()
    assert not r.mapped and r.lost
    other.close()


def test_a_write_into_the_lost_range_raises_too(shm_file):
    path, fd = shm_file
    with Region.from_fd(os.dup(fd), 65536, own_fd=True) as r:
        os.ftruncate(fd, 0)
        with pytest.raises(SharedObjectLost):
            r.write(8192, b"\xff" * 100)
        with pytest.raises(SharedObjectLost):
            r.load8(0)


def _fifo_pair(path, layout, window=None):
    region = Region.from_fd(os.open(path, os.O_RDWR), 65536, own_fd=True, uri=f"file:{path}")
    a, b = EventfdDoorbell.pair()
    dev = MsgFifo(region, role="device", layout=layout, doorbell=a, window=window)
    drv = MsgFifo(region, role="driver", layout=layout, doorbell=b, window=window)
    start_pair(dev, drv)
    return region, dev, drv, (a, b)


@pytest.mark.parametrize("layout", ["b", "a"])
@pytest.mark.parametrize("new_size", [0, 4096])
def test_msgfifo_over_a_truncated_file(shm_file, layout, new_size):
    path, fd = shm_file
    region, dev, drv, bells = _fifo_pair(path, layout)
    assert drv.try_send(make_msg(1)) and dev.recv_bytes(timeout=1) == make_msg(1)
    os.ftruncate(fd, new_size)
    # The first call that touches a lost page finds out (here: a send into
    # the element array above 4 KiB); from then on every call says so.
    sender = drv if layout == "b" else dev
    with pytest.raises(SharedObjectLost, match=f"the shared object shrank: file:{path}") as ei:
        sender.try_send(make_msg(2))
    assert ei.value.uri == f"file:{path}"
    calls = [lambda: dev.try_recv(bytearray(64)), lambda: drv.try_send(make_msg(2)),
             lambda: dev.recv_burst(bytearray(640)), lambda: drv.send_many([make_msg(3)]),
             lambda: dev.pending(), lambda: drv.free_slots(), lambda: dev.recv(bytearray(64), 1),
             lambda: drv.start(1)]
    if layout == "b":
        calls.append(lambda: dev.peer_state())
    for call in calls:
        with pytest.raises(SharedObjectLost, match=f"file:{path}"):
            call()
    assert dev.state == "broken" and region.lost
    dev.close()
    drv.close()
    region.close()
    assert not region.mapped
    for b in bells:
        b.close()


def test_a_waiting_receiver_wakes_with_the_error(shm_file):
    path, fd = shm_file
    region, dev, drv, bells = _fifo_pair(path, "b")
    err = []

    def waiter():
        try:
            dev.recv(bytearray(64), timeout=30)
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    deadline = time.monotonic() + 10
    while dev.sleeps == 0 and time.monotonic() < deadline:   # it is asleep on the doorbell
        time.sleep(0.005)
    os.ftruncate(fd, 0)
    t.join(15)
    assert not t.is_alive(), "the waiter never noticed"
    assert len(err) == 1 and isinstance(err[0], SharedObjectLost)
    dev.close()
    drv.close()
    region.close()


# ---- real processes ------------------------------------------------------------------

_CRASH = textwrap.dedent("""
    import mmap, os, sys, tempfile
    from vmsgamp._core.region import Region
    guard = Region.memfd(4096)            # installs the SIGBUS guard
    fd = os.memfd_create("plain")
    os.ftruncate(fd, 65536)
    m = mmap.mmap(fd, 65536)              # not a vmsgamp mapping
    os.ftruncate(fd, 0)
    print(m[60000])
""")


def test_a_sigbus_outside_our_mappings_still_kills():
    """The guard only repairs its own mappings: a real fault elsewhere must
    not be swallowed."""
    p = subprocess.run([sys.executable, "-c", _CRASH], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGBUS, (p.returncode, p.stderr)


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "vmsgamp", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _status(path, off):
    with open(path, "rb") as f:       # pread, not mmap: the test itself must not fault
        f.seek(off)
        raw = f.read(2)
    return int.from_bytes(raw, "little") & 0x1F if len(raw) == 2 else None


@pytest.mark.parametrize("new_size", [0, 4096])
def test_serve_and_ping_survive_truncate(new_size):
    """The issue's scenario: ``vmsgamp serve`` + ``vmsgamp ping`` over shm:,
    then ``truncate`` by a third process.  Both end with one clear line and
    exit code 1, not signal 7."""
    name = f"vmsgamp-test-{uuid.uuid4().hex[:12]}"
    path = f"/dev/shm/{name}"
    serve = _spawn("serve", "--region", f"shm:{name}#create=1&size=1M", "--json")
    ping = None
    try:
        info = json.loads(serve.stdout.readline())
        assert info["region"].startswith(f"shm:{name}")
        ping = _spawn("ping", "--region", f"shm:{name}", "-n", "100000000")
        deadline = time.monotonic() + 30
        while not (_status(path, 66) == 2 and _status(path, 74) == 2):   # both queue heads RUN
            assert time.monotonic() < deadline, "the bus never came up"
            assert ping.poll() is None, ping.communicate()
            time.sleep(0.02)
        subprocess.run(["truncate", "-s", str(new_size), path], check=True)
        results = {}
        for label, p in (("serve", serve), ("ping", ping)):
            out, err = p.communicate(timeout=30)
            results[label] = (p.returncode, err)
        for label, (rc, err) in results.items():
            assert rc == 1, f"{label}: exit {rc}\n{err}"
            lines = err.strip().splitlines()
            assert lines and lines[-1].startswith(f"vmsgamp {label}: error: the shared object shrank: "), err
            assert f"shm:{name}" in lines[-1]
    finally:
        for p in (serve, ping):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def test_many_live_mappings_and_mapping_churn_while_faults_are_repaired(shm_file):
    """The guard table grows past its first chunk (256 entries), and regions
    mapped and unmapped in another thread while faults are being repaired
    neither crash nor get marked lost by someone else's fault."""
    path, fd = shm_file
    victims = [Region.from_fd(os.dup(fd), 65536, own_fd=True, uri=f"shm:v{i}") for i in range(300)]
    bystander = Region.memfd(4096)
    stop = threading.Event()
    churned = []

    def churn():
        while not stop.is_set():
            with Region.memfd(8192) as r:
                r.store32(4096, 1)
                assert r.load32(4096) == 1 and not r.lost
            churned.append(1)

    t = threading.Thread(target=churn)
    t.start()
    try:
        os.ftruncate(fd, 0)
        for v in reversed(victims):             # the last ones live in the second chunk
            with pytest.raises(SharedObjectLost, match=v.uri):
                v.read(0, 64)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive() and churned
    assert all(v.lost for v in victims) and not bystander.lost
    for v in victims:
        v.close()
    bystander.store32(0, 3)
    assert bystander.load32(0) == 3
    bystander.close()


# ---- virtqueues over a shrinking object ---------------------------------------------

@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_virtqueue_over_a_shrunk_object_raises(shm_file, fmt):
    """Device and driver queue calls that touch an object truncated under
    them end in SharedObjectLost (the AddressSpace checks each window's
    region), in the very call that touched the lost pages, never SIGBUS."""
    from vmsgamp._core.addrspace import AddressSpace
    from vmsgamp._core.virtq import ChainBatch
    from vmsgamp.testing.virtq_mock import MockDriver

    path, fd = shm_file
    region = Region.from_fd(fd, 65536, uri=f"file:{path}")
    m = MockDriver(region, fmt, size=8, buf_size=64)
    q = m.device_queue()
    assert m.add_chain([b"ping"], [16])
    os.ftruncate(fd, 0)
    with pytest.raises(SharedObjectLost, match="shrank"):
        q.pop()
    for call in (q.pop, lambda: q.pop_batch(ChainBatch(4, 16)), lambda: q.add_used(0, 0)):
        with pytest.raises(SharedObjectLost):
            call()
    assert region.lost


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_driver_queue_over_a_shrunk_object_raises(shm_file, fmt):
    from vmsgamp._core.addrspace import RegionAllocator
    from vmsgamp._core.virtq import PackedQueueDriver, SplitQueueDriver

    path, fd = shm_file
    region = Region.from_fd(fd, 65536, uri=f"file:{path}")
    cls = SplitQueueDriver if fmt == "split" else PackedQueueDriver
    drv = cls.create(RegionAllocator(region), 8)
    os.ftruncate(fd, 0)
    with pytest.raises(SharedObjectLost, match="shrank"):
        for _ in range(3):           # the first call touching a lost page raises
            drv.get_used()
