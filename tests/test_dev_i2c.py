"""virtio-i2c: the device model through the mock driver (incl. malformed
requests), the I2C_RDWR marshalling, and device against client through two
processes over the AMP bus."""
import ctypes
import struct

import pytest

from vmsgamp._core.region import Region
from vmsgamp._core.virtq import QueueBrokenError
from vmsgamp.bus import DriverError
from vmsgamp.devices._base import parse_device_list
from vmsgamp.devices.i2c import (
    I2C_M_RD, I2C_M_TEN, I2C_RDWR, VIRTIO_I2C_FLAGS_FAIL_NEXT as FN, VIRTIO_I2C_FLAGS_M_RD as RD,
    VIRTIO_I2C_MSG_ERR as ERR, VIRTIO_I2C_MSG_OK as OK, AdapterMsg, Eeprom24C02, I2cAdapter, I2cDevice,
    LinuxI2cAdapter, Lm75, SimBus, decode_addr, encode_addr,
)
from vmsgamp.devices.i2c_client import I2cClient, I2cError, I2cMsg
from vmsgamp.devices.rng import RngDevice
from vmsgamp.testing.amp import amp_pair
from vmsgamp.testing.virtq_mock import MockDriver

EEPROM, TEMP, ABSENT = 0x50, 0x48, 0x51


def hdr(addr, flags=0, raw_addr=None):
    return struct.pack("<HHI", encode_addr(addr) if raw_addr is None else raw_addr, 0, flags)


class Rig:
    """A device model on one queue of a mock driver."""

    def __init__(self, fmt="split", device=None, size=64):
        self.drv = MockDriver(Region.memfd(1 << 20), fmt, size=size)
        self.q = self.drv.device_queue()
        self.dev = device or I2cDevice()
        assert self.dev.features_ok(1)
        self.dev.activate([self.q], 1)
        self.n = 0

    def write(self, addr, data, flags=0, **kw):
        out = [hdr(addr, flags, **kw)] + ([bytes(data)] if data else [])
        assert self.drv.add_chain(out, [1], token=self._tok())

    def read(self, addr, length, flags=RD, **kw):
        assert self.drv.add_chain([hdr(addr, flags, **kw)], ([length] if length else []) + [1], token=self._tok())

    def raw(self, out, in_sizes):
        assert self.drv.add_chain(out, in_sizes, token=self._tok())

    def _tok(self):
        self.n += 1
        return self.n

    def run(self):
        """Kick: returns [(length, data_before_status, status)] in order."""
        self.dev.handle_queue(0, self.q)
        done = []
        while (u := self.drv.get_used()) is not None:
            done.append(u)
        done.sort(key=lambda u: u[0])
        return [(ln, data[:-1], data[-1] if data else None) for _, ln, data in done]


@pytest.fixture(params=["split", "packed"])
def rig(request):
    r = Rig(request.param)
    yield r
    r.drv.close()


def statuses(results):
    return [s for _, _, s in results]


# ---- spec basics ----------------------------------------------------------------------

def test_identity_and_feature_negotiation():
    dev = I2cDevice()
    assert (dev.device_id, dev.num_queues, dev.features) == (34, 1, 1)
    assert dev.features_ok(1) and not dev.features_ok(0)   # ZERO_LENGTH_REQUEST is mandatory


def test_address_encoding():
    assert encode_addr(0x50) == 0xA0 and decode_addr(0xA0) == (0x50, False)
    assert decode_addr(encode_addr(0x2A5, ten_bit=True)) == (0x2A5, True)
    assert decode_addr(0xA1) is None                 # bit 0 set
    assert decode_addr(0x01A0) is None               # high byte without the 10-bit marker
    with pytest.raises(ValueError):
        encode_addr(0x80)


# ---- simulated targets ---------------------------------------------------------------------

