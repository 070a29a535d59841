"""vhost-user back-end: serves one VirtioDevice model to a front-end (QEMU)
over a UNIX socket.

The front-end owns the virtio transport (PCI, feature negotiation with the
guest); this process owns the virtqueues: guest RAM arrives as fds
(SET_MEM_TABLE) and is mapped into an AddressSpace keyed by guest-physical
address, the rings become the Cython device-side queues, kicks arrive on
eventfds and used-buffer interrupts leave on eventfds.

Behaviour where QEMU 7.2 is particular (``docs/vhost-user.md``, which also
has the QEMU command lines and what was tested):

* NEED_REPLY is honoured on every message, even without REPLY_ACK (after a
  reconnect QEMU sets it without renegotiating protocol features);
* a ring is processed on SET_VRING_ENABLE 1 as well as on a kick (the guest
  has usually kicked already);
* after a back-end restart QEMU 7.2 sends a packed ring's initial base
  0x80008000 instead of its real position, so with that base the position
  is read from guest memory (see :func:`recover_packed_position`; on a fresh
  ring this finds the initial position too);
* split rings restart from ``used->idx`` in guest memory when the base is
  ahead of it (chains popped but never completed are processed again), as
  QEMU itself does when GET_VRING_BASE failed.

After serving chains the back-end spins for a while on the rings with the
guest's kicks suppressed, then re-enables them and blocks
(:mod:`vmsgamp.vhost_user._ringwait`, ``wait=``: a ``WaitPolicy``).

Unknown or malformed messages are refused (a failure ack when NEED_REPLY is
set, a log line otherwise); only a broken header (bad version, absurd size)
closes the connection, and the back-end then waits for the next one.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from vmsgamp._core.addrspace import AddressSpace
from vmsgamp._core.region import Region
from vmsgamp._core.virtq import PackedQueue, QueueState, SplitQueue
from vmsgamp.bus._wait import WaitPolicy
from vmsgamp.devices._base import VirtioDevice, offered_features
from vmsgamp.devices._service import Serviced, needs_notification, service_queue
from vmsgamp.errors import SharedObjectLost
from vmsgamp.vhost_user._protocol import (
    FLAG_NEED_REPLY, MAX_FDS, VHOST_USER_F_PROTOCOL_FEATURES, Decoder, MemoryRegion, ProtocolFeature,
    Request, VhostMessage, VhostProtocolError, encode_config, encode_reply, encode_u64,
    encode_vring_state, packed_base, parse_config, parse_memory_table, parse_u64, parse_vring_addr,
    parse_vring_fd, parse_vring_state, unpack_packed_base,
)
from vmsgamp.vhost_user._ringwait import RingWait

log = logging.getLogger("vmsgamp.vhost_user")

VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34
PACKED_INITIAL_BASE = 0x80008000   # avail 0 / wrap 1, used 0 / wrap 1
MAX_RING_SIZE = 32768


class VhostUserError(Exception):
    """A request the back-end refuses (answered with a failure ack)."""


# ---- guest memory ------------------------------------------------------------------

class GuestMemory:
    """The front-end's memory table, mapped.  ``aspace`` translates
    guest-physical addresses (descriptors); :meth:`uva_to_gpa` translates the
    front-end's user virtual addresses (SET_VRING_ADDR)."""

    def __init__(self, regions: list[MemoryRegion], fds: tuple[int, ...]):
        self.regions = list(regions)
        self.aspace = AddressSpace()
        self._mapped: list[Region] = []
        try:
            for r, fd in zip(regions, fds):
                # Map from file offset 0 and skip mmap_offset in the pointer, as
                # libvhost-user does: works for hugetlbfs whatever the offset.
                reg = Region.from_fd(fd, r.memory_size, offset=0, map_offset=r.mmap_offset, own_fd=True,
                                     uri=f"vhost-user:gpa={r.guest_phys_addr:#x}")
                self._mapped.append(reg)
                self.aspace.add_window(r.guest_phys_addr, reg, 0, r.memory_size)
        except BaseException:
            for fd in fds[len(self._mapped):]:   # not owned by a Region yet
                _close(fd)
            self.close()
            raise

    def uva_to_gpa(self, uva: int, length: int) -> int:
        for r in self.regions:
            if r.userspace_addr <= uva and uva + length <= r.userspace_addr + r.memory_size:
                return r.guest_phys_addr + (uva - r.userspace_addr)
        raise VhostUserError(f"user address [{uva:#x}, +{length:#x}) is not inside one memory region")

    def read16(self, gpa: int) -> int:
        return struct.unpack("<H", self.aspace.read(gpa, 2))[0]

    def read32(self, gpa: int) -> int:
        return struct.unpack("<I", self.aspace.read(gpa, 4))[0]

    def close(self) -> None:
        self.aspace.close()
        for r in self._mapped:
            r.close()
        self._mapped = []


