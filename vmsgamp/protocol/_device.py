"""Device-side virtio-msg state machine (no I/O).

Turns driver messages into typed events (RequestReceived for transport
requests and GET_DEVICES, NotificationReceived for EVENT_AVAIL), answers PING
by itself, and builds responses that echo the request's token and dev_num.
Malformed or misdirected input is dropped and counted: the spec has no error
message and events never get a reply (docs/virtio-msg.md#errors-and-malformed-messages).
"""
from __future__ import annotations

from typing import Iterable

from ._constants import DeviceBusState, TransportMsgId
from ._endpoint import BUS, Connection
from ._messages import (EventAvail, EventConfig, EventDevice, EventUsed, GetDevicesRequest,
                        GetDevicesResponse, Message, PingRequest, PingResponse)

__all__ = ["DeviceConnection", "get_devices_window"]

_EVENT_AVAIL_ID = int(TransportMsgId.EVENT_AVAIL)


class DeviceConnection(Connection):
    """The device end of one bus (all device numbers behind it)."""

    ROLE = "device"

    @classmethod
    def _sends(cls, mcls: type[Message]) -> bool:
        if mcls.IS_BUS:
            return True  # GET_DEVICES/PING responses, EVENT_DEVICE, own PING
        return mcls.IS_RESPONSE or (mcls.is_event() and not issubclass(mcls, EventAvail))

    @classmethod
    def _receives(cls, mcls: type[Message]) -> bool:
        if mcls.IS_BUS:
            # GET_DEVICES and PING requests, and the answer to our own PING.
            return issubclass(mcls, (GetDevicesRequest, PingRequest, PingResponse))
        return mcls.is_request() or issubclass(mcls, EventAvail)

    def event_avail(self, data: bytes) -> tuple[int, int] | None:
        """The hot path of a virtqueue kick: if ``data`` is a well-formed
        EVENT_AVAIL, count it as received and return ``(dev_num, vq_index)``
        (what ``receive_bytes`` would report in a NotificationReceived); the
        caller then skips ``receive_bytes``.  None for anything else: pass
        it to ``receive_bytes``."""
        size = self._ping_size + 4   # vq_index, next_offset_wrap
        if len(data) < size or data[1] != _EVENT_AVAIL_ID or data[0] & 3:
            return None
        fields = self._ping_in(data)   # an EVENT_AVAIL starts as a PING does: header, then a u32
        msg_size = fields[-2]
        if msg_size < size or msg_size > self.max_rx_size or msg_size > len(data):
            return None   # malformed: receive_bytes counts it
        self.counters.rx_messages += 1
        return fields[0], fields[-1]

    # -- answering ---------------------------------------------------------------
    def respond(self, request: Message, response: Message) -> list[bytes]:
        """Answer ``request`` (as delivered in RequestReceived); token and
        dev_num are copied from it.  Raises LocalProtocolError if it is not an
        unanswered request or the response is of another kind."""
        self._answer(request, response)
        return self.data_to_send()

    def ignore(self, request: Message) -> None:
        """Deliberately leave ``request`` unanswered (QEMU does so for GET_SHM
        and bad SET_VQUEUE: the driver times out)."""
        queue = self._incoming.get(BUS if request.IS_BUS else request.dev_num)
        if queue is not None:
            for i, r in enumerate(queue):
                if r is request:
                    del queue[i]
                    return

    # -- events the device sends -------------------------------------------------
    def notify_used(self, dev_num: int, vq_index: int, now: float) -> list[bytes]:
        return self.send(EventUsed(dev_num=dev_num, vq_index=vq_index), now)

    def config_changed(self, dev_num: int, device_status: int, generation: int, now: float, *,
                       offset: int = 0, data: bytes = b"") -> list[bytes]:
        """EVENT_CONFIG; QEMU sends offset 0, length 0 and lets the driver re-read."""
        return self.send(EventConfig(dev_num=dev_num, device_status=device_status, generation=generation,
                                     offset=offset, data=data), now)

    def device_event(self, device_number: int, state: int, now: float) -> list[bytes]:
        """EVENT_DEVICE (hot-plug READY / unplug REMOVED)."""
        return self.send(EventDevice(device_number=device_number, device_bus_state=state), now)

    def device_ready(self, device_number: int, now: float) -> list[bytes]:
        return self.device_event(device_number, DeviceBusState.READY, now)

    def device_removed(self, device_number: int, now: float) -> list[bytes]:
        return self.device_event(device_number, DeviceBusState.REMOVED, now)

    def answer_get_devices(self, request: GetDevicesRequest, devices: Iterable[int], *,
                           next_offset: int | None = None) -> list[bytes]:
        """Answer a GET_DEVICES window.  The count returned is the count
        asked (Linux fails otherwise: its ``{0, 32}`` always gets exactly 32)
        unless the window cannot be answered whole: see :func:`get_devices_window`.
        ``next_offset`` defaults to offset+count as QEMU does, or 0 ("no
        more") where no 8-device window starts below 0x10000."""
        count = get_devices_window(request.offset, request.count, self.max_msg_size,
                                   self.profile.header_size)
        if next_offset is None:
            end = request.offset + count
            next_offset = end if end + 8 <= 0x10000 else 0
        return self.respond(request, GetDevicesResponse.from_devices(
            devices, offset=request.offset, count=count, next_offset=next_offset))

    def ping(self, data: int, now: float, *, timeout: float | None = None) -> list[bytes]:
        return self.send(PingRequest(data=data), now, timeout=timeout)


# GET_DEVICES response: header, then offset, count, next_offset (u16 each), then the bitmap.
_GET_DEVICES_FIXED = 6


def get_devices_window(offset: int, count: int, max_msg_size: int, header_size: int) -> int:
    """How many device numbers a GET_DEVICES answer for ``{offset, count}``
    covers.  The request's count unless the window cannot be answered whole,
    in which case it is clamped (a multiple of 8, possibly 0) to

    * what fits one message: ``8 * (max_msg_size - header - 6)`` (400 device
      numbers with 64-byte messages, 272 with 48);
    * the 16-bit device-number space: the window ends at 0x10000 at most.

    The spec has no error answer for GET_DEVICES, so a shorter window (its
    count says how much was answered) is the only honest reply; a driver
    that asked for more continues at next_offset."""
    room = max(0, max_msg_size - header_size - _GET_DEVICES_FIXED) * 8
    space = max(0, 0x10000 - offset) & ~7
    return max(0, min(count, room, space)) & ~7
