"""Pure-Python model of split and packed virtqueues: a test oracle.

Written straight from the virtio 1.2 text ("Split Virtqueues", "Packed
Virtqueues") with plain ints and ``struct``, no speed tricks and no code
shared with the engine, so it can be read against the spec.  Driver policy
(free-list order, when to use an indirect table, when used_event is
refreshed) is the same as vmsgamp._core.virtq, so a system of reference
driver + reference device and a system of Cython driver + Cython device fed
the same operations leave byte-identical rings: tests/test_virtq_stateful.py
drives both with hypothesis and compares.  Use it the same way to check
your own ring code.

Memory is anything with ``read(addr, n) -> bytes`` and ``write(addr, data)``
(an AddressSpace, or :class:`BytesMemory`).  Single-threaded only: it uses
plain reads and writes, not atomics.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
NO_INTERRUPT = NO_NOTIFY = 1
EV_ENABLE, EV_DISABLE, EV_DESC = 0, 1, 2
U16 = 0xFFFF


class Memory(Protocol):
    def read(self, addr: int, n: int) -> bytes: ...
    def write(self, addr: int, data: bytes) -> None: ...


class BytesMemory:
    """A bytearray at bus address ``base`` (out-of-range access raises IndexError)."""

    def __init__(self, size: int, base: int = 0) -> None:
        self.buf = bytearray(size)
        self.base = base

    def _off(self, addr: int, n: int) -> int:
        off = addr - self.base
        if off < 0 or n < 0 or off + n > len(self.buf):
            raise IndexError(f"[{addr:#x}, +{n:#x}) outside memory")
        return off

    def read(self, addr: int, n: int) -> bytes:
        off = self._off(addr, n)
        return bytes(self.buf[off:off + n])

    def write(self, addr: int, data: bytes) -> None:
        off = self._off(addr, len(data))
        self.buf[off:off + len(data)] = data


class RefBroken(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def need_event(event: int, new: int, old: int) -> bool:
    """Spec: notify iff event is in [old, new) modulo 2^16."""
    return ((new - event - 1) & U16) < ((new - old) & U16)


def split_sizes(q: int) -> tuple[int, int, int]:
    return 16 * q, 6 + 2 * q, 6 + 8 * q


@dataclass
class RefChain:
    """A popped chain.  ``head`` is the id add_used() takes back, as in
    DescriptorChain: split, the first descriptor's index; packed, the buffer id."""
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)


class _Mem:
    def __init__(self, mem: Memory) -> None:
        self.mem = mem

    def u16(self, a: int) -> int:
        return struct.unpack("<H", self.mem.read(a, 2))[0]

    def u32(self, a: int) -> int:
        return struct.unpack("<I", self.mem.read(a, 4))[0]

    def w16(self, a: int, v: int) -> None:
        self.mem.write(a, struct.pack("<H", v & U16))

    def w32(self, a: int, v: int) -> None:
        self.mem.write(a, struct.pack("<I", v & 0xFFFFFFFF))

    def desc(self, a: int) -> tuple[int, int, int, int]:
        return struct.unpack("<QIHH", self.mem.read(a, 16))

    def wdesc(self, a: int, addr: int, ln: int, x: int, y: int) -> None:
        self.mem.write(a, struct.pack("<QIHH", addr, ln, x, y))


def _check_buffer(mem: Memory, addr: int, ln: int) -> None:
    """The buffer must lie inside the memory (one window)."""
    if addr + ln > 1 << 64:
        raise RefBroken("length overflow")
    try:
        mem.read(addr, ln)
    except Exception:
        raise RefBroken(f"buffer {addr:#x}+{ln:#x} outside memory") from None


# ---------------------------------------------------------------- split ----

