"""AmpBus: the only glue between the FIFOs (vmsgamp._core) and the sans-I/O
protocol (vmsgamp.protocol).

It drains every ready message per wake-up into the protocol connection,
sends what the connection produced, rings the doorbell only when the FIFO
says the peer may be asleep, drives request timeouts, and turns a peer that
left RUN into a ``PeerLost`` event (after resetting the connection, so no
message of the old session reaches the new one).

A session also ends, with the same ``PeerLost``, when

* the FIFO breaks (the peer wrote an impossible index: event 'broken');
* the carrier says the peer went away (:meth:`AmpBus.watch_carrier`; the
  ivshmem server's disconnect notice: event 'dead', within
  ``CARRIER_CHECK_S`` + one wait slice);
* the liveness rule finds the peer dead (event 'dead'): while own requests
  wait, a peer that sends nothing at all for ``liveness`` seconds (default
  ``DEFAULT_LIVENESS_S`` = 3 s) is dead.  After a third of that silence the
  bus sends one probe PING of its own (answered at once by any live peer:
  Linux and vmsgamp do), so a request the peer legitimately leaves
  unanswered (QEMU ignores GET_SHM) does not count as death.  An idle bus
  sends nothing; :meth:`AmpBus.keepalive` pings on a timer instead.

After 'broken' or 'dead' our own queue head drops to INIT and the next
:meth:`AmpBus.start` waits for the peer to run its handshake anew (INIT or
READY), exactly as after a peer restart: a peer still showing RUN belongs to
the session that ended.
"""
from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmsgamp._core.fifo import MsgFifo
from vmsgamp.bus._wait import SPIN_SLICE_S, WaitPolicy, Waiter
from vmsgamp.errors import BadMessageSize, FifoBrokenError, PeerStateError, VmsgampError
from vmsgamp.protocol import (
    BusMsgId, Connection, Event, Message, PingRequest, RequestTimedOut, ResponseReceived, TransportMsgId,
    encode,
)

log = logging.getLogger("vmsgamp.bus")

DEFAULT_LIVENESS_S = 3.0    # silence while own requests wait that means "dead"
CARRIER_CHECK_S = 0.1       # how often poll() reads the carrier's peer notices
_WAIT_SLICE_S = 0.25        # longest FIFO wait while watching a carrier
_PROBE_DATA = 0x7E000000    # liveness probe PINGs: data = _PROBE_DATA | seq (24 bits)
_PROBE_TOKEN = 0x7E7E       # their token (any non-zero value; answers echo it)
_PING = struct.Struct("<I")
_PING_ID = int(BusMsgId.PING)
_EVENT_AVAIL_ID = int(TransportMsgId.EVENT_AVAIL)
_LIVENESS_LOOKS = 12        # the liveness rule is applied this often per liveness period
LINGER_S = 20e-6            # after a fast-path exchange, wait this long for the peer's next message
LINGER_MAX_S = 50e-6        # at most this long in all per drain: housekeeping is not put off for long
_SPIN_ALWAYS_NS = 1 << 62   # FIFO spin setting: spin for the whole (short) wait
_DRAIN_ROUNDS = 8           # FIFO reads (of up to a ring's worth each) per drain


class BusError(VmsgampError):
    """The bus cannot carry traffic (peer gone, FIFO full for too long)."""


@dataclass(frozen=True)
class PeerLost(Event):
    """The peer restarted ('restart'), shut down ('shutdown'), died ('dead')
    or corrupted the FIFO ('broken'), or we ended the session ourselves
    (:meth:`AmpBus.end_session`, with its event name); ``peer_state`` says
    what was seen.
    Own requests in flight were cancelled (RequestCancelled events precede
    this one).  Call ``AmpBus.start()`` to run the handshake again."""

    event: str
    peer_state: str


