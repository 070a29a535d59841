"""Driver-side virtio-msg state machine (no I/O)."""
from __future__ import annotations

from vmsgamp.errors import LocalProtocolError

from ._codec import ProfileLike
from ._constants import DEFAULT_MAX_MSG_SIZE, NUM_FEATURE_BITS, QEMU_MAX_MSG_SIZE, SLOT_SIZE
from ._endpoint import DEFAULT_REQUEST_TIMEOUT, Connection, _Operation, _Pending
from ._events import ConfigRead, Event, FeaturesRead, FeaturesWritten, OperationFailed, ResponseReceived
from ._messages import (EventAvail, EventConfig, EventDevice, GetConfigRequest, GetConfigResponse,
                        GetDeviceFeaturesRequest, GetDeviceFeaturesResponse, GetDevicesRequest,
                        GetDevicesResponse, GetDeviceStatusResponse, Message, PingRequest, PingResponse,
                        SetDeviceStatusRequest, SetDeviceStatusResponse, SetDriverFeaturesRequest)
from ._status import check_driver_status_write

__all__ = ["DriverConnection"]

# Payload bytes before the data of a GET_CONFIG response / the words of a
# GET_DEVICE_FEATURES response: what limits a chunk besides the header.
_CONFIG_OVERHEAD = 12
_FEATURES_OVERHEAD = 8
_MAX_GENERATION_RETRIES = 8
_STATUS_RESPONSES = frozenset({SetDeviceStatusResponse, GetDeviceStatusResponse})