class RefSplitDriver(_Mem):
    def __init__(self, mem: Memory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool = False, indirect: bool = False,
                 indirect_addr: int | None = None, indirect_max: int = 8, start_index: int = 0) -> None:
        super().__init__(mem)
        self.q, self.desc_addr, self.avail, self.used = size, desc, driver, device
        self.event_idx = event_idx
        self.ind_max = min(indirect_max, size)
        self.pool = indirect_addr if (indirect and indirect_addr is not None and indirect_max > 1) else None
        self.next = [i + 1 for i in range(size)]
        self.free_desc, self.num_free = 0, size
        self.num_added = 0
        self.cb_disabled = False
        # first descriptor index -> (token, ndesc, in_len)
        self.inflight: dict[int, tuple[Any, int, int]] = {}
        for a, n in zip((desc, driver, device), split_sizes(size)):
            mem.write(a, bytes(n))
        self.avail_idx = self.last_used = start_index & U16
        self.w16(driver + 2, self.avail_idx)
        self.w16(device + 2, self.avail_idx)

    def add(self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]], token: Any) -> bool:
        sg = [(a, ln, 0) for a, ln in out] + [(a, ln, WRITE) for a, ln in in_]
        n = len(sg)
        ind = self.pool is not None and 1 < n <= self.ind_max
        need = 1 if ind else n
        if self.num_free < need:
            return False
        desc_idx = self.free_desc
        if ind:
            table = self.pool + desc_idx * self.ind_max * 16
            for k, (a, ln, f) in enumerate(sg):
                last = k == n - 1
                self.wdesc(table + 16 * k, a, ln, f | (0 if last else NEXT), 0 if last else k + 1)
            self.wdesc(self.desc_addr + 16 * desc_idx, table, 16 * n, INDIRECT, 0)
            self.free_desc = self.next[desc_idx]
        else:
            i = desc_idx
            for k, (a, ln, f) in enumerate(sg):
                last = k == n - 1
                self.wdesc(self.desc_addr + 16 * i, a, ln, f | (0 if last else NEXT),
                           0 if last else self.next[i])
                i = self.next[i]
            self.free_desc = i
        self.num_free -= need
        self.inflight[desc_idx] = (token, need, sum(ln for _, ln in in_))
        self.w16(self.avail + 4 + 2 * (self.avail_idx % self.q), desc_idx)
        self.avail_idx = (self.avail_idx + 1) & U16
        self.num_added = min(self.num_added + 1, U16)
        self.w16(self.avail + 2, self.avail_idx)
        return True

    def kick_prepare(self) -> bool:
        if self.event_idx:
            ev = self.u16(self.used + 4 + 8 * self.q)
            need = self.num_added >= 0x8000 or need_event(ev, self.avail_idx, self.avail_idx - self.num_added)
        else:
            need = not self.u16(self.used) & NO_NOTIFY
        self.num_added = 0
        return need

    def get_used(self) -> tuple[Any, int] | None:
        idx = self.u16(self.used + 2)
        if ((idx - self.last_used) & U16) > ((self.avail_idx - self.last_used) & U16):
            raise RefBroken("used index jump")
        if idx == self.last_used:
            return None
        e = self.used + 4 + 8 * (self.last_used % self.q)
        desc_idx, ln = self.u32(e), self.u32(e + 4)
        if desc_idx not in self.inflight:
            raise RefBroken(f"used id {desc_idx} not in flight")
        token, nd, in_len = self.inflight[desc_idx]
        if ln > in_len:
            raise RefBroken("used len too large")
        del self.inflight[desc_idx]
        tail = desc_idx
        for _ in range(nd - 1):
            tail = self.next[tail]
        self.next[tail] = self.free_desc
        self.free_desc = desc_idx
        self.num_free += nd
        self.last_used = (self.last_used + 1) & U16
        if self.event_idx and not self.cb_disabled:
            self.w16(self.avail + 4 + 2 * self.q, self.last_used)
        return token, ln

    def has_used(self) -> bool:
        return self.u16(self.used + 2) != self.last_used

    def enable_callbacks(self) -> bool:
        self.cb_disabled = False
        if self.event_idx:
            self.w16(self.avail + 4 + 2 * self.q, self.last_used)
        else:
            self.w16(self.avail, 0)
        return self.has_used()

    def disable_callbacks(self) -> None:
        self.cb_disabled = True
        if not self.event_idx:
            self.w16(self.avail, NO_INTERRUPT)