def test_eeprom_write_read_back_and_page_wrap(rig):
    rig.write(EEPROM, b"\x10" + b"ABCDEFGH")          # exactly one page
    rig.write(EEPROM, b"\x06" + bytes(range(10)))     # 10 bytes from 0x06: wraps inside page 0
    assert statuses(rig.run()) == [OK, OK]
    rig.write(EEPROM, b"\x00", flags=FN)               # random read of the whole first 24 bytes
    rig.read(EEPROM, 24)
    res = rig.run()
    assert statuses(res) == [OK, OK] and res[0][0] == 1 and res[1][0] == 25
    assert res[1][1] == bytes([2, 3, 4, 5, 6, 7, 8, 9]) + b"\xff" * 8 + b"ABCDEFGH"
    # sequential read continues from the pointer and rolls over at 256
    rig.write(EEPROM, b"\xfe", flags=FN)
    rig.read(EEPROM, 4)
    assert rig.run()[1][1] == b"\xff\xff" + bytes([2, 3])


def test_temperature_sensor(rig):
    sensor = rig.dev.adapter.devices[TEMP]
    sensor.temperature = 23.5
    rig.write(TEMP, b"\x00", flags=FN)
    rig.read(TEMP, 2)
    res = rig.run()
    assert statuses(res) == [OK, OK] and res[1][1] == bytes([0x17, 0x80])
    sensor.temperature = lambda: -0.5
    rig.read(TEMP, 2)                                    # pointer stays on the temperature
    assert rig.run()[0][1] == b"\xff\x80" and Lm75.decode(0xFF80) == -0.5
    rig.write(TEMP, b"\x03" + bytes([0x50, 0x00]))       # T_os = 80.0 -> 160/2
    rig.write(TEMP, b"\x03", flags=FN)
    rig.read(TEMP, 2)
    assert rig.run()[2][1] == bytes([0x50, 0x00])
    rig.write(TEMP, b"\x07")                             # no register 7: NACK
    assert statuses(rig.run()) == [ERR]


def test_zero_length_requests(rig):
    rig.write(EEPROM, b"")        # SMBus quick write
    rig.read(EEPROM, 0)           # quick read
    rig.write(ABSENT, b"")
    assert statuses(rig.run()) == [OK, OK, ERR]


# ---- errors and FAIL_NEXT -------------------------------------------------------------------

def test_absent_address_fails_the_rest_of_its_group(rig):
    rig.write(ABSENT, b"\x00", flags=FN)
    rig.write(EEPROM, b"\x00\xaa", flags=FN)   # must not be executed
    rig.read(EEPROM, 4)
    rig.write(EEPROM, b"\x08\x11")             # next group: runs
    res = rig.run()
    assert statuses(res) == [ERR, ERR, ERR, OK]
    assert res[2][1] == bytes(4)               # failed read: buffer cleared, not stale
    assert rig.dev.adapter.devices[EEPROM].mem[0] == 0xFF and rig.dev.adapter.devices[EEPROM].mem[8] == 0x11


def test_failure_in_the_middle_of_a_group(rig):
    rig.write(EEPROM, b"\x00\x01", flags=FN)
    rig.read(ABSENT, 1, flags=RD | FN)
    rig.write(EEPROM, b"\x01\x02")
    assert statuses(rig.run()) == [OK, ERR, ERR]
    assert rig.dev.adapter.devices[EEPROM].mem[:2] == b"\x01\xff"


def test_fail_next_carries_to_a_request_made_available_later(rig):
    rig.write(ABSENT, b"\x00", flags=FN)
    assert statuses(rig.run()) == [ERR]
    rig.write(EEPROM, b"\x00\x42")             # rest of that group: failed, not executed
    assert statuses(rig.run()) == [ERR]
    rig.write(EEPROM, b"\x00\x42")
    assert statuses(rig.run()) == [OK]
    assert rig.dev.adapter.devices[EEPROM].mem[0] == 0x42
    # a reset forgets the pending failure
    rig.write(ABSENT, b"", flags=FN)
    rig.run()
    rig.dev.reset()
    rig.dev.activate([rig.q], 1)
    rig.write(EEPROM, b"")
    assert statuses(rig.run()) == [OK]


class _Exploding(I2cAdapter):
    def transfer(self, msgs):
        raise RuntimeError("adapter bug")


def test_adapter_exception_is_an_error_status_not_a_crash():
    r = Rig(device=I2cDevice(_Exploding()))
    r.write(EEPROM, b"\x00", flags=FN)
    r.read(EEPROM, 2)
    assert statuses(r.run()) == [ERR, ERR]


