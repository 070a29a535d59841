"""Issue: two device sides on one region corrupt the bus silently.

The second one must refuse with one line and leave the running bus alone;
a crashed one must be replaceable without ceremony; a device side whose
layout or queue head is overwritten must notice.  The rule is in
vmsgamp/bus/_claim.py; "firmware" below is a device side that takes no lock
of ours (a bare MsgFifo: it writes the layout and its queue head, nothing
else)."""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from cli_support import run_vmsgamp, spawn

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.fifo import MsgFifo, read_layout
from vmsgamp._core.region import Region
from vmsgamp.bus import AmpBus, AmpDriver, DeviceServer, DeviceSideActive, PeerLost
from vmsgamp.bus import _claim
from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import DeviceConnection, DriverConnection
from vmsgamp.testing.amp import DRIVER_MEMORY_START

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _server(region, bell=None, **kw) -> DeviceServer:
    fifo = MsgFifo(region, role="device", doorbell=bell)
    return DeviceServer(AmpBus(fifo, DeviceConnection()), AddressSpace.identity(region), [RngDevice()],
                        handshake_timeout=0.1, **kw)


def _driver(region, bell=None, timeout=5.0) -> AmpDriver:
    fifo = MsgFifo(region, role="driver", doorbell=bell)
    bus = AmpBus(fifo, DriverConnection())
    bus.start(timeout)
    return AmpDriver(bus, RegionAllocator(region, DRIVER_MEMORY_START))


