"""Device side for the machine's own kernel: virtio device models answering
the Linux virtio-msg user API (``/dev/virtio-msg-N``) of a loopback bus
(``vmsg-lb:`` carrier).

The transport logic is the AMP bus's :class:`DeviceTransport` (features,
status, config, virtqueues, hostile-peer checks); only the carriage
differs, and that difference lives here:

* no FIFO, handshake or doorbell: the kernel posts one message at a time on
  the message node (poll, then read) and busy-waits for our RESPONSE write;
* exactly one RESPONSE write per message read, **including EVENT_AVAIL**
  (acked with ``type 1``, same msg_id/dev_id/token, msg_size 8, *before* the
  ring is processed), and including malformed messages or messages for a
  device we do not serve (a zeroed, well-formed answer or a bare header
  echo: never silence, which would spin a kernel CPU forever);
* no bus messages (devices come and go with the ADD/REMOVE ioctls);
* 50-byte messages, so config data travels in 30-byte chunks;
* VIRTIO_F_VERSION_1 and VIRTIO_F_ACCESS_PLATFORM always offered (without
  ACCESS_PLATFORM the kernel puts rings in ordinary RAM, out of our reach);
* addresses are region addresses: the reserved region is one window at its
  base, and anything outside ``[base, base + size)`` is refused.

Threads: the **responder** serves the message node and the models' host fds
and never dies (every error is logged, counted and answered); a
**watchdog** reports loudly when a message stays unanswered longer than
``late_after`` seconds; ADD and REMOVE run in helper threads because ADD
returns only after the probe has been answered (by the responder) and
REMOVE may never return on this kernel version.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from vmsgamp._core.addrspace import AddressSpace
from vmsgamp.bus._device_side import DeviceTransport, absent_response, fallback_response
from vmsgamp.carriers.vmsg_lb import HEADER, MSG_SIZE, VmsgLbCarrier, VmsgLbError
from vmsgamp.devices._base import VirtioDevice
from vmsgamp.errors import LocalProtocolError, RemoteProtocolError
from vmsgamp.protocol import (
    EventAvail, EventUsed, GetDeviceInfoResponse, Message, TransportMsgId, decode, encode,
)

log = logging.getLogger("vmsgamp.userapi")

VIRTIO_F_ACCESS_PLATFORM = 33
_EVENT_AVAIL = int(TransportMsgId.EVENT_AVAIL)
_SET_VQUEUE = int(TransportMsgId.SET_VQUEUE)
_BURST = 64              # messages handled per wake-up before host fds get a turn
_LOG_FIRST = 10          # malformed messages logged one by one; then every 100th


class _Busy:
    """A message read and not yet answered (what the watchdog watches)."""

    __slots__ = ("since", "what", "reported", "next_report")

    def __init__(self, since: float, what: str) -> None:
        self.since = since
        self.what = what
        self.reported = False
        self.next_report = 0.0


class PendingCall:
    """An ADD or REMOVE running in a helper thread: ``wait(timeout)`` says
    whether it returned; ``error`` is what it raised."""

    def __init__(self, what: str, fn: Callable[[], None],
                 on_done: Callable[[BaseException | None], None] | None = None) -> None:
        self.what = what
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self._done = threading.Event()
        self._fn = fn
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, name=f"vmsg-lb {what}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._fn()
        except BaseException as e:  # handed to the waiter
            self.error = e
        if self._on_done is not None:
            try:
                self._on_done(self.error)
            except Exception:
                log.exception("%s: clean-up failed", self.what)
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> None:
        """Wait, then raise what the call raised (TimeoutError if it has not
        returned within ``timeout``)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.what} has not returned after {timeout} s")
        if self.error is not None:
            raise self.error