class AmpBus:
    """One virtio-msg-amp bus: a started or startable MsgFifo plus a protocol
    connection (DriverConnection or DeviceConnection)."""

    def __init__(self, fifo: MsgFifo, conn: Connection, *, send_timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, tracer: Any = None,
                 trace_name: str | None = None,
                 liveness: float | None = DEFAULT_LIVENESS_S, wait: WaitPolicy | None = None):
        self.fifo = fifo
        self.conn = conn
        self.clock = clock
        self.send_timeout = send_timeout
        self.up = fifo.state == "running"
        self.sessions = 1 if self.up else 0
        self.peer_events: list[PeerLost] = []
        # Adaptive waiting (vmsgamp.bus._wait): spin after traffic, then block or poll.
        self.waiter = Waiter(wait)
        # Called when a wait leaves its spin phase, before it sleeps: re-arm
        # what was kept quiet while spinning (AmpDriver: used-buffer
        # notifications); True = work is ready, do not sleep.
        self.before_sleep: Callable[[], bool] | None = None
        # Looked at between idle sleeps on a carrier without a doorbell (the
        # rings a waiter watches): True = work is ready, stop sleeping.
        self.while_asleep: Callable[[], bool] | None = None
        # EVENT_AVAIL fast path (a device side's kick handler): called with
        # (dev_num, vq_index) for a well-formed EVENT_AVAIL that no earlier
        # message of the same wake-up is still waiting before (order kept);
        # every other message becomes an event as usual.  It returns True
        # when it left nothing for its loop to do (what it sends is sent):
        # the drain may then linger for the next message (see _drain).
        self.on_event_avail: Callable[[int, int], bool] | None = None
        # keepalive: PING every `interval` s; `misses` unanswered in a row = peer dead
        self._ka_interval: float | None = None
        self._ka_misses = 3
        self._ka_missed = 0
        self._ka_next = 0.0
        self._ka_seq = 0xC0000000
        self._ka_inflight: set[int] = set()
        self.keepalive_rtts: list[float] = []
        self._ka_sent: dict[int, float] = {}
        self._ka_out: list[bytes] = []
        # Message tracing (vmsgamp.trace): None, or hooks taking each message's bytes.
        self._tap: Any = None
        if tracer is not None:
            self.attach_tracer(tracer, trace_name)
        # liveness: see the module docstring
        self.liveness: float | None = liveness
        self._heard = clock()                 # last message from the peer
        self._waiting_since: float | None = None
        self._probes: dict[int, float] = {}   # probe data -> time sent
        self._probe_seq = 0
        self.probes_sent = 0
        self._live_next = 0.0                 # next look at the liveness rule
        # session ends we caused or saw
        self.fifo_breaks = 0
        self._fresh = False                   # next start() waits for a new peer handshake
        self._carrier: Any = None
        self._carrier_next = 0.0

    def keepalive(self, interval: float | None, misses: int = 3) -> None:
        """Ping the peer every ``interval`` seconds while polling; after
        ``misses`` pings in a row go unanswered the peer is declared dead
        (PeerLost('dead')).  None turns it off."""
        self._ka_interval = interval
        self._ka_misses = max(1, misses)
        self._ka_missed = 0
        self._ka_next = self.clock() + (interval or 0)

    # ---- tracing -------------------------------------------------------------
    def attach_tracer(self, tracer: Any, name: str | None = None) -> None:
        """Record every message sent and received from now on (a
        ``vmsgamp.trace.Tracer``; ``name`` defaults to the region's URI).
        Replaces a tracer attached before; may be called while running."""
        self._tap = tracer.tap(name or self.fifo.region.uri or "region",
                               profile=self.conn.profile.name, role=self.conn.ROLE)

    def detach_tracer(self) -> None:
        self._tap = None

    def watch_carrier(self, carrier: Any) -> None:
        """Take peer notices from ``carrier`` (its ``fileno()`` becomes
        readable, ``poll_events()`` returns ``('disconnected', peer_id)``):
        the ivshmem server announces a peer whose connection closed, which
        is how a SIGKILLed peer shows.  Carriers without notices are ignored."""
        try:
            carrier.fileno()
        except (ValueError, AttributeError):
            return
        self._carrier = carrier

    def carrier_fileno(self) -> int | None:
        """The watched carrier's notice fd (for loops that select on it)."""
        return None if self._carrier is None else self._carrier.fileno()

    def check_carrier(self) -> list[Event]:
        """Read the carrier's notices now; a disconnect of our peer ends the
        session (PeerLost 'dead')."""
        carrier = self._carrier
        if carrier is None:
            return []
        self._carrier_next = self.clock() + CARRIER_CHECK_S
        peer = carrier.peer_id
        try:
            notices = carrier.poll_events()
        except Exception as e:  # a confused carrier must not end the loop
            log.warning("reading the carrier's notices failed: %s", e)
            return []
        if self.up and peer is not None and ("disconnected", peer) in notices:
            log.info("the carrier says peer %s went away", peer)
            return self._end("dead", f"peer {peer} disconnected from the carrier")
        return []

    # ---- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Run the FIFO handshake (again after a PeerLost; after 'broken' or
        'dead', the peer must start its handshake anew)."""
        self.fifo.start(timeout, fresh=self._fresh)
        self._fresh = False
        self.up = True
        self.sessions += 1
        self._heard = self.clock()
        self._waiting_since = None
        self._probes.clear()

    def close(self) -> None:
        self.fifo.close()
        self.up = False

    def __enter__(self) -> AmpBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.fifo.doorbell.fileno()

    # ---- traffic -------------------------------------------------------------
    def send(self, msg: Message, *, timeout: float | None = None) -> list[Event]:
        """Hand ``msg`` to the connection (requests may queue behind one in
        flight) and transmit what is ready.  Returns events caused by a peer
        loss while sending (normally empty)."""
        out = self.conn.send(msg, self.clock(), timeout=timeout)
        return self.transmit(out)

    def transmit(self, out: list[bytes]) -> list[Event]:
        if not out:
            return []
        if not self.up:
            raise BusError("bus is down: the peer is gone; start() it again")
        tap = self._tap
        try:
            for data in out:
                if not self.fifo.try_send(data):
                    self.fifo.send(data, timeout=self.send_timeout)
                if tap is not None:
                    tap.tx(data)
        except TimeoutError:
            raise BusError(f"the peer has not consumed messages for {self.send_timeout} s") from None
        except PeerStateError as e:
            return self._lost(e)
        except FifoBrokenError as e:
            return self._broken(e)
        return []

    def await_reply(self) -> list[Event]:
        """Right after sending a request: spin on the FIFO (in C, without
        the GIL) for up to the wait policy's spin window, returning the
        moment a message lands.  The caller's ``poll()`` then finds it
        ready: the answer is met at once instead of after the waiter's
        bookkeeping.  Nothing happens with a policy that does not spin.
        Returns the events of a session that ended meanwhile (as
        ``transmit`` does; normally empty)."""
        policy = self.waiter.policy
        spin = SPIN_SLICE_S if policy.busy_poll else policy.spin_us * 1e-6
        if spin <= 0 or not self.up:
            return []
        fifo = self.fifo
        try:
            fifo.spin_ns = _SPIN_ALWAYS_NS
            fifo.wait_readable(spin)
        except (PeerStateError, FifoBrokenError) as e:
            return self.peer_lost(e)
        return []

    @property
    def wait_policy(self) -> WaitPolicy:
        return self.waiter.policy

    def poll(self, timeout: float | None = 0.0) -> list[Event]:
        """Wait up to ``timeout`` seconds (None: until something happens) for
        messages or a request deadline, then process everything ready.
        The wait is adaptive (``wait_policy``): it spins while traffic
        flows, then blocks on the doorbell or polls with a growing sleep."""
        if not self.up:
            raise BusError("bus is down: the peer is gone; start() it again")
        fifo = self.fifo
        try:
            if timeout != 0 and not fifo.pending():
                self.waiter.wait(fifo, timeout, cap=self._wait_limit, arm=self.before_sleep,
                                 check=self.while_asleep)
            events = self._drain()
        except PeerStateError as e:
            return self._lost(e)
        except FifoBrokenError as e:
            return self._broken(e)
        ready = self.conn.data_to_send()
        if ready:   # answers first: the peer is waiting for them, housekeeping is not
            events.extend(self.transmit(ready))
            if not self.up:
                return events
        now = self.clock()
        if self._carrier is not None and now >= self._carrier_next:
            events.extend(self.check_carrier())
            if not self.up:
                return events
        expired = self.conn.handle_timeout(now)
        if expired:
            events.extend(expired)
        if self._ka_interval is None and now < self._live_next:
            # The common case: nothing more to look at.  Only an expiry can
            # have released a queued request into the outbox.
            if expired:
                ready = self.conn.data_to_send()
                if ready:
                    events.extend(self.transmit(ready))
            return events
        out: list[bytes] = []
        if self._ka_interval is not None:
            events = self._keepalive(events)
            if not self.up:
                return events
            out, self._ka_out = self._ka_out, []
        if self.liveness is not None and now >= self._live_next:
            self._live_next = now + self.liveness / _LIVENESS_LOOKS
            events.extend(self._liveness(out))
            if not self.up:
                return events
        elif self.liveness is None:
            self._live_next = now + CARRIER_CHECK_S   # looked at again: it may be turned on
        ready = self.conn.data_to_send()
        if ready or out:
            events.extend(self.transmit(out + ready if out else ready))
        return events

    def _wait_limit(self, timeout: float | None) -> float | None:
        """How long poll() may sleep: the caller's timeout, cut at the next
        request deadline and at the next carrier or liveness check."""
        wait = timeout
        limits = []
        deadline = self.conn.next_deadline()
        if deadline is not None:
            limits.append(max(0.0, deadline - self.clock()))
        if self._carrier is not None:
            limits.append(_WAIT_SLICE_S)
        if self.liveness is not None and (self._waiting_since is not None
                                          or self.conn.pending_requests()):
            limits.append(self.liveness / 6)
        for limit in limits:
            wait = limit if wait is None else min(wait, limit)
        return wait

    def _liveness(self, out: list[bytes]) -> list[Event]:
        """Apply the liveness rule (module docstring); may queue a probe."""
        now = self.clock()
        assert self.liveness is not None
        for data, sent in list(self._probes.items()):
            if now - sent > self.liveness:
                del self._probes[data]
        if not self.conn.pending_requests():
            self._waiting_since = None
            return []
        if self._waiting_since is None:
            self._waiting_since = now
        silent = now - max(self._heard, self._waiting_since)
        if silent >= self.liveness:
            log.info("peer declared dead: silent for %.1f s while requests waited", silent)
            return self._end("dead", f"silent for {silent:.1f} s while requests waited")
        if silent >= self.liveness / 3 and not self._probes:
            self._probe_seq = (self._probe_seq + 1) & 0xFFFFFF
            data = _PROBE_DATA | self._probe_seq
            self._probes[data] = now
            self.probes_sent += 1
            # Outside the connection: the bus channel may be busy with the very
            # request the peer is silent about.
            out.append(encode(PingRequest(data=data, token=_PROBE_TOKEN), profile=self.conn.profile,
                              max_size=self.conn.max_msg_size, pad_to=self.conn.pad_to))
        return []

    def _is_probe_answer(self, msg: bytes) -> bool:
        hdr = self.conn.profile.header_size
        if len(msg) < hdr + 4 or msg[0] & 3 != 3 or msg[1] != BusMsgId.PING:
            return False
        (data,) = _PING.unpack_from(msg, hdr)
        return self._probes.pop(data, None) is not None

    def _keepalive(self, events: list[Event]) -> list[Event]:
        """Consume our own keepalive pings' outcomes; send the next ping."""
        kept: list[Event] = []
        now = self.clock()
        for ev in events:
            req = getattr(ev, "request", None)
            if isinstance(req, PingRequest) and req.data in self._ka_inflight:
                self._ka_inflight.discard(req.data)
                if isinstance(ev, ResponseReceived):
                    self._ka_missed = 0
                    self.keepalive_rtts.append(now - self._ka_sent.pop(req.data, now))
                    del self.keepalive_rtts[:-1000]
                elif isinstance(ev, RequestTimedOut):
                    self._ka_sent.pop(req.data, None)
                    self._ka_missed += 1
                    if self._ka_missed >= self._ka_misses:
                        log.warning("peer missed %d keepalive pings: declared dead", self._ka_missed)
                        kept.extend(self._end("dead", f"no answer to {self._ka_missed} pings"))
                        return kept
                continue
            kept.append(ev)
        if now >= self._ka_next and not self._ka_inflight:
            self._ka_seq = 0xC0000000 | ((self._ka_seq + 1) & 0x3FFFFFFF)
            self._ka_inflight.add(self._ka_seq)
            self._ka_sent[self._ka_seq] = now
            # send() hands back the encoded bytes (and empties the outbox)
            self._ka_out = self.conn.send(PingRequest(data=self._ka_seq), now, timeout=self._ka_interval)
            self._ka_next = now + self._ka_interval
        return kept

    def _drain(self) -> list[Event]:
        """Everything the FIFO holds, through the fast paths or as events.

        After a fast-path exchange (a PING answered, a kick served) with
        nothing left for the caller, the drain lingers up to ``LINGER_S``
        (in all at most ``LINGER_MAX_S``, and only while the wait policy
        spins) for the peer's next message: a peer in a tight loop then
        meets a loop already watching the FIFO instead of one on its way
        back through its housekeeping."""
        events: list[Event] = []
        fifo = self.fifo
        recv = fifo.recv_many
        batch = fifo.num_slots
        served = False        # a fast-path exchange happened since the last look
        until = 0.0           # end of the lingering, once it starts
        for _ in range(_DRAIN_ROUNDS):   # a peer that keeps sending cannot hold the loop here
            try:
                msgs = recv(batch)  # one C call and one copy per message
            except BadMessageSize as e:
                # Counted by the FIFO; the protocol never saw it.  A capture
                # keeps the slot as it was read (the format's malformed record).
                tap = self._tap
                if tap is not None and e.data:
                    tap.rx(e.data)
                self._heard = self.clock()
                self.conn.counters.rx_malformed += 1
                self.conn.counters.last_error = str(e)
                continue
            if not msgs:
                if not served or events or not self.up or self.conn.has_output():
                    return events
                served = False
                now = self.clock()
                if not until:
                    policy = self.waiter.policy
                    if not (policy.busy_poll or policy.spin_us > 0):
                        return events
                    until = now + LINGER_MAX_S
                left = until - now
                fifo.spin_ns = _SPIN_ALWAYS_NS
                if left <= 0 or not fifo.wait_readable(left if left < LINGER_S else LINGER_S):
                    return events
                continue
            now = self._heard = self.clock()
            conn = self.conn
            tap = self._tap
            kick = self.on_event_avail
            for data in msgs:
                if tap is not None:
                    tap.rx(data)
                if data[1] == _EVENT_AVAIL_ID and kick is not None and not events:
                    where = conn.event_avail(data)   # type: ignore[attr-defined]  # a DeviceConnection's
                    if where is not None:
                        served = kick(where[0], where[1])
                        if not self.up:   # what it sent ended the session: the rest was the old one's
                            return events
                        continue
                elif data[1] == _PING_ID:
                    if data[0] & 1:     # a PING answer: a liveness probe's, or ours
                        if self._probes and self._is_probe_answer(data):
                            continue
                        if conn.ping_response(data, now):
                            continue
                    else:   # the protocol answers a PING from its bytes
                        answer = conn.ping_answer(data)
                        if answer is not None:
                            # Straight back (the peer is timing it), unless
                            # answers are already waiting in the outbox.
                            if conn.has_output() or not fifo.try_send(answer):
                                conn.queue_output(answer)
                            elif tap is not None:
                                tap.tx(answer)
                            served = True
                            continue
                events.extend(conn.receive_bytes(data, now))
        return events   # more is waiting: the caller's next poll takes it, after its housekeeping

    def peer_lost(self, e: PeerStateError | FifoBrokenError) -> list[Event]:
        """Handle an error raised by a direct FIFO call (e.g. arm_wait)."""
        if isinstance(e, FifoBrokenError):
            return self._broken(e)
        return self._lost(e)

    def _lost(self, e: PeerStateError) -> list[Event]:
        log.info("peer %s (%s): session %d ends", e.event, e.peer_state, self.sessions)
        return self._end(e.event, e.peer_state)

    def _broken(self, e: FifoBrokenError) -> list[Event]:
        self.fifo_breaks += 1
        log.warning("the FIFO broke (%s): session %d ends; waiting for the peer to start a "
                    "new handshake", e.reason, self.sessions)
        return self._end("broken", e.reason)

    def require_new_handshake(self) -> None:
        """Make the next start() wait for the peer to start its handshake
        anew (a peer still in RUN belongs to a session that ended)."""
        self._fresh = True

    def end_session(self, event: str, detail: str) -> list[Event]:
        """End the session from our side (``event`` names why, as in
        PeerLost): requests cancelled, connection reset, our queue head back
        to INIT, and the next start() waits for a new handshake."""
        if not self.up:
            return []
        log.info("session %d ends: %s (%s)", self.sessions, event, detail)
        return self._end(event, detail)

    def _end(self, event: str, detail: str) -> list[Event]:
        """End the session: requests cancelled, connection reset, and (unless
        the FIFO already stopped on the peer's state change) our queue head
        back to INIT with a new handshake required from the peer."""
        self.up = False
        self._ka_inflight.clear()
        self._ka_missed = 0
        self._waiting_since = None
        self._probes.clear()
        if self.fifo.state != "stopped":
            self.fifo.rearm()
            self._fresh = True
        events: list[Event] = list(self.conn.reset())
        lost = PeerLost(event, detail)
        self.peer_events.append(lost)
        events.append(lost)
        return events

    # ---- introspection ----------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        c = self.conn.counters
        return {
            "up": self.up,
            "sessions": self.sessions,
            "fifo": self.fifo.stats(),
            "rx_messages": c.rx_messages,
            "rx_malformed": c.rx_malformed,
            "rx_unexpected": c.rx_unexpected,
            "rx_unsolicited": c.rx_unsolicited,
            "tx_messages": c.tx_messages,
            "timeouts": c.timeouts,
            "last_error": c.last_error,
            "fifo_breaks": self.fifo_breaks,
            "probes_sent": self.probes_sent,
        }


__all__ = ["AmpBus", "BusError", "FifoBrokenError", "PeerLost"]