class RefSplitDevice(_Mem):
    def __init__(self, mem: Memory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool = False, indirect: bool = False, start_index: int = 0) -> None:
        super().__init__(mem)
        self.q, self.desc_addr, self.avail, self.used = size, desc, driver, device
        self.event_idx, self.indirect = event_idx, indirect
        self.next_avail = self.next_used = start_index & U16
        self.signalled: int | None = None
        self.broken: str | None = None

    def _walk(self, desc_idx: int) -> RefChain:
        if desc_idx >= self.q:
            raise RefBroken("head descriptor index out of range")
        chain = RefChain(desc_idx)
        table, tsize, i, nested, count = self.desc_addr, self.q, desc_idx, False, 0
        while True:
            addr, ln, flags, nxt = self.desc(table + 16 * i)
            if flags & INDIRECT:
                if nested:
                    raise RefBroken("nested indirect")
                if flags & NEXT:
                    raise RefBroken("NEXT with INDIRECT")
                if not self.indirect:
                    raise RefBroken("indirect not negotiated")
                if ln == 0 or ln % 16 or ln // 16 > self.q:
                    raise RefBroken("bad indirect length")
                _check_buffer(self.mem, addr, ln)
                table, tsize, i, nested = addr, ln // 16, 0, True
                continue
            if count >= self.q:
                raise RefBroken("chain longer than queue")
            _check_buffer(self.mem, addr, ln)
            if flags & WRITE:
                chain.writable.append((addr, ln))
            else:
                if chain.writable:
                    raise RefBroken("readable after writable")
                chain.readable.append((addr, ln))
            count += 1
            if sum(n for _, n in chain.writable) > 0xFFFFFFFF or sum(n for _, n in chain.readable) > 0xFFFFFFFF:
                raise RefBroken("length overflow")
            if not flags & NEXT:
                return chain
            i = nxt
            if i >= tsize:
                raise RefBroken("next out of range")

    def pop(self) -> RefChain | None:
        if self.broken:
            raise RefBroken(self.broken)
        try:
            idx = self.u16(self.avail + 2)
            if ((idx - self.next_used) & U16) > self.q:
                raise RefBroken("avail index jump")
            if idx == self.next_avail:
                return None
            desc_idx = self.u16(self.avail + 4 + 2 * (self.next_avail % self.q))
            chain = self._walk(desc_idx)
        except RefBroken as e:
            self.broken = e.reason
            raise
        self.next_avail = (self.next_avail + 1) & U16
        return chain

    def add_used(self, desc_idx: int, ln: int) -> None:
        e = self.used + 4 + 8 * (self.next_used % self.q)
        self.w32(e, desc_idx)
        self.w32(e + 4, ln)
        self.next_used = (self.next_used + 1) & U16
        self.w16(self.used + 2, self.next_used)

    def needs_notification(self) -> bool:
        if self.event_idx:
            ev = self.u16(self.avail + 4 + 2 * self.q)
            old, self.signalled = self.signalled, self.next_used
            return old is None or need_event(ev, self.next_used, old)
        return not self.u16(self.avail) & NO_INTERRUPT

    def enable_notification(self) -> bool:
        if self.event_idx:
            self.w16(self.used + 4 + 8 * self.q, self.next_avail)
        else:
            self.w16(self.used, 0)
        return self.u16(self.avail + 2) != self.next_avail

    def disable_notification(self) -> None:
        if not self.event_idx:
            self.w16(self.used, NO_NOTIFY)


# ---------------------------------------------------------------- packed ----

def _avail_ok(flags: int, wrap: int) -> bool:
    return bool(flags & AVAIL) == bool(wrap) and bool(flags & USED) != bool(wrap)


def _used_ok(flags: int, wrap: int) -> bool:
    return bool(flags & AVAIL) == bool(wrap) and bool(flags & USED) == bool(wrap)


