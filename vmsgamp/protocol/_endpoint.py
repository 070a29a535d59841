"""Machinery shared by the driver and device connections: outbox, own-request
tracking (one in flight per device plus one for the bus, the rest queued),
response matching, timeouts and the answer-bookkeeping for peer requests.

No I/O and no clock: every call that cares about time takes ``now`` (seconds,
any monotonic origin) and the caller asks ``next_deadline()`` when to call
``handle_timeout()``.
"""
from __future__ import annotations

import struct
from collections import deque
from typing import ClassVar, Union

from vmsgamp.errors import LocalProtocolError, RemoteProtocolError

from ._codec import ProfileLike, decode, encode_with, encoder_table, get_profile
from ._constants import DEFAULT_MAX_MSG_SIZE, SLOT_SIZE, TYPE_BUS, TYPE_RESPONSE, BusMsgId
from ._events import (Counters, Event, NotificationReceived, PingReceived, RequestCancelled,
                      RequestReceived, RequestTimedOut, ResponseReceived)
from ._messages import MESSAGE_CLASSES, REQUEST_CLASS, Message, PingRequest, PingResponse, replace_header

# Own-request channel: a device number for transport requests, BUS for bus ones.
BUS = "bus"
ChannelKey = Union[int, str]

DEFAULT_REQUEST_TIMEOUT = 5.0  # Linux waits 100 s; a co-processor link that is silent for 5 s is dead
_NEVER = float("inf")

# The PING fast paths (ping_answer, start_ping, ping_response) work on the
# bytes, without message objects: a PING's header and data word, per profile
# (has_token), read as (dev_num, token?, msg_size, data) and written as
# (type, msg_id, dev_num, token?, msg_size, data) plus the slot padding.
PING_ID = int(BusMsgId.PING)
_PING_IN = {True: "<2xHHHI", False: "<2xHHI"}
_PING_OUT = {True: "<BBHHHI", False: "<BBHHI"}
_PING_REPLY_TYPE = TYPE_BUS | TYPE_RESPONSE
_PING_REQUEST_TYPE = TYPE_BUS


class _Operation:
    """A multi-message driver operation (chunked config read, feature blocks).

    The connection sends ``first()``; each response goes to ``on_response``,
    which returns the next request (sent ahead of anything queued behind it on
    the same channel) and/or the events to report."""

    name: str = "operation"
    dev_num: int = 0

    def first(self) -> Message:
        raise NotImplementedError

    def on_response(self, request: Message, response: Message) -> tuple[Message | None, list[Event]]:
        raise NotImplementedError

    def on_timeout(self, request: Message) -> list[Event]:
        raise NotImplementedError

    def on_cancel(self, request: Message) -> list[Event]:
        return [RequestCancelled(request)]


class _Pending:
    """One own request: the message as it goes on the wire (token filled in)
    and its bytes, encoded once when submitted."""

    __slots__ = ("request", "wire", "timeout", "op", "deadline")

    def __init__(self, request: Message, wire: bytes, timeout: float, op: _Operation | None) -> None:
        self.request = request
        self.wire = wire
        self.timeout = timeout
        self.op = op
        self.deadline = 0.0


class _PingInFlight(_Operation):
    """The PING of ``start_ping()`` while it waits: at once the pending
    request (what a ``_Pending`` holds) and its operation.  There is one
    per connection, reused: it is only ever in flight, never queued, so a
    latency probe allocates nothing but its bytes.  The PingRequest is made
    only if something asks for it (a timeout or cancel event, the generic
    response path).  Whichever path takes the answer, the connection's
    ``ping_pending`` / ``ping_result`` say how it ended."""

    name = "PING"

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.op = self
        self.token = 0
        self.data = 0
        self.wire = b""
        self.timeout = 0.0
        self.deadline = 0.0
        self._request: Message | None = None

    @property
    def request(self) -> Message:
        if self._request is None:
            self._request = PingRequest._make(0, self.token, 0, self.data)  # type: ignore[attr-defined]
        return self._request

    def on_response(self, request: Message, response: Message) -> tuple[Message | None, list[Event]]:
        self.conn._ping_waiting = False
        self.conn.ping_result = response.data  # type: ignore[attr-defined]
        return None, []

    def on_timeout(self, request: Message) -> list[Event]:
        self.conn._ping_waiting = False
        return [RequestTimedOut(request)]

    def on_cancel(self, request: Message) -> list[Event]:
        self.conn._ping_waiting = False
        return [RequestCancelled(request)]


