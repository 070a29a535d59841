"""A vhost-user front-end written in Python that behaves like QEMU 7.2
(``docs/vhost-user.md``, "QEMU 7.2's messages, as observed"): same message
order and payloads, guest RAM in a memfd sent as two regions around the
0xa0000-0xc0000 hole, ring addresses in a fake QEMU user address space,
kick/call/err eventfds.  The "guest driver" of each queue is a
:class:`MockDriver` writing real rings into that RAM.  For back-end tests
without QEMU::

    fe = FakeFrontend(path)
    fe.realize()                      # QEMU start-up (before the guest runs)
    fe.start(fmt="split")             # guest DRIVER_OK
    fe.driver(0).add_chain([], [64]); fe.kick(0)
    token, n, data = fe.wait_used(0)
    bases = fe.stop()                 # SET_VRING_ENABLE 0 + GET_VRING_BASE
"""
from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

from vmsgamp._core.region import Region
from vmsgamp.testing.virtq_mock import MockDriver
from vmsgamp.vhost_user._protocol import (
    FLAG_NEED_REPLY, HEADER, VERSION, VRING_NOFD, MemoryRegion, ProtocolFeature, Request, VhostMessage,
    encode, encode_config, encode_memory_table, encode_u64, encode_vring_addr, encode_vring_state,
    parse_u64, parse_vring_state,
)

__all__ = ["FakeFrontend", "QEMU_UVA_BASE", "HOLE_START", "HOLE_END"]

QEMU_UVA_BASE = 0x7F3A_0000_0000   # where "QEMU" mapped guest RAM
HOLE_START, HOLE_END = 0xA0000, 0xC0000
RING_AREA = 0x100000               # each queue's rings + buffers get 1 MiB from here
QUEUE_SPAN = 0x100000

F_INDIRECT, F_EVENT_IDX, F_PROTOCOL, F_VERSION_1, F_PACKED = 28, 29, 30, 32, 34
QEMU_RNG_SPLIT = 0x170000000
QEMU_RNG_PACKED = 0x570000000


