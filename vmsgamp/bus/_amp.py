"""AmpBus: the only glue between the FIFOs (vmsgamp._core) and the sans-I/O
protocol (vmsgamp.protocol).

It drains every ready message per wake-up into the protocol connection,
sends what the connection produced, rings the doorbell only when the FIFO
says the peer may be asleep, drives request timeouts, and turns a peer that
left RUN into a ``PeerLost`` event (after resetting the connection, so no
message of the old session reaches the new one).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmsgamp._core.fifo import MsgFifo
from vmsgamp.errors import BadMessageSize, FifoBrokenError, PeerStateError, VmsgampError
from vmsgamp.protocol import (
    Connection, Event, Message, PingRequest, RequestTimedOut, ResponseReceived,
)

log = logging.getLogger("vmsgamp.bus")


class BusError(VmsgampError):
    """The bus cannot carry traffic (peer gone, FIFO full for too long)."""


@dataclass(frozen=True)
class PeerLost(Event):
    """The peer restarted ('restart'), shut down ('shutdown') or died ('dead').
    Own requests in flight were cancelled (RequestCancelled events precede
    this one).  Call ``AmpBus.start()`` to run the handshake again."""

    event: str
    peer_state: str


class AmpBus:
    """One virtio-msg-amp bus: a started or startable MsgFifo plus a protocol
    connection (DriverConnection or DeviceConnection)."""

    def __init__(self, fifo: MsgFifo, conn: Connection, *, send_timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, tracer: Any = None,
                 trace_name: str | None = None):
        self.fifo = fifo
        self.conn = conn
        self.clock = clock
        self.send_timeout = send_timeout
        self.up = fifo.state == "running"
        self.sessions = 1 if self.up else 0
        self.peer_events: list[PeerLost] = []
        self._rx = bytearray(fifo.slot_size)
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

    # ---- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Run the FIFO handshake (again after a PeerLost)."""
        self.fifo.start(timeout)
        self.up = True
        self.sessions += 1

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
        return []

    def poll(self, timeout: float | None = 0.0) -> list[Event]:
        """Wait up to ``timeout`` seconds (None: until something happens) for
        messages or a request deadline, then process everything ready."""
        if not self.up:
            raise BusError("bus is down: the peer is gone; start() it again")
        events: list[Event] = []
        try:
            if self.fifo.pending() == 0 and timeout != 0:
                wait = timeout
                deadline = self.conn.next_deadline()
                if deadline is not None:
                    left = max(0.0, deadline - self.clock())
                    wait = left if wait is None else min(wait, left)
                self.fifo.wait_readable(wait)
            events.extend(self._drain())
        except PeerStateError as e:
            events.extend(self._lost(e))
            return events
        events.extend(self.conn.handle_timeout(self.clock()))
        out: list[bytes] = []
        if self._ka_interval is not None:
            events = self._keepalive(events)
            if not self.up:
                return events
            out, self._ka_out = self._ka_out, []
        events.extend(self.transmit(out + self.conn.data_to_send()))
        return events

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
                        self.up = False
                        kept.extend(self.conn.reset())
                        lost = PeerLost("dead", f"no answer to {self._ka_missed} pings")
                        self.peer_events.append(lost)
                        kept.append(lost)
                        self._ka_missed = 0
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
        events: list[Event] = []
        now = self.clock()
        recv = self.fifo.try_recv
        buf = self._rx
        tap = self._tap
        while True:
            try:
                n = recv(buf)
            except BadMessageSize as e:
                # Counted by the FIFO; the protocol never saw it.
                self.conn.counters.rx_malformed += 1
                self.conn.counters.last_error = str(e)
                continue
            if not n:
                return events
            data = bytes(buf[:n])
            if tap is not None:
                tap.rx(data)
            events.extend(self.conn.receive_bytes(data, now))

    def peer_lost(self, e: PeerStateError) -> list[Event]:
        """Handle a PeerStateError raised by a direct FIFO call (e.g. arm_wait)."""
        return self._lost(e)

    def _lost(self, e: PeerStateError) -> list[Event]:
        log.info("peer %s (%s): session %d ends", e.event, e.peer_state, self.sessions)
        self.up = False
        self._ka_inflight.clear()
        events: list[Event] = list(self.conn.reset())
        lost = PeerLost(e.event, e.peer_state)
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
        }


__all__ = ["AmpBus", "BusError", "FifoBrokenError", "PeerLost"]
