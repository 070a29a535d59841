"""Pure-Python reference of the virtio-msg-amp FIFOs: a test oracle.

``PyFifoPeer`` implements one side of the Gen B (vmamp_shmem) or Gen A
(spsc_queue) layout with ``struct`` on a plain buffer, written from the
layouts (csrc/vmamp_shmem.h, csrc/spsc_queue.h) rather than from the Cython
code, so a test can run it against ``MsgFifo`` and catch a disagreement:
tests/test_fifo_stateful.py drives both with hypothesis and compares.  It is single-threaded
and not atomic: use it only where the test itself serialises the two sides.

It is also a tool for writing hostile-peer tests: ``poke_*`` methods write
arbitrary values where a misbehaving peer would.
"""
from __future__ import annotations

import struct
import time
from collections import deque

LAYOUT_MAGIC = 0x4C4F
QUEUE_MAGIC = 0x514F
INIT, READY, RUN, SHUTDOWN, PEER_DEAD = range(5)
STATE_MASK = 0x1F

_LAYOUT = struct.Struct("<HHHHBBHHHQQQQQQ")  # the 64-byte layout header of csrc/vmamp_shmem.h
assert _LAYOUT.size == 64


class PyFifoPeer:
    """One side of a FIFO pair over ``buf`` (anything supporting the buffer
    protocol, e.g. ``region.view()``)."""

    def __init__(self, buf, *, role: str, layout: str = "b", offset: int = 0,
                 window: int = 8192, header: str = "g2", placement: str = "0/4k"):
        self.mem = memoryview(buf).cast("B")
        self.role = role
        self.layout = layout
        self.off = offset
        self.window = window
        self.msg_size_off = 6 if header == "g2" else 4
        self.header_size = 8 if header == "g2" else 6
        if layout == "a":
            drv, dev = {"0/4k": (0, 4096), "4k/8k": (4096, 8192)}[placement]
            self.tx_blk = offset + (dev if role == "device" else drv)
            self.rx_blk = offset + (drv if role == "device" else dev)
            self.n = 62
            self.slot = 64

    # ---- Gen B layout ------------------------------------------------------
    def write_layout(self, slot: int = 64) -> None:
        """Device side: the QEMU-style default layout for the window."""
        first = (64 + 16 + 7) & ~7
        n = min((self.window - first) // (2 * slot), 0xFFFF)
        _LAYOUT.pack_into(self.mem, self.off, 0, 64, 1, 0, 0, 0, n, slot, 0,
                          0, 64, first, 0, 72, first + n * slot)
        struct.pack_into("<H", self.mem, self.off, LAYOUT_MAGIC)

    def read_layout(self) -> dict:
        names = ("magic length version features num_notif num_vq_notif_per_device "
                 "num_queue_elements size_queue_elements reserved dev_notif_offset "
                 "dev_queue_head_offset dev_queue_elements_offset drv_notif_offset "
                 "drv_queue_head_offset drv_queue_elements_offset").split()
        return dict(zip(names, _LAYOUT.unpack_from(self.mem, self.off)))

    def attach(self) -> None:
        lay = self.read_layout()
        if lay["magic"] != LAYOUT_MAGIC:
            raise RuntimeError("no layout yet")
        self.n = lay["num_queue_elements"]
        self.slot = lay["size_queue_elements"]
        mine, peer = ("dev", "drv") if self.role == "device" else ("drv", "dev")
        self.my_qh = self.off + lay[f"{mine}_queue_head_offset"]
        self.peer_qh = self.off + lay[f"{peer}_queue_head_offset"]
        self.tx_el = self.off + lay[f"{mine}_queue_elements_offset"]
        self.rx_el = self.off + lay[f"{peer}_queue_elements_offset"]

    def _u16(self, off: int) -> int:
        return struct.unpack_from("<H", self.mem, off)[0]

    def _w16(self, off: int, v: int) -> None:
        struct.pack_into("<H", self.mem, off, v & 0xFFFF)

    def _u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.mem, off)[0]

    def _w32(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.mem, off, v & 0xFFFFFFFF)

    def set_state(self, state: int) -> None:
        self._w16(self.my_qh + 2, state)

    def peer_state(self) -> int:
        return self._u16(self.peer_qh + 2) & STATE_MASK

    def handshake(self, timeout: float = 5.0) -> None:
        """Gen B start-up as the layout defines it (blocking): the device writes
        the layout; each side sets state INIT and its queue magic, waits for
        the peer's magic, zeroes its indices and moves to READY, then to RUN
        once the peer has left INIT."""
        deadline = time.monotonic() + timeout
        if self.role == "device":
            self.write_layout()
        while True:
            try:
                self.attach()
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise TimeoutError("no layout")
                time.sleep(0.001)
        self.set_state(INIT)
        self._w16(self.my_qh, QUEUE_MAGIC)
        while self._u16(self.peer_qh) != QUEUE_MAGIC or self.peer_state() > RUN:
            if time.monotonic() > deadline:
                raise TimeoutError("peer magic")
            time.sleep(0.001)
        self._w16(self.my_qh + 4, 0)
        self._w16(self.my_qh + 6, 0)
        self.set_state(READY)
        while self.peer_state() == INIT:
            if time.monotonic() > deadline:
                raise TimeoutError("peer INIT")
            time.sleep(0.001)
        self.set_state(RUN)

    # ---- indices -----------------------------------------------------------
    def _my_prod(self) -> int:
        return self._u16(self.my_qh + 4) if self.layout == "b" else self._u32(self.tx_blk)

    def _set_my_prod(self, v: int) -> None:
        self._w16(self.my_qh + 4, v) if self.layout == "b" else self._w32(self.tx_blk, v)

    def _peer_cons(self) -> int:
        return self._u16(self.peer_qh + 6) if self.layout == "b" else self._u32(self.tx_blk + 64)

    def _my_cons(self) -> int:
        return self._u16(self.my_qh + 6) if self.layout == "b" else self._u32(self.rx_blk + 64)

    def _set_my_cons(self, v: int) -> None:
        self._w16(self.my_qh + 6, v) if self.layout == "b" else self._w32(self.rx_blk + 64, v)

    def _peer_prod(self) -> int:
        return self._u16(self.peer_qh + 4) if self.layout == "b" else self._u32(self.rx_blk)

    def _tx_slot(self, i: int) -> int:
        return (self.tx_el if self.layout == "b" else self.tx_blk + 128) + i * self.slot

    def _rx_slot(self, i: int) -> int:
        return (self.rx_el if self.layout == "b" else self.rx_blk + 128) + i * self.slot

    # ---- traffic -------------------------------------------------------------
    def send(self, msg: bytes) -> bool:
        t = self._my_prod()
        nxt = (t + 1) % self.n
        if nxt == self._peer_cons():
            return False
        s = self._tx_slot(t)
        self.mem[s:s + self.slot] = bytes(msg).ljust(self.slot, b"\0")
        self._set_my_prod(nxt)
        return True

    def recv(self) -> bytes | None:
        h = self._my_cons()
        if h == self._peer_prod():
            return None
        s = self._rx_slot(h)
        size = struct.unpack_from("<H", self.mem, s + self.msg_size_off)[0]
        data = bytes(self.mem[s:s + min(size, self.slot)])
        self._set_my_cons((h + 1) % self.n)
        return data

    # ---- hostile peer --------------------------------------------------------
    def poke_prod(self, v: int) -> None:
        """Write any value as our producer index (a corrupt or malicious peer)."""
        self._set_my_prod(v)

    def poke_cons(self, v: int) -> None:
        self._set_my_cons(v)

    def poke_slot_size(self, i: int, msg_size: int) -> None:
        struct.pack_into("<H", self.mem, self._tx_slot(i) + self.msg_size_off, msg_size)

    def release(self) -> None:
        self.mem.release()


class FifoModel:
    """The abstract behaviour: a bounded deque holding N-1 messages."""

    def __init__(self, num_slots: int):
        self.capacity = num_slots - 1
        self.q: deque[bytes] = deque()

    def send(self, msg: bytes) -> bool:
        if len(self.q) >= self.capacity:
            return False
        self.q.append(msg)
        return True

    def recv(self) -> bytes | None:
        return self.q.popleft() if self.q else None


def make_msg(seq: int, size: int = 64, header: str = "g2") -> bytes:
    """A well-formed message of ``size`` bytes carrying ``seq`` in its payload
    (the header's msg_size field says ``size``)."""
    if header == "g2":
        hdr = struct.pack("<BBHHH", 0, 0x80, 0, 0, size)
    else:
        hdr = struct.pack("<BBHH", 0, 0x80, 0, size)
    body = struct.pack("<Q", seq & 0xFFFFFFFFFFFFFFFF)
    return (hdr + body).ljust(size, b"\xa5")[:size] if size >= len(hdr) + 8 else (hdr + body)[:size]