# ---- malformed requests ----------------------------------------------------------------------

def test_malformed_requests_get_err_and_the_queue_keeps_working(rig):
    rig.dev.max_len = 64
    h = hdr(EEPROM)
    cases = [
        ([h[:4]], [1]),                        # header too short
        ([hdr(EEPROM, RD), b"xy"], [1]),       # read request with a device-readable buffer
        ([h], [4, 1]),                         # write request with a device-writable buffer
        ([h + b"\x00\x01"], [2]),              # status part of two bytes
        ([hdr(EEPROM, 4), b"\x00"], [1]),      # reserved flag bit
        ([hdr(0, raw_addr=0xA1), b"\x00"], [1]),   # bit 0 of addr set
        ([hdr(0, raw_addr=0x12A0), b"\x00"], [1]),  # high byte without the 10-bit marker
        ([hdr(EEPROM, RD)], [65, 1]),          # read over max_len (cleared, len = all)
        ([h, bytes(65)], [1]),                 # write over max_len
    ]
    for out, ins in cases:
        rig.raw(out, ins)
    rig.write(EEPROM, b"\x20\x5a")             # a good one after all that
    res = rig.run()
    assert statuses(res) == [ERR] * len(cases) + [OK]
    assert [ln for ln, _, _ in res] == [1, 1, 5, 2, 1, 1, 1, 66, 1, 1]
    assert res[2][1] == bytes(4)
    assert rig.dev.stats["malformed"] == len(cases)
    assert rig.dev.adapter.devices[EEPROM].mem[0x20] == 0x5A


def test_missing_status_byte_and_huge_buffer(rig):
    rig.raw([hdr(EEPROM), b"\x00"], [])                  # nowhere to put a status
    drv = rig.drv
    h = drv.buffer()
    drv.aspace.write(h, hdr(EEPROM, RD))
    big = [(drv.buffer(), 4096) for _ in range(17)]      # 68 KiB: too big to clear
    assert drv.add_sg([(h, 8)], big, token="big")
    rig.write(EEPROM, b"")
    rig.dev.handle_queue(0, rig.q)
    used = [drv.get_used() for _ in range(3)]
    assert [(t, ln) for t, ln, _ in used] == [(1, 0), ("big", 0), (2, 1)]
    # status only, in the last byte (len 0: a device MAY write more than len)
    assert drv.aspace.read(big[-1][0] + 4095, 1) == bytes([ERR])
    assert used[2][2] == bytes([OK])


def test_framing_does_not_assume_descriptor_layout(rig):
    h = hdr(EEPROM)
    rig.raw([h[:3], h[3:] + b"\x30", b"\x77\x66"], [1])   # header split, data across segments
    rig.raw([hdr(EEPROM, FN), b"\x30"], [1])
    rig.raw([hdr(EEPROM, RD)], [1, 1, 1])                  # read 2 bytes + status in three segments
    res = rig.run()
    assert statuses(res) == [OK, OK, OK] and res[2][1] == b"\x77\x66"


def test_ten_bit_addresses_reach_the_adapter():
    seen = []

    class Rec(I2cAdapter):
        def transfer(self, msgs):
            seen.extend((m.addr, m.ten_bit, m.read, bytes(m.data)) for m in msgs)
            return len(msgs)

    r = Rig(device=I2cDevice(Rec()))
    r.raw([hdr(0x2A5, raw_addr=encode_addr(0x2A5, True)), b"\x01"], [1])
    assert statuses(r.run()) == [OK] and seen == [(0x2A5, True, False, b"\x01")]
    # and the simulated bus has no 10-bit targets
    r2 = Rig()
    r2.raw([hdr(0, raw_addr=encode_addr(0x50, True))], [1])
    assert statuses(r2.run()) == [ERR]


def test_writable_before_readable_breaks_the_queue():
    """Ring-level corruption is the queue's: pop raises, the transport sets
    DEVICE_NEEDS_RESET (tests/test_bus.py covers that part)."""
    r = Rig("split")
    a, b = r.drv.buffer(), r.drv.buffer()
    r.drv.write_desc(0, a, 1, 2 | 1, 1)       # WRITE | NEXT
    r.drv.write_desc(1, b, 8, 0)              # readable after writable
    r.drv.write_avail(0, 0)
    r.drv.set_avail_idx(1)
    with pytest.raises(QueueBrokenError):
        r.dev.handle_queue(0, r.q)