class RefPackedDriver(_Mem):
    def __init__(self, mem: Memory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool = False, indirect: bool = False,
                 indirect_addr: int | None = None, indirect_max: int = 8) -> None:
        super().__init__(mem)
        self.q, self.desc_addr, self.drv_ev, self.dev_ev = size, desc, driver, device
        self.event_idx = event_idx
        self.ind_max = min(indirect_max, size)
        self.pool = indirect_addr if (indirect and indirect_addr is not None and indirect_max > 1) else None
        self.free_ids = list(range(size))  # stack top at index 0 (same order as the Cython list)
        self.num_free = size
        self.next_avail, self.avail_wrap = 0, 1
        self.last_used, self.used_wrap = 0, 1
        self.num_added = 0
        self.cb_disabled = False
        self.inflight: dict[int, tuple[Any, int, int]] = {}
        mem.write(desc, bytes(16 * size))
        mem.write(driver, bytes(4))
        mem.write(device, bytes(4))

    def _flags_for(self, wrap: int) -> int:
        return AVAIL if wrap else USED

    def add(self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]], token: Any) -> bool:
        sg = [(a, ln, 0) for a, ln in out] + [(a, ln, WRITE) for a, ln in in_]
        n = len(sg)
        ind = self.pool is not None and 1 < n <= self.ind_max
        need = 1 if ind else n
        if self.num_free < need or not self.free_ids:
            return False
        bid = self.free_ids.pop(0)
        head_pos, pos, w = self.next_avail, self.next_avail, self.avail_wrap
        head_flags = 0
        if ind:
            table = self.pool + bid * self.ind_max * 16
            for k, (a, ln, f) in enumerate(sg):
                self.wdesc(table + 16 * k, a, ln, 0, f)
            self.mem.write(self.desc_addr + 16 * pos, struct.pack("<QIH", table, 16 * n, bid))
            head_flags = INDIRECT | self._flags_for(w)
            pos += 1
            if pos == self.q:
                pos, w = 0, w ^ 1
        else:
            for k, (a, ln, f) in enumerate(sg):
                fl = f | (NEXT if k < n - 1 else 0) | self._flags_for(w)
                if k == 0:
                    head_flags = fl
                    self.mem.write(self.desc_addr + 16 * pos, struct.pack("<QIH", a, ln, bid))
                else:
                    self.wdesc(self.desc_addr + 16 * pos, a, ln, bid, fl)
                pos += 1
                if pos == self.q:
                    pos, w = 0, w ^ 1
        # the head's flags last: that makes the whole chain available
        self.w16(self.desc_addr + 16 * head_pos + 14, head_flags)
        self.next_avail, self.avail_wrap = pos, w
        self.num_free -= need
        self.num_added = min(self.num_added + need, U16)
        self.inflight[bid] = (token, need, sum(ln for _, ln in in_))
        return True

    def kick_prepare(self) -> bool:
        off_wrap, flags = self.u16(self.dev_ev), self.u16(self.dev_ev + 2) & 3
        if flags == EV_DISABLE:
            need = False
        elif flags != EV_DESC or not self.event_idx or self.num_added >= self.q:
            need = True
        else:
            event = off_wrap & 0x7FFF
            if (off_wrap >> 15) != self.avail_wrap:
                event -= self.q
            need = need_event(event & U16, self.next_avail, (self.next_avail - self.num_added) & U16)
        self.num_added = 0
        return need

    def get_used(self) -> tuple[Any, int] | None:
        a = self.desc_addr + 16 * self.last_used
        _, ln, bid, flags = self.desc(a)
        if not _used_ok(flags, self.used_wrap):
            return None
        if not self.inflight:
            raise RefBroken("used descriptor with nothing in flight")
        if bid not in self.inflight:
            raise RefBroken(f"used id {bid} not in flight")
        token, nd, in_len = self.inflight[bid]
        if ln > in_len:
            raise RefBroken("used len too large")
        del self.inflight[bid]
        self.last_used += nd
        if self.last_used >= self.q:
            self.last_used -= self.q
            self.used_wrap ^= 1
        self.num_free += nd
        self.free_ids.insert(0, bid)
        if self.event_idx and not self.cb_disabled:
            self._write_event(EV_DESC)
        return token, ln

    def _write_event(self, flags: int) -> None:
        self.w16(self.drv_ev, self.last_used | (self.used_wrap << 15) if flags == EV_DESC else 0)
        self.w16(self.drv_ev + 2, flags)

    def has_used(self) -> bool:
        return _used_ok(self.u16(self.desc_addr + 16 * self.last_used + 14), self.used_wrap)

    def enable_callbacks(self) -> bool:
        self.cb_disabled = False
        self._write_event(EV_DESC if self.event_idx else EV_ENABLE)
        return self.has_used()

    def disable_callbacks(self) -> None:
        self.cb_disabled = True
        self._write_event(EV_DISABLE)


