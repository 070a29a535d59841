"""vmsgamp: a Linux process as a full virtio-msg-amp endpoint.

Compiled core: Region (shared memory), MsgFifo (the AMP message queues),
doorbells, split/packed virtqueues over a bounds-checked AddressSpace.
Python layers: vmsgamp.protocol (sans-I/O virtio-msg), vmsgamp.bus (the AMP
bus and both transports), vmsgamp.devices (device models and clients),
vmsgamp.carriers (shm, ivshmem, UIO, PCI, VFIO), vmsgamp.vhost_user.
"""
from vmsgamp._core.addrspace import AddressError, AddressSpace, RegionAllocator
from vmsgamp._core.doorbell import Doorbell, EventfdDoorbell, PollingDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import ACQUIRE, RELAXED, RELEASE, SEQ_CST, Region
from vmsgamp._core.virtq import (
    ChainBatch, DescriptorChain, PackedQueue, PackedQueueDriver, QueueBrokenError, QueueState,
    SplitQueue, SplitQueueDriver,
)
from vmsgamp.bus import AmpBus, AmpDriver, BusError, DeviceServer, DriverDevice, PeerLost
from vmsgamp.carriers import open_carrier, open_region
from vmsgamp.devices._base import VirtioDevice
from vmsgamp.errors import (
    BadMessageSize,
    FifoBrokenError,
    HandshakeTimeout,
    LayoutError,
    LocalProtocolError,
    PeerRestarted,
    PeerShutdown,
    PeerStateError,
    RemoteProtocolError,
    VmsgampError,
)

__version__ = "0.1.0"

__all__ = [
    "ACQUIRE", "RELAXED", "RELEASE", "SEQ_CST",
    "AddressError", "AddressSpace", "AmpBus", "AmpDriver", "BadMessageSize", "BusError",
    "ChainBatch", "DescriptorChain", "DeviceServer", "Doorbell", "DriverDevice", "EventfdDoorbell",
    "FifoBrokenError", "HandshakeTimeout", "LayoutError", "LocalProtocolError", "MsgFifo",
    "PackedQueue", "PackedQueueDriver", "PeerLost", "PeerRestarted", "PeerShutdown",
    "PeerStateError", "PollingDoorbell", "QueueBrokenError", "QueueState", "Region",
    "RegionAllocator", "RemoteProtocolError", "SplitQueue", "SplitQueueDriver", "VirtioDevice",
    "VmsgampError", "open_carrier", "open_region",
]
