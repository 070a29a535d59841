"""asyncio helpers: wait on a doorbell or a FIFO without blocking the loop."""
from __future__ import annotations

import asyncio

from vmsgamp._core.doorbell import Doorbell
from vmsgamp._core.fifo import MsgFifo


async def wait_doorbell(doorbell: Doorbell, timeout: float | None = None) -> bool:
    """Wait until ``doorbell`` is rung (True) or ``timeout`` expires (False),
    using ``loop.add_reader`` on its fd; pending rings are drained."""
    loop = asyncio.get_running_loop()
    fd = doorbell.fileno()
    fut: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await asyncio.wait_for(fut, timeout)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        doorbell.drain()


async def recv(fifo: MsgFifo, into: bytearray, timeout: float | None = None) -> int:
    """Receive one message into ``into`` without blocking the event loop.
    Sleeps on the FIFO's doorbell (advertising that it waits, so the sender
    rings) or, for a polling doorbell, polls every millisecond."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        n = fifo.try_recv(into)
        if n:
            return n
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            raise TimeoutError(f"no message within {timeout} s")
        if fifo.doorbell.can_wait:
            # Advertise that we sleep, so the sender rings (no lost wake-up).
            if fifo.arm_wait():
                continue
            try:
                await wait_doorbell(fifo.doorbell, 0.1 if left is None else min(left, 0.1))
            finally:
                fifo.disarm_wait()
        else:
            await asyncio.sleep(0.001)
