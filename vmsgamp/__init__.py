"""vmsgamp: a Linux process as a full virtio-msg-amp endpoint.

Compiled core: Region (shared memory), MsgFifo (the AMP message queues),
doorbells, split/packed virtqueues over a bounds-checked AddressSpace.
Python layers: vmsgamp.protocol (sans-I/O virtio-msg), vmsgamp.bus (the AMP
bus and both transports), vmsgamp.devices (device models and clients),
vmsgamp.carriers (shm, ivshmem, UIO, PCI, VFIO), vmsgamp.vhost_user.

The names below are imported on first use (PEP 562): ``import vmsgamp`` and
``vmsgamp --help`` stay fast, and a program that needs only the protocol
never loads numpy, the carriers or the bus.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY: dict[str, str] = {}
for _mod, _names in (
    ("vmsgamp._core.addrspace", ("AddressError", "AddressSpace", "RegionAllocator")),
    ("vmsgamp._core.doorbell", ("Doorbell", "EventfdDoorbell", "PollingDoorbell")),
    ("vmsgamp._core.fifo", ("MsgFifo",)),
    ("vmsgamp._core.region", ("ACQUIRE", "RELAXED", "RELEASE", "SEQ_CST", "Region")),
    ("vmsgamp._core.virtq", ("ChainBatch", "DescriptorChain", "PackedQueue", "PackedQueueDriver",
                             "QueueBrokenError", "QueueState", "SplitQueue", "SplitQueueDriver")),
    ("vmsgamp.bus", ("AmpBus", "AmpDriver", "BusError", "DeviceServer", "DriverDevice", "PeerLost")),
    ("vmsgamp.carriers", ("open_carrier", "open_region")),
    ("vmsgamp.devices._base", ("VirtioDevice",)),
    ("vmsgamp.errors", ("BadMessageSize", "FifoBrokenError", "HandshakeTimeout", "LayoutError",
                        "LocalProtocolError", "PeerRestarted", "PeerShutdown", "PeerStateError",
                        "RemoteProtocolError", "VmsgampError")),
):
    for _name in _names:
        _LAZY[_name] = _mod
del _mod, _names, _name

if TYPE_CHECKING:   # what type checkers see: the same names, imported eagerly
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


# Hidden from type checkers: they see the names above, and a typo such as
# ``vmsgamp.AmpBuss`` stays an error instead of an Any.
if not TYPE_CHECKING:
    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            # ``import vmsgamp; vmsgamp.protocol.decode(...)`` worked when the
            # package imported its subpackages eagerly: keep it working.
            if not name.startswith("__"):
                try:
                    return importlib.import_module(f"vmsgamp.{name}")
                except ModuleNotFoundError as e:
                    if e.name != f"vmsgamp.{name}":
                        raise
            raise AttributeError(f"module 'vmsgamp' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value      # next time a plain attribute: no hook
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