class Serving:
    def __init__(self, server: DeviceServer):
        self.server = server
        self.stop = threading.Event()
        self.thread = threading.Thread(target=server.serve_forever, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.server.close()
        self.server.bus.fifo.close()


def _head_state(region) -> int:
    return region.load16(read_layout(region)["dev_queue_head_offset"] + 2, "acquire")


def test_constants_match_the_c_header(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler on PATH: the package itself could not have been built either")
    (tmp_path / "c.c").write_text(
        '#include <stdio.h>\n#include "vmamp_shmem.h"\nint main(void){printf("%u %u %u %u %u %u %u %u %u %u %u",'
        "VMAMP_QUEUE_MAGIC, VMAMP_QH_OFF_MAGIC, VMAMP_QH_OFF_STATUS, VMAMP_QH_OFF_TAIL, VMAMP_QH_OFF_HEAD,"
        "VMAMP_STATE_MASK, VMAMP_STATE_INIT, VMAMP_STATE_READY, VMAMP_STATE_RUN, VMAMP_STATUS_F_WAITING,"
        "VMAMP_STATUS_F_LOCKED);return 0;}\n")
    subprocess.run([cc, "-std=gnu11", "-I", str(CSRC), "-o", str(tmp_path / "c"), str(tmp_path / "c.c")],
                   check=True)
    got = [int(v) for v in subprocess.run([str(tmp_path / "c")], capture_output=True, text=True,
                                          check=True).stdout.split()]
    assert got == [_claim.QUEUE_MAGIC, _claim.QH_MAGIC, _claim.QH_STATUS, _claim.QH_TAIL, _claim.QH_HEAD,
                   _claim.STATE_MASK, _claim.STATE_INIT, _claim.STATE_READY, _claim.STATE_RUN,
                   _claim.F_WAITING, _claim.F_LOCKED]


# ---- rule 1: the lock ---------------------------------------------------------------------

def test_a_second_device_side_is_refused_and_the_first_keeps_serving():
    region = Region.memfd(1 << 20)
    dev_bell, drv_bell = EventfdDoorbell.pair()
    first = Serving(_server(region, dev_bell))
    try:
        drv = _driver(region, drv_bell)
        assert drv.enumerate() == [0]
        before = region.read(0, 64)
        with pytest.raises(DeviceSideActive, match="already active on memfd:vmsgamp .*holds its lock"):
            _server(region)
        assert region.read(0, 64) == before           # the layout was not touched
        assert drv.enumerate() == [0] and drv.ping(3)["count"] == 3
        assert _head_state(region) & _claim.F_LOCKED
    finally:
        first.close()


def test_windows_at_different_offsets_are_claimed_apart():
    region = Region.memfd(1 << 20)
    a = MsgFifo(region, role="device", offset=0)
    b = MsgFifo(region, role="device", offset=0x10000)
    sa = DeviceServer(AmpBus(a, DeviceConnection()), AddressSpace.identity(region), [RngDevice()])
    sb = DeviceServer(AmpBus(b, DeviceConnection()), AddressSpace.identity(region), [RngDevice()])
    with pytest.raises(DeviceSideActive):
        DeviceServer(AmpBus(MsgFifo(region, role="device", offset=0x10000), DeviceConnection()),
                     AddressSpace.identity(region), [RngDevice()])
    sa.close()
    sb.close()
    # released: the window can be claimed again
    _server(region).close()


def _fork_device(region, bell) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            server = _server(region, bell)
            while True:
                server.step(0.05)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def test_a_killed_device_process_is_replaced_at_once():
    """Its lock died with it: the head's F_LOCKED says it was a lock holder."""
    region = Region.memfd(1 << 20)
    dev_bell, drv_bell = EventfdDoorbell.pair()
    pid = _fork_device(region, dev_bell)
    drv = _driver(region, drv_bell)
    assert drv.enumerate() == [0]
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert _head_state(region) & 0x1F == 2            # it died in RUN, holding nothing
    t0 = time.monotonic()
    pid = _fork_device(region, dev_bell)             # no --takeover needed
    try:
        drv.bus.end_session("test", "the old device side is gone")
        drv.bus.start(10)
        assert drv.enumerate() == [0] and drv.ping(2)["count"] == 2
        assert time.monotonic() - t0 < 8             # not one observation window per restart
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


# ---- rule 4: device sides without our lock (firmware) ------------------------------------------

def _firmware_waiting(region) -> tuple[MsgFifo, threading.Thread]:
    """A device side that wrote the layout and waits for a driver."""
    fw = MsgFifo(region, role="device")
    t = threading.Thread(target=lambda: pytest.raises(Exception, fw.start, 0.8), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while read_layout(region)["magic"] != 0x4C4F:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return fw, t


def test_idle_firmware_is_not_overwritten_without_takeover():
    region = Region.memfd(1 << 20)
    fw, t = _firmware_waiting(region)
    before = region.read(0, 80)
    with pytest.raises(DeviceSideActive, match="shows INIT; pass --takeover if it is dead"):
        _server(region, observe=0.2)
    t.join()
    assert region.read(0, 80) == before
    server = _server(region, observe=0.2, takeover=True)
    assert server.claim.fresh_start
    server.close()


def test_firmware_with_traffic_is_seen_alive():
    region = Region.memfd(1 << 20)
    a, b = EventfdDoorbell.pair()
    fw = MsgFifo(region, role="device", doorbell=a)
    drv = MsgFifo(region, role="driver", doorbell=b)
    stop = threading.Event()

    def firmware():
        fw.start(5)
        while not stop.is_set():
            try:
                fw.send(fw.recv_bytes(0.2), 1)
            except TimeoutError:
                pass

    def driver():
        drv.start(5)
        msg = bytes(6) + (12).to_bytes(2, "little") + bytes(4)
        while not stop.is_set():
            drv.send(msg, 1)
            drv.recv_bytes(1)
            time.sleep(0.01)

    threads = [threading.Thread(target=f, daemon=True) for f in (firmware, driver)]
    for th in threads:
        th.start()
    try:
        time.sleep(0.3)
        with pytest.raises(DeviceSideActive, match="keeps changing"):
            _server(region, observe=0.5)
    finally:
        stop.set()
        for th in threads:
            th.join(5)


def test_dead_firmware_is_replaced():
    """The driver's messages stay unconsumed: nobody serves the window."""
    region = Region.memfd(1 << 20)
    fw = MsgFifo(region, role="device")
    drv = MsgFifo(region, role="driver")
    th = threading.Thread(target=fw.start, args=(5,))
    th.start()
    drv.start(5)
    th.join()
    drv.send(bytes(6) + (12).to_bytes(2, "little") + bytes(4), 1)    # never consumed
    server = _server(region, observe=0.3)
    assert server.claim.fresh_start
    server.close()


# ---- verify(): overwritten under us -------------------------------------------------------------

def test_an_overwritten_layout_is_noticed_and_rewritten_once_quiet(caplog):
    region = Region.memfd(1 << 20)
    dev_bell, drv_bell = EventfdDoorbell.pair()
    srv = Serving(_server(region, dev_bell, observe=0.2))
    try:
        drv = _driver(region, drv_bell)
        assert drv.enumerate() == [0]
        region.store16(14, 0x5555, "release")         # layout `reserved`: nobody but us writes it
        deadline = time.monotonic() + 5
        while srv.server.overwrites == 0:
            assert time.monotonic() < deadline, "the overwrite went unnoticed"
            time.sleep(0.02)
        assert "layout field reserved changed under us" in caplog.text
        lost = [e for e in srv.server.events if isinstance(e, PeerLost)]
        assert lost and lost[-1].event == "overwritten"
        # The driver sees the session end and comes back with a new handshake.
        with pytest.raises(Exception):
            for _ in range(100):
                drv.ping(1, timeout=0.2)
        drv.bus.start(10)
        assert drv.enumerate() == [0]
        assert srv.server.recoveries == 1
        assert read_layout(region)["reserved"] == 0
    finally:
        srv.close()


# ---- the CLI ------------------------------------------------------------------------------------

_vm = functools.partial(run_vmsgamp, timeout=60)
_spawn = spawn


def _stop(p):
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    return err


@pytest.mark.parametrize("scheme", ["shm", "ivshmem"])
def test_second_vmsgamp_serve_refuses_in_one_line(tmp_path, scheme):
    procs = []
    name = f"vmsgamp-claim-{uuid.uuid4().hex[:8]}"
    try:
        if scheme == "ivshmem":
            sock = str(tmp_path / "ivshmem.sock")
            procs.append(_spawn("ivshmem-server", sock, "--size", "1M"))
            while not os.path.exists(sock):
                time.sleep(0.02)
            first_uri = region = f"ivshmem:{sock}"
        else:
            first_uri, region = f"shm:{name}#create=1&size=1M", f"shm:{name}"
        first = _spawn("serve", "--region", first_uri, "--devices", "rng,rng", "--json")
        procs.append(first)
        json.loads(first.stdout.readline())
        second = _vm("serve", "--region", region, "--devices", "console")
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1, second.stderr
        assert "a device side is already active on" in second.stderr
        out = json.loads(_vm("devices", "--region", region, "--json").stdout)
        assert [d["name"] for d in out["devices"]] == ["rng", "rng"]
        assert _vm("ping", "--region", region, "-n", "20").returncode == 0
        assert first.poll() is None
    finally:
        for p in reversed(procs):
            _stop(p)
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")
