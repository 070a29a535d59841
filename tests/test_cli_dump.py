"""``vmsgamp dump``: only messages really waiting are listed as pending."""
from __future__ import annotations

import json

import pytest

from conftest import start_pair
from vmsgamp._core.doorbell import PollingDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp.carriers import open_region
from vmsgamp.cli import main
from vmsgamp.protocol import PingRequest, encode


def _dump(capsys: pytest.CaptureFixture[str], path: str) -> dict:
    assert main(["dump", "--region", path, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _ping(token: int) -> bytes:
    return encode(PingRequest(data=token, token=token))


def test_pending_while_both_run_then_leftovers(tmp_path, capsys):
    path = str(tmp_path / "region.bin")
    (tmp_path / "region.bin").write_bytes(bytes(16384))
    region = open_region(path)
    dev = MsgFifo(region, role="device", doorbell=PollingDoorbell())
    drv = MsgFifo(region, role="driver", doorbell=PollingDoorbell())
    try:
        start_pair(dev, drv)
        for t in (1, 2, 3):
            assert drv.send(_ping(t))
        d = _dump(capsys, path)
        assert [m["token"] for m in d["driver_to_device"]] == [1, 2, 3]
        assert d["device_to_driver"] == [] and "device_to_driver_note" not in d
        assert dev.recv_bytes() == _ping(1)          # the device takes one
        d = _dump(capsys, path)
        assert [m["token"] for m in d["driver_to_device"]] == [2, 3]
        drv.close()                                  # the driver leaves (SHUTDOWN) ...
        d = _dump(capsys, path)
        assert [m["token"] for m in d["driver_to_device"]] == [2, 3]   # ... still delivered
        assert d["device_to_driver"] == [] and "leftovers" in d["device_to_driver_note"]
        dev.close()
        d = _dump(capsys, path)
        assert d["driver_to_device"] == [] and d["device_to_driver"] == []
        assert "leftovers" in d["driver_to_device_note"]
        assert main(["dump", "--region", path]) == 0
        out = capsys.readouterr().out
        assert "MALFORMED" not in out and "pending" in out and "leftovers" in out
    finally:
        dev.close()
        drv.close()
        region.close()
