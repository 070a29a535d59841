"""A passive, read-only observer of a live AMP bus (both directions).

It never writes a byte and never rings a doorbell: it follows each
direction's producer index (Gen B: each side's queue head ``tail``; Gen A:
each block's producer word), copies the whole element array out with one
bulk read and validates the messages in that private copy.

Falling behind.  Indices wrap at the ring size N, so a producer that
advanced by N or more between two looks is not visible in its index alone.
Instead of printing what may be garbage, the observer reports Missed records:

* the copy is only trusted for messages the producer cannot have started to
  overwrite: the producer index is re-read *after* the copy, and a message
  more than N - 1 behind it may be torn (an exact count);
* the consumer's index may never be ahead of the producer's in our count: if
  it is, the producer went round unseen;
* slots the producer had no business writing since the last look (outside
  what it published and the one it may be filling) must hold the same bytes
  as then; if they changed and its index does not soon cover them (a producer
  may fill several slots before publishing them), it went round unseen.

After an unseen lap the slots still hold the newest messages, and those are
printed; the count of missed messages is then a lower bound
(``Missed.at_least``).  A lap that leaves the index looking like N - 1 new
messages, or that rewrites the comparable slots with identical bytes while
the consumer keeps pace, cannot be seen at all; the observer polls without
sleeping while traffic flows to keep that unlikely.

Restarts.  A side that shut down keeps its indices, and what it published
before saying so is still collected (one more look follows the look that saw
it go).  A side that restarts zeroes its slots and indices; a copy taken
meanwhile is never printed, and what went by unread is counted from the
consumer's index when the consumer still holds it.

Order: within one direction the ring order is the true order; across the two
directions a look only knows that a response follows its request, and
:func:`_merge` orders each look's two batches by that.

Memory order: the observer is a third reader.  Each producer index is read
with an acquire load (pairs with the producer's release store R1 in
``vmsgamp/_core/fifo.pyx``), so the slots it publishes are visible before they
are copied; the consumer index with an acquire load (pairs with R2); the
layout magic and queue-head status words with acquire loads (pair with R0
and R3).
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from vmsgamp._core.fifo import PLACEMENTS, read_layout, state_name, validate_layout
from vmsgamp._core.region import Region
from vmsgamp.errors import LayoutError
from vmsgamp.trace._pcapng import DIR_INBOUND, DIR_OUTBOUND

# Layout constants (csrc/vmamp_shmem.h, csrc/spsc_queue.h).
_LO_MAGIC = 0x4C4F
_QO_MAGIC = 0x514F
_STATE_MASK = 0x1F
_STATE_INIT = 0
_STATE_RUN = 2
_STATE_SHUTDOWN, _STATE_PEER_DEAD = 3, 4
_HOLDING = (_STATE_RUN, _STATE_SHUTDOWN, _STATE_PEER_DEAD)   # a side in these keeps its indices
_QH_MAGIC, _QH_STATUS, _QH_TAIL, _QH_HEAD = 0, 2, 4, 6
_UNKNOWN, _ABSENT = "unknown", "absent"   # the driver queue head at a look, when not a tuple
_SPSC_HEAD, _SPSC_TAIL, _SPSC_PACKETS, _SPSC_SLOTS, _SPSC_SLOT = 0, 64, 128, 62, 64
_HEADERS = {"g2": (8, 6), "g1": (6, 4)}   # header size, offset of msg_size


@dataclass(frozen=True)
class Seen:
    """One message as it sat in its slot: ``data`` is ``msg_size`` bytes, or the
    whole slot when ``msg_size`` was impossible (``size_ok`` False)."""

    time_ns: int
    direction: int
    data: bytes
    size_ok: bool = True


@dataclass(frozen=True)
class Missed:
    """Messages that went by unread (the ring was overwritten first)."""

    time_ns: int
    direction: int
    count: int
    at_least: bool
    reason: str


@dataclass(frozen=True)
class Notice:
    """A change of the bus itself: layout found, session up or down, a broken index."""

    time_ns: int
    text: str
    up: bool


class _Corrupt(Exception):
    pass


class _Ring:
    """One direction: where its slots and indices live, and how far we got.

    Counts (``*_total``) are messages since we started following the ring,
    reconstructed from index deltas (each taken modulo N)."""

    def __init__(self, region: Region, direction: int, elems: int, n: int, slot: int,
                 prod: int, cons: int, width: int, size_off: int, hdr: int):
        self.region = region
        self.direction = direction
        self.elems, self.n, self.slot = elems, n, slot
        self.prod, self.cons = prod, cons
        self.load = region.load16 if width == 2 else region.load32
        self.size_off, self.hdr = size_off, hdr
        region.check_range(elems, n * slot)
        self.last_p = self.last_c = 0
        self.p_total = self.c_total = self.obs_total = 0
        self.snap: bytes | None = None
        self.snap_from = 0      # messages >= this may have changed since the snapshot was taken
        self.p = self.c = 0

    _STATE = ("last_p", "last_c", "p_total", "c_total", "obs_total", "snap", "snap_from", "p", "c")

    def save(self) -> dict:
        return {name: getattr(self, name) for name in self._STATE}

    def restore(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def sample(self) -> None:
        """Phase 1: read the indices (consumer first, so it is never ahead)."""
        c = self.load(self.cons, "acquire")   # A2: pairs with the consumer's R2
        p = self.load(self.prod, "acquire")   # A1: pairs with the producer's R1
        if p >= self.n or c >= self.n:
            raise _Corrupt(f"{'producer' if p >= self.n else 'consumer'} index "
                           f"{p if p >= self.n else c} out of range (ring of {self.n})")
        self.p, self.c = p, c

    def follow(self, from_start: bool) -> None:
        """Start following: from index 0 (a session we saw begin) or from now."""
        self.sample()
        if from_start:
            self.last_p = self.last_c = 0
            self.p_total = self.c_total = self.obs_total = 0
        else:
            self.last_p, self.last_c = self.p, self.c
            self.c_total = 0
            self.p_total = self.obs_total = (self.p - self.c) % self.n
        # The first look compares against this copy (the producer may be
        # writing message p_total meanwhile: collect() allows for it).
        self.snap = self.region.read(self.elems, self.n * self.slot)
        self.snap_from = self.p_total

    def collect(self, now: int, out: list, consumer_ok: bool = True) -> int:
        """Phase 2: copy the slots out, check them, append Seen/Missed.
        ``consumer_ok`` False: the consumer is restarting and its index means
        nothing (no lap check against it)."""
        n, sz = self.n, self.slot
        self.p_total += (self.p - self.last_p) % n
        if consumer_ok:
            self.c_total += (self.c - self.last_c) % n
        else:
            self.c_total = self.p_total - (self.p - self.c) % n
        self.last_p, self.last_c = self.p, self.c
        at_least = False
        reason = ""
        if self.c_total > self.p_total:
            # The consumer cannot pass the producer: the producer went round unseen.
            self.p_total += -(-(self.c_total - self.p_total) // n) * n
            at_least, reason = True, "the producer went round the ring between two looks"
        ring = self.region.read(self.elems, n * sz)           # one bulk copy into private memory
        p2 = self.load(self.prod, "acquire")                  # A1 again: re-check after the copy
        if p2 >= n:
            raise _Corrupt(f"producer index {p2} out of range (ring of {n})")
        p2_total = self.p_total + (p2 - self.p) % n
        lapped = False
        if self.snap is not None and not at_least:
            lapped = self._went_round(ring, p2_total)
        self.snap = ring
        self.snap_from = self.p_total
        first_valid = p2_total - (n - 1)        # older slots may be torn by the producer
        missed = 0
        if self.obs_total < first_valid:
            missed = first_valid - self.obs_total
            self.obs_total = first_valid
            reason = reason or "the slots were overwritten before they were read"
        if missed or at_least:
            out.append(Missed(now, self.direction, missed, at_least, reason))
        if lapped:
            # Counted as one lap; what follows is still the newest messages
            # (the slots hold them whatever the number of laps).
            out.append(Missed(now, self.direction, n, True,
                              "slots changed that the producer had not published: it went round unseen"))
        got = 0
        unpack = struct.unpack_from
        for m in range(self.obs_total, self.p_total):
            base = (m % n) * sz
            msz = unpack("<H", ring, base + self.size_off)[0]
            if self.hdr <= msz <= sz:
                out.append(Seen(now, self.direction, ring[base:base + msz], True))
            else:
                out.append(Seen(now, self.direction, ring[base:base + sz], False))
            got += 1
        self.obs_total = max(self.obs_total, self.p_total)
        return got

    def _went_round(self, ring: bytes, p2_total: int) -> bool:
        """Did the producer go round since the last snapshot?  Slots of messages
        [snap_from, p2_total] may have changed since then (p2_total: the one it
        may be writing now); any other slot that changed was rewritten unseen,
        unless the producer fills several slots before it publishes them (a
        burst): then its index soon covers them, so look at it again."""
        n, sz = self.n, self.slot
        for _ in range(64):
            if p2_total - self.snap_from >= n - 1:
                return False                 # every slot may have changed: nothing to compare
            if _same_outside(self.snap, ring, (p2_total + 1) % n, self.snap_from % n, sz):
                return False
            p3 = self.load(self.prod, "acquire")        # A1: a burst being published?
            if p3 >= n:
                raise _Corrupt(f"producer index {p3} out of range (ring of {n})")
            p2_total = self.p_total + (p3 - self.p) % n
        return True


def _pair_key(rec: Seen | Missed, g2: bool) -> tuple[bool, tuple | None, tuple | None]:
    """(is a response, exact key, key without token) from a message header."""
    if not isinstance(rec, Seen) or not rec.size_ok:
        return False, None, None
    d = rec.data
    mtype, msg_id, dev = d[0], d[1], d[2] | d[3] << 8
    tok = d[4] | d[5] << 8 if g2 else None
    loose = (mtype & 2, msg_id, dev if not mtype & 2 else 0)
    return bool(mtype & 1), loose + (tok,), loose


def _merge(outbound: list, inbound: list, g2: bool) -> list:
    """One look's two batches in an order that respects cause and effect.

    Each direction's order is the true one; across directions only this is
    known: a response comes after its request.  So take the device -> driver
    head unless it is a response whose request is still waiting in the other
    batch, else the driver -> device head under the same rule.  A response
    answers an emitted, unanswered request with its key first (G1 has no
    token: the oldest one of its kind); a token-0 bus response, as QEMU sends
    them, matches by msg_id alone."""
    if not outbound or not inbound:
        return outbound + inbound
    keys = {id(r): _pair_key(r, g2) for r in outbound + inbound}
    open_exact: dict[tuple, int] = {}
    open_loose: dict[tuple, int] = {}

    def emit(rec, merged: list) -> None:
        is_resp, exact, loose = keys[id(rec)]
        if exact is not None:
            if not is_resp:
                open_exact[exact] = open_exact.get(exact, 0) + 1
                open_loose[loose] = open_loose.get(loose, 0) + 1
            elif open_exact.get(exact):
                open_exact[exact] -= 1
                open_loose[loose] -= 1
            elif exact[3] == 0 and open_loose.get(loose):
                open_loose[loose] -= 1
        merged.append(rec)

    def waits(rec, other: list, start: int) -> bool:
        is_resp, exact, loose = keys[id(rec)]
        if not is_resp or open_exact.get(exact) or (exact[3] == 0 and open_loose.get(loose)):
            return False
        for r in other[start:]:
            r_resp, r_exact, r_loose = keys[id(r)]
            if r_exact is not None and not r_resp and (r_exact == exact or (exact[3] == 0 and r_loose == loose)):
                return True
        return False

    merged: list = []
    i = j = 0
    while i < len(outbound) or j < len(inbound):
        if j < len(inbound) and (i == len(outbound) or not waits(inbound[j], outbound, i)):
            emit(inbound[j], merged)
            j += 1
        elif i < len(outbound) and (j == len(inbound) or not waits(outbound[i], inbound, j)):
            emit(outbound[i], merged)
            i += 1
        else:       # each waits for the other: impossible for sane traffic
            emit(outbound[i], merged)
            i += 1
    return merged


def _same_outside(old: bytes, new: bytes, lo: int, hi: int, sz: int) -> bool:
    """Slots [lo, hi) (cyclic; lo == hi means none) equal in both copies."""
    if lo == hi:
        return True
    mo, mn = memoryview(old), memoryview(new)
    if lo < hi:
        return mo[lo * sz:hi * sz] == mn[lo * sz:hi * sz]
    return mo[lo * sz:] == mn[lo * sz:] and mo[:hi * sz] == mn[:hi * sz]


class Observer:
    """Follow both directions of the AMP bus at ``offset`` in ``region``.

    ``poll()`` returns what happened since the last call (Seen, Missed and
    Notice records; each response after its request); it never blocks.  The
    layout may appear late and the bus may restart any number of times (Gen
    B: a new handshake; Gen A: both blocks zeroed)."""

    def __init__(self, region: Region, *, layout: str = "b", offset: int = 0, window: int = 8192,
                 placement: str = "0/4k", profile: str = "g2"):
        if layout not in ("a", "b"):
            raise ValueError(f"layout must be 'b' or 'a', not {layout!r}")
        if profile not in _HEADERS:
            raise ValueError(f"profile must be 'g2' or 'g1', not {profile!r}")
        if layout == "a" and placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, not {placement!r}")
        self.region = region
        self.layout = layout
        self.offset = offset
        self.window = window
        self.placement = placement
        self.profile = profile
        self.hdr, self.size_off = _HEADERS[profile]
        self.rings: list[_Ring] = []       # [driver -> device, device -> driver]
        self.up = False
        self.sessions = 0
        self.seen = 0
        self.missed = 0
        self.missed_at_least = False
        self._waiting: str | None = None   # why we are not following, once said
        # The driver's queue head at our last look while waiting: _UNKNOWN (no
        # look since we started or since a session we followed), _ABSENT (no
        # driver yet), or (state, producer index, consumer index).
        self._drv_seen: tuple[int, int, int] | str = _UNKNOWN
        self._saw_down = False             # a session that starts now starts at index 0
        self._layout_key: tuple | None = None
        self._next_layout_check = 0.0
        if layout == "a":
            self._attach_a()

    # ---- attaching -----------------------------------------------------------------
    def _attach_a(self) -> None:
        drv_off, dev_off = PLACEMENTS[self.placement]
        rings = []
        for direction, off in ((DIR_OUTBOUND, drv_off), (DIR_INBOUND, dev_off)):
            blk = self.offset + off
            rings.append(_Ring(self.region, direction, blk + _SPSC_PACKETS, _SPSC_SLOTS, _SPSC_SLOT,
                               blk + _SPSC_HEAD, blk + _SPSC_TAIL, 4, self.size_off, self.hdr))
        self.rings = rings

    def _attach_b(self, lay: dict[str, int]) -> None:
        o = self.offset
        n, sz = lay["num_queue_elements"], lay["size_queue_elements"]
        dev_qh, drv_qh = o + lay["dev_queue_head_offset"], o + lay["drv_queue_head_offset"]
        self._dev_qh, self._drv_qh = dev_qh, drv_qh
        self.rings = [
            # driver -> device: the driver's elements, its tail; the device's head consumes.
            _Ring(self.region, DIR_OUTBOUND, o + lay["drv_queue_elements_offset"], n, sz,
                  drv_qh + _QH_TAIL, dev_qh + _QH_HEAD, 2, self.size_off, self.hdr),
            _Ring(self.region, DIR_INBOUND, o + lay["dev_queue_elements_offset"], n, sz,
                  dev_qh + _QH_TAIL, drv_qh + _QH_HEAD, 2, self.size_off, self.hdr),
        ]

    def _read_layout_b(self) -> dict[str, int] | str:
        """The validated layout, or why there is none yet."""
        if self.offset + 64 > self.region.size:
            return f"the region ({self.region.size} bytes) ends before offset {self.offset:#x} + 64"
        if self.region.load16(self.offset, "acquire") != _LO_MAGIC:   # A0: pairs with the device's R0
            return "waiting for the device side to write the layout"
        try:
            return validate_layout(read_layout(self.region, self.offset),
                                   min(self.window, self.region.size - self.offset))
        except LayoutError as e:
            if e.field == "magic":      # rewritten since we looked: the device is restarting
                return "waiting for the device side to write the layout"
            return str(e)

    # ---- one look ------------------------------------------------------------------
    def poll(self, *, final: bool = False) -> list:
        """What crossed the bus since the last look.  ``final``: the last look
        before the caller stops, taken even within the waiting rate limit."""
        if final:
            self._next_layout_check = 0.0
        now = time.time_ns()
        out: list = []
        if self.layout == "b":
            self._poll_b(now, out)
        else:
            self._poll_a(now, out)
        return out

    def _notice(self, now: int, out: list, text: str, up: bool) -> None:
        """Say when the bus comes up or goes down, and once why we wait; a
        device re-running its handshake while it waits for a driver would
        otherwise repeat itself every quarter second."""
        if up or self._waiting is None:
            out.append(Notice(now, text, up))
        self._waiting = None if up else text

    def _down(self, now: int, out: list, text: str) -> None:
        self.up = False
        self._saw_down = True
        out.append(Notice(now, text, False))
        self._waiting = text

    def _poll_b(self, now: int, out: list) -> None:
        if not self.up:
            # Layout checks cost a dozen loads: at most every 2 ms while waiting.
            t = time.monotonic()
            if t < self._next_layout_check:
                return
            self._next_layout_check = t + 0.002
            lay = self._read_layout_b()
            if isinstance(lay, str):
                self._saw_down = True
                self._notice(now, out, lay, False)
                return
            key = tuple(sorted(lay.items()))
            if key != self._layout_key:
                self._attach_b(lay)
                self._layout_key = key
            st = self._states()
            if st is None:
                self._saw_down = True
                self._unseen_session(now, out)
                self._notice(now, out, "waiting for both sides to reach RUN", False)
                return
            try:
                for ring in self.rings:
                    ring.follow(from_start=self._saw_down)
            except _Corrupt as e:
                self._down(now, out, f"bus broken: {e}")
                return
            self.up = True
            self.sessions += 1
            self._drv_seen = _UNKNOWN
            n = self.rings[0].n
            self._notice(now, out, f"bus up: layout B, {n} slots of {self.rings[0].slot} bytes each way"
                         + ("" if self._saw_down else " (joined a running session)"), True)
            return
        # Status words first (A3): a side that shuts down publishes its last
        # messages before it changes state, so they are still collected; and
        # once a look ends with a side gone, another look catches what it
        # published between our index read and its state change.
        heads = self._heads()
        for _look in range(3):
            trust = self._trusted(heads)
            if not any(trust):
                break
            holding = self._holding(heads)
            saved = [ring.save() for ring in self.rings]
            batches, broken = self._collect(now, trust, holding)
            after = self._heads()
            still, held = self._trusted(after), self._holding(after)
            for k, batch in enumerate(batches):
                if not trust[k]:
                    continue
                if holding[k] and not held[k]:
                    # The consumer restarted under our copy: its index (used to
                    # spot laps) meant nothing.  Forget this look at the ring;
                    # the next one reads it without the consumer.
                    self.rings[k].restore(saved[k])
                    batches[k] = []
                elif not still[k] or self._restarting(batch, after, k):
                    # The producer restarted (it zeroes its indices and slots): the
                    # copy means nothing, never print it.  What went by unread is
                    # at least what the consumer took since our last look, if the
                    # consumer still holds its index.
                    batches[k] = [self._lost(now, k, saved[k]["obs_total"] if held[k] else None)]
            got = _merge(batches[0], batches[1], self.hdr == 8)
            self._account(got)
            out.extend(got)
            if broken:
                self._down(now, out, broken)
                return
            if self._running(after):
                return
            heads = after
        self._down(now, out, self._why(heads))

    # Which ring can still be read.  The driver -> device ring while the driver
    # holds its indices (RUN, or SHUTDOWN/PEER_DEAD after RUN: a restarting
    # driver zeroes its slots before it says INIT).  The device -> driver ring
    # while the layout is in place and the device is RUN, gone, or back in INIT
    # after its peer left (its indices stay until it rewrites the layout, and
    # it clears the layout magic first).
    def _heads(self) -> tuple[int, int, int]:
        r = self.region
        magic = r.load16(self.offset, "acquire")                       # A0
        dev_st = r.load16(self._dev_qh + _QH_STATUS, "acquire")  # A3
        drv_st = r.load16(self._drv_qh + _QH_STATUS, "acquire")  # A3
        return magic, dev_st, drv_st

    @staticmethod
    def _trusted(heads: tuple[int, int, int]) -> list[bool]:
        magic, dev_st, drv_st = heads
        return [(drv_st & _STATE_MASK) in _HOLDING,
                magic == _LO_MAGIC and (dev_st & _STATE_MASK) in _HOLDING + (_STATE_INIT,)]

    @staticmethod
    def _holding(heads: tuple[int, int, int]) -> list[bool]:
        """Whether each ring's consumer index still means something (a device
        back in INIT may already have zeroed its queue head)."""
        magic, dev_st, drv_st = heads
        return [magic == _LO_MAGIC and (dev_st & _STATE_MASK) in _HOLDING,
                (drv_st & _STATE_MASK) in _HOLDING]

    @staticmethod
    def _running(heads: tuple[int, int, int]) -> bool:
        magic, dev_st, drv_st = heads
        return magic == _LO_MAGIC and (dev_st & _STATE_MASK) == _STATE_RUN == (drv_st & _STATE_MASK)

    @staticmethod
    def _why(heads: tuple[int, int, int]) -> str:
        magic, dev_st, drv_st = heads
        if magic != _LO_MAGIC:
            return "bus down: the device side is rewriting the layout"
        return f"bus down: device {state_name(dev_st)}, driver {state_name(drv_st)}"

    def _lost(self, now: int, k: int, seen_until: int | None) -> Missed | Notice:
        ring = self.rings[k]
        side = ("driver", "device")[k]
        if seen_until is not None:
            taken = (ring.c - seen_until) % ring.n
            if taken:
                return Missed(now, ring.direction, taken, True,
                              f"the {side} side restarted and cleared its ring before they were read")
        return Notice(now, f"the {side} side restarted; what it sent last may be missing", False)

    def _restarting(self, batch: list, heads: tuple[int, int, int], k: int) -> bool:
        """A producer that is not RUN does not go round its ring: if its slots
        changed behind its index, or show all zeros, it is clearing them for a
        new session."""
        st = heads[2] if k == 0 else heads[1]
        if (st & _STATE_MASK) == _STATE_RUN:
            return False
        return any(isinstance(rec, Missed) or (not rec.size_ok and not any(rec.data)) for rec in batch)

    def _unseen_session(self, now: int, out: list) -> None:
        """A whole session can come and go between two looks (a short one on a
        busy machine).  The driver's queue head gives it away: it is now in
        SHUTDOWN/PEER_DEAD, and at our last look there was no driver, or one in
        another state, or one shut down with other indices (a new session
        zeroes them).  Its indices count, modulo the ring, what it sent and
        took: a lower bound.  Not seen: a session that ended with the very
        indices of the stale one before it."""
        r = self.region
        magic = r.load16(self._drv_qh + _QH_MAGIC, "acquire")
        state = r.load16(self._drv_qh + _QH_STATUS, "acquire") & _STATE_MASK   # A3
        sent = r.load16(self._drv_qh + _QH_TAIL, "acquire")   # A1: its producer index
        took = r.load16(self._drv_qh + _QH_HEAD, "acquire")   # A2: its consumer index
        cur: tuple[int, int, int] | str = (state, sent, took) if magic == _QO_MAGIC else _ABSENT
        prev, self._drv_seen = self._drv_seen, cur
        gone = magic == _QO_MAGIC and state in (_STATE_SHUTDOWN, _STATE_PEER_DEAD)
        if not gone or prev == _UNKNOWN:
            return
        if isinstance(prev, tuple) and prev[0] in (_STATE_SHUTDOWN, _STATE_PEER_DEAD) and prev[1:] == (sent, took):
            return                     # the same ended session as last time
        reason = "a whole session went by between two looks"
        for direction, count in ((DIR_OUTBOUND, sent), (DIR_INBOUND, took)):
            if 0 < count < self.rings[0].n:
                out.append(Missed(now, direction, count, True, reason))
                self.missed += count
                self.missed_at_least = True

    def _states(self) -> tuple[int, int] | None:
        r = self.region
        dev_m, drv_m = r.load16(self._dev_qh + _QH_MAGIC, "acquire"), r.load16(self._drv_qh + _QH_MAGIC, "acquire")
        dev_st = r.load16(self._dev_qh + _QH_STATUS, "acquire")
        drv_st = r.load16(self._drv_qh + _QH_STATUS, "acquire")
        if dev_m != _QO_MAGIC or drv_m != _QO_MAGIC:
            return None
        if (dev_st & _STATE_MASK) != _STATE_RUN or (drv_st & _STATE_MASK) != _STATE_RUN:
            return None
        return dev_st, drv_st

    def _poll_a(self, now: int, out: list) -> None:
        if not self.up:
            try:
                for ring in self.rings:
                    ring.follow(from_start=self._saw_down)
            except _Corrupt as e:
                self._saw_down = True
                self._notice(now, out, f"bus broken: {e}", False)
                return
            self.up = True
            self.sessions += 1
            self._notice(now, out, f"following layout A ({self.placement}), 62 slots of 64 bytes each way", True)
            return
        # Gen A has no handshake: a reset zeroes both blocks, indices and slots.
        try:
            zeroed = self._zeroed()
            if zeroed and any(ring.p_total or ring.c_total for ring in self.rings):
                for ring in self.rings:
                    ring.follow(from_start=True)
                out.append(Notice(now, "queues reset (both blocks zeroed)", True))
        except _Corrupt as e:
            self._down(now, out, f"bus broken: {e}")
            return
        if not zeroed:
            batches, broken = self._collect(now)
            got = _merge(batches[0], batches[1], self.hdr == 8)
            self._account(got)
            out.extend(got)
            if broken:
                self._down(now, out, broken)

    def _zeroed(self) -> bool:
        for ring in self.rings:
            ring.sample()
            if ring.p or ring.c:
                return False
        return all(not any(self.region.read(ring.elems, ring.n * ring.slot)) for ring in self.rings)

    def _collect(self, now: int, use: list[bool] | None = None,
                 consumer_ok: list[bool] | None = None) -> tuple[list[list], str | None]:
        """Each direction's new records (not yet counted), or why the bus is
        broken.  ``use``: which rings to read."""
        rings = self.rings
        use = use or [True, True]
        consumer_ok = consumer_ok or [True, True]
        batches: list[list] = [[], []]
        try:
            # device -> driver indices first: a response seen there was caused by a
            # request published before the driver -> device index is read.
            for k in (1, 0):
                if use[k]:
                    rings[k].sample()
            for k in (0, 1):
                if use[k]:
                    rings[k].collect(now, batches[k], consumer_ok[k])
        except _Corrupt as e:
            return batches, f"bus broken: {e}"
        return batches, None

    def _account(self, recs: list) -> None:
        for rec in recs:
            if isinstance(rec, Missed):
                self.missed += rec.count
                self.missed_at_least |= rec.at_least
            elif isinstance(rec, Seen):
                self.seen += 1
