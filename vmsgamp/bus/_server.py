"""DeviceServer: the device side of an AMP bus.  It serves device models
(one DeviceTransport per device number), the bus requests (enumeration,
ping, hot-plug) and the session lifecycle (peer restart, broken FIFO, dead
peer), and claims its FIFO window against a second device side.

Nothing a driver sends or writes ends the serving loop:

* every request field is clamped or refused by the transport logic;
* a broken FIFO or a vanished driver ends the session only: every device is
  reset and the server waits for the driver's next handshake, as on a
  driver restart (``AmpBus``);
* a last-resort guard around the dispatch of each event logs it, counts it
  (``dispatch_errors``), answers the request if one is owed, and resets only
  the device concerned (DEVICE_NEEDS_RESET);
* anything escaping a loop step ends the session, never the loop.
"""
from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from vmsgamp._core.addrspace import AddressSpace
from vmsgamp.bus._amp import AmpBus, BusError, PeerLost
from vmsgamp.bus._claim import DEFAULT_OBSERVE_S, DeviceSideClaim
from vmsgamp.bus._wait import FD_CHECK_S
from vmsgamp.bus._device_side import MAX_DEVICES, DeviceTransport, absent_response, fallback_response
from vmsgamp.devices._base import VirtioDevice
from vmsgamp.errors import (
    FifoBrokenError, LayoutError, LocalProtocolError, PeerStateError, SharedObjectLost,
)
from vmsgamp.protocol import (
    DeviceConnection, Event, EventAvail, GetDevicesRequest, Message, NotificationReceived,
    PingReceived, RequestCancelled, RequestReceived, RequestTimedOut, ResponseReceived,
)

log = logging.getLogger("vmsgamp.device")

VERIFY_EVERY_S = 0.2       # how often a running device side checks its layout and queue head
_LOG_FIRST = 20            # dispatch errors logged in full; later ones every _LOG_EVERY


