"""Helpers shared by the device-kit tests (tests/test_kit_*.py): the kit's rng
test pattern, a driver session over a region URI, and the driver-side
operations every kit test runs (rng bytes, EEPROM write/read-back)."""
from __future__ import annotations

import struct
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from vmsgamp._core.addrspace import RegionAllocator
from vmsgamp._core.fifo import MsgFifo
from vmsgamp.bus import AmpBus, AmpDriver
from vmsgamp.carriers import open_carrier
from vmsgamp.protocol import DriverConnection

PATTERN_SEED = 0x2545F491    # csrc/kit/vmk_models.h VMK_RNG_PATTERN_SEED


def need_tools(*tools: str):
    """A skip marker naming the Debian packages when a tool is missing."""
    from vmsgamp.coproc.build import missing_tools

    missing = missing_tools(*tools)
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(tools)} "
                                                    f"(apt-get install {' '.join(missing)})")


def rng_pattern(n: int) -> bytes:
    """The first ``n`` bytes the kit's rng model produces without a source:
    an xorshift32 stream, each state little-endian."""
    out = bytearray()
    x = PATTERN_SEED
    while len(out) < n:
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out += struct.pack("<I", x)
    return bytes(out[:n])


@contextmanager
def driver_session(uri: str, *, allocator_start: int, ram_uri: str | None = None,
                   timeout: float = 10.0) -> Iterator[tuple[AmpDriver, AmpBus, object]]:
    """(driver, bus, carrier) over ``uri``; rings and buffers go into the
    carrier's region from ``allocator_start``, or into ``ram_uri``."""
    carrier = open_carrier(uri, timeout=timeout)
    ram = None
    fifo = MsgFifo(carrier.region, role="driver", offset=carrier.offset, doorbell=carrier.doorbell)
    bus = AmpBus(fifo, DriverConnection())
    try:
        bus.start(timeout)
        if ram_uri is not None:
            ram = open_carrier(ram_uri)
            alloc = RegionAllocator(ram.region, allocator_start)
        else:
            alloc = RegionAllocator(carrier.region, allocator_start)
        drv = AmpDriver(bus, alloc, timeout=5)
        yield drv, bus, carrier
        try:
            drv.close()
        except Exception:
            pass
    finally:
        bus.close()
        carrier.close()
        if ram is not None:
            ram.close()


def read_rng(drv: AmpDriver, dev_num: int, sizes: list[int]) -> bytes:
    """Queue one buffer per size, kick once, return the bytes in used order."""
    dev = drv.open(dev_num, packed=False)
    try:
        q = dev.queues[0]
        bufs = [dev.alloc(n) for n in sizes]
        for i, ((addr, _view), n) in enumerate(zip(bufs, sizes)):
            q.add([], [(addr, n)], token=i)
        dev.notify(0)
        out = bytearray()
        done = 0
        while done < len(sizes):
            assert dev.wait_used(0, 5), f"rng: {done} of {len(sizes)} buffers used within 5 s"
            while (used := q.get_used()) is not None:
                token, ln = used
                out += bytes(bufs[token][1][:ln])
                done += 1
        return bytes(out)
    finally:
        dev.close()


def eeprom_roundtrip(drv: AmpDriver, dev_num: int, at: int, data: bytes) -> bytes:
    """Write ``data`` (one page) at ``at`` of the EEPROM at 0x50, read it back."""
    from vmsgamp.devices.i2c_client import I2cClient

    client = I2cClient.open(drv, dev_num, packed=False)
    try:
        client.write_i2c_block_data(0x50, at, data)
        return bytes(client.read_i2c_block_data(0x50, at, len(data)))
    finally:
        client.close()


def wait_device_left_run(region, offset: int = 0, timeout: float = 5.0) -> int:
    """Wait until the device's queue head (Gen B: 64 bytes after the layout)
    is no longer RUN.  A restarting driver must leave the device time to see
    it go: the handshake rings no doorbell (see docs/coprocessor-kit.md)."""
    deadline = time.monotonic() + timeout
    while True:
        st = region.load16(offset + 64 + 2, "acquire") & 0x1F
        if st != 2:
            return st
        assert time.monotonic() < deadline, f"the device stayed in RUN for {timeout} s"
        time.sleep(0.001)