# ---- pass-through marshalling --------------------------------------------------------------------

class FakeI2cDev:
    """Decodes I2C_RDWR the way the kernel reads it (raw struct bytes and
    user pointers), answers reads from a little register file."""

    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail
        self.regs = bytearray(range(256))

    def __call__(self, fd, request, arg, mutate=True):
        assert request == I2C_RDWR == 0x0707 and fd == 99
        raw = bytes(memoryview(arg).cast("B"))
        assert len(raw) == 16
        msgs_ptr, nmsgs = struct.unpack("<QI4x", raw)
        table = ctypes.string_at(msgs_ptr, 16 * nmsgs)
        call = []
        ptr = 0
        for i in range(nmsgs):
            addr, flags, length, buf = struct.unpack_from("<HHH2xQ", table, 16 * i)
            if flags & I2C_M_RD:
                ctypes.memmove(buf, bytes(self.regs[ptr:ptr + length]), length)
                call.append((addr, flags, length, None))
            else:
                data = ctypes.string_at(buf, length)
                if data:
                    ptr = data[0]
                call.append((addr, flags, length, data))
        self.calls.append(call)
        if self.fail:
            raise OSError(121, "Remote I/O error")
        return nmsgs


def test_i2c_rdwr_marshalling():
    fake = FakeI2cDev()
    ad = LinuxI2cAdapter("/dev/i2c-fake", ioctl=fake, fd=99)
    msgs = [AdapterMsg(0x50, False, bytearray(b"\x10")), AdapterMsg(0x50, True, bytearray(3)),
            AdapterMsg(0x2A5, False, bytearray(), ten_bit=True)]
    assert ad.transfer(msgs) == 3
    assert fake.calls == [[(0x50, 0, 1, b"\x10"), (0x50, I2C_M_RD, 3, None), (0x2A5, I2C_M_TEN, 0, b"")]]
    assert msgs[1].data == bytes([0x10, 0x11, 0x12])
    # groups over the kernel's 42-message limit are split
    fake.calls.clear()
    assert ad.transfer([AdapterMsg(0x50, False, bytearray(b"\x01")) for _ in range(50)]) == 50
    assert [len(c) for c in fake.calls] == [42, 8]
    # an ioctl error fails the group at its first message
    bad = LinuxI2cAdapter("/dev/i2c-fake", ioctl=FakeI2cDev(fail=True), fd=99)
    assert bad.transfer(msgs) == 0


def test_pass_through_device_end_to_end_with_fake_ioctl():
    fake = FakeI2cDev()
    r = Rig(device=I2cDevice(LinuxI2cAdapter("/dev/i2c-fake", ioctl=fake, fd=99)))
    r.write(0x1D, b"\x40", flags=FN)
    r.read(0x1D, 2)
    res = r.run()
    assert statuses(res) == [OK, OK] and res[1][1] == b"\x40\x41"
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 2      # one combined I2C_RDWR


def test_device_list_options(tmp_path):
    (dev,) = parse_device_list("i2c:sim;celsius=30.5;eeprom=0x50+0x57;temp=none")
    assert isinstance(dev, I2cDevice) and sorted(dev.adapter.devices) == [0x50, 0x57]
    assert isinstance(dev.adapter.devices[0x57], Eeprom24C02)
    (dev,) = parse_device_list("i2c")
    assert sorted(dev.adapter.devices) == [TEMP, EEPROM]
    with pytest.raises(ValueError, match="does not exist"):
        parse_device_list(f"i2c:dev={tmp_path}/i2c-7")
    with pytest.raises(ValueError, match="options: .*dev"):
        parse_device_list("i2c:speed=400")


# ---- two processes over the AMP bus -------------------------------------------------------------

def _models():
    bus = SimBus.default(celsius=21.5)
    return [I2cDevice(bus), RngDevice()]


