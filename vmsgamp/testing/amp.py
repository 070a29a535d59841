"""Test helpers: a device side and a driver side joined by a real AMP bus.

``amp_pair(factory)`` forks a process that serves the device models built by
``factory()`` (so models run in a different process from the driver, as on
real hardware) and yields an ``AmpDriver`` connected to it through a memfd
region with eventfd doorbells.  ``process=False`` runs the server in a
thread instead (easier to debug).
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.doorbell import EventfdDoorbell, PollingDoorbell
from vmsgamp._core.fifo import LayoutName, MsgFifo
from vmsgamp._core.region import Region
from vmsgamp.bus import AmpBus, AmpDriver, DeviceServer
from vmsgamp.devices._base import VirtioDevice
from vmsgamp.protocol import DeviceConnection, DriverConnection

FIFO_WINDOW = 8192
DRIVER_MEMORY_START = 16384   # driver rings and buffers live above the FIFOs


def _serve(region: Region, doorbell, factory, layout: LayoutName, offer_packed: bool,
           stop: threading.Event | None = None, server_hook=None) -> None:
    fifo = MsgFifo(region, role="device", layout=layout, doorbell=doorbell)
    bus = AmpBus(fifo, DeviceConnection())
    server = DeviceServer(bus, AddressSpace.identity(region), factory(), offer_packed=offer_packed)
    if server_hook is not None:
        server_hook(server)
    try:
        server.serve_forever(stop)
    finally:
        server.close()
        fifo.close()


@contextmanager
def amp_pair(factory: Callable[[], Sequence[VirtioDevice] | dict[int, VirtioDevice]], *,
             layout: LayoutName = "b", region_size: int = 4 << 20, process: bool = True,
             offer_packed: bool = True, timeout: float = 5.0,
             server_hook: Callable[[DeviceServer], None] | None = None,
             doorbell: str = "eventfd") -> Iterator[AmpDriver]:
    """``server_hook(server)`` runs in the device process before it serves
    (e.g. ``server.add_fd(pipe, callback)`` to let a test steer hot-plug).
    ``doorbell``: "eventfd" (as ivshmem: interrupts both ways) or "polling"
    (as the shm: carrier: no interrupt, waiters poll)."""
    if doorbell not in ("eventfd", "polling"):
        raise ValueError(f"doorbell {doorbell!r}: expected 'eventfd' or 'polling'")
    region = Region.memfd(region_size)
    if doorbell == "eventfd":
        dev_bell, drv_bell = EventfdDoorbell.pair()
    else:
        dev_bell, drv_bell = PollingDoorbell(), PollingDoorbell()
    pid = 0
    stop = threading.Event()
    thread = None
    if process:
        pid = os.fork()
        if pid == 0:  # device process
            code = 0
            try:
                # Ctrl-C in a terminal reaches the whole process group: the
                # parent handles it and stops this process with SIGTERM.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
                _serve(region, dev_bell, factory, layout, offer_packed, stop, server_hook)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
    else:
        thread = threading.Thread(target=_serve, args=(region, dev_bell, factory, layout, offer_packed, stop, server_hook),
                                  daemon=True)
        thread.start()
    fifo = MsgFifo(region, role="driver", layout=layout, doorbell=drv_bell)
    bus = AmpBus(fifo, DriverConnection())
    driver = AmpDriver(bus, RegionAllocator(region, DRIVER_MEMORY_START), timeout=timeout)
    failed = True
    try:
        bus.start(timeout)
        yield driver
        failed = False
    finally:
        try:
            driver.close()
        except Exception:
            pass
        fifo.close()
        code = 0
        if pid:
            os.kill(pid, signal.SIGTERM)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        else:
            stop.set()
            thread.join(5)
        dev_bell.close()
        drv_bell.close()
        region.close()
        # Only when nothing else failed: an exception on its way out (Ctrl-C
        # included) says more than the device process's exit status.
        if code != 0 and not failed:
            raise RuntimeError(f"device process exited with {code}")
