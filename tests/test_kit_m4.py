"""vmsgamp's driver side against the kit's firmware on an emulated Cortex-M4
(QEMU mps2-an386, TCG): the PSRAM is a host file, the rings live in it
(bus address 0x21000000 + offset), the doorbell is polling or the M4's UART.

Covers: enumeration, the rng pattern, EEPROM write/read-back, ping, driver
restart, the doorbell really ringing both ways, and hostile-driver attacks
after each of which the firmware still answers PING and serves the i2c
device.  Skips (saying which Debian package) when the tools are missing."""
import json
import os
import subprocess
import sys
import time

import pytest
from kit_support import driver_session, eeprom_roundtrip, need_tools, read_rng, rng_pattern

from vmsgamp.bus import BusError
from vmsgamp.coproc.build import build_firmware
from vmsgamp.coproc.m4 import DRIVER_MEMORY_OFFSET, PSRAM_BASE, M4Error, M4Machine
from vmsgamp.protocol import (
    DeviceStatus, EventAvail, GetDeviceStatusRequest, PingRequest, SetDeviceStatusRequest,
    SetVqueueRequest,
)

pytestmark = need_tools("arm-none-eabi-gcc", "qemu-system-arm")
NEEDS_RESET = DeviceStatus.DEVICE_NEEDS_RESET


@pytest.fixture(scope="module")
def firmware(tmp_path_factory):
    return build_firmware(tmp_path_factory.mktemp("fw")).path


def session(m4):
    return driver_session(m4.uri, allocator_start=DRIVER_MEMORY_OFFSET)


@pytest.mark.parametrize("doorbell", ["poll", "uart"])
def test_m4_serves_rng_and_i2c(firmware, doorbell):
    expected = rng_pattern(32 << 10)
    got = b""
    with M4Machine(firmware, doorbell=doorbell) as m4:
        for n in range(2):
            with session(m4) as (drv, bus, carrier):
                assert drv.enumerate() == [0, 1]
                infos = [drv.info(i) for i in (0, 1)]
                assert [(i.name, i.num_feature_bits, i.queue_max_sizes) for i in infos] == \
                    [("rng", 64, [256]), ("i2c", 64, [256])]
                got += read_rng(drv, 0, [4096, 1000, 7])
                assert got == expected[:len(got)]
                page = bytes((0x11 * i + n) & 0xFF for i in range(8))
                assert eeprom_roundtrip(drv, 1, 0x18, page) == page
                # rings and buffers really are in the M4's PSRAM, at its addresses
                assert drv.allocator.bus_base == PSRAM_BASE
                # idle long enough for the firmware to sleep, then ping: with the
                # UART doorbell each ping rings it awake and its answer rings us
                for _ in range(5):
                    time.sleep(0.01)
                    drv.ping(1)
                fifo = bus.stats()["fifo"]
                if doorbell == "uart":
                    assert fifo["rings"] >= 5, fifo
                    assert carrier.doorbell.wakeup_count > 0
                else:
                    assert fifo["rings"] == 0
                assert drv.ping(20)["count"] == 20
                assert bus.stats()["rx_malformed"] == 0
            # driver restart: the firmware sees the queue head go SHUTDOWN on its
            # next tick, resets both devices and is READY for the next session
            assert m4.wait_device_state("READY") == "READY"
        log = m4.log()
    assert log.count("driver connected") == 2 and log.count("driver left RUN") == 2, log
    assert "FAULT" not in log
    # the firmware counts the UART receive interrupts it took
    last = [line for line in log.splitlines() if "driver left RUN" in line][-1]
    taken = int(last.split("doorbells ")[1], 16)
    assert (taken > 0) if doorbell == "uart" else (taken == 0), last


def _ring_offsets(q):
    return q.desc_addr - PSRAM_BASE, q.driver_addr - PSRAM_BASE


def _publish_evil_chain(drv, region, q, desc: tuple[int, int, int, int]):
    """Descriptor 0 := desc (addr, len, flags, next), made available as one
    chain behind the driver queue's back, and kicked."""
    d, a = _ring_offsets(q)
    addr, ln, flags, nxt = desc
    region.store64(d, addr)
    region.store32(d + 8, ln)
    region.store16(d + 12, flags)
    region.store16(d + 14, nxt)
    idx = region.load16(a + 2)
    region.store16(a + 4 + 2 * (idx % q.size), 0)
    region.store16(a + 2, (idx + 1) & 0xFFFF, "release")
    drv.dispatch(drv.bus.send(EventAvail(dev_num=0, vq_index=0)))


def _status(drv, dev_num):
    return drv.request(GetDeviceStatusRequest(dev_num=dev_num)).status


WRITE, NEXT = 2, 1
ATTACKS = {
    "buffer in the firmware's own RAM": lambda drv, r, q: _publish_evil_chain(drv, r, q, (0x20000000, 64, WRITE, 0)),
    "buffer over the FIFO window": lambda drv, r, q: _publish_evil_chain(drv, r, q, (PSRAM_BASE, 64, WRITE, 0)),
    "buffer past the end of PSRAM": lambda drv, r, q: _publish_evil_chain(drv, r, q,
                                                                          (PSRAM_BASE + (16 << 20) - 8, 64, WRITE, 0)),
    "descriptor loop": lambda drv, r, q: _publish_evil_chain(drv, r, q, (PSRAM_BASE + 0x8000, 8, WRITE | NEXT, 0)),
    "4 GiB descriptor": lambda drv, r, q: _publish_evil_chain(drv, r, q, (PSRAM_BASE + 0x8000, 0xFFFFFFFF, WRITE, 0)),
}


