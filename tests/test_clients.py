"""Every device model has a driver-side client, opened the same way."""
from __future__ import annotations

import pytest

from vmsgamp.devices._base import device_types
from vmsgamp.devices.blk import BlkDevice
from vmsgamp.devices.blk_client import BlkClient
from vmsgamp.devices.clients import CLIENTS, client_class, open_client
from vmsgamp.devices.console import ConsoleDevice, EchoBackend
from vmsgamp.devices.console_client import ConsoleClient
from vmsgamp.devices.rng import RngDevice
from vmsgamp.devices.rng_client import RngClient
from vmsgamp.errors import VmsgampError
from vmsgamp.testing.amp import amp_pair

SOURCE = bytes(range(256)) * 4


def test_every_registered_device_type_has_a_client():
    known = {"rng": 4, "console": 3, "i2c": 34, "gpio": 41, "blk": 2}
    assert set(device_types()) == set(known)        # a new model needs a client and a line here
    for name, device_id in known.items():
        cls = client_class(device_id)
        assert callable(cls.open) and callable(cls.close), name
    assert set(CLIENTS) == set(known.values())


@pytest.mark.parametrize("packed", [False, True])
def test_rng_client_reads_exactly_what_the_source_gives(tmp_path, packed):
    src = tmp_path / "entropy"
    src.write_bytes(SOURCE)
    with amp_pair(lambda: [RngDevice(str(src))]) as drv:
        with RngClient.open(drv, 0, packed=packed, request=100, in_flight=3) as rng:
            data = rng.read(700)
            assert len(data) == 700 and data == (SOURCE * 2)[:700]
            assert rng.read(5) == (SOURCE * 2)[700:705] and rng.bytes_read >= 705


def test_blk_client_write_read_flush_id(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(64 * 512))
    with amp_pair(lambda: [BlkDevice(str(img), serial="vmsgamp-disk")]) as drv:
        with BlkClient.open(drv, 0) as disk:
            assert disk.capacity == 64 and not disk.readonly
            disk.write(3, b"\xa5" * 1024)
            assert disk.read(3, 1024) == b"\xa5" * 1024
            disk.flush()
            assert disk.get_id() == b"vmsgamp-disk"
            with pytest.raises(ValueError):
                disk.read(64, 512)          # past the end: refused before anything is sent
            with pytest.raises(ValueError):
                disk.write(0, b"short")
    assert img.read_bytes()[3 * 512:5 * 512] == b"\xa5" * 1024


def test_open_client_picks_the_class_and_checks_the_type():
    with amp_pair(lambda: [RngDevice(), ConsoleDevice(EchoBackend())]) as drv:
        con = open_client(drv, 1)
        assert isinstance(con, ConsoleClient)
        con.write(b"ping\n")
        assert con.readline(timeout=5) == b"ping\n"
        con.close()
        with pytest.raises(VmsgampError, match="not rng"):
            RngClient.open(drv, 1)
        with pytest.raises(VmsgampError, match="not console"):
            ConsoleClient.open(drv, 0)