def recover_packed_position(mem: GuestMemory, desc_gpa: int, driver_gpa: int, size: int,
                            event_idx: bool) -> tuple[int, bool, str]:
    """Where a packed ring's device position is, read from guest memory
    (QEMU 7.2 does not restore it after a back-end restart).  Returns
    ``(position, wrap counter, method)``; assumes the device had completed
    every chain it popped (the ring is idle), so used == avail.

    1. With EVENT_IDX and the driver's event flags at DESC, Linux writes its
       last used position (with the wrap counter in bit 15) into the driver
       event area whenever it enables callbacks: that is our next position.
    2. Otherwise scan the USED bits: the driver writes USED = !wrap when it
       makes a descriptor available and the device writes USED = wrap when it
       uses one, so (for chains of one ring descriptor each, which is what
       Linux posts with INDIRECT_DESC) the ring reads ``[X] * P + [!X] * (size - P)``
       with P the device position and X its wrap counter.  Multi-descriptor
       chains leave their tails untouched, which makes the scan ambiguous."""
    def used_bit(i: int) -> bool:
        return bool(mem.read16(desc_gpa + 16 * i + 14) >> 15 & 1)

    if event_idx:
        ev = mem.read32(driver_gpa)
        flags = (ev >> 16) & 3
        off = ev & 0x7FFF
        wrap = bool(ev >> 15 & 1)
        if flags == 2 and off < size and used_bit(off) != wrap:
            return off, wrap, "driver event area"
    x = used_bit(0)
    for i in range(1, size):
        if used_bit(i) != x:
            return i, x, "descriptor scan"
    return 0, not x, "descriptor scan"


# ---- one virtqueue ------------------------------------------------------------------

@dataclasses.dataclass
class Vring:
    index: int
    num: int = 0
    desc: int = 0        # guest-physical (translated from SET_VRING_ADDR)
    avail: int = 0
    used: int = 0
    addr_set: bool = False
    base: int | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    queue: Any = None    # SplitQueue | PackedQueue once started
    broken: str | None = None

    @property
    def started(self) -> bool:
        return self.queue is not None

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                _close(fd)
                setattr(self, name, None)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# ---- the back-end -----------------------------------------------------------------------

