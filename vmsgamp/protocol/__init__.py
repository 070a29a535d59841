"""Sans-I/O virtio-msg: message codec and driver/device state machines.

Bytes in, events out; no sockets, no shared memory, no clock (time is passed in
as ``now``).  Layouts, IDs, sizes and interop rules follow the virtio-msg
specification (message header and types, transport and bus messages) and the
probe sequence Linux's virtio-msg driver uses.

Quick tour::

    msg = decode(slot_bytes)                 # RemoteProtocolError if malformed
    data = encode(GetDeviceInfoRequest(dev_num=0, token=5))
    drv = DriverConnection(); dev = DeviceConnection()
    for out in drv.get_devices(now):         # bytes to put in the FIFO
        for ev in dev.receive_bytes(out, now): ...
"""
from vmsgamp.errors import LocalProtocolError, RemoteProtocolError

from ._codec import (G1, G2, HeaderProfile, ProfileLike, decode, describe, encode, encoded_size,
                     get_profile, message_class, peek_header)
from ._constants import (DEFAULT_MAX_MSG_SIZE, NUM_FEATURE_BITS, QEMU_MAX_MSG_SIZE, SLOT_SIZE,
                         TYPE_BUS, TYPE_RESPONSE, VIRTIO_F_EVENT_IDX, VIRTIO_F_IN_ORDER,
                         VIRTIO_F_INDIRECT_DESC, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_PACKED,
                         VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1, BusMsgId, DeviceBusState, DeviceStatus,
                         TransportMsgId)
from ._device import DeviceConnection
from ._driver import DriverConnection
from ._endpoint import BUS, DEFAULT_REQUEST_TIMEOUT, Connection
from ._events import (ConfigRead, Counters, Event, FeaturesRead, FeaturesWritten, NotificationReceived,
                      OperationFailed, PingReceived, RequestCancelled, RequestReceived, RequestTimedOut,
                      ResponseReceived)
from ._messages import (MESSAGE_CLASSES, EventAvail, EventConfig, EventDevice, EventUsed,
                        GetConfigRequest, GetConfigResponse, GetDeviceFeaturesRequest,
                        GetDeviceFeaturesResponse, GetDeviceInfoRequest, GetDeviceInfoResponse,
                        GetDevicesRequest, GetDevicesResponse, GetDeviceStatusRequest,
                        GetDeviceStatusResponse, GetShmRequest, GetShmResponse, GetVqueueRequest,
                        GetVqueueResponse, Message, PingRequest, PingResponse, ResetVqueueRequest,
                        ResetVqueueResponse, SetConfigRequest, SetConfigResponse, SetDeviceStatusRequest,
                        SetDeviceStatusResponse, SetDriverFeaturesRequest, SetDriverFeaturesResponse,
                        SetVqueueRequest, SetVqueueResponse)
from ._status import PROBE_STATUS_SEQUENCE, check_driver_status_write, device_status_after_write

__all__ = [
    # errors
    "LocalProtocolError", "RemoteProtocolError",
    # codec
    "HeaderProfile", "G1", "G2", "ProfileLike", "get_profile", "encode", "decode", "encoded_size",
    "describe", "message_class", "peek_header",
    # constants
    "TransportMsgId", "BusMsgId", "DeviceBusState", "DeviceStatus", "TYPE_RESPONSE", "TYPE_BUS",
    "SLOT_SIZE", "QEMU_MAX_MSG_SIZE", "DEFAULT_MAX_MSG_SIZE", "NUM_FEATURE_BITS",
    "VIRTIO_F_INDIRECT_DESC", "VIRTIO_F_EVENT_IDX", "VIRTIO_F_VERSION_1", "VIRTIO_F_RING_PACKED",
    "VIRTIO_F_IN_ORDER", "VIRTIO_F_NOTIFICATION_DATA", "VIRTIO_F_RING_RESET",
    # messages
    "Message", "MESSAGE_CLASSES",
    "GetDeviceInfoRequest", "GetDeviceInfoResponse",
    "GetDeviceFeaturesRequest", "GetDeviceFeaturesResponse",
    "SetDriverFeaturesRequest", "SetDriverFeaturesResponse",
    "GetConfigRequest", "GetConfigResponse", "SetConfigRequest", "SetConfigResponse",
    "GetDeviceStatusRequest", "GetDeviceStatusResponse",
    "SetDeviceStatusRequest", "SetDeviceStatusResponse",
    "GetVqueueRequest", "GetVqueueResponse", "SetVqueueRequest", "SetVqueueResponse",
    "ResetVqueueRequest", "ResetVqueueResponse", "GetShmRequest", "GetShmResponse",
    "EventConfig", "EventAvail", "EventUsed",
    "GetDevicesRequest", "GetDevicesResponse", "PingRequest", "PingResponse", "EventDevice",
    # state machines and events
    "Connection", "DriverConnection", "DeviceConnection", "BUS", "DEFAULT_REQUEST_TIMEOUT",
    "Event", "RequestReceived", "ResponseReceived", "RequestTimedOut", "RequestCancelled",
    "NotificationReceived", "PingReceived", "ConfigRead", "FeaturesRead", "FeaturesWritten",
    "OperationFailed", "Counters",
    # status helpers
    "PROBE_STATUS_SEQUENCE", "check_driver_status_write", "device_status_after_write",
]
