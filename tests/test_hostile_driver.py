"""Issue: a hostile driver must not be able to end `vmsgamp serve`.

Every attack runs against a real DeviceServer (a serving thread over a
memfd with eventfd doorbells; one through the CLI in a subprocess), and
every test ends with the server answering PING: it is still alive and
still serving."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from vmsgamp._core.addrspace import AddressSpace
from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.fifo import MsgFifo, read_layout
from vmsgamp._core.region import Region
from vmsgamp.bus import AmpBus, DeviceServer, PeerLost
from vmsgamp.devices._base import VirtioDevice
from vmsgamp.devices.rng import RngDevice
from vmsgamp.errors import PeerStateError
from vmsgamp.protocol import (
    DeviceConnection, EventAvail, EventConfig, GetConfigRequest, GetConfigResponse,
    GetDeviceFeaturesRequest, GetDeviceFeaturesResponse, GetDevicesRequest, GetDevicesResponse,
    GetDeviceStatusRequest, GetVqueueRequest, Message, PingRequest, PingResponse, ResetVqueueRequest,
    SetConfigRequest, SetDeviceStatusRequest, SetDriverFeaturesRequest, SetVqueueRequest, decode,
    encode,
)
from vmsgamp.protocol._device import get_devices_window


class Faulty(VirtioDevice):
    """A model with bugs a driver can trigger: config reads raise, and its
    config generation does not fit the 32-bit wire field."""

    device_id = 34
    name = "faulty"

    def config_size(self) -> int:
        return 8

    def read_config(self, offset, length):
        raise RuntimeError("model bug in read_config")

    def write_config(self, offset, data):
        self.config_generation = 1 << 40      # next EVENT_CONFIG cannot be encoded
        return True


class RawDriver:
    """A driver that sends whatever it is told: encoded messages straight
    into its FIFO, no state machine."""

    def __init__(self, region: Region, bell: EventfdDoorbell, timeout: float = 5.0):
        self.fifo = MsgFifo(region, role="driver", doorbell=bell)
        self.fifo.start(timeout)
        self.token = 0

    def send(self, msg: Message) -> None:
        self.token = self.token % 0xFFFF + 1
        self.fifo.send(encode(_with_token(msg, self.token)), 2)

    def ask(self, msg: Message, timeout: float = 3.0) -> Message | None:
        """Send a request; its response (events in between are skipped)."""
        self.send(msg)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = decode(self.fifo.recv_bytes(left))
            except TimeoutError:
                return None
            if got.IS_RESPONSE and got.MSG_ID == msg.MSG_ID and got.IS_BUS == msg.IS_BUS:
                return got
        return None

    def ping(self, data: int = 0x1234) -> bool:
        r = self.ask(PingRequest(data=data))
        return isinstance(r, PingResponse) and r.data == data

    def close(self) -> None:
        self.fifo.close()


def _with_token(msg: Message, token: int) -> Message:
    import dataclasses
    return dataclasses.replace(msg, token=token)


class Served:
    """A DeviceServer serving rng (0) and a faulty model (1) in a thread."""

    def __init__(self):
        self.region = Region.memfd(1 << 20)
        self.dev_bell, self.drv_bell = EventfdDoorbell.pair()
        self.fifo = MsgFifo(self.region, role="device", doorbell=self.dev_bell)
        self.server = DeviceServer(AmpBus(self.fifo, DeviceConnection()), AddressSpace.identity(self.region),
                                   {0: RngDevice(), 1: Faulty()}, handshake_timeout=0.1)
        self.stop = threading.Event()
        self.crash: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.server.serve_forever(self.stop)
        except BaseException as e:   # the test fails on any escape
            self.crash.append(e)

    def driver(self) -> RawDriver:
        return RawDriver(self.region, self.drv_bell)

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.crash

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.server.close()
        self.fifo.close()
        self.dev_bell.close()
        self.drv_bell.close()
        self.region.close()


@pytest.fixture
def served():
    s = Served()
    yield s
    assert s.alive(), s.crash
    s.close()
    assert not s.crash, s.crash


# ---- out-of-range request fields -------------------------------------------------------

@pytest.mark.parametrize("offset, count, want_count, want_next", [
    (0, 32, 32, 32),              # Linux: exactly the count asked
    (0, 0xFFF8, 400, 400),        # the most a 64-byte message carries
    (0xFFF0, 32, 16, 0),          # the 16-bit device space ends at 0xFFFF
    (0xFFF8, 8, 8, 0),
    (0xFFFF, 8, 0, 0),
    (0x8000, 0, 0, 0x8000),
])
def test_get_devices_window_is_clamped(served, offset, count, want_count, want_next):
    drv = served.driver()
    r = drv.ask(GetDevicesRequest(offset=offset, count=count))
    assert isinstance(r, GetDevicesResponse)
    assert (r.offset, r.count, r.next_offset) == (offset, want_count, want_next)
    assert r.devices() == [n for n in (0, 1) if offset <= n < offset + want_count]
    assert drv.ping()


def test_get_devices_window_rule():
    assert get_devices_window(0, 32, 64, 8) == 32
    assert get_devices_window(0, 0xFFF8, 48, 8) == 8 * (48 - 8 - 6)
    assert get_devices_window(0xFFFC, 8, 64, 8) == 0
    assert get_devices_window(0, 64, 10, 8) == 0


@pytest.mark.parametrize("dev_num", [0, 7])         # a device, and a gap
@pytest.mark.parametrize("block_index, num_blocks", [
    (0, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFE, 4), (2, 0xFFF8),
])
def test_get_device_features_with_huge_fields(served, dev_num, block_index, num_blocks):
    drv = served.driver()
    r = drv.ask(GetDeviceFeaturesRequest(dev_num=dev_num, block_index=block_index, num_blocks=num_blocks))
    assert isinstance(r, GetDeviceFeaturesResponse) and r.block_index == block_index
    assert 0 < r.num_blocks <= (64 - 16) // 4
    if block_index >= 2:
        assert set(r.features) == {0}     # beyond the 64 feature bits: zeros
    assert drv.ping()


@pytest.mark.parametrize("msg", [
    GetConfigRequest(dev_num=0, offset=0xFFFFFFFF, length=0xFFFFFFFF),
    GetConfigRequest(dev_num=0, offset=1, length=0xFFFFFFFF),
    SetConfigRequest(dev_num=0, generation=0, offset=0xFFFFFFF0, data=b"\xff" * 16),
    SetDriverFeaturesRequest(dev_num=0, block_index=0xFFFFFFFF, features=(0xFFFFFFFF,) * 4),
    SetDeviceStatusRequest(dev_num=0, status=0xFFFFFFFF),
    GetVqueueRequest(dev_num=0, index=0xFFFFFFFF),
    ResetVqueueRequest(dev_num=0, index=0xFFFFFFFF),
    SetVqueueRequest(dev_num=0, index=0, size=0xFFFFFFFF, desc_addr=2**64 - 16,
                     driver_addr=2**64 - 2, device_addr=2**64 - 4),
    SetVqueueRequest(dev_num=0, index=0xFFFFFFFF, size=16, desc_addr=0, driver_addr=0, device_addr=0),
], ids=lambda m: m.NAME)
def test_transport_requests_with_overflowing_fields_are_answered(served, msg):
    drv = served.driver()
    r = drv.ask(msg)
    assert r is not None and r.MSG_ID == msg.MSG_ID, r
    if isinstance(r, GetConfigResponse):
        assert r.data == b""
    assert drv.ping()


def test_event_avail_for_queues_that_do_not_exist(served):
    drv = served.driver()
    for dev, vq in ((0, 0xFFFFFFFF), (31, 0), (0xFFFF, 0xFFFF), (1, 3)):
        drv.send(EventAvail(dev_num=dev, vq_index=vq))
    assert drv.ping()


def test_a_model_bug_is_answered_and_resets_only_that_device(served):
    drv = served.driver()
    r = drv.ask(GetConfigRequest(dev_num=1, offset=0, length=4))
    assert isinstance(r, GetConfigResponse) and r.data == b""      # the fallback answer
    st = drv.ask(GetDeviceStatusRequest(dev_num=1))
    assert st.status & 0x40                                          # DEVICE_NEEDS_RESET
    assert drv.ask(GetDeviceStatusRequest(dev_num=0)).status == 0     # the rng is untouched
    assert served.server.dispatch_errors == 1
    # A generation that does not fit the wire: the event is dropped, the loop goes on.
    assert drv.ask(SetConfigRequest(dev_num=1, generation=0, offset=0, data=b"\x01")) is not None
    assert drv.ping()
    assert served.server.dispatch_errors >= 2


# ---- queue state ---------------------------------------------------------------------------

def _drv_head(region: Region) -> int:
    return read_layout(region)["drv_queue_head_offset"]


def _dev_state(region: Region) -> int:
    return region.load16(read_layout(region)["dev_queue_head_offset"] + 2, "acquire") & 0x1F


@pytest.mark.parametrize("field, value", [(4, 0xFFFF), (4, 63), (6, 0xFFFF), (2, 0x001F)],
                         ids=["producer-0xFFFF", "producer-N", "consumer-0xFFFF", "state-31"])
def test_a_corrupted_fifo_ends_the_session_not_the_server(served, field, value):
    drv = served.driver()
    assert drv.ping()
    served.region.store16(_drv_head(served.region) + field, value, "release")
    if field == 6:
        # The device reads our consumer index when its ring looks full:
        # make it answer more pings than its ring holds, reading none.
        with pytest.raises(PeerStateError):      # the device drops to INIT meanwhile
            for i in range(1_000_000):           # until its ring fills: how soon depends on timing
                drv.send(PingRequest(data=i & 0xFFFF))
    drv.fifo.kick()
    deadline = time.monotonic() + 5
    while not any(isinstance(e, PeerLost) for e in served.server.events):
        assert time.monotonic() < deadline, "the device side never noticed"
        time.sleep(0.01)
    lost = [e for e in served.server.events if isinstance(e, PeerLost)]
    assert lost[0].event == "broken" and served.server.bus.fifo_breaks == 1
    # It waits for a new driver handshake instead of running on with the old
    # session's indices: the old driver still shows RUN.
    time.sleep(0.3)
    assert _dev_state(served.region) != 2
    assert served.alive()
    drv.fifo.rearm()                 # the hostile driver goes away
    drv2 = served.driver()           # a new driver, as after a restart
    assert drv2.ping()
    r = drv2.ask(GetDevicesRequest(offset=0, count=32))
    assert r.devices() == [0, 1]
    assert served.server.recoveries == 1


def test_flood_of_kicks_and_garbage_messages(served):
    drv = served.driver()
    junk = [bytes([0, 0x41, 0, 0, 0, 0, 16, 0]) + bytes(8),                 # EVENT_AVAIL dev 0
            bytes([3, 0x03, 0, 0, 0, 0, 12, 0, 1, 2, 3, 4]),                 # a PING response
            bytes([0, 0xEE, 0, 0, 0, 0, 8, 0]),                              # unknown id
            bytes([2, 0x02, 0, 0, 1, 0, 12, 0, 0, 0, 9, 0])]                 # count 9
    for i in range(200):
        drv.fifo.send(junk[i % len(junk)], 2)
    assert drv.ping()


# ---- the CLI --------------------------------------------------------------------------------

def test_vmsgamp_serve_survives_the_attacks():
    """The issue's attacks on a `vmsgamp serve` process, then a new driver
    that pings it."""
    name = f"vmsgamp-hostile-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-m", "vmsgamp", "serve", "--region",
                             f"shm:{name}#create=1&size=1M", "--devices", "rng", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        region = Region.from_fd(os.open(f"/dev/shm/{name}", os.O_RDWR), 1 << 20, own_fd=True)
        with region:
            drv = RawDriver(region, None)
            for msg in (GetDevicesRequest(offset=0, count=0xFFF8),
                        GetDeviceFeaturesRequest(block_index=0xFFFFFFFF, num_blocks=0xFFFFFFFF)):
                assert drv.ask(msg) is not None
            region.store16(_drv_head(region) + 4, 0xFFFF, "release")   # producer index 0xFFFF
            time.sleep(0.5)
            assert proc.poll() is None
            drv.close()
        p = subprocess.run([sys.executable, "-m", "vmsgamp", "ping", "--region", f"shm:{name}",
                            "-n", "3", "--timeout", "20"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert proc.poll() is None
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")
    assert proc.returncode == 0, err
    assert "FIFO broke" in err and "producer index 65535" in err


def test_a_session_that_ends_while_answering_drops_the_rest_of_its_batch():
    """Found by the soak: the answer to the first request of a batch found the
    peer gone; the PeerLost was lost and the next request of the old session
    was answered into the void (LocalProtocolError, a device flagged for
    nothing).  Now the PeerLost is handled and the rest of the batch dropped."""
    from vmsgamp.protocol import GetDeviceInfoRequest, RequestReceived
    from conftest import start_pair

    region = Region.memfd(1 << 20)
    dev = MsgFifo(region, role="device")
    drv = MsgFifo(region, role="driver")
    start_pair(dev, drv)
    server = DeviceServer(AmpBus(dev, DeviceConnection()), AddressSpace.identity(region), [RngDevice()])
    reqs = [GetDeviceInfoRequest(dev_num=0, token=1), GetDeviceStatusRequest(dev_num=0, token=2)]
    events = [ev for r in reqs for ev in server.conn.receive_bytes(encode(r), 0.0)]
    assert [type(e) for e in events] == [RequestReceived, RequestReceived]
    real = server.bus.transmit

    def peer_leaves_while_we_send(out):
        server.bus.transmit = real
        return server.bus.end_session("restart", "INIT")   # what a PeerStateError while sending gives

    server.bus.transmit = peer_leaves_while_we_send
    server.transports[0].status = 0x0F
    server.handle_events(events)
    assert server.dispatch_errors == 0
    assert [e.event for e in server.events if isinstance(e, PeerLost)] == ["restart"]
    assert server.transports[0].status == 0          # every device reset, none flagged
    server.close()
    drv.close()
