"""The driver side against any region URI: find the rng device on the bus
and read entropy through RngClient.

    vmsgamp ivshmem-server /tmp/ivshmem.sock &
    vmsgamp serve --region ivshmem:/tmp/ivshmem.sock --devices rng &
    python examples/read_entropy.py ivshmem:/tmp/ivshmem.sock
"""
from __future__ import annotations

import sys

from vmsgamp import AmpBus, AmpDriver, MsgFifo, RegionAllocator, open_carrier
from vmsgamp.devices.rng_client import RngClient
from vmsgamp.protocol import DriverConnection

RNG = 4   # virtio device id


def main(uri: str) -> int:
    with open_carrier(uri) as carrier:
        fifo = MsgFifo(carrier.region, role="driver", layout="b", header="g2",
                       doorbell=carrier.doorbell)
        bus = AmpBus(fifo, DriverConnection())
        bus.start(timeout=10)                    # waits for `vmsgamp serve`
        try:
            drv = AmpDriver(bus, RegionAllocator(carrier.region, 16384))
            rngs = [n for n in drv.enumerate() if drv.info(n).device_id == RNG]
            if not rngs:
                print(f"no rng device on {uri}", file=sys.stderr)
                return 1
            with RngClient.open(drv, rngs[0]) as rng:
                print(rng.read(32).hex())
            drv.close()
        finally:
            bus.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "ivshmem:/tmp/ivshmem.sock"))
