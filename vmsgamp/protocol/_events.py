"""What the state machines hand back to their caller (h11-style events)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ._fastinit import fast_init
from ._messages import Message

__all__ = [
    "Event",
    "RequestReceived",
    "ResponseReceived",
    "RequestTimedOut",
    "RequestCancelled",
    "NotificationReceived",
    "PingReceived",
    "ConfigRead",
    "FeaturesRead",
    "FeaturesWritten",
    "OperationFailed",
    "Counters",
]


@fast_init
@dataclass(frozen=True)
class Event:
    """Base class of every event."""


@fast_init
@dataclass(frozen=True)
class RequestReceived(Event):
    """The peer sent a request we must answer (device side: transport requests
    and GET_DEVICES).  Answer it with ``respond()``/``send()``."""

    request: Message


@fast_init
@dataclass(frozen=True)
class ResponseReceived(Event):
    """One of our requests was answered.  ``request`` is the request as it went
    on the wire (token filled in)."""

    request: Message
    response: Message


@fast_init
@dataclass(frozen=True)
class RequestTimedOut(Event):
    request: Message


@fast_init
@dataclass(frozen=True)
class RequestCancelled(Event):
    """Dropped by ``reset()`` (peer restart): it will never be answered."""

    request: Message


@fast_init
@dataclass(frozen=True)
class NotificationReceived(Event):
    """An event message from the peer (EVENT_CONFIG, EVENT_USED, EVENT_AVAIL,
    EVENT_DEVICE)."""

    message: Message


@fast_init
@dataclass(frozen=True)
class PingReceived(Event):
    """The peer pinged us; the reply is already in the outbox (proof of life)."""

    request: Message


@fast_init
@dataclass(frozen=True)
class ConfigRead(Event):
    """A chunked ``read_config()`` completed with one consistent generation."""

    dev_num: int
    offset: int
    generation: int
    data: bytes


@fast_init
@dataclass(frozen=True)
class FeaturesRead(Event):
    """``read_features()`` completed; bit n = feature bit n."""

    dev_num: int
    features: int
    num_bits: int


@fast_init
@dataclass(frozen=True)
class FeaturesWritten(Event):
    dev_num: int
    features: int
    num_bits: int


@fast_init
@dataclass(frozen=True)
class OperationFailed(Event):
    """A multi-message operation (read_config, read/write_features) gave up."""

    dev_num: int
    operation: str
    reason: str
    request: Message | None = None


@dataclass
class Counters:
    """Plain counters (mutable on purpose); remote errors never raise past the
    connection, they end up here."""

    rx_messages: int = 0
    rx_malformed: int = 0  # failed to decode: dropped silently (docs/virtio-msg.md#errors-and-malformed-messages)
    rx_unexpected: int = 0  # valid message in the wrong direction for our role
    rx_unsolicited: int = 0  # response matching no request in flight (late, unknown)
    token_mismatches: int = 0  # matched by (dev_num, type, msg_id) but another token
    tx_messages: int = 0
    timeouts: int = 0
    pings_answered: int = 0
    last_error: str = field(default="")