class FakeFrontend:
    def __init__(self, socket_path: str, *, ram_size: int = 8 << 20, connect_timeout: float = 5.0,
                 reply_timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.reply_timeout = reply_timeout
        self.ram = Region.memfd(ram_size, "guest-ram")
        self.mem_regions = [
            MemoryRegion(0, HOLE_START, QEMU_UVA_BASE, 0),
            MemoryRegion(HOLE_END, ram_size - HOLE_END, QEMU_UVA_BASE + HOLE_END, HOLE_END),
        ]
        self.sock: socket.socket | None = None
        self.drivers: dict[int, MockDriver] = {}
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.masked_fds: dict[int, int] = {}
        self.err_fds: dict[int, int] = {}
        self.features = 0
        self.protocol_features = 0
        self.backend_features = 0
        self.log: list[str] = []        # request names sent, in order
        self.connect(connect_timeout)

    # ---- connection ------------------------------------------------------------
    def connect(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket_path)
                s.settimeout(self.reply_timeout)
                self.sock = s
                return
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no vhost-user back-end listening on {self.socket_path}")
                time.sleep(0.02)

    def disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        assert self.sock is not None
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def recv_reply(self) -> VhostMessage:
        assert self.sock is not None
        hdr = self._recv_exact(HEADER.size)
        request, flags, size = HEADER.unpack(hdr)
        return VhostMessage(request, flags, self._recv_exact(size))

    def _recv_exact(self, n: int) -> bytes:
        assert self.sock is not None
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("back-end closed the connection")
            out += chunk
        return out

    def request(self, req: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                need_reply: bool = False, expect_reply: bool = False) -> VhostMessage | None:
        """Send one message; read the reply when the request has one or
        NEED_REPLY is set."""
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        self.log.append(Request(req).name if req in Request._value2member_map_ else str(req))
        self.send_raw(encode(req, payload, flags=flags), fds)
        if expect_reply or need_reply:
            r = self.recv_reply()
            if r.request != req or not r.is_reply:
                raise AssertionError(f"reply {r!r} does not answer {req}")
            return r
        return None

    def ack(self, req: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY; the u64 status (0 = success)."""
        r = self.request(req, payload, fds, need_reply=True)
        assert r is not None
        return parse_u64(r)

    # ---- QEMU 7.2 sequences ------------------------------------------------------------
    def _eventfd(self) -> int:
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def realize(self, queues: Sequence[int] = (0,), *, protocol_mask: int = 0x1FDFF,
                config_size: int = 0) -> dict[str, Any]:
        """Start-up (steps 1-8 of the notes; + GET_CONFIG as vhost-user-blk does)."""
        out: dict[str, Any] = {}
        r = self.request(Request.GET_FEATURES, expect_reply=True)
        self.backend_features = out["features"] = parse_u64(r)
        if self.backend_features >> F_PROTOCOL & 1:
            r = self.request(Request.GET_PROTOCOL_FEATURES, expect_reply=True)
            offered = out["protocol_features"] = parse_u64(r)
            self.protocol_features = offered & protocol_mask
            self.request(Request.SET_PROTOCOL_FEATURES, encode_u64(self.protocol_features))
            if self.protocol_features >> ProtocolFeature.MQ & 1:
                r = self.request(Request.GET_QUEUE_NUM, expect_reply=True)
                out["queue_num"] = parse_u64(r)
        self.request(Request.SET_OWNER)
        self.request(Request.GET_FEATURES, expect_reply=True)
        for q in queues:
            self.masked_fds[q] = self._eventfd()
            self.err_fds[q] = self._eventfd()
            self.request(Request.SET_VRING_CALL, encode_u64(q), [self.masked_fds[q]])
            self.request(Request.SET_VRING_ERR, encode_u64(q), [self.err_fds[q]])
        if config_size:
            r = self.request(Request.GET_CONFIG, encode_config(0, bytes(config_size)), expect_reply=True)
            out["config"] = r.payload
        return out

    def setup_driver(self, q: int, fmt: str, size: int, *, event_idx: bool, indirect: bool,
                     buf_size: int = 4096, nbufs: int = 32) -> MockDriver:
        """The guest driver's rings for queue ``q`` (in guest RAM)."""
        drv = MockDriver(self.ram, fmt, size, event_idx=event_idx, indirect=indirect, buf_size=buf_size,
                         nbufs=nbufs, bus_base=0, ring_offset=RING_AREA + q * QUEUE_SPAN)
        if drv.alloc.cursor > RING_AREA + (q + 1) * QUEUE_SPAN:
            raise ValueError("queue rings and buffers do not fit in their 1 MiB")
        self.drivers[q] = drv
        return drv

    def start(self, queues: Sequence[int] = (0,), *, fmt: str = "split", size: int = 4,
              features: int | None = None, bases: dict[int, int] | None = None,
              reconnect: bool = False, new_drivers: bool = True, buf_size: int = 4096,
              nbufs: int = 32) -> None:
        """Steps 9-18: the guest set DRIVER_OK.  With ``reconnect`` the
        drivers (ring memory) are kept, as after a back-end restart."""
        if features is None:
            features = QEMU_RNG_PACKED if fmt == "packed" else QEMU_RNG_SPLIT
        self.features = features
        event_idx = bool(features >> F_EVENT_IDX & 1)
        indirect = bool(features >> F_INDIRECT & 1)
        for q in queues:
            self.call_fds.setdefault(q, self._eventfd())
            self.request(Request.SET_VRING_CALL, encode_u64(q), [self.call_fds[q]])
        self.request(Request.SET_FEATURES, encode_u64(features))
        table = encode_memory_table(self.mem_regions)
        fds = [self.ram.fd] * len(self.mem_regions)
        # QEMU sets NEED_REPLY here when REPLY_ACK was negotiated, and always
        # after a reconnect (it remembers the negotiation).
        if self.protocol_features >> ProtocolFeature.REPLY_ACK & 1 or reconnect:
            status = self.ack(Request.SET_MEM_TABLE, table, fds)
            if status:
                raise AssertionError(f"SET_MEM_TABLE refused ({status})")
        else:
            self.request(Request.SET_MEM_TABLE, table, fds)
        for q in queues:
            if new_drivers or q not in self.drivers:
                self.setup_driver(q, fmt, size, event_idx=event_idx, indirect=indirect, buf_size=buf_size,
                                  nbufs=nbufs)
            drv = self.drivers[q]
            self.request(Request.SET_VRING_NUM, encode_vring_state(q, drv.size))
            base = (bases or {}).get(q, 0x80008000 if fmt == "packed" else 0)
            self.request(Request.SET_VRING_BASE, encode_vring_state(q, base))
            self.request(Request.SET_VRING_ADDR, encode_vring_addr(
                q, QEMU_UVA_BASE + drv.desc_addr, QEMU_UVA_BASE + drv.device_addr,
                QEMU_UVA_BASE + drv.driver_addr, log=drv.device_addr))
            self.kick_fds.setdefault(q, self._eventfd())
            self.request(Request.SET_VRING_KICK, encode_u64(q), [self.kick_fds[q]])
            self.request(Request.SET_VRING_ENABLE, encode_vring_state(q, 1))
            self.request(Request.SET_VRING_CALL, encode_u64(q), [self.call_fds[q]])

    def stop(self, queues: Sequence[int] = (0,)) -> dict[int, int]:
        """Steps 19-21: the rings' bases as GET_VRING_BASE reports them."""
        bases = {}
        for q in queues:
            self.request(Request.SET_VRING_ENABLE, encode_vring_state(q, 0))
            r = self.request(Request.GET_VRING_BASE, encode_vring_state(q, 0), expect_reply=True)
            st = parse_vring_state(r)
            assert st.index == q
            bases[q] = st.num
            self.request(Request.SET_VRING_CALL, encode_u64(q), [self.masked_fds.get(q) or self._eventfd()])
        return bases

    def used_idx(self, q: int) -> int:
        """Split: used->idx as QEMU reads it to restore a base after a failed GET_VRING_BASE."""
        return struct.unpack("<H", self.ram.read(self.drivers[q].device_addr + 2, 2))[0]

    # ---- the guest's side of a queue ---------------------------------------------------
    def driver(self, q: int) -> MockDriver:
        return self.drivers[q]

    def kick(self, q: int, *, force: bool = False) -> bool:
        if force or self.drivers[q].kick_prepare():
            os.eventfd_write(self.kick_fds[q], 1)
            return True
        return False

    def wait_call(self, q: int, timeout: float = 5.0) -> bool:
        """Wait for the back-end's used-buffer notification on queue ``q``."""
        fd = self.call_fds[q]
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return False
        os.eventfd_read(fd)
        return True

    def wait_used(self, q: int, timeout: float = 5.0) -> tuple[Any, int, bytes]:
        """Like a guest interrupt handler: wait for a call, then collect the
        next used buffer.  TimeoutError when no call arrives."""
        drv = self.drivers[q]
        deadline = time.monotonic() + timeout
        while True:
            got = drv.get_used()
            if got is not None:
                return got
            drv.enable_callbacks()
            got = drv.get_used()
            if got is not None:
                return got
            if not self.wait_call(q, max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"queue {q}: no used-buffer notification within {timeout}s")

    def config_request(self, offset: int, size: int) -> VhostMessage:
        r = self.request(Request.GET_CONFIG, encode_config(offset, bytes(size)), expect_reply=True)
        assert r is not None
        return r

    def close(self) -> None:
        self.disconnect()
        for d in (self.kick_fds, self.call_fds, self.masked_fds, self.err_fds):
            for fd in d.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            d.clear()
        for drv in self.drivers.values():
            drv.close()
        self.drivers.clear()
        self.ram.close()

    def __enter__(self) -> "FakeFrontend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nofd(q: int) -> bytes:
    """SET_VRING_* payload with the NOFD bit (no fd attached)."""
    return encode_u64(q | VRING_NOFD)