class RefPackedDevice(_Mem):
    def __init__(self, mem: Memory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool = False, indirect: bool = False) -> None:
        super().__init__(mem)
        self.q, self.desc_addr, self.drv_ev, self.dev_ev = size, desc, driver, device
        self.event_idx, self.indirect = event_idx, indirect
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        self.ndesc: dict[int, int] = {}
        self.signalled: int | None = None
        self.used_since = 0
        self.broken: str | None = None

    def pop(self) -> RefChain | None:
        if self.broken:
            raise RefBroken(self.broken)
        try:
            return self._pop()
        except RefBroken as e:
            self.broken = e.reason
            raise

    def _pop(self) -> RefChain | None:
        pos, w = self.next_avail, self.avail_wrap
        addr, ln, bid, flags = self.desc(self.desc_addr + 16 * pos)
        if not _avail_ok(flags, w):
            return None
        chain = RefChain(-1)
        nring = 0
        while True:
            if nring:
                addr, ln, bid, flags = self.desc(self.desc_addr + 16 * pos)
                if not _avail_ok(flags, w):
                    raise RefBroken("wrap bits contradict")
            nring += 1
            if flags & INDIRECT:
                if flags & NEXT:
                    raise RefBroken("NEXT with INDIRECT")
                if not self.indirect:
                    raise RefBroken("indirect not negotiated")
                if ln == 0 or ln % 16 or ln // 16 > self.q:
                    raise RefBroken("bad indirect length")
                _check_buffer(self.mem, addr, ln)
                for k in range(ln // 16):
                    a2, l2, _, f2 = self.desc(addr + 16 * k)
                    if f2 & INDIRECT:
                        raise RefBroken("nested indirect")
                    self._add_seg(chain, a2, l2, f2)
                break
            self._add_seg(chain, addr, ln, flags)
            if not flags & NEXT:
                break
            if nring >= self.q:
                raise RefBroken("chain longer than queue")
            pos += 1
            if pos == self.q:
                pos, w = 0, w ^ 1
        if bid >= self.q:
            raise RefBroken("buffer id out of range")
        if bid in self.ndesc:
            raise RefBroken("buffer id in flight")
        if sum(self.ndesc.values()) + nring > self.q:
            raise RefBroken("too many descriptors")
        chain.head = bid
        self.ndesc[bid] = nring
        self.next_avail += nring
        if self.next_avail >= self.q:
            self.next_avail -= self.q
            self.avail_wrap ^= 1
        return chain

    def _add_seg(self, chain: RefChain, addr: int, ln: int, flags: int) -> None:
        if len(chain.readable) + len(chain.writable) >= self.q:
            raise RefBroken("chain longer than queue")
        _check_buffer(self.mem, addr, ln)
        if flags & WRITE:
            chain.writable.append((addr, ln))
        else:
            if chain.writable:
                raise RefBroken("readable after writable")
            chain.readable.append((addr, ln))
        if sum(n for _, n in chain.writable) > 0xFFFFFFFF or sum(n for _, n in chain.readable) > 0xFFFFFFFF:
            raise RefBroken("length overflow")

    def add_used(self, bid: int, ln: int) -> None:
        nd = self.ndesc.pop(bid)
        a = self.desc_addr + 16 * self.next_used
        self.w32(a + 8, ln)
        self.w16(a + 12, bid)
        self.w16(a + 14, ((AVAIL | USED) if self.used_wrap else 0) | (WRITE if ln else 0))
        self.used_since += nd
        self.next_used += nd
        if self.next_used >= self.q:
            self.next_used -= self.q
            self.used_wrap ^= 1

    def needs_notification(self) -> bool:
        off_wrap, flags = self.u16(self.drv_ev), self.u16(self.drv_ev + 2) & 3
        if flags == EV_DISABLE:
            notify = False
        elif flags != EV_DESC or not self.event_idx or self.signalled is None or self.used_since >= self.q:
            notify = True
        else:
            new, old = self.next_used, self.signalled
            if old > new or (old == new and self.used_since):
                old -= self.q
            event = off_wrap & 0x7FFF
            if (off_wrap >> 15) != self.used_wrap:
                event -= self.q
            notify = need_event(event & U16, new, old & U16)
        self.signalled, self.used_since = self.next_used, 0
        return notify

    def enable_notification(self) -> bool:
        if self.event_idx:
            self.w16(self.dev_ev, self.next_avail | (self.avail_wrap << 15))
            self.w16(self.dev_ev + 2, EV_DESC)
        else:
            self.w16(self.dev_ev, 0)
            self.w16(self.dev_ev + 2, EV_ENABLE)
        return _avail_ok(self.u16(self.desc_addr + 16 * self.next_avail + 14), self.avail_wrap)

    def disable_notification(self) -> None:
        self.w16(self.dev_ev, 0)
        self.w16(self.dev_ev + 2, EV_DISABLE)