@pytest.mark.parametrize("packed", [False, True])
def test_client_against_device_process(packed):
    with amp_pair(_models, timeout=5.0) as drv:
        bus = I2cClient.open(drv, 0, packed=packed)
        assert bus.dev.packed == packed
        # EEPROM: byte, block (spanning two pages, written page by page), read back
        bus.write_byte_data(EEPROM, 0x05, 0xA5)
        assert bus.read_byte_data(EEPROM, 0x05) == 0xA5
        data = bytes(range(100, 116))
        bus.write_i2c_block_data(EEPROM, 0x20, data[:8])
        bus.write_i2c_block_data(EEPROM, 0x28, data[8:])
        assert bytes(bus.read_i2c_block_data(EEPROM, 0x20, 16)) == data
        w, r = I2cMsg.write(EEPROM, [0x05]), I2cMsg.read(EEPROM, 2)
        assert bus.i2c_rdwr(w, r) == [b"\xa5\xff"] and bytes(r) == b"\xa5\xff"
        # temperature: 21.5 degC -> 0x15 0x80
        assert bytes(bus.read_i2c_block_data(TEMP, 0, 2)) == b"\x15\x80"
        assert bus.probe(TEMP) and not bus.probe(ABSENT)
        # absent address: I2cError naming it; the failed group's read is not used
        with pytest.raises(I2cError) as ei:
            bus.read_byte_data(ABSENT, 0)
        assert ei.value.addr == ABSENT and ei.value.index == 0 and ei.value.errno == 121
        r = I2cMsg.read(ABSENT, 4)
        with pytest.raises(I2cError, match="message 2 of 2"):
            bus.i2c_rdwr(I2cMsg.write(EEPROM, [0]), r)
        assert r.data == b""
        # re-negotiation: close, reopen, the EEPROM kept its content
        bus.close()
        bus = I2cClient.open(drv, 0, packed=not packed)
        assert bus.read_byte_data(EEPROM, 0x05) == 0xA5


@pytest.mark.parametrize("packed", [False, True])
def test_malformed_traffic_does_not_disturb_the_bus(packed):
    with amp_pair(_models, layout="a" if packed else "b") as drv:
        dev = drv.open(0, features=1, packed=packed)
        q = dev.queues[0]
        h_addr, h = dev.alloc(32)
        st_addr, st = dev.alloc(16)
        h[:8] = hdr(EEPROM, RD)
        h[8:16] = hdr(0, raw_addr=0xFFFF)
        st[:4] = b"\xee\xee\xee\xee"
        bad = [([(h_addr, 8), (h_addr + 8, 8)], [(st_addr, 1)]),     # read with a readable buffer
               ([(h_addr, 4)], [(st_addr + 1, 1)]),                   # short header
               ([(h_addr + 8, 8)], [(st_addr + 2, 1)]),               # bad address
               ([(h_addr + 8, 8)], [])]                               # no status byte
        for i, (out, in_) in enumerate(bad):
            assert q.add(out, in_, token=("bad", i))
        dev.notify(0)
        got = []
        while len(got) < len(bad):
            assert dev.wait_used(0, 5)
            while (u := q.get_used()) is not None:
                got.append(u)
        assert sorted(got) == [(("bad", 0), 1), (("bad", 1), 1), (("bad", 2), 1), (("bad", 3), 0)]
        assert bytes(st[:4]) == bytes([ERR, ERR, ERR, 0xEE]) and not dev.needs_reset
        # the i2c device and the rng next to it still work
        bus = I2cClient(dev)
        bus.write_byte_data(EEPROM, 0, 0x3C)
        assert bus.read_byte_data(EEPROM, 0) == 0x3C
        rng = drv.open(1)
        addr, view = rng.alloc(32)
        assert rng.queues[0].add([], [(addr, 32)], token="r")
        rng.notify(0)
        assert rng.wait_used(0, 5) and rng.queues[0].get_used() == ("r", 32)


def test_driver_without_zero_length_request_is_refused():
    with amp_pair(_models) as drv:
        with pytest.raises(DriverError, match="refused features"):
            drv.open(0, features=0)
        # a proper driver is accepted afterwards
        assert I2cClient.open(drv, 0).read_byte_data(EEPROM, 0) == 0xFF