def test_m4_survives_hostile_drivers(firmware):
    expected = rng_pattern(1 << 16)
    pos = 0
    with M4Machine(firmware, doorbell="uart") as m4:
        with session(m4) as (drv, bus, carrier):
            region = carrier.region
            for name, attack in ATTACKS.items():
                dev = drv.open(0, packed=False)
                attack(drv, region, dev.queues[0])
                assert _status(drv, 0) & NEEDS_RESET, name
                # still answers PING and still serves the other device
                assert drv.ping(3)["count"] == 3, name
                page = bytes(range(0x20, 0x28))
                assert eeprom_roundtrip(drv, 1, 0x30, page) == page, name
                # a reset and a new probe bring the rng back; no byte was produced meanwhile
                dev.close()
                data = read_rng(drv, 0, [256])
                assert data == expected[pos:pos + 256], name
                pos += 256
            # avail.idx far ahead of anything the driver could have made available
            dev = drv.open(0, packed=False)
            d, a = _ring_offsets(dev.queues[0])
            region.store16(a + 2, 5000, "release")
            drv.dispatch(drv.bus.send(EventAvail(dev_num=0, vq_index=0)))
            assert _status(drv, 0) & NEEDS_RESET
            dev.close()
            # rings placed in the firmware's code and outside the window are refused
            drv.request(SetDeviceStatusRequest(dev_num=0, status=0))
            drv.request(SetVqueueRequest(dev_num=0, index=0, size=16, desc_addr=0x0, driver_addr=0x1000,
                                         device_addr=0x2000))
            assert _status(drv, 0) & NEEDS_RESET
            drv.request(SetDeviceStatusRequest(dev_num=0, status=0))
            # malformed and unexpected messages: dropped, nothing answered, nothing broken
            raw = [bytes([0, 0x7F, 0, 0, 1, 0, 8, 0]),                       # unknown transport id
                   bytes([2, 2, 0, 0, 1, 0, 12, 0, 0, 0, 7, 0]),             # GET_DEVICES count 7
                   bytes([2, 2, 0, 0, 1, 0, 12, 0, 0, 0, 0x98, 1]),          # an answer too big for a slot
                   bytes([0, 4, 1, 0, 1, 0, 16, 0, 0, 0, 0, 0, 100, 0, 0, 0]),  # 100 feature blocks, none sent
                   bytes([0, 0x0A, 1, 0, 1, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0]),  # SET_VQUEUE cut short
                   bytes([0, 0x41, 9, 0, 0, 0, 16, 0] + [0] * 8),            # EVENT_AVAIL for no device
                   bytes([1, 2, 0, 0, 1, 0, 8, 0])]                          # a response from the driver
            drv.dispatch(bus.transmit(raw))
            assert drv.ping(3)["count"] == 3
            assert drv.enumerate() == [0, 1]
            page = bytes(range(0x40, 0x48))
            assert eeprom_roundtrip(drv, 1, 0x50, page) == page
            # the driver's producer index out of range: the firmware drops the
            # session (queue head INIT), and the driver sees the peer restart
            my_head = 64 + 8
            region.store16(my_head + 4, 1000, "release")
            assert m4.wait_device_state("INIT") == "INIT"   # before our next send rewrites it
            with pytest.raises(BusError):
                drv.request(PingRequest(data=1), timeout=2)
        m4.wait_device_state("READY", "INIT")
        with session(m4) as (drv, bus, carrier):
            assert drv.enumerate() == [0, 1]
            assert read_rng(drv, 0, [128]) == expected[pos:pos + 128]
            page = bytes(range(0x60, 0x68))
            assert eeprom_roundtrip(drv, 1, 0x70, page) == page
        log = m4.log()
    assert "driver producer index out of range" in log, log
    assert log.count("virtqueue broken") >= len(ATTACKS), log
    assert "FAULT" not in log


def test_emulate_coprocessor_m4_json():
    p = subprocess.run([sys.executable, "-m", "vmsgamp", "emulate", "--coprocessor", "m4", "--duration", "0.1",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    by_name = {d["name"]: d["result"] for d in r["devices"]}
    assert set(by_name) == {"rng", "i2c"}
    assert by_name["rng"]["bytes"] > 0 and by_name["rng"]["sample"] == rng_pattern(16).hex()
    assert by_name["i2c"]["match"] and by_name["i2c"]["temperature_c"] == 25.0
    assert r["ping"]["count"] == 200 and r["device_process"]["exit_code"] == 0
    assert r["bus"]["timeouts"] == 0 and r["bus"]["rx_malformed"] == 0
    fw = r["coprocessor"]["firmware"]
    assert fw["text"] > 0 and r["coprocessor"]["doorbell"] == "uart"
    assert any("driver connected" in line for line in r["coprocessor"]["log"])


def test_emulate_coprocessor_without_the_tools(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))   # neither the compiler nor QEMU on PATH
    p = subprocess.run([sys.executable, "-m", "vmsgamp", "emulate", "--coprocessor", "m4"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1, p.stderr
    assert "gcc-arm-none-eabi" in p.stderr and "qemu-system-arm" in p.stderr
    p = subprocess.run([sys.executable, "-m", "vmsgamp", "emulate", "--coprocessor", "m4", "--devices", "rng"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "--devices" in p.stderr


def test_m4_machine_reports_a_qemu_that_fails(tmp_path):
    m4 = M4Machine(tmp_path / "missing.elf", doorbell="poll", boot_timeout=30)
    with pytest.raises(M4Error, match="QEMU exited with 1: .*missing.elf"):
        m4.start()
    assert not os.path.exists(m4.memory_path)   # cleaned up
    m4.close()   # idempotent