class DeviceServer:
    """Serves device models on an AmpBus whose connection is a
    DeviceConnection.  Device numbers are the dict keys (or list order).

    ``claim`` (default on) claims the FIFO window first and raises
    :class:`~vmsgamp.bus.DeviceSideActive` if another device side is active
    on it (rule in ``vmsgamp.bus._claim``); ``takeover`` claims a window
    whose device side shows no sign of life but cannot be proven dead;
    ``observe`` is how long such a device side is watched."""

    def __init__(self, bus: AmpBus, aspace: AddressSpace, devices: Iterable[VirtioDevice] | dict[int, VirtioDevice] = (),
                 *, offer_packed: bool = True, offer_event_idx: bool = True, offer_indirect: bool = True,
                 handshake_timeout: float = 1.0, claim: bool = True, takeover: bool = False,
                 observe: float = DEFAULT_OBSERVE_S):
        if not isinstance(bus.conn, DeviceConnection):
            raise TypeError("DeviceServer needs an AmpBus with a DeviceConnection")
        self.bus = bus
        self.conn: DeviceConnection = bus.conn
        self.aspace = aspace
        self.opts = dict(offer_packed=offer_packed, offer_event_idx=offer_event_idx,
                         offer_indirect=offer_indirect)
        self.handshake_timeout = handshake_timeout
        self.transports: dict[int, DeviceTransport] = {}
        self._outbox: list[Message] = []
        self._late: list[Event] = []                 # events raised while sending
        self._rescan: set[tuple[int, int]] = set()   # (dev_num, vq) with chains left over
        self._fds: dict[int, Callable[[], None]] = {}  # host fds watched by the loop
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self.events: list[Any] = []      # PeerLost and hot-plug history, for reports
        self._ping_seq = 0
        self._ping_sent: dict[int, float] = {}
        self.ping_rtts: list[float] = []
        # hostile-peer accounting
        self.dispatch_errors = 0         # events whose handling raised (answered with a fallback)
        self.loop_errors = 0             # errors that escaped a loop step (session ended)
        self.overwrites = 0              # our layout or queue head changed under us
        self.recoveries = 0              # sessions started again after one ended
        self._verify_next = 0.0
        self._fds_next = 0.0             # next look at the host fds while busy
        self._fds_cache: list[int] = []  # the host fds as last looked at
        self._overwritten = False        # wait until the window is free before writing it
        self._closed = False
        items = devices.items() if isinstance(devices, dict) else enumerate(devices)
        for num, dev in items:
            self._attach(num, dev)
        bus.on_event_avail = self._on_event_avail
        self.claim: DeviceSideClaim | None = None
        if claim:
            self.claim = DeviceSideClaim(bus.fifo, observe=observe, takeover=takeover)
            self.claim.acquire()
            if bus.up:
                self.claim.started()

    # ---- devices -------------------------------------------------------------
    def _attach(self, dev_num: int, device: VirtioDevice) -> DeviceTransport:
        if not 0 <= dev_num < MAX_DEVICES:
            raise ValueError(f"device number {dev_num} outside 0..{MAX_DEVICES - 1}")
        if dev_num in self.transports:
            raise ValueError(f"device number {dev_num} is already in use")
        t = DeviceTransport(dev_num, device, self.aspace, send=self._queue_event,
                            max_msg_size=self.conn.max_msg_size, **self.opts)
        self.transports[dev_num] = t
        self._fds_next = 0.0
        return t

    def add_device(self, device: VirtioDevice, dev_num: int | None = None) -> int:
        """Hot-plug: attach and announce with EVENT_DEVICE READY."""
        with self._lock:
            if dev_num is None:
                dev_num = next(i for i in range(MAX_DEVICES) if i not in self.transports)
            self._attach(dev_num, device)
            if self.bus.up:
                self._transmit(self.conn.device_ready(dev_num, self.bus.clock()))
            return dev_num

    def remove_device(self, dev_num: int) -> VirtioDevice:
        """Hot-unplug: reset, detach and announce EVENT_DEVICE REMOVED."""
        with self._lock:
            t = self.transports.pop(dev_num)
            self._fds_next = 0.0
            t.reset()
            if self.bus.up:
                self._transmit(self.conn.device_removed(dev_num, self.bus.clock()))
            return t.device

    @property
    def devices(self) -> dict[int, VirtioDevice]:
        return {n: t.device for n, t in self.transports.items()}

    def add_fd(self, fd: int, callback: Callable[[], None]) -> None:
        """Watch a host fd in the serving loop (carrier notifications, control
        pipes); ``callback()`` runs when it is readable."""
        self._fds[fd] = callback
        self._fds_next = 0.0   # the loop's fd list is made anew

    def remove_fd(self, fd: int) -> None:
        self._fds.pop(fd, None)
        self._fds_next = 0.0

    def _queue_event(self, msg: Message) -> None:
        self._outbox.append(msg)

    def _transmit(self, out: list[bytes]) -> None:
        # Sending can end the session (the peer left RUN, the FIFO broke):
        # the PeerLost that says so is handled by the next handle_events().
        self._late.extend(self.bus.transmit(out))

    def _flush(self) -> None:
        while self._outbox and self.bus.up:
            msg = self._outbox.pop(0)
            try:
                out = self.conn.send(msg, self.bus.clock())
            except LocalProtocolError as e:   # a model's field does not fit the wire
                self.dispatch_errors += 1
                log.error("dropping %r: %s", msg, e)
                continue
            self._transmit(out)

    def reset_all(self) -> None:
        for t in self.transports.values():
            t.reset()
        self._outbox.clear()
        self._rescan.clear()

    @property
    def pings_answered(self) -> int:
        """Bus PINGs the driver sent us and we answered (most are answered
        by the connection's fast path, without an event)."""
        return int(self.conn.counters.pings_answered)

    def stats(self) -> dict[str, Any]:
        """Counters for reports and tests: the bus's plus the server's own."""
        return self.bus.stats() | {
            "dispatch_errors": self.dispatch_errors, "loop_errors": self.loop_errors,
            "overwrites": self.overwrites, "recoveries": self.recoveries,
            "pings_answered": self.pings_answered,
            "devices_broken": sum(t.stats["broken"] for t in self.transports.values()),
        }

    # ---- dispatch -----------------------------------------------------------------
    def handle_events(self, events: list[Event]) -> None:
        pending = self._late + list(events)
        self._late = []
        while True:
            for ev in pending:
                if not self.bus.up and not isinstance(ev, PeerLost):
                    continue    # the session ended under us: the rest was the old session's
                try:
                    self._handle_event(ev)
                except (BusError, SharedObjectLost):
                    raise
                except Exception as e:  # last resort: one bad message never ends the loop
                    self._dispatch_failed(ev, e)
            # Flushed even when there were no events: host input (a device fd)
            # queues its EVENT_USED outside any event.
            self._flush()
            if not self._late:
                return
            pending, self._late = self._late, []

    def _handle_event(self, ev: Event) -> None:
        if isinstance(ev, RequestReceived):
            self._on_request(ev.request)
        elif isinstance(ev, NotificationReceived) and isinstance(ev.message, EventAvail):
            self._kick(ev.message.dev_num, ev.message.vq_index)
        elif isinstance(ev, PingReceived):
            pass    # answered by the connection; counted in its counters
        elif isinstance(ev, ResponseReceived):
            sent = self._ping_sent.pop(getattr(ev.response, "data", -1), None)
            if sent is not None:
                self.ping_rtts.append(self.bus.clock() - sent)
        elif isinstance(ev, PeerLost):
            # The driver's session ended (its queue head left RUN, the FIFO
            # broke, it vanished): every device is reset (docs/virtio-msg.md#teardown-and-re-registration).
            self.events.append(ev)
            self.reset_all()
        elif isinstance(ev, (RequestTimedOut, RequestCancelled)):
            pass

    def _dispatch_failed(self, ev: Event, e: Exception) -> None:
        """Log, count, answer what is owed, reset only the device concerned."""
        self.dispatch_errors += 1
        n = self.dispatch_errors
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.error("handling %r failed (%d so far): %s: %s", ev, n, type(e).__name__, e,
                      exc_info=n <= _LOG_FIRST)
        msg = getattr(ev, "request", None) or getattr(ev, "message", None)
        if msg is None:
            return
        t = None if msg.IS_BUS else self.transports.get(msg.dev_num)
        if t is not None:
            try:
                t._needs_reset(f"internal error handling {msg.NAME}: {e}")
            except Exception:
                log.exception("device %d: could not flag DEVICE_NEEDS_RESET", msg.dev_num)
        if isinstance(ev, RequestReceived) and any(r is msg for r in self.conn.unanswered_requests()):
            try:
                resp = fallback_response(msg, t, self.conn.max_msg_size)
                if resp is None:
                    self.conn.ignore(msg)
                else:
                    self._transmit(self.conn.respond(msg, resp))
            except BusError:
                raise
            except Exception:
                log.exception("no fallback answer for %r either: left unanswered", msg)
                self.conn.ignore(msg)

    def _on_event_avail(self, dev_num: int, vq_index: int) -> bool:
        """An EVENT_AVAIL taken by the bus's fast path (no event made): the
        kick is served at once, under the same last-resort guard as events,
        and what it queued (EVENT_USED) is sent at once.  True when nothing
        is left for the loop (no chains left over, nothing raised late)."""
        try:
            self._kick(dev_num, vq_index)
        except (BusError, SharedObjectLost):
            raise
        except Exception as e:
            self._dispatch_failed(NotificationReceived(EventAvail(dev_num=dev_num, vq_index=vq_index)), e)
        if self._outbox:
            self._flush()
        return not self._rescan and not self._late

    def _kick(self, dev_num: int, vq_index: int) -> None:
        t = self.transports.get(dev_num)
        if t is not None and t.on_avail(vq_index):
            self._rescan.add((dev_num, vq_index))
        else:
            self._rescan.discard((dev_num, vq_index))

    def _on_request(self, req: Message) -> None:
        if isinstance(req, GetDevicesRequest):
            present = [n for n in self.transports if req.offset <= n < req.offset + req.count]
            self._transmit(self.conn.answer_get_devices(req, present))
            return
        t = self.transports.get(req.dev_num)
        if t is None:
            resp = absent_response(req, self.conn.max_msg_size)
        else:
            resp = t.handle(req)
        if resp is None:
            self.conn.ignore(req)
        else:
            self._transmit(self.conn.respond(req, resp))

    # ---- serving ----------------------------------------------------------------
    def step(self, timeout: float | None = 0.05) -> None:
        """Serve one wake-up: bus traffic, device fds, timeouts.  The wait
        is the bus's adaptive one (``bus.wait_policy``), with the device
        and carrier fds watched too."""
        with self._lock:
            bus = self.bus
            if self._late:
                self.handle_events([])
            if not bus.up and not self._start_session():
                return
            now = bus.clock()
            if now >= self._verify_next:
                self._verify_window()
                if not bus.up:
                    return
            if self._rescan:
                for dev_num, vq in list(self._rescan):
                    self._kick(dev_num, vq)
                self._flush()
                timeout = 0
            try:
                waiting = timeout != 0 and not bus.fifo.pending()
                # Host fds: watched by the wait (which looks at them every
                # FD_CHECK_S while it spins, and sleeps on them), and looked at
                # now and then while the bus keeps the loop busy.  The list is
                # made anew every FD_CHECK_S, not on every wake-up: a wait that
                # follows a message is on the peer's round trip.
                fds = self._fds_cache
                if now >= self._fds_next:
                    self._fds_next = now + FD_CHECK_S
                    self._fds_cache = fds = self._watched_fds()
                    if fds and not waiting:
                        self._on_fds(select.select(fds, [], [], 0)[0])
                        timeout = 0
                if fds and waiting:
                    self._on_fds(bus.waiter.wait(bus.fifo, timeout, fds, cap=bus._wait_limit,
                                                 arm=bus.before_sleep))
                    timeout = 0
            except (PeerStateError, FifoBrokenError) as e:
                self.handle_events(bus.peer_lost(e))
                return
            events = bus.poll(timeout)
            if events or self._late or self._outbox:
                self.handle_events(events)

    def _watched_fds(self) -> list[int]:
        """The device models' fds, the loop's own and the carrier's notice fd."""
        fds = [fd for t in self.transports.values() for fd in t.device.poll_fds()]
        if self._fds:
            fds.extend(self._fds)
        bell = self.bus.carrier_fileno()
        if bell is not None:
            fds.append(bell)
        return fds

    def _on_fds(self, ready: list[int]) -> None:
        carrier = self.bus.carrier_fileno()
        for fd in ready:
            if fd == carrier:
                self.handle_events(self.bus.check_carrier())
            elif fd in self._fds:
                self._fds[fd]()
            else:
                for t in self.transports.values():
                    if fd in t.device.poll_fds():
                        t.on_fd_ready(fd)

    def _start_session(self) -> bool:
        """Run the handshake (first session, or after one ended).  False
        while no driver is there (or the window is not ours to write)."""
        for fd, cb in list(self._fds.items()):
            if select.select([fd], [], [], 0)[0]:
                cb()
        if self.bus.carrier_fileno() is not None:
            self.handle_events(self.bus.check_carrier())
        if self._overwritten:
            assert self.claim is not None
            if not self.claim.may_reclaim():
                log.debug("%s: the window is still being written by someone else", self.claim.where)
                return False
            self._overwritten = False
            log.warning("%s: the window is quiet again: writing it anew", self.claim.where)
        if self.claim is not None and self.claim.fresh_start:
            self.bus.require_new_handshake()
        try:
            self.bus.start(self.handshake_timeout)
        except TimeoutError:
            return False
        except PeerStateError as e:
            log.info("no session: the driver is %s (%s)", e.event, e.peer_state)
            return False
        except (LayoutError, ValueError) as e:
            # Gen A picks up indices from memory: a peer's bad ones keep it down.
            log.warning("no session: %s", e)
            time.sleep(self.handshake_timeout)
            return False
        if self.claim is not None:
            self.claim.started()
        if self.bus.sessions > 1:
            self.recoveries += 1
        log.info("peer is here: session %d", self.bus.sessions)
        self._verify_next = self.bus.clock() + VERIFY_EVERY_S
        return True

    def _verify_window(self) -> None:
        """Has someone overwritten our layout or queue head?"""
        if self.claim is None:
            self._verify_next = float("inf")   # nothing to verify, ever
            return
        if not self.bus.up or self.bus.clock() < self._verify_next:
            return
        self._verify_next = self.bus.clock() + VERIFY_EVERY_S
        what = self.claim.verify()
        if what is None:
            return
        self.overwrites += 1
        log.error("%s: our %s changed under us: another device side on this window, or a "
                  "driver writing memory it does not own; the session ends and the window is "
                  "written again only once nothing else changes it", self.claim.where, what)
        self.claim.lost()
        self._overwritten = True
        self.handle_events(self.bus.end_session("overwritten", what))

    def ping(self) -> None:
        """Send a bus PING; its round trip lands in ``ping_rtts``."""
        with self._lock:
            self._ping_seq = (self._ping_seq + 1) & 0xFFFFFFFF
            self._ping_sent[self._ping_seq] = self.bus.clock()
            self._transmit(self.conn.ping(self._ping_seq, self.bus.clock(), timeout=5.0))

    def serve_forever(self, stop: threading.Event | None = None, *,
                      on_step: Callable[[], None] | None = None) -> None:
        """Serve until ``stop`` (or :meth:`stop`) is set; ``on_step()`` runs
        after every loop step (a heartbeat for watchdogs)."""
        stop = stop or self._stop
        while not stop.is_set():
            if on_step is not None:
                on_step()
            try:
                self.step(0.1)
            except BusError as e:
                log.warning("bus error: %s", e)
                time.sleep(0.05)
            except SharedObjectLost:
                raise  # the shared memory is gone: no session can run on it any more
            except Exception as e:  # last resort: end the session, keep serving
                self.loop_errors += 1
                log.exception("serving loop error (%d so far): the session ends", self.loop_errors)
                with self._lock:
                    if self.bus.up:
                        self.handle_events(self.bus.end_session("error", f"{type(e).__name__}: {e}"))
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop, tell the driver we left (own queue head SHUTDOWN, unless
        another device side has taken the window over), close the models and
        release the claim.  Idempotent."""
        self.stop()
        if self._closed:
            return
        self._closed = True
        if not self._overwritten:
            try:
                self.bus.fifo.shutdown()
            except Exception:
                log.exception("shutting the FIFO down")
        for t in self.transports.values():
            try:
                t.device.close()
            except Exception:
                log.exception("closing device %d", t.dev_num)
        if self.claim is not None:
            self.claim.release()