class _Channel:
    __slots__ = ("in_flight", "queue")

    def __init__(self) -> None:
        self.in_flight: _Pending | None = None
        self.queue: deque[_Pending] = deque()


class Connection:
    """Base of DriverConnection and DeviceConnection.

    Bytes in: ``receive_bytes(one_message, now) -> list[Event]`` (one FIFO slot
    per call; bytes past msg_size are ignored).  Bytes out: everything to
    transmit collects in an outbox, in order; ``send()`` returns it drained and
    ``data_to_send()`` drains what receive/timeout handling added (auto PING
    replies, queued requests released by a response or a timeout).

    A subclass states its role's rules as ``_sends(message_class)`` and
    ``_receives(message_class)``; they are evaluated once per class into
    ``_SENDS``/``_RECEIVES``, so a message costs one set lookup.
    """

    ROLE: ClassVar[str] = "?"
    _SENDS: ClassVar[frozenset[type[Message]]] = frozenset()
    _RECEIVES: ClassVar[frozenset[type[Message]]] = frozenset()

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        cls._SENDS = frozenset(m for m in MESSAGE_CLASSES if cls._sends(m))
        cls._RECEIVES = frozenset(m for m in MESSAGE_CLASSES if cls._receives(m))

    def __init__(self, *, profile: ProfileLike = "g2", max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
                 max_rx_size: int = SLOT_SIZE, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 pad_to: int | None = None, strict_tokens: bool = False) -> None:
        """
        profile: "g2" (8-byte header with token) or "g1" (6-byte header).
        max_msg_size: largest message we send (48 towards QEMU-style peers).
        max_rx_size: largest msg_size we accept (the slot size).
        pad_to: zero-pad every outgoing message to this many bytes (slot padding).
        strict_tokens: drop transport responses whose token differs from the
            request's instead of accepting them as Linux does (bus responses with
            token 0 are always accepted: QEMU sends them so).
        """
        self.profile = get_profile(profile)
        if max_msg_size < self.profile.header_size + 4:
            raise LocalProtocolError(f"max_msg_size {max_msg_size} is too small for any message")
        if pad_to is not None and pad_to < max_msg_size:
            raise LocalProtocolError(f"pad_to {pad_to} is smaller than max_msg_size {max_msg_size}")
        self.max_msg_size = max_msg_size
        self.max_rx_size = max_rx_size
        self.request_timeout = request_timeout
        self.pad_to = pad_to
        self.strict_tokens = strict_tokens
        self.counters = Counters()
        self._has_token = self.profile.has_token
        self._encoders = encoder_table(self.profile)
        ping_in = struct.Struct(_PING_IN[self._has_token])
        self._ping_in = ping_in.unpack_from
        self._ping_size = ping_in.size
        # The padding is packed with the fields: one call makes the whole slot.
        pad = (pad_to - ping_in.size) if pad_to is not None and pad_to > ping_in.size else 0
        self._ping_out = struct.Struct(_PING_OUT[self._has_token] + (f"{pad}x" if pad else "")).pack
        self._ping = _PingInFlight(self)
        self._ping_waiting = False
        self.ping_result: int | None = None
        self._outbox: list[bytes] = []
        self._channels: dict[ChannelKey, _Channel] = {}
        self._incoming: dict[ChannelKey, deque[Message]] = {}
        self._last_token = 0
        # Never later than the earliest deadline in flight (a lower bound:
        # answered requests leave it stale), so handle_timeout() returns at
        # once when nothing can have expired.
        self._deadline_hint = _NEVER

    # -- role rules (overridden) ----------------------------------------------
    @classmethod
    def _sends(cls, mcls: type[Message]) -> bool:
        raise NotImplementedError

    @classmethod
    def _receives(cls, mcls: type[Message]) -> bool:
        raise NotImplementedError

    def _may_send(self, msg: Message) -> bool:
        return msg.__class__ in self._SENDS

    def _may_receive(self, msg: Message) -> bool:
        return msg.__class__ in self._RECEIVES

    # -- public API -------------------------------------------------------------
    def send(self, msg: Message, now: float, *, timeout: float | None = None) -> list[bytes]:
        """Send a request, response or event; returns everything ready to go.

        Requests get a fresh non-zero token unless they carry one, and wait in
        a queue while their channel (device or bus) has one in flight.
        A response is matched to the oldest unanswered peer request with the
        same msg_id on its device (its ``dev_num``; bus responses: the bus) and
        goes out with that request's token (``respond()`` names the request).  Events go out with token 0.
        """
        cls = msg.__class__
        if cls not in self._SENDS:
            raise LocalProtocolError(f"a {self.ROLE} does not send {_label(msg)}")
        if cls.IS_RESPONSE:
            self._answer(None, msg)
        elif cls._IS_EVENT:
            self._emit(replace_header(msg, msg.dev_num, 0) if msg.token else msg)
        else:
            self._submit(msg, now, timeout, None)
        out, self._outbox = self._outbox, []
        return out

    def data_to_send(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    def has_output(self) -> bool:
        """Something waits in the outbox (``data_to_send()`` would return it)."""
        return bool(self._outbox)

    def queue_output(self, data: bytes) -> None:
        """Put bytes made by a fast path (``ping_answer``) back in the
        outbox, behind what is there: the caller could not send them now."""
        self._outbox.append(data)

    def receive_bytes(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Process one received message.  Malformed, misdirected and
        unsolicited messages are counted and dropped; never raises a remote
        error."""
        counters = self.counters
        counters.rx_messages += 1
        try:
            msg = decode(data, profile=self.profile, max_size=self.max_rx_size)
        except RemoteProtocolError as e:
            counters.rx_malformed += 1
            counters.last_error = str(e)
            return []
        return self.receive_message(msg, now)

    def ping_answer(self, data: bytes) -> bytes | None:
        """The hot path of a bus round trip: if ``data`` is a well-formed
        PING request, return its answer's bytes (exactly what
        ``receive_bytes`` would put in the outbox; counted as received,
        answered and sent) for the caller to transmit at once; no
        PingReceived event is made.  None for anything else: pass it to
        ``receive_bytes``."""
        size = self._ping_size
        if len(data) < size or data[1] != PING_ID or data[0] & 3 != TYPE_BUS:
            return None
        if self._has_token:
            dev_num, token, msg_size, word = self._ping_in(data)
            if msg_size < size or msg_size > self.max_rx_size or msg_size > len(data):
                return None   # malformed: receive_bytes counts it
            out = self._ping_out(_PING_REPLY_TYPE, PING_ID, dev_num, token, size, word)
        else:
            dev_num, msg_size, word = self._ping_in(data)
            if msg_size < size or msg_size > self.max_rx_size or msg_size > len(data):
                return None
            out = self._ping_out(_PING_REPLY_TYPE, PING_ID, dev_num, size, word)
        counters = self.counters
        counters.rx_messages += 1
        counters.pings_answered += 1
        counters.tx_messages += 1
        return out

    # PING as a latency probe: the request goes out and its answer comes back
    # without message objects or events (a bus round trip then costs what
    # the link costs, not what the generic request machinery costs).
    def start_ping(self, data: int, now: float, *, timeout: float | None = None) -> list[bytes] | None:
        """Put a PING with ``data`` in flight on the bus channel, as
        ``send(PingRequest(data=data))`` would, and return what is ready to
        go; None (nothing done) while the bus channel is busy: use ``send()``.
        The answer is taken by ``ping_response()`` (or ``receive_bytes()``)
        without an event: ``ping_pending`` turns False and ``ping_result``
        holds the echoed data word; a timeout or a reset reports
        RequestTimedOut / RequestCancelled of the PingRequest as usual and
        leaves ``ping_result`` None."""
        ch = self._channels.get(BUS)
        if ch is None:
            ch = self._channels[BUS] = _Channel()
        elif ch.in_flight is not None or ch.queue:
            return None
        if not 0 <= data <= 0xFFFFFFFF:
            raise LocalProtocolError(f"PING data {data} does not fit 32 bits")
        ping = self._ping
        if self._has_token:
            self._last_token = token = self._last_token % 0xFFFF + 1
            ping.wire = self._ping_out(_PING_REQUEST_TYPE, PING_ID, 0, token, self._ping_size, data)
        else:
            token = 0
            ping.wire = self._ping_out(_PING_REQUEST_TYPE, PING_ID, 0, self._ping_size, data)
        ping.token = token
        ping.data = data
        ping._request = None
        ping.timeout = self.request_timeout if timeout is None else timeout
        self._put_in_flight(ch, ping, now)  # type: ignore[arg-type]  # duck-types _Pending
        self._ping_waiting = True
        self.ping_result = None
        out, self._outbox = self._outbox, []
        return out

    @property
    def ping_pending(self) -> bool:
        """A PING of ``start_ping()`` is waiting for its answer."""
        return self._ping_waiting

    def ping_response(self, data: bytes, now: float) -> bool:
        """True if ``data`` answers the PING of ``start_ping()`` in flight
        (taken: no event; see ``ping_result``).  False for anything else,
        which goes to ``receive_bytes()`` (that also takes a PING answer
        the fast check leaves to it: another token, odd sizes)."""
        size = self._ping_size
        if not self._ping_waiting or len(data) < size or data[0] & 3 != _PING_REPLY_TYPE or data[1] != PING_ID:
            return False
        if self._has_token:
            dev_num, token, msg_size, word = self._ping_in(data)
            if token != self._ping.token:
                return False
        else:
            dev_num, msg_size, word = self._ping_in(data)
        if msg_size < size or msg_size > self.max_rx_size or msg_size > len(data):
            return False
        ch = self._channels.get(BUS)
        if ch is None or ch.in_flight is not self._ping:
            return False
        ch.in_flight = None
        self._ping_waiting = False
        self.ping_result = word
        self.counters.rx_messages += 1
        if ch.queue:
            self._start_next(BUS, now)
        return True

    def receive_message(self, msg: Message, now: float) -> list[Event]:
        """Same as receive_bytes for an already decoded message."""
        cls = msg.__class__
        if cls not in self._RECEIVES:
            self.counters.rx_unexpected += 1
            self.counters.last_error = f"unexpected {_label(msg)} for a {self.ROLE}"
            return []
        if cls.IS_RESPONSE:
            return self._on_response(msg, now)
        if cls._IS_EVENT:
            return self._on_event(msg)
        if cls is PingRequest:
            # Both sides answer PING (Linux does); echo token, dev_num 0.
            self._emit(PingResponse._make(msg.dev_num, msg.token, 0, msg.data))  # type: ignore[attr-defined]
            self.counters.pings_answered += 1
            return [PingReceived(msg)]
        key = BUS if cls.IS_BUS else msg.dev_num
        queue = self._incoming.get(key)
        if queue is None:
            queue = self._incoming[key] = deque()
        queue.append(msg)
        return [RequestReceived(msg)]

    def next_deadline(self) -> float | None:
        """Earliest time handle_timeout() has work to do, or None."""
        deadlines = [ch.in_flight.deadline for ch in self._channels.values() if ch.in_flight]
        return min(deadlines) if deadlines else None

    def handle_timeout(self, now: float) -> list[Event]:
        if now < self._deadline_hint:
            return []  # nothing in flight can have expired (called on every bus poll)
        events: list[Event] = []
        hint = _NEVER
        for key, ch in list(self._channels.items()):
            pend = ch.in_flight
            if pend is None:
                continue
            if pend.deadline > now:
                hint = min(hint, pend.deadline)
                continue
            self.counters.timeouts += 1
            ch.in_flight = None
            events.extend(pend.op.on_timeout(pend.request) if pend.op else [RequestTimedOut(pend.request)])
            self._start_next(key, now)
            if ch.in_flight is not None:
                hint = min(hint, ch.in_flight.deadline)
        self._deadline_hint = hint  # every request in flight was looked at
        return events

    def pending_requests(self) -> int:
        """Own requests in flight or queued."""
        return sum((ch.in_flight is not None) + len(ch.queue) for ch in self._channels.values())

    def unanswered_requests(self) -> list[Message]:
        """Peer requests we have not answered yet, oldest first per channel."""
        return [m for q in self._incoming.values() for m in q]

    def reset(self) -> list[Event]:
        """Forget the session (peer restarted or shut down): every own request
        is cancelled, unanswered peer requests are forgotten, the outbox is
        emptied, so nothing from the old session reaches the new one."""
        events: list[Event] = []
        for ch in self._channels.values():
            for pend in ([ch.in_flight] if ch.in_flight else []) + list(ch.queue):
                events.extend(pend.op.on_cancel(pend.request) if pend.op else [RequestCancelled(pend.request)])
        self._channels.clear()
        self._incoming.clear()
        self._outbox.clear()
        self._deadline_hint = _NEVER
        return events

    # -- internals ---------------------------------------------------------------
    def _encode(self, msg: Message) -> bytes:
        return encode_with(self._encoders, msg, self.max_msg_size, self.pad_to)

    def _emit(self, msg: Message) -> None:
        self._outbox.append(encode_with(self._encoders, msg, self.max_msg_size, self.pad_to))
        self.counters.tx_messages += 1

    def _submit(self, msg: Message, now: float, timeout: float | None, op: _Operation | None,
                *, front: bool = False) -> None:
        if self._has_token:
            if msg.token == 0:
                # Non-zero and distinct from recent ones; with one request in
                # flight per channel that is unique among in-flight (dev_num, token).
                self._last_token = token = self._last_token % 0xFFFF + 1
                msg = replace_header(msg, msg.dev_num, token)
        elif msg.token:
            msg = replace_header(msg, msg.dev_num, 0)  # g1 has no token on the wire
        # Encoded now: a LocalProtocolError belongs to this call, not to the
        # response that releases it from the queue later.
        pend = _Pending(msg, encode_with(self._encoders, msg, self.max_msg_size, self.pad_to),
                        self.request_timeout if timeout is None else timeout, op)
        key = BUS if msg.IS_BUS else msg.dev_num
        ch = self._channels.get(key)
        if ch is None:
            ch = self._channels[key] = _Channel()
        if ch.in_flight is None and not ch.queue:
            self._put_in_flight(ch, pend, now)  # idle channel: straight out
        elif front:
            ch.queue.appendleft(pend)
        else:
            ch.queue.append(pend)

    def _start_next(self, key: ChannelKey, now: float) -> None:
        ch = self._channels.get(key)
        if ch is None or ch.in_flight is not None or not ch.queue:
            return
        self._put_in_flight(ch, ch.queue.popleft(), now)

    def _put_in_flight(self, ch: _Channel, pend: _Pending, now: float) -> None:
        pend.deadline = deadline = now + pend.timeout
        if deadline < self._deadline_hint:
            self._deadline_hint = deadline
        ch.in_flight = pend
        self._outbox.append(pend.wire)
        self.counters.tx_messages += 1

    def _on_response(self, msg: Message, now: float) -> list[Event]:
        key = BUS if msg.IS_BUS else msg.dev_num
        ch = self._channels.get(key)
        pend = ch.in_flight if ch is not None else None
        if pend is None or pend.request.__class__ is not REQUEST_CLASS[msg.__class__]:
            self.counters.rx_unsolicited += 1
            self.counters.last_error = f"unsolicited {_label(msg)} dev {msg.dev_num} token {msg.token}"
            return []
        req = pend.request
        if self._has_token and msg.token != req.token and not (msg.IS_BUS and msg.token == 0):
            self.counters.token_mismatches += 1
            self.counters.last_error = f"{_label(msg)} token {msg.token}, request had {req.token}"
            if self.strict_tokens:
                return []
        assert ch is not None
        ch.in_flight = None
        events = self._on_matched(pend, msg, now)
        if ch.queue:
            self._start_next(key, now)
        return events

    def _on_matched(self, pend: _Pending, response: Message, now: float) -> list[Event]:
        if pend.op is None:
            return [ResponseReceived(pend.request, response)]
        follow_up, events = pend.op.on_response(pend.request, response)
        if follow_up is not None:
            # Ahead of the queue so an operation's chunks stay together.
            self._submit(follow_up, now, pend.timeout, pend.op, front=True)
        return events

    def _on_event(self, msg: Message) -> list[Event]:
        return [NotificationReceived(msg)]

    def _answer(self, request: Message | None, response: Message) -> None:
        key = _channel_key(response) if request is None else _channel_key(request)
        queue = self._incoming.get(key)
        wanted = REQUEST_CLASS.get(response.__class__)  # None: not a response
        if request is None:
            request = next((r for r in queue or () if r.__class__ is wanted), None)
            if request is None:
                raise LocalProtocolError(f"no unanswered {response.NAME} request on {_where(key)}")
        elif not queue or (queue[0] is not request and not any(r is request for r in queue)):
            raise LocalProtocolError(f"{_label(request)} is not an unanswered request")
        if request.__class__ is not wanted:
            raise LocalProtocolError(f"{_label(response)} does not answer {_label(request)}")
        # Echo token and dev_num (docs/virtio-msg.md#requests-responses-events-and-tokens).
        self._emit(replace_header(response, request.dev_num, request.token))
        assert queue is not None
        if queue[0] is request:
            queue.popleft()
        else:
            for i, r in enumerate(queue):
                if r is request:  # by identity: two requests may be equal
                    del queue[i]
                    break
        if not queue:
            del self._incoming[key]


def _channel_key(msg: Message) -> ChannelKey:
    return BUS if msg.IS_BUS else msg.dev_num


def _label(msg: object) -> str:
    if not isinstance(msg, Message):
        return f"{type(msg).__name__} (not a virtio-msg message)"
    kind = "bus" if msg.IS_BUS else "transport"
    what = "response" if msg.IS_RESPONSE else ("event" if msg.is_event() else "request")
    return f"{kind} {msg.NAME} {what}"


def _where(key: ChannelKey) -> str:
    return "the bus" if key == BUS else f"device {key}"
