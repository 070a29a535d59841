"""Two processes, one shared-memory region: a virtio-rng device served by
one, read by the other (driver side), over a virtio-msg-amp bus.

    python examples/two_processes.py
"""
import os
import signal

from vmsgamp import EventfdDoorbell, MsgFifo, Region
from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp.bus import AmpBus, AmpDriver, DeviceServer
from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import DeviceConnection, DriverConnection

region = Region.memfd(1 << 20)                # FIFOs at 0..8K, driver memory above 16K
device_bell, driver_bell = EventfdDoorbell.pair()

pid = os.fork()
if pid == 0:                                  # device side
    fifo = MsgFifo(region, role="device", doorbell=device_bell)
    server = DeviceServer(AmpBus(fifo, DeviceConnection()), AddressSpace.identity(region),
                          [RngDevice()])
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    server.serve_forever()
    os._exit(0)

fifo = MsgFifo(region, role="driver", doorbell=driver_bell)   # driver side
bus = AmpBus(fifo, DriverConnection())
bus.start(timeout=5)                          # Gen B handshake: INIT -> READY -> RUN
drv = AmpDriver(bus, RegionAllocator(region, 16384))
print("devices:", drv.enumerate())
rng = drv.open(0)                             # probe, negotiate, queues, DRIVER_OK
addr, buf = rng.alloc(32)
rng.queues[0].add([], [(addr, 32)])           # one device-writable buffer
rng.notify(0)                                 # EVENT_AVAIL
rng.wait_used(0, timeout=5)
token, length = rng.queues[0].get_used()
print(f"{length} random bytes: {bytes(buf[:length]).hex()}")
print("ping:", {k: round(v, 1) for k, v in drv.ping(10).items()})
rng.close()
bus.close()                                   # SHUTDOWN: the device side resets its devices
os.kill(pid, signal.SIGTERM)
os.waitpid(pid, 0)
