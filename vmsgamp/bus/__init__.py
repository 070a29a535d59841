"""The AMP bus: glue between the FIFOs and the protocol, and both transports."""
from vmsgamp.bus._amp import AmpBus, BusError, PeerLost
from vmsgamp.bus._claim import DeviceSideActive
from vmsgamp.bus._device_side import DeviceTransport
from vmsgamp.bus._driver_side import AmpDriver, AsyncDriver, DeviceInfo, DriverDevice, DriverError
from vmsgamp.bus._server import DeviceServer
from vmsgamp.bus._wait import WaitPolicy, Waiter

__all__ = ["AmpBus", "AmpDriver", "AsyncDriver", "BusError", "DeviceInfo", "DeviceServer",
           "DeviceSideActive", "DeviceTransport", "DriverDevice", "DriverError", "PeerLost", "WaitPolicy",
           "Waiter"]
