"""vmsgamp: a Linux process as a full virtio-msg-amp endpoint.

Core objects (compiled): Region (shared memory), MsgFifo (the AMP message
queues), Doorbell / EventfdDoorbell / PollingDoorbell.  Further layers
(protocol, bus, transport, devices, carriers) live in sub-packages.
"""
from vmsgamp._core.doorbell import Doorbell, EventfdDoorbell, PollingDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import ACQUIRE, RELAXED, RELEASE, SEQ_CST, Region
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
    "BadMessageSize", "Doorbell", "EventfdDoorbell", "FifoBrokenError", "HandshakeTimeout",
    "LayoutError", "LocalProtocolError", "MsgFifo", "PeerRestarted", "PeerShutdown",
    "PeerStateError", "PollingDoorbell", "Region", "RemoteProtocolError", "VmsgampError",
]
