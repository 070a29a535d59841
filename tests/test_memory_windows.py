"""--memory FILE@BUS: the device reaches the driver's rings through a separate
mapping at the driver's own bus addresses, as with a QEMU guest's RAM file."""
import argparse
import threading

import pytest

from vmsgamp._cmd.serve import build_address_space
from vmsgamp._core.addrspace import RegionAllocator
from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region
from vmsgamp.bus import AmpBus, AmpDriver, DeviceServer
from vmsgamp.carriers import open_region
from vmsgamp.cli import CliError
from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import DeviceConnection, DriverConnection

GUEST_RAM_BASE = 0x4000_0000


def test_rings_in_guest_ram_file(tmp_path):
    ram_file = tmp_path / "guest-ram"
    ram_file.write_bytes(bytes(1 << 20))
    shared = Region.memfd(16384)
    args = argparse.Namespace(memory=[f"{ram_file}@{GUEST_RAM_BASE:#x}"], region_at=None)
    aspace, opened = build_address_space(args, shared)
    assert [(w[0], w[3]) for w in aspace.windows] == [(GUEST_RAM_BASE, 1 << 20)]

    a, b = EventfdDoorbell.pair()
    server = DeviceServer(AmpBus(MsgFifo(shared, role="device", doorbell=a), DeviceConnection()),
                          aspace, [RngDevice()])
    stop = threading.Event()
    t = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
    t.start()
    try:
        # The "guest" maps its RAM itself and hands out guest-physical addresses.
        guest_ram = open_region(str(ram_file), bus_base=GUEST_RAM_BASE)
        bus = AmpBus(MsgFifo(shared, role="driver", doorbell=b), DriverConnection())
        bus.start(5)
        drv = AmpDriver(bus, RegionAllocator(guest_ram, 0))
        dev = drv.open(0)
        assert dev.queues[0].desc_addr >= GUEST_RAM_BASE
        addr, view = dev.alloc(64)
        dev.queues[0].add([], [(addr, 64)])
        dev.notify(0)
        assert dev.wait_used(0, 5) and dev.queues[0].get_used()[1] == 64
        assert bytes(view) != bytes(64)  # entropy landed in the guest RAM file
        bus.close()
    finally:
        stop.set()
        t.join(5)
        for r in opened:
            r.close()


def test_region_back_at_chosen_address_and_overlap_refused(tmp_path):
    ram_file = tmp_path / "ram"
    ram_file.write_bytes(bytes(1 << 16))
    shared = Region.memfd(1 << 16)
    args = argparse.Namespace(memory=[f"{ram_file}@0x0"], region_at=0x10000)
    aspace, opened = build_address_space(args, shared)
    assert sorted((w[0], w[3]) for w in aspace.windows) == [(0, 1 << 16), (0x10000, 1 << 16)]
    for r in opened:
        r.close()
    args = argparse.Namespace(memory=[f"{ram_file}@0x0"], region_at=0x8000)
    with pytest.raises(CliError, match="overlap"):
        build_address_space(args, shared)
    args = argparse.Namespace(memory=[f"{ram_file}@zz"], region_at=None)
    with pytest.raises(CliError, match="not an integer"):
        build_address_space(args, shared)