class DriverConnection(Connection):
    """The driver end: sends transport requests, EVENT_AVAIL, GET_DEVICES and
    PING; receives responses, EVENT_CONFIG/EVENT_USED/EVENT_DEVICE and PING.

    Besides ``send()``, it offers multi-message helpers that report one event
    when done: ``read_config`` (chunked to fit the maximum message size,
    restarted if the generation moves), ``read_features``/``write_features``
    (feature blocks), and ``set_status`` (checked against the status rules).
    """

    ROLE = "driver"

    def __init__(self, *, profile: ProfileLike = "g2", max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
                 max_rx_size: int = SLOT_SIZE, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 pad_to: int | None = None, strict_tokens: bool = False,
                 max_config_chunk: int | None = None) -> None:
        """See Connection for the common arguments.  max_config_chunk caps the
        config bytes per GET_CONFIG (default: what fits in max_msg_size, i.e. 28
        towards a 48-byte QEMU-style peer; QEMU-6B G1 peers need 8)."""
        super().__init__(profile=profile, max_msg_size=max_msg_size, max_rx_size=max_rx_size,
                         request_timeout=request_timeout, pad_to=pad_to, strict_tokens=strict_tokens)
        fit = self.max_msg_size - self.profile.header_size - _CONFIG_OVERHEAD
        self.max_config_chunk = fit if max_config_chunk is None else min(fit, max_config_chunk)
        if self.max_config_chunk < 1:
            raise LocalProtocolError(f"max_msg_size {self.max_msg_size} leaves no room for config data")
        self.max_feature_blocks = (self.max_msg_size - self.profile.header_size - _FEATURES_OVERHEAD) // 4
        self._status: dict[int, int] = {}
        self._kick_wires: dict[tuple[int, int], bytes] = {}   # notify(): EVENT_AVAIL bytes per queue

    @classmethod
    def for_qemu(cls, *, profile: ProfileLike = "g2", request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 pad_to: int | None = None) -> "DriverConnection":
        """Limits of a QEMU-RFC device: 48-byte messages, hence 28 config bytes
        per GET_CONFIG (it silently ignores longer reads)."""
        return cls(profile=profile, max_msg_size=QEMU_MAX_MSG_SIZE, request_timeout=request_timeout,
                   pad_to=pad_to)

    def reset(self) -> list[Event]:
        self._status.clear()
        return super().reset()

    @classmethod
    def _sends(cls, mcls: type[Message]) -> bool:
        if mcls.IS_BUS:
            return issubclass(mcls, (GetDevicesRequest, PingRequest, PingResponse))
        return mcls.is_request() or issubclass(mcls, EventAvail)

    @classmethod
    def _receives(cls, mcls: type[Message]) -> bool:
        if mcls.IS_BUS:
            return issubclass(mcls, (GetDevicesResponse, PingRequest, PingResponse, EventDevice))
        return mcls.IS_RESPONSE or (mcls.is_event() and not issubclass(mcls, EventAvail))

    # -- convenience senders ----------------------------------------------------
    def get_devices(self, now: float, *, offset: int = 0, count: int = 32) -> list[bytes]:
        """Enumerate a window; Linux asks {0, 32}."""
        return self.send(GetDevicesRequest(offset=offset, count=count), now)

    def ping(self, data: int, now: float, *, timeout: float | None = None) -> list[bytes]:
        return self.send(PingRequest(data=data), now, timeout=timeout)

    def notify(self, dev_num: int, vq_index: int, now: float, next_offset_wrap: int = 0) -> list[bytes]:
        """EVENT_AVAIL (token 0, no response).  The bytes of a plain kick
        (no ``next_offset_wrap``) are made once per queue: a kick is the
        most frequent message a driver sends."""
        if next_offset_wrap:
            return self.send(EventAvail(dev_num=dev_num, vq_index=vq_index,
                                        next_offset_wrap=next_offset_wrap), now)
        key = (dev_num, vq_index)
        wire = self._kick_wires.get(key)
        if wire is None:
            wire = self._kick_wires[key] = self._encode(EventAvail(dev_num=dev_num, vq_index=vq_index))
        self._outbox.append(wire)
        self.counters.tx_messages += 1
        return self.data_to_send()

    def set_status(self, dev_num: int, status: int, now: float, *, timeout: float | None = None) -> list[bytes]:
        """SET_DEVICE_STATUS after checking the write against the status rules
        and the last status the device reported."""
        check_driver_status_write(self._status.get(dev_num), status)
        return self.send(SetDeviceStatusRequest(dev_num=dev_num, status=status), now, timeout=timeout)

    def device_status(self, dev_num: int) -> int | None:
        """Last status the device reported (SET/GET_DEVICE_STATUS responses, EVENT_CONFIG)."""
        return self._status.get(dev_num)

    def read_config(self, dev_num: int, offset: int, length: int, now: float, *,
                    timeout: float | None = None) -> list[bytes]:
        """GET_CONFIG in chunks of at most ``max_config_chunk`` bytes; reports
        ConfigRead (or OperationFailed).  length 0 reads just the generation."""
        if offset < 0 or length < 0 or offset + length > 0xFFFFFFFF:
            raise LocalProtocolError(f"bad config range offset={offset} length={length}")
        op = _ConfigReadOp(dev_num, offset, length, self.max_config_chunk)
        self._submit(op.first(), now, timeout, op)
        return self.data_to_send()

    def read_features(self, dev_num: int, now: float, *, num_bits: int = NUM_FEATURE_BITS,
                      timeout: float | None = None) -> list[bytes]:
        """GET_DEVICE_FEATURES for bits [0, num_bits); reports FeaturesRead."""
        op = _FeaturesOp(dev_num, _blocks(num_bits), self.max_feature_blocks, None)
        self._submit(op.first(), now, timeout, op)
        return self.data_to_send()

    def write_features(self, dev_num: int, features: int, now: float, *, num_bits: int = NUM_FEATURE_BITS,
                       timeout: float | None = None) -> list[bytes]:
        """SET_DRIVER_FEATURES for bits [0, num_bits); reports FeaturesWritten."""
        if features < 0 or features >> num_bits:
            raise LocalProtocolError(f"features 0x{features:x} do not fit in {num_bits} bits")
        op = _FeaturesOp(dev_num, _blocks(num_bits), self.max_feature_blocks, features)
        self._submit(op.first(), now, timeout, op)
        return self.data_to_send()

    # -- tracking ------------------------------------------------------------------
    def _on_matched(self, pend: _Pending, response: Message, now: float) -> list[Event]:
        if response.__class__ in _STATUS_RESPONSES:
            self._status[response.dev_num] = response.status  # type: ignore[attr-defined]
        if pend.op is None:  # the common case, without the super() call
            return [ResponseReceived(pend.request, response)]
        return super()._on_matched(pend, response, now)

    def _on_event(self, msg: Message) -> list[Event]:
        if msg.__class__ is EventConfig:  # it carries the current status
            self._status[msg.dev_num] = msg.device_status
        return super()._on_event(msg)


