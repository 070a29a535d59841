"""virtio-msg over the AMP bus, device process against driver process."""

import pytest

from vmsgamp.bus import DriverError
from vmsgamp.devices._base import VirtioDevice, parse_device_list
from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import DeviceStatus
from vmsgamp.testing.amp import amp_pair


def _read_entropy(dev, n):
    addr, view = dev.alloc(n)
    q = dev.queues[0]
    assert q.add([], [(addr, n)], token="rng")
    dev.notify(0)
    assert dev.wait_used(0, 5)
    token, ln = q.get_used()
    assert token == "rng" and 0 < ln <= n
    return bytes(view[:ln])


@pytest.mark.parametrize("layout", ["b", "a"])
@pytest.mark.parametrize("packed", [False, True])
def test_enumerate_probe_and_read_entropy(tmp_path, layout, packed):
    src = tmp_path / "entropy"
    src.write_bytes(bytes(range(256)) * 16)
    with amp_pair(lambda: [RngDevice(str(src))], layout=layout) as drv:
        assert drv.enumerate() == [0]
        info = drv.info(0)
        assert (info.device_id, info.name, info.num_feature_bits) == (4, "rng", 64)
        assert info.features >> 32 & 1 and not info.features >> 38 & 1   # VERSION_1, never NOTIFICATION_DATA
        dev = drv.open(0, packed=packed)
        assert dev.packed == packed
        assert _read_entropy(dev, 64) == bytes(range(64))
        assert _read_entropy(dev, 300) == bytes(range(64, 256)) + bytes(range(108))
        stats = drv.ping(5)
        assert stats["count"] == 5 and stats["p50_us"] > 0
        dev.close()
        # re-negotiation after a reset works
        dev = drv.open(0, packed=not packed)
        assert len(_read_entropy(dev, 32)) == 32


def test_absent_device_and_features_refused():
    with amp_pair(lambda: {3: RngDevice()}) as drv:
        assert drv.enumerate() == [3]
        assert drv.info(0).device_id == 0
        with pytest.raises(DriverError, match="no device"):
            drv.open(0)


class _PickyDevice(RngDevice):
    def features_ok(self, features):
        return False


def test_features_ok_refused_by_the_device():
    with amp_pair(lambda: [_PickyDevice()]) as drv:
        with pytest.raises(DriverError, match="refused features"):
            drv.open(0)


class _BuggyDevice(VirtioDevice):
    device_id = 4
    name = "buggy"

    def handle_queue(self, index, queue):
        raise RuntimeError("model bug")


def test_device_model_exception_marks_needs_reset_not_crash():
    with amp_pair(lambda: [_BuggyDevice(), RngDevice()]) as drv:
        dev = drv.open(0)
        addr, _ = dev.alloc(16)
        dev.queues[0].add([], [(addr, 16)])
        dev.notify(0)
        drv.pump(0.5)
        deadline = 50
        while not dev.needs_reset and deadline:
            drv.pump(0.1)
            deadline -= 1
        assert dev.needs_reset and dev.config_events >= 1
        # the other device on the bus still works
        other = drv.open(1)
        assert len(_read_entropy(other, 16)) == 16
        # and the broken one recovers after a reset
        dev.close()
        dev = drv.open(0)
        assert not dev.needs_reset


def test_queue_outside_memory_is_refused():
    """A driver that points a queue outside every window gets NEEDS_RESET."""
    from vmsgamp.protocol import SetVqueueRequest, SetDeviceStatusRequest, GetDeviceStatusRequest
    S = DeviceStatus
    with amp_pair(lambda: [RngDevice()], region_size=1 << 20) as drv:
        drv.info(0)
        for st in (0, S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER):
            drv.request(SetDeviceStatusRequest(dev_num=0, status=st))
        drv.request(SetVqueueRequest(dev_num=0, index=0, size=16, desc_addr=1 << 40,
                                     driver_addr=(1 << 40) + 4096, device_addr=(1 << 40) + 8192))
        st = drv.request(GetDeviceStatusRequest(dev_num=0)).status
        assert st & S.DEVICE_NEEDS_RESET


def test_parse_device_list_errors():
    assert [d.name for d in parse_device_list("rng,rng:source=/dev/urandom")] == ["rng", "rng"]
    with pytest.raises(ValueError, match="known types: .*rng"):
        parse_device_list("toaster")
    with pytest.raises(ValueError, match="options: source"):
        parse_device_list("rng:colour=red")


def test_async_driver_api():
    import asyncio

    from vmsgamp.bus import AsyncDriver

    async def main(drv):
        adrv = AsyncDriver(drv)
        assert await adrv.enumerate() == [0]
        stats, dev = await asyncio.gather(adrv.ping(3), adrv.open(0))
        assert stats["count"] == 3
        addr, view = dev.alloc(16)
        dev.queues[0].add([], [(addr, 16)])
        dev.notify(0)
        assert await adrv.wait_used(dev, 0, 5)
        return dev.queues[0].get_used()[1]

    with amp_pair(lambda: [RngDevice()]) as drv:
        assert asyncio.run(main(drv)) == 16