class UserApiServer:
    """Serves device models to the kernel through a :class:`VmsgLbCarrier`.

    ``start()`` runs the responder, then ``add_device(dev_id, model)`` per
    device (blocks until the kernel's probe has been answered); on shutdown
    ``begin_remove(dev_id)`` per device while the responder keeps answering,
    then ``close()``.  ``stats`` counts everything, malformed messages
    included.
    """

    def __init__(self, carrier: VmsgLbCarrier, *, offer_packed: bool | None = None,
                 offer_event_idx: bool = True, offer_indirect: bool = True,
                 late_after: float = 0.5, watchdog_interval: float = 0.25,
                 on_late: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if carrier.region is None:
            raise ValueError(f"{carrier.uri}: the carrier's region was detached or closed")
        self.carrier = carrier
        # One window: the reserved region at its base.  Rings or buffers
        # anywhere else are refused by AddressSpace, never followed.
        self.aspace = AddressSpace([(carrier.base, carrier.region, 0, carrier.size)])
        self.opts = dict(offer_packed=carrier.packed if offer_packed is None else offer_packed,
                         offer_event_idx=offer_event_idx, offer_indirect=offer_indirect)
        self.late_after = late_after
        self.watchdog_interval = watchdog_interval
        self.on_late = on_late
        self.clock = clock
        self.transports: dict[int, DeviceTransport] = {}
        self.stats = {"messages": 0, "responses": 0, "acks": 0, "used_events": 0, "malformed": 0,
                      "unknown_device": 0, "unexpected": 0, "handler_errors": 0, "write_errors": 0,
                      "events_not_sent": 0, "late": 0, "stalls": 0, "loop_errors": 0}
        self.last_malformed: str | None = None
        self._lock = threading.RLock()      # transports and their queues: responder vs ADD/REMOVE
        self._outbox: list[Message] = []
        self._rescan: set[tuple[int, int]] = set()
        self._bad_fds: set[int] = set()
        self._busy: _Busy | None = None
        self._info_answered: dict[int, threading.Event] = {}   # ADDs in progress: their GET_DEVICE_INFO
        self._pending_seen: tuple[float, int] | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._closed = False

    # ---- lifecycle -----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        """Start the responder (and the watchdog).  Must run before any ADD."""
        if self._closed:
            raise ValueError("the server is closed")
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="vmsg-lb responder", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="vmsg-lb watchdog", daemon=True)
        self._watchdog.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop answering (after a last look for a pending message).  Devices
        still on the bus are left without a responder: say so."""
        if self._thread is None or self._stop.is_set():
            self._stop.set()
            return
        with self._lock:
            left = sorted(self.transports)
        if left:
            log.error("the responder stops with dev_id %s still on the loopback bus: the kernel's "
                      "next transfer for them will spin a CPU until a device side answers",
                      ", ".join(map(str, left)))
        self._stop.set()
        self._wake()
        self._thread.join(timeout)
        if self._watchdog is not None:
            self._watchdog.join(timeout)

    def close(self) -> None:
        """Stop and release the models' host resources (the carrier is the
        caller's).  Idempotent."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        with self._lock:
            for t in self.transports.values():
                try:
                    t.device.close()
                except Exception:
                    log.exception("closing device %d", t.dev_num)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> UserApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- devices ---------------------------------------------------------------------------
    def begin_add(self, dev_id: int, device: VirtioDevice) -> PendingCall:
        """ADD ``device`` as ``dev_id`` in a helper thread; the kernel probes
        it through the responder.  A failed ADD detaches the model again."""
        if not self.running:
            raise RuntimeError("start() the responder first: ADD returns only after the kernel's "
                               "probe has been answered")
        with self._lock:
            if dev_id in self.transports:
                raise ValueError(f"dev_id {dev_id} is already served")
            t = DeviceTransport(dev_id, device, self.aspace, send=self._outbox.append,
                                max_msg_size=MSG_SIZE, **self.opts)
            # VERSION_1 is always in `offered`; ACCESS_PLATFORM is this bus's own rule.
            t.offered |= 1 << VIRTIO_F_ACCESS_PLATFORM
            self.transports[dev_id] = t

        answered = threading.Event()
        self._info_answered[dev_id] = answered

        def add() -> None:
            try:
                self.carrier.add_device(dev_id)
            except OSError as e:
                if e.errno == errno.ENODEV:
                    self._diagnose_enodev(dev_id, answered)
                raise

        def done(error: BaseException | None) -> None:
            self._info_answered.pop(dev_id, None)
            if error is not None:
                self._detach(dev_id, t)

        return PendingCall(f"ADD of dev_id {dev_id}", add, done)

    def _diagnose_enodev(self, dev_id: int, answered: threading.Event) -> None:
        """ENODEV means the kernel read device_id 0.  If we answered its
        GET_DEVICE_INFO with a real one, the kernel read someone else's
        answer: a stray response has shifted the bus by one.  (The kernel
        may fail ADD before we even read the message: wait for it a little.)"""
        if answered.wait(1.0) and getattr(answered, "device_id", 0):
            raise VmsgLbError(errno.ENODEV, f"ADD of dev_id {dev_id}: the kernel read device_id 0 although "
                              f"we answered GET_DEVICE_INFO with device_id {answered.device_id}: the bus "
                              f"is off by one (a stray response was written earlier, by a previous "
                              f"device side or by one that answered a message twice). Nothing written "
                              f"to the node can realign it: reload the loopback bus modules")

    def add_device(self, dev_id: int, device: VirtioDevice, timeout: float | None = None) -> None:
        """ADD and wait for it (raises what ADD raised, TimeoutError if it
        has not returned within ``timeout``)."""
        self.begin_add(dev_id, device).result(timeout)

    def begin_remove(self, dev_id: int) -> PendingCall:
        """REMOVE ``dev_id`` in a helper thread while the responder keeps
        answering the driver's remove path.  This kernel version can deadlock
        in REMOVE: never assume the call returns (``wait(timeout)``)."""

        def done(error: BaseException | None) -> None:
            if error is None or getattr(error, "errno", None) == errno.ENODEV:
                self._detach(dev_id, None)

        return PendingCall(f"REMOVE of dev_id {dev_id}", lambda: self.carrier.remove_device(dev_id), done)

    def _detach(self, dev_id: int, expected: DeviceTransport | None) -> None:
        with self._lock:
            t = self.transports.get(dev_id)
            if t is None or (expected is not None and t is not expected):
                return
            del self.transports[dev_id]
            self._rescan = {k for k in self._rescan if k[0] != dev_id}
            t.reset()

    @property
    def devices(self) -> dict[int, VirtioDevice]:
        with self._lock:
            return {n: t.device for n, t in self.transports.items()}

    # ---- the responder -----------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except BaseException:  # last-resort guard: the kernel spins if we stop answering
                self.stats["loop_errors"] += 1
                log.exception("responder: unexpected error (still serving)")
                self._stop.wait(0.001)
        try:
            self._drain()   # a message posted while we were stopping is still answered
        except BaseException:
            log.exception("responder: last drain failed")

    def _step(self) -> None:
        with self._lock:
            dev_fds = {fd: t for t in self.transports.values() for fd in t.device.poll_fds()}
        # A model that hands out a closed fd would make poll() return at once forever.
        self._bad_fds &= set(dev_fds)
        msg_fd = self.carrier.msg_fileno()
        p = select.poll()
        p.register(msg_fd, select.POLLIN)
        p.register(self._wake_r, select.POLLIN)
        for fd in dev_fds:
            if fd not in self._bad_fds:
                p.register(fd, select.POLLIN)
        ready = p.poll(0 if self._rescan else 500)
        more = False
        for fd, ev in ready:
            if fd == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
            elif fd == msg_fd:
                more = bool(ev & select.POLLIN)
                if not more and ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self.stats["loop_errors"] += 1
                    log.error("%s polls as %#x (error/hang-up): retrying", self.carrier.msg_path, ev)
                    self._stop.wait(0.05)
            elif ev & select.POLLNVAL:
                self._bad_fds.add(fd)
                log.error("device %d: poll_fds() gave fd %d, which is not open; ignoring it",
                          dev_fds[fd].dev_num, fd)
            elif fd in dev_fds:
                with self._lock:
                    dev_fds[fd].on_fd_ready(fd)
                self._flush()
        if more:
            self._drain()
        if self._rescan:
            with self._lock:
                for dev_id, vq in list(self._rescan):
                    self._kick(dev_id, vq)
            self._flush()

    def _drain(self) -> None:
        for _ in range(_BURST):
            raw = self.carrier.read_message()
            if raw is None:
                return
            self._serve_one(raw)

    def _serve_one(self, raw: bytes) -> None:
        """Answer one kernel message with exactly one RESPONSE write, then do
        what may wait (ring processing after an EVENT_AVAIL ack)."""
        self.stats["messages"] += 1
        busy = _Busy(self.clock(), _label(raw))
        self._busy = busy
        answer: bytes | None = None
        after: Callable[[], None] | None = None
        try:
            with self._lock:
                answer, after = self._answer(raw)
        except Exception:
            self.stats["handler_errors"] += 1
            log.exception("responder: answering %s failed; sending a bare header echo", busy.what)
        finally:
            self._write(answer if answer is not None else _echo(raw), response=True)
            self._busy = None
            if busy.reported:
                log.warning("%s answered after %.3f s", busy.what, self.clock() - busy.since)
        if after is not None:
            try:
                with self._lock:
                    after()
            except Exception:
                self.stats["handler_errors"] += 1
                log.exception("responder: processing %s failed", busy.what)
        self._flush()

    def _answer(self, raw: bytes) -> tuple[bytes, Callable[[], None] | None]:
        if len(raw) < HEADER.size:
            self._malformed(raw, f"{len(raw)} bytes, shorter than a header")
            return _echo(raw), None
        mtype, msg_id, dev_id, token, msg_size = HEADER.unpack_from(raw)
        if mtype & 3 == 0 and msg_id == _EVENT_AVAIL:
            # The kicking kernel thread busy-waits for this ack: it goes out
            # first, the ring is processed afterwards.
            ack = HEADER.pack(1, _EVENT_AVAIL, dev_id, token, HEADER.size)
            try:
                msg = decode(raw, max_size=MSG_SIZE)
            except RemoteProtocolError as e:
                self._malformed(raw, str(e))
                return ack, None
            if dev_id not in self.transports or not isinstance(msg, EventAvail):
                self.stats["unknown_device"] += 1
                return ack, None
            vq = msg.vq_index
            return ack, lambda: self._kick(dev_id, vq)
        try:
            msg = decode(raw, max_size=MSG_SIZE)
        except RemoteProtocolError as e:
            hint = ""
            if msg_id == _SET_VQUEUE and mtype & 3 == 0 and msg_size == 40:
                hint = " (an unpadded SET_VQUEUE: an older user API? only the 2026 version is supported)"
            self._malformed(raw, f"{e}{hint}")
            return _echo(raw), None
        if msg.IS_BUS or msg.IS_RESPONSE or msg.is_event():
            # The kernel sends none of these on this bus; answer all the same.
            self.stats["unexpected"] += 1
            log.warning("responder: unexpected %s from the kernel (answered with a header echo)",
                        _label(raw))
            return _echo(raw), None
        t = self.transports.get(dev_id)
        resp: Message | None
        if t is None:
            self.stats["unknown_device"] += 1
            resp = absent_response(msg, MSG_SIZE)
        else:
            try:
                resp = t.handle(msg)
                if isinstance(resp, GetDeviceInfoResponse) and dev_id in self._info_answered:
                    seen = self._info_answered[dev_id]
                    seen.device_id = resp.device_id     # type: ignore[attr-defined]
                    seen.set()
            except Exception:
                self.stats["handler_errors"] += 1
                log.exception("device %d: %s failed; answering with zeros", dev_id, msg.NAME)
                resp = fallback_response(msg, t, MSG_SIZE)
        if resp is None:
            return _echo(raw), None
        try:
            return encode(dataclasses.replace(resp, dev_num=dev_id, token=token), max_size=MSG_SIZE), None
        except LocalProtocolError:
            self.stats["handler_errors"] += 1
            log.exception("device %d: cannot encode the answer to %s", dev_id, msg.NAME)
            return _echo(raw), None

    def _kick(self, dev_id: int, vq: int) -> None:
        t = self.transports.get(dev_id)
        if t is not None and t.on_avail(vq):
            self._rescan.add((dev_id, vq))
        else:
            self._rescan.discard((dev_id, vq))

    def _flush(self) -> None:
        """Events the transports produced: EVENT_USED goes to the kernel;
        EVENT_CONFIG does not exist on this bus (the kernel ignores it)."""
        while self._outbox:
            msg = self._outbox.pop(0)
            if isinstance(msg, EventUsed):
                try:
                    data = encode(dataclasses.replace(msg, token=0), max_size=MSG_SIZE)
                except LocalProtocolError:
                    self.stats["handler_errors"] += 1
                    log.exception("cannot encode %r", msg)
                    continue
                self._write(data, response=False)
            else:
                self.stats["events_not_sent"] += 1
                log.debug("not sent (no such event on this bus): %r", msg)

    def _write(self, data: bytes, *, response: bool) -> None:
        try:
            self.carrier.write_message(data)
        except Exception as e:  # not only OSError: a broken node object must not end the loop
            self.stats["write_errors"] += 1
            log.critical("write to %s failed (%s): %s", self.carrier.msg_path, e,
                         "the kernel transfer stays unanswered" if response else "EVENT_USED lost")
            return
        if not response:
            self.stats["used_events"] += 1
        elif data[1] == _EVENT_AVAIL:
            self.stats["acks"] += 1
        else:
            self.stats["responses"] += 1

    def _malformed(self, raw: bytes, why: str) -> None:
        self.stats["malformed"] += 1
        self.last_malformed = f"{raw[:16].hex()}: {why}"
        n = self.stats["malformed"]
        if n <= _LOG_FIRST or n % 100 == 0:
            log.warning("malformed kernel message #%d %s (answered)", n, self.last_malformed)

    # ---- the watchdog ----------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.watchdog_interval):
            try:
                self.check_late()
            except Exception:
                log.exception("watchdog")

    def check_late(self, now: float | None = None) -> str | None:
        """One watchdog look: a message read and unanswered for
        ``late_after`` s, a pending message nobody reads, or a dead
        responder.  Returns the report and passes it to ``on_late`` (or logs
        it as an error without one)."""
        now = self.clock() if now is None else now
        report = None
        busy = self._busy
        thread = self._thread
        if busy is not None and now - busy.since >= self.late_after:
            if now >= busy.next_report:
                if not busy.reported:
                    self.stats["late"] += 1
                busy.reported = True
                busy.next_report = now + max(5.0, 10 * self.late_after)
                report = (f"LATE: {busy.what} was read {now - busy.since:.2f} s ago and is still "
                          f"unanswered; the kernel spins a CPU until it is")
        elif thread is not None and not thread.is_alive() and not self._stop.is_set():
            report = "the responder thread is gone: kernel transfers go unanswered"
        elif busy is None and self.running and self._pending(now):
            self.stats["stalls"] += 1
            report = (f"STALLED: a kernel message has been pending for {self.late_after} s or more and "
                      f"the responder has not read it")
        if report is not None:
            if self.on_late is not None:
                self.on_late(report)
            else:
                log.error("%s", report)
        return report

    def _pending(self, now: float) -> bool:
        """A message pending on two looks ``late_after`` apart with no
        message read in between."""
        p = select.poll()
        p.register(self.carrier.msg_fileno(), select.POLLIN)
        if not p.poll(0):
            self._pending_seen = None
            return False
        seen = self._pending_seen
        count = self.stats["messages"]
        if seen is None or seen[1] != count:
            self._pending_seen = (now, count)
            return False
        if now - seen[0] >= self.late_after:
            self._pending_seen = (now, count)
            return True
        return False

    def describe(self) -> dict[str, Any]:
        return {"devices": {n: d.name for n, d in self.devices.items()}, "stats": dict(self.stats),
                "last_malformed": self.last_malformed}


def _echo(raw: bytes) -> bytes:
    """A bare response header for ``raw``: type | RESPONSE, same msg_id,
    dev_id and token, msg_size 8.  Releases the kernel transfer; the kernel
    reads zeros for the payload."""
    hdr = bytes(raw[:HEADER.size]).ljust(HEADER.size, b"\0")
    mtype, msg_id, dev_id, token, _ = HEADER.unpack(hdr)
    return HEADER.pack((mtype | 1) & 0xFF, msg_id, dev_id, token, HEADER.size)


def _label(raw: bytes) -> str:
    if len(raw) < HEADER.size:
        return f"a {len(raw)}-byte message"
    mtype, msg_id, dev_id, token, _ = HEADER.unpack_from(raw)
    try:
        name = TransportMsgId(msg_id).name if not mtype & 2 else f"bus msg 0x{msg_id:02x}"
    except ValueError:
        name = f"msg 0x{msg_id:02x}"
    return f"{name} for dev_id {dev_id} (token {token})"


__all__ = ["PendingCall", "UserApiServer", "VIRTIO_F_ACCESS_PLATFORM"]