def _blocks(num_bits: int) -> int:
    if num_bits <= 0 or num_bits % 32:
        raise LocalProtocolError(f"num_bits {num_bits} is not a positive multiple of 32")
    return num_bits // 32


class _ConfigReadOp(_Operation):
    name = "read_config"

    def __init__(self, dev_num: int, offset: int, length: int, chunk: int) -> None:
        self.dev_num = dev_num
        self.offset = offset
        self.length = length
        self.chunk = chunk
        self.retries = 0
        self._restart()

    def _restart(self) -> None:
        self.data = bytearray()
        self.generation: int | None = None

    def _request(self) -> GetConfigRequest:
        done = len(self.data)
        return GetConfigRequest(dev_num=self.dev_num, offset=self.offset + done,
                                length=min(self.chunk, self.length - done))

    def first(self) -> Message:
        return self._request()

    def on_response(self, request: Message, response: Message) -> tuple[Message | None, list[Event]]:
        # Matching guarantees a GET_CONFIG response; its range may still be wrong.
        assert isinstance(request, GetConfigRequest) and isinstance(response, GetConfigResponse)
        if response.offset != request.offset or response.length != request.length:
            return None, [OperationFailed(
                self.dev_num, self.name,
                f"GET_CONFIG answered {response.offset}+{response.length} for {request.offset}+{request.length}",
                request)]
        if self.generation is not None and response.generation != self.generation:
            # The config changed under us: start over so the result is consistent.
            self.retries += 1
            if self.retries > _MAX_GENERATION_RETRIES:
                return None, [OperationFailed(self.dev_num, self.name, "config generation never settled", request)]
            self._restart()
            return self._request(), []
        self.generation = response.generation
        self.data += response.data
        if len(self.data) < self.length:
            return self._request(), []
        return None, [ConfigRead(self.dev_num, self.offset, response.generation, bytes(self.data))]

    def on_timeout(self, request: Message) -> list[Event]:
        return [OperationFailed(self.dev_num, self.name, "GET_CONFIG timed out", request)]


class _FeaturesOp(_Operation):
    def __init__(self, dev_num: int, num_blocks: int, per_message: int, write: int | None) -> None:
        self.dev_num = dev_num
        self.num_blocks = num_blocks
        self.per_message = per_message
        self.write = write
        self.name = "read_features" if write is None else "write_features"
        self.next_block = 0
        self.value = 0

    def _request(self) -> Message:
        start = self.next_block
        count = min(self.per_message, self.num_blocks - start)
        if self.write is None:
            return GetDeviceFeaturesRequest(dev_num=self.dev_num, block_index=start, num_blocks=count)
        words = tuple((self.write >> (32 * (start + i))) & 0xFFFFFFFF for i in range(count))
        return SetDriverFeaturesRequest(dev_num=self.dev_num, block_index=start, features=words)

    def first(self) -> Message:
        return self._request()

    def on_response(self, request: Message, response: Message) -> tuple[Message | None, list[Event]]:
        count = getattr(request, "num_blocks")
        if isinstance(response, GetDeviceFeaturesResponse):
            if response.block_index != self.next_block:
                return None, [OperationFailed(self.dev_num, self.name,
                                              f"features answered block {response.block_index}, "
                                              f"asked {self.next_block}", request)]
            # Blocks the device did not return count as zero (unimplemented).
            self.value |= GetDeviceFeaturesResponse(
                block_index=self.next_block, features=response.features[:count]).as_int()
        self.next_block += count
        if self.next_block < self.num_blocks:
            return self._request(), []
        bits = self.num_blocks * 32
        if self.write is None:
            return None, [FeaturesRead(self.dev_num, self.value, bits)]
        return None, [FeaturesWritten(self.dev_num, self.write, bits)]

    def on_timeout(self, request: Message) -> list[Event]:
        return [OperationFailed(self.dev_num, self.name, f"{request.NAME} timed out", request)]