class VhostUserBackend:
    """Serve ``device`` on the UNIX socket ``socket_path`` (created here; a
    stale socket file is replaced).  One front-end at a time; after a
    disconnect the back-end waits for the next connection (QEMU
    ``reconnect=1``).  Run :meth:`serve_forever` in a thread or the main
    thread; :meth:`stop` is thread-safe.

    ``wait``: how long to spin on the rings after serving chains before
    blocking on the kick eventfds (``WaitPolicy(spin_us=0)``: never spin);
    ``clock`` is injectable for tests."""

    def __init__(self, device: VirtioDevice, socket_path: str, *, offer_packed: bool = True,
                 offer_event_idx: bool = True, offer_indirect: bool = True,
                 wait: WaitPolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self.socket_path = socket_path
        self.offered_features = offered_features(
            device, packed=offer_packed, event_idx=offer_event_idx,
            indirect=offer_indirect) | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        proto = 1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK | 1 << ProtocolFeature.RESET_DEVICE
        if len(device.config):
            proto |= 1 << ProtocolFeature.CONFIG
        self.offered_protocol_features = proto
        self.stats: dict[str, int] = {"connections": 0, "messages": 0, "refused": 0, "kicks": 0,
                                      "calls": 0, "broken": 0, "spins": 0, "served_while_spinning": 0,
                                      "served_at_arm": 0, "blocks": 0}
        self.wait_policy = wait or WaitPolicy()
        self._wait = RingWait(self.wait_policy, self.stats, clock=clock)
        self.events: list[str] = []      # notable session events, for reports and tests
        self._closed = False
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._listener = self._listen(socket_path)
        self._sel.register(self._listener, selectors.EVENT_READ, ("accept", None))
        self._conn: socket.socket | None = None
        self._decoder = Decoder()
        self._dev_fds: set[int] = set()
        self._pending: set[int] = set()
        self._reset_session()
        device._notify_queue = self._device_notify
        device._notify_config = self._config_changed

    # ---- socket ------------------------------------------------------------------------
    @staticmethod
    def _listen(path: str) -> socket.socket:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)   # a previous back-end's socket (we are its restart)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(path)
            s.listen(1)
        except OSError:
            s.close()
            raise
        s.setblocking(False)
        return s

    def _reset_session(self) -> None:
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner_seen = False
        self.mem: GuestMemory | None = None
        self.vrings = [Vring(i) for i in range(self.device.num_queues)]

    # ---- public API -------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def serve_forever(self, stop: threading.Event | None = None, *, poll_interval: float = 0.5) -> None:
        """Serve until :meth:`stop` (or ``stop`` is set)."""
        while not self._stop.is_set() and not (stop is not None and stop.is_set()) and not self._closed:
            self.step(0 if self._pending else poll_interval)

    def step(self, timeout: float | None) -> None:
        """One round of the loop: wait for sockets/kicks and handle them (or,
        right after serving chains, spin on the rings: see ``_ringwait``)."""
        self._sync_device_fds()
        self._wait.wait(timeout, [vr for vr in self.vrings if vr.queue is not None], self._process,
                        self._look, self._mark_broken)
        for index in list(self._pending):
            self._pending.discard(index)
            vr = self.vrings[index] if index < len(self.vrings) else None
            if vr is not None and vr.started and vr.enabled:
                self._process(vr)

    def _look(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` in the selector and handle what it reports."""
        events = self._sel.select(timeout)
        for key, _ in events:
            kind, arg = key.data
            if kind == "wake":
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
            elif kind == "accept":
                self._accept()
            elif kind == "conn":
                self._on_readable()
            elif kind == "kick":
                self._on_kick(arg)
            elif kind == "devfd":
                try:
                    self.device.on_fd_ready(arg)
                except Exception:
                    log.exception("%s: host input handler failed", self.device.name)
        return bool(events)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._disconnect("back-end closed")
        for fd in list(self._dev_fds):
            self._sel.unregister(fd)
        self._dev_fds.clear()
        self._sel.unregister(self._listener)
        self._listener.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        except OSError:
            pass
        self._sel.close()
        _close(self._wake_r)
        _close(self._wake_w)

    def __enter__(self) -> "VhostUserBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- connection ----------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self._conn is not None and self._peer_alive():
            # One front-end at a time: vhost-user has no arbitration.
            log.warning("second front-end refused while one is connected")
            conn.close()
            return
        if self._conn is not None:
            # A reconnect seen before the old connection's EOF.
            self._disconnect("connection closed by the front-end")
        conn.setblocking(False)
        self._conn = conn
        self._decoder = Decoder()
        self.stats["connections"] += 1
        self.events.append("connect")
        self._sel.register(conn, selectors.EVENT_READ, ("conn", None))
        log.info("front-end connected (connection %d)", self.stats["connections"])

    def _peer_alive(self) -> bool:
        assert self._conn is not None
        try:
            return self._conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def _disconnect(self, why: str) -> None:
        for vr in self.vrings:
            self._stop_ring(vr)
            vr.close_fds()
        if self._conn is not None:
            log.info("front-end disconnected: %s", why)
            self.events.append("disconnect")
            self._sel.unregister(self._conn)
            self._conn.close()
            self._conn = None
        for fd in self._decoder.take_fds():
            _close(fd)
        if self.mem is not None:
            self.mem.close()
        self._pending.clear()
        try:
            self.device.reset()
        except Exception:
            log.exception("%s: reset failed", self.device.name)
        self._reset_session()

    def _on_readable(self) -> None:
        """Read exactly what the current message still needs (so fds stay
        with their message), then handle every complete message."""
        conn = self._conn
        assert conn is not None
        while self._conn is conn:
            try:
                need = self._decoder.needed() or 1
                data, fds, flags, _ = socket.recv_fds(conn, need, MAX_FDS, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except VhostProtocolError as e:
                self._disconnect(f"unrecoverable framing error: {e}")
                return
            except OSError as e:
                self._disconnect(f"read error: {e}")
                return
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    _close(fd)
                self._disconnect("too many fds in one message (ancillary data truncated)")
                return
            if not data:
                for fd in fds:
                    _close(fd)
                self._disconnect("connection closed by the front-end")
                return
            self._decoder.feed(data, fds)
            try:
                msg = self._decoder.next_message()
            except VhostProtocolError as e:
                self._disconnect(f"unrecoverable framing error: {e}")
                return
            if msg is not None:
                self._dispatch(msg)

    def _send(self, data: bytes) -> None:
        if self._conn is None:
            return
        try:
            self._conn.setblocking(True)
            self._conn.sendall(data)
            self._conn.setblocking(False)
        except OSError as e:
            self._disconnect(f"write error: {e}")

    # ---- dispatch -----------------------------------------------------------------------------
    def _dispatch(self, msg: VhostMessage) -> None:
        self.stats["messages"] += 1
        handler: Callable[[VhostMessage], bytes | None] | None = getattr(self, f"_m_{msg.name}", None)
        log.debug("<- %r", msg)
        self._kept: set[int] = set()
        ok = True
        reply: bytes | None = None
        try:
            if handler is None:
                raise VhostUserError(f"{msg.name} is not supported")
            reply = handler(msg)
        except (VhostUserError, VhostProtocolError, ValueError, OSError) as e:
            ok = False
            self.stats["refused"] += 1
            log.warning("%s refused: %s", msg.name, e)
            self.events.append(f"refused {msg.name}")
        except SharedObjectLost:
            raise    # guest memory shrank under us: this session cannot go on
        except Exception as e:   # a bug (ours or the model's) must not end the back-end
            ok = False
            self.stats["refused"] += 1
            log.exception("%s refused: internal error", msg.name)
            self.events.append(f"refused {msg.name}: {e!r}")
        finally:
            for fd in msg.fds:
                if fd not in self._kept:
                    _close(fd)
        if self._conn is None:
            return
        if reply is not None:
            self._send(encode_reply(msg.request, reply))
        elif not ok and _HAS_REPLY.get(msg.request) is not None:
            # The front-end waits for this reply: send a well-formed failure.
            self._send(encode_reply(msg.request, _HAS_REPLY[msg.request]))
        elif msg.flags & FLAG_NEED_REPLY:
            self._send(encode_reply(msg.request, encode_u64(0 if ok else 1)))

    def _keep(self, fd: int) -> int:
        self._kept.add(fd)
        return fd

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise VhostUserError(f"queue {index} does not exist (the device has {len(self.vrings)})")
        return self.vrings[index]

    # ---- features and ownership -------------------------------------------------------------------
    def _m_GET_FEATURES(self, msg: VhostMessage) -> bytes:
        return encode_u64(self.offered_features)

    def _m_SET_FEATURES(self, msg: VhostMessage) -> None:
        features = parse_u64(msg)
        # QEMU 7.2 rng sets bits it was never offered (packed, event idx):
        # follow what it says, the guest driver uses exactly that.
        self.acked_features = features
        if features & ~self.offered_features:
            log.info("SET_FEATURES %#x has bits that were not offered (%#x)", features,
                     features & ~self.offered_features)
        if not self.device.features_ok(features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)):
            raise VhostUserError(f"the device refuses features {features:#x}")

    def _m_GET_PROTOCOL_FEATURES(self, msg: VhostMessage) -> bytes:
        return encode_u64(self.offered_protocol_features)

    def _m_SET_PROTOCOL_FEATURES(self, msg: VhostMessage) -> None:
        features = parse_u64(msg)
        if features & ~self.offered_protocol_features:
            raise VhostUserError(f"protocol features {features:#x} include bits never offered")
        self.acked_protocol_features = features

    def _m_GET_QUEUE_NUM(self, msg: VhostMessage) -> bytes:
        return encode_u64(self.device.num_queues)

    def _m_SET_OWNER(self, msg: VhostMessage) -> None:
        self.owner_seen = True

    def _reset_device(self) -> None:
        for vr in self.vrings:
            self._stop_ring(vr)
            vr.close_fds()
        self.vrings = [Vring(i) for i in range(self.device.num_queues)]
        self.acked_features = 0
        try:
            self.device.reset()
        except Exception:
            log.exception("%s: reset failed", self.device.name)

    def _m_RESET_OWNER(self, msg: VhostMessage) -> None:
        self._reset_device()

    def _m_RESET_DEVICE(self, msg: VhostMessage) -> None:
        self._reset_device()

    # ---- memory -------------------------------------------------------------------------------
    def _m_SET_MEM_TABLE(self, msg: VhostMessage) -> None:
        regions = parse_memory_table(msg)
        for fd in msg.fds:
            self._keep(fd)   # GuestMemory owns them from here (closes them on failure)
        mem = GuestMemory(regions, msg.fds)
        old, self.mem = self.mem, mem
        # Running rings move to the new mapping with their state (memory hot-plug).
        for vr in self.vrings:
            if vr.queue is not None:
                try:
                    vr.queue = type(vr.queue).from_state(mem.aspace, vr.queue.state())
                except ValueError as e:
                    self._mark_broken(vr, f"ring not inside the new memory table: {e}")
        if any(vr.started for vr in self.vrings):
            self._activate()
        if old is not None:
            old.close()
        log.info("memory table: %s", ", ".join(f"gpa {r.guest_phys_addr:#x}+{r.memory_size:#x}"
                                                for r in regions))

    # ---- rings -------------------------------------------------------------------------------------
    def _m_SET_VRING_NUM(self, msg: VhostMessage) -> None:
        st = parse_vring_state(msg)
        vr = self._vring(st.index)
        if not 1 <= st.num <= min(MAX_RING_SIZE, self.device.queue_max_size):
            raise VhostUserError(f"queue {st.index}: size {st.num} outside 1..{self.device.queue_max_size}")
        vr.num = st.num

    def _m_SET_VRING_ADDR(self, msg: VhostMessage) -> None:
        a = parse_vring_addr(msg)
        vr = self._vring(a.index)
        if self.mem is None:
            raise VhostUserError("SET_VRING_ADDR before SET_MEM_TABLE")
        if a.flags & ~1:
            raise VhostUserError(f"vring address flags {a.flags:#x} not supported")
        # Only the start of each area must be mapped here; the queue checks
        # the full extents when it is built.
        vr.desc = self.mem.uva_to_gpa(a.desc, 1)
        vr.avail = self.mem.uva_to_gpa(a.avail, 1)
        vr.used = self.mem.uva_to_gpa(a.used, 1)
        vr.addr_set = True

    def _m_SET_VRING_BASE(self, msg: VhostMessage) -> None:
        st = parse_vring_state(msg)
        vr = self._vring(st.index)
        if vr.started:
            raise VhostUserError(f"queue {st.index}: SET_VRING_BASE while the ring runs")
        vr.base = st.num

    def _m_GET_VRING_BASE(self, msg: VhostMessage) -> bytes:
        st = parse_vring_state(msg)
        vr = self._vring(st.index)
        num = self._stop_ring(vr)
        if vr.kick_fd is not None:
            _close(vr.kick_fd)
            vr.kick_fd = None
        vr.enabled = False
        return encode_vring_state(st.index, num)

    def _m_SET_VRING_KICK(self, msg: VhostMessage) -> None:
        v = parse_vring_fd(msg)
        vr = self._vring(v.index)
        if vr.kick_fd is not None:
            self._unwatch_kick(vr)
            _close(vr.kick_fd)
        vr.kick_fd = self._keep(v.fd) if v.fd is not None else None
        if not self.acked_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            vr.enabled = True   # without protocol features a ring starts enabled
        if vr.started and vr.kick_fd is not None:   # a new kick fd for a running ring
            self._sel.register(vr.kick_fd, selectors.EVENT_READ, ("kick", vr.index))
        else:
            self._start_ring(vr)
        if vr.started and vr.enabled:
            self._process(vr)

    def _m_SET_VRING_CALL(self, msg: VhostMessage) -> None:
        v = parse_vring_fd(msg)
        vr = self._vring(v.index)
        if vr.call_fd is not None:
            _close(vr.call_fd)
        vr.call_fd = self._keep(v.fd) if v.fd is not None else None

    def _m_SET_VRING_ERR(self, msg: VhostMessage) -> None:
        v = parse_vring_fd(msg)
        vr = self._vring(v.index)
        if vr.err_fd is not None:
            _close(vr.err_fd)
        vr.err_fd = self._keep(v.fd) if v.fd is not None else None

    def _m_SET_VRING_ENABLE(self, msg: VhostMessage) -> None:
        st = parse_vring_state(msg)
        vr = self._vring(st.index)
        if st.num not in (0, 1):
            raise VhostUserError(f"SET_VRING_ENABLE {st.num}")
        vr.enabled = bool(st.num)
        if vr.enabled and not vr.started:
            self._start_ring(vr)
        if vr.enabled and vr.started:
            self._process(vr)   # the guest has usually kicked already

    # ---- configuration space -------------------------------------------------------------------------
    def _m_GET_CONFIG(self, msg: VhostMessage) -> bytes:
        c = parse_config(msg)
        have = len(self.device.config)
        data = self.device.read_config(c.offset, max(0, min(c.size, have - c.offset))) if c.offset < have else b""
        # QEMU checks the reply has exactly the size it asked for.
        return encode_config(c.offset, data.ljust(c.size, b"\0"), c.flags)

    def _m_SET_CONFIG(self, msg: VhostMessage) -> None:
        c = parse_config(msg)
        if c.offset + c.size > len(self.device.config) or not self.device.write_config(c.offset, c.data):
            raise VhostUserError(f"config write of {c.size} bytes at {c.offset} refused")

    # ---- ring life cycle ---------------------------------------------------------------------------------
    def _start_ring(self, vr: Vring) -> None:
        """Build the device-side queue once everything it needs is known."""
        if vr.started or vr.kick_fd is None or self.mem is None or not vr.addr_set or not vr.num:
            return
        f = self.acked_features
        packed = bool(f >> VIRTIO_F_RING_PACKED & 1)
        event_idx = bool(f >> VIRTIO_F_EVENT_IDX & 1)
        indirect = bool(f >> VIRTIO_F_INDIRECT_DESC & 1)
        mem = self.mem
        try:
            if packed:
                base = PACKED_INITIAL_BASE if vr.base is None else vr.base
                avail, avail_wrap, used, used_wrap = unpack_packed_base(base)
                if (avail, avail_wrap) != (used, used_wrap):
                    # Chains popped but not completed before the stop: their
                    # descriptors are still in the ring, process them again.
                    log.info("queue %d: base %#x has chains in flight; restarting from used %d/%d",
                             vr.index, base, used, used_wrap)
                pos, wrap = used, used_wrap
                if base == PACKED_INITIAL_BASE:
                    # QEMU 7.2 sends the initial base after a back-end restart
                    # (it restores only split rings).  On a fresh ring the
                    # recovery finds the same position, so always look.
                    pos, wrap, how = recover_packed_position(mem, vr.desc, vr.avail, vr.num, event_idx)
                    if (pos, wrap) != (0, True):
                        self.events.append(f"queue {vr.index}: packed position {pos}/{int(wrap)} from {how}")
                        log.info("queue %d: packed base is the initial value but the ring is at %d wrap %d "
                                 "(from the %s): a restart, continuing there", vr.index, pos, wrap, how)
                if pos >= vr.num:
                    raise VhostUserError(f"packed base {base:#x} outside a ring of {vr.num}")
                state = QueueState("packed", vr.num, vr.desc, vr.avail, vr.used, event_idx, indirect,
                                   pos, pos, wrap, wrap)
                queue = PackedQueue.from_state(mem.aspace, state)
            else:
                base = (vr.base or 0) & 0xFFFF
                used_idx = mem.read16(vr.used + 2)
                if base != used_idx:
                    log.info("queue %d: base %d, used->idx %d: restarting from used->idx",
                             vr.index, base, used_idx)
                state = QueueState("split", vr.num, vr.desc, vr.avail, vr.used, event_idx, indirect,
                                   used_idx, used_idx)
                queue = SplitQueue.from_state(mem.aspace, state)
        except (ValueError, VhostUserError, IndexError) as e:
            self._mark_broken(vr, f"cannot start: {e}")
            return
        vr.queue = queue
        vr.broken = None
        self._sel.register(vr.kick_fd, selectors.EVENT_READ, ("kick", vr.index))
        self.events.append(f"start {vr.index} {'packed' if packed else 'split'}")
        log.info("queue %d started: %r", vr.index, queue)
        self._activate()

    def _activate(self) -> None:
        queues = [vr.queue for vr in self.vrings]
        try:
            self.device.activate(queues, self.acked_features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))
        except Exception:
            log.exception("%s: activate failed", self.device.name)

    def _unwatch_kick(self, vr: Vring) -> None:
        if vr.kick_fd is not None:
            try:
                self._sel.unregister(vr.kick_fd)
            except (KeyError, ValueError):
                pass

    def _stop_ring(self, vr: Vring) -> int:
        """Stop the ring; its base as GET_VRING_BASE reports it."""
        self._unwatch_kick(vr)
        self._wait.forget(vr)
        q = vr.queue
        if q is None:
            if vr.base is not None:
                return vr.base
            return PACKED_INITIAL_BASE if self.acked_features >> VIRTIO_F_RING_PACKED & 1 else 0
        st = q.state()
        if st.format == "packed":
            # In-flight chains are re-read from the ring on restart, so report
            # the used position for avail too (the chains are still there).
            num = packed_base(st.next_used, st.used_wrap, st.next_used, st.used_wrap) \
                if st.inflight else packed_base(st.next_avail, st.avail_wrap, st.next_used, st.used_wrap)
        else:
            num = st.next_avail
        vr.queue = None
        vr.base = num
        self._pending.discard(vr.index)
        self.events.append(f"stop {vr.index} base={num:#x}")
        try:
            self.device.queue_reset(vr.index)
        except Exception:
            log.exception("%s: queue_reset(%d) failed", self.device.name, vr.index)
        if not any(v.started for v in self.vrings):
            try:
                self.device.reset()
            except Exception:
                log.exception("%s: reset failed", self.device.name)
        return num

    def _mark_broken(self, vr: Vring, reason: str) -> None:
        log.warning("queue %d: %s", vr.index, reason)
        self.events.append(f"broken {vr.index}: {reason}")
        self.stats["broken"] += 1
        vr.broken = reason
        if vr.queue is not None:
            vr.queue.mark_broken(reason)
        if vr.err_fd is not None:
            try:
                os.eventfd_write(vr.err_fd, 1)
            except OSError:
                pass

    # ---- data path -------------------------------------------------------------------------------------
    def _on_kick(self, index: int) -> None:
        vr = self.vrings[index]
        if vr.kick_fd is None:
            return
        try:
            os.read(vr.kick_fd, 8)   # eventfd counter: clears it
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno != errno.EAGAIN:
                self._unwatch_kick(vr)
            return
        self.stats["kicks"] += 1
        if vr.started and vr.enabled:
            self._process(vr)

    def _process(self, vr: Vring) -> bool:
        """Serve the ring; True if it had chains."""
        q = vr.queue
        if q is None or q.broken:
            return False
        # (packed: the wrap counter too; a service that pops exactly a
        # multiple of 2 * size chains looks idle, which only skips one spin)
        before = (q.next_avail, getattr(q, "avail_wrap", False))
        spin = self._wait.polls
        done = service_queue(self.device, vr.index, q, rearm=not spin)
        served = (q.next_avail, getattr(q, "avail_wrap", False)) != before
        if spin:
            self._wait.quiet.add(vr.index)   # kicks left off: armed before the loop sleeps
            if served:
                self._wait.activity()
        self._after_service(vr, done)
        return served

    def _after_service(self, vr: Vring, done: Serviced) -> None:
        if done.broken is not None:
            self._mark_broken(vr, done.broken)
            return
        if done.more:
            self._pending.add(vr.index)
        if done.notify and vr.call_fd is not None:
            try:
                os.eventfd_write(vr.call_fd, 1)
                self.stats["calls"] += 1
            except OSError as e:
                log.warning("queue %d: call eventfd write failed: %s", vr.index, e)

    def _device_notify(self, index: int) -> None:
        if 0 <= index < len(self.vrings) and self.vrings[index].started:
            vr = self.vrings[index]
            if vr.queue is not None:
                self._after_service(vr, needs_notification(vr.queue))

    def _config_changed(self) -> None:
        # Needs the back-end request channel (CONFIG_CHANGE_MSG), not offered.
        log.info("%s: configuration changed; the front-end is not told (no back-end channel)",
                 self.device.name)

    def _sync_device_fds(self) -> None:
        want = set(self.device.poll_fds()) if any(vr.started for vr in self.vrings) else set()
        for fd in self._dev_fds - want:
            self._sel.unregister(fd)
        for fd in want - self._dev_fds:
            self._sel.register(fd, selectors.EVENT_READ, ("devfd", fd))
        self._dev_fds = want


# Requests whose front-end waits for a reply whatever the flags: the payload
# sent back when the request is refused.
_HAS_REPLY: dict[int, bytes] = {
    Request.GET_FEATURES: encode_u64(0),
    Request.GET_PROTOCOL_FEATURES: encode_u64(0),
    Request.GET_QUEUE_NUM: encode_u64(0),
    Request.GET_VRING_BASE: encode_vring_state(0, 0),
    Request.GET_CONFIG: b"",          # zero-size payload: the request failed
    Request.GET_MAX_MEM_SLOTS: encode_u64(0),
    Request.GET_STATUS: encode_u64(0),
    Request.GET_INFLIGHT_FD: b"",
}
