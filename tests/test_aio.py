import asyncio
import threading

import pytest

from conftest import start_pair
from vmsgamp import aio
from vmsgamp._core.doorbell import EventfdDoorbell, PollingDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region
from vmsgamp.testing.fifo_model import make_msg


def test_wait_doorbell():
    a, b = EventfdDoorbell.pair()

    async def main():
        assert not await aio.wait_doorbell(b, 0.01)
        asyncio.get_running_loop().call_later(0.02, a.ring)
        assert await aio.wait_doorbell(b, 2)

    asyncio.run(main())


@pytest.mark.parametrize("polling", [False, True])
def test_async_recv(polling):
    region = Region.memfd(16384)
    if polling:
        da, db = PollingDoorbell(), PollingDoorbell()
    else:
        da, db = EventfdDoorbell.pair()
    dev = MsgFifo(region, role="device", doorbell=da, spin_us=0)
    drv = MsgFifo(region, role="driver", doorbell=db)
    start_pair(dev, drv)

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_later(0.03, lambda: threading.Thread(target=drv.try_send, args=(make_msg(4),)).start())
        buf = bytearray(64)
        assert await aio.recv(dev, buf, timeout=5) == 64
        assert bytes(buf) == make_msg(4)
        with pytest.raises(TimeoutError):
            await aio.recv(dev, buf, timeout=0.02)

    asyncio.run(main())
