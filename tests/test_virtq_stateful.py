"""Hypothesis stateful tests: Cython driver + device against the pure-Python
reference driver + device and an abstract model.

Two systems get the same operations: X = SplitQueueDriver/SplitQueue (or the
packed pair) over one region, Y = the virtq_model pair over another region
with the same layout.  Every observable result must agree, the ring areas
must stay byte-identical, and an abstract model checks FIFO order, tokens,
lengths, data, and that no notification is ever lost (a side that said it
would sleep is always woken by the peer's next publish).
"""
from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.region import Region
from vmsgamp._core.virtq import (
    PackedQueue, PackedQueueDriver, QueueState, SplitQueue, SplitQueueDriver,
)
from vmsgamp.testing.virtq_model import RefPackedDevice, RefPackedDriver, RefSplitDevice, RefSplitDriver

BUF = 64          # bytes per buffer slot
NSLOTS = 64
REGION = 1 << 16


def _system(fmt, size, event_idx, indirect, start):
    """Identical layouts in two regions: (cy_drv, cy_dev, ref_drv, ref_dev, areas, regions)."""
    rx, ry = Region.memfd(REGION, bus_base=0x4000_0000), Region.memfd(REGION, bus_base=0x4000_0000)
    ax = AddressSpace.identity(rx)
    ay = AddressSpace.identity(ry)
    al = RegionAllocator(rx)
    if fmt == "split":
        cdrv = SplitQueueDriver.create(al, size, aspace=ax, event_idx=event_idx, indirect=indirect,
                                       indirect_max=4, start_index=start)
        cdev = SplitQueue.from_state(ax, QueueState("split", size, cdrv.desc_addr, cdrv.driver_addr,
                                                    cdrv.device_addr, event_idx, indirect, start, start))
    else:
        cdrv = PackedQueueDriver.create(al, size, aspace=ax, event_idx=event_idx, indirect=indirect,
                                        indirect_max=4)
        cdev = PackedQueue(ax, size, cdrv.desc_addr, cdrv.driver_addr, cdrv.device_addr,
                           event_idx=event_idx, indirect=indirect)
    pool = cdrv.indirect_addr
    assert (pool is not None) == indirect
    areas = [(cdrv.desc_addr, 16 * size), (cdrv.driver_addr, 6 + 2 * size if fmt == "split" else 4),
             (cdrv.device_addr, 6 + 8 * size if fmt == "split" else 4)]
    if indirect:
        areas.append((pool, size * min(4, size) * 16))
    slots_base = al.alloc(NSLOTS * BUF, 64)
    if fmt == "split":
        rdrv = RefSplitDriver(ay, size, cdrv.desc_addr, cdrv.driver_addr, cdrv.device_addr,
                              event_idx=event_idx, indirect=indirect,
                              indirect_addr=pool if indirect else None, indirect_max=4, start_index=start)
        rdev = RefSplitDevice(ay, size, cdrv.desc_addr, cdrv.driver_addr, cdrv.device_addr,
                              event_idx=event_idx, indirect=indirect, start_index=start)
    else:
        rdrv = RefPackedDriver(ay, size, cdrv.desc_addr, cdrv.driver_addr, cdrv.device_addr,
                               event_idx=event_idx, indirect=indirect,
                               indirect_addr=pool if indirect else None, indirect_max=4)
        rdev = RefPackedDevice(ay, size, cdrv.desc_addr, cdrv.driver_addr, cdrv.device_addr,
                               event_idx=event_idx, indirect=indirect)
    return cdrv, cdev, rdrv, rdev, areas, slots_base, (ax, ay), (rx, ry)


class VirtqMachine(RuleBasedStateMachine):
    @initialize(fmt=st.sampled_from(["split", "packed"]), size_exp=st.integers(1, 3),
                odd=st.booleans(), event_idx=st.booleans(), indirect=st.booleans(),
                near_wrap=st.booleans())
    def setup(self, fmt, size_exp, odd, event_idx, indirect, near_wrap):
        size = 1 << size_exp
        if fmt == "packed" and odd:
            size += 1        # packed sizes need not be powers of two
        start = (0x10000 - 3 * size) if (near_wrap and fmt == "split") else 0
        (self.cdrv, self.cdev, self.rdrv, self.rdev, self.areas, self.slots, self.aspaces,
         self.regions) = _system(fmt, size, event_idx, indirect, start)
        self.fmt, self.size = fmt, size
        self.free_slots = list(range(NSLOTS))
        self.seq = 0
        self.avail = []        # model: chains published, not popped (FIFO)
        self.popped = []       # popped, not used: (token, cy_chain, ref_chain, spec)
        self.used = []         # used, not collected: (token, len, data)
        self.dev_asleep = False
        self.drv_asleep = False
        self.added_while_dev_asleep = False
        self.used_while_drv_asleep = False

    def _both(self, f_cy, f_ref):
        a, b = f_cy(), f_ref()
        assert a == b, (a, b)
        return a

    # ---- driver ----

    @rule(out=st.lists(st.integers(0, BUF), min_size=0, max_size=3),
          inn=st.lists(st.integers(1, BUF), min_size=0, max_size=3))
    def add(self, out, inn):
        if not out and not inn:
            out = [8]
        nseg = len(out) + len(inn)
        if nseg > len(self.free_slots) or nseg > self.size:
            return
        slots = self.free_slots[-nseg:]
        tok = self.seq
        self.seq += 1
        outs, ins, payload = [], [], b""
        for s, ln in zip(slots, out):
            data = bytes((tok * 7 + s + i) & 0xFF for i in range(ln))
            a = self.slots + s * BUF
            for asp in self.aspaces:
                asp.write(a, data)
            outs.append((a, ln))
            payload += data
        for s, ln in zip(slots[len(out):], inn):
            ins.append((self.slots + s * BUF, ln))
        ok = self._both(lambda: self.cdrv.add(outs, ins, tok), lambda: self.rdrv.add(outs, ins, tok))
        if ok:
            del self.free_slots[-nseg:]
            self.avail.append((tok, outs, ins, payload, slots))
            if self.dev_asleep:
                self.added_while_dev_asleep = True

    @rule()
    def kick(self):
        k = self._both(self.cdrv.kick_prepare, self.rdrv.kick_prepare)
        if self.dev_asleep and self.added_while_dev_asleep:
            assert k, "lost wake-up: the device sleeps but the driver does not kick"
        if k:
            self.dev_asleep = False
            self.added_while_dev_asleep = False

    @precondition(lambda self: not self.drv_asleep)
    @rule()
    def get_used(self):
        r = self._both(self.cdrv.get_used, self.rdrv.get_used)
        if r is None:
            assert not self.used
            return
        tok, ln = r
        etok, eln, edata, slots, ins = self.used.pop(0)
        assert (tok, ln) == (etok, eln)
        got = b"".join(self.aspaces[0].read(a, n) for a, n in ins)[:ln]
        assert got == edata
        self.free_slots.extend(slots)

    @precondition(lambda self: not self.drv_asleep)
    @rule()
    def disable_cb(self):
        self._both(self.cdrv.disable_callbacks, self.rdrv.disable_callbacks)

    @precondition(lambda self: not self.drv_asleep)
    @rule(sleep=st.booleans())
    def enable_cb(self, sleep):
        pending = self._both(self.cdrv.enable_callbacks, self.rdrv.enable_callbacks)
        assert pending == bool(self.used)
        if sleep and not pending:
            self.drv_asleep = True
            self.used_while_drv_asleep = False

    # ---- device ----

    @precondition(lambda self: not self.dev_asleep)
    @rule()
    def pop(self):
        c = self.cdev.pop()
        r = self.rdev.pop()
        if c is None:
            assert r is None and not self.avail
            return
        tok, outs, ins, payload, slots = self.avail.pop(0)
        assert r is not None and c.head == r.head
        assert c.segments == [(a, n, False) for a, n in r.readable] + [(a, n, True) for a, n in r.writable]
        assert c.segments == [(a, n, False) for a, n in outs] + [(a, n, True) for a, n in ins]
        assert c.read() == payload
        self.popped.append((tok, c, r, ins, payload, slots))

    @precondition(lambda self: not self.dev_asleep and self.popped)
    @rule(which=st.integers(0, 100), notify=st.booleans(), fill=st.integers(0, 255))
    def use(self, which, notify, fill):
        tok, c, r, ins, payload, slots = self.popped.pop(which % len(self.popped))
        cap = c.writable_len
        data = (payload + bytes([fill]) * cap)[:cap]
        n = c.write(data)
        off = 0
        for a, ln in r.writable:
            self.aspaces[1].write(a, data[off:off + ln])
            off += ln
        self.cdev.add_used(c.head, n)
        self.rdev.add_used(r.head, n)
        self.used.append((tok, n, data, slots, ins))
        if self.drv_asleep:
            self.used_while_drv_asleep = True
        if notify:
            self.notify()

    @precondition(lambda self: not self.dev_asleep)
    @rule()
    def notify(self):
        k = self._both(self.cdev.needs_notification, self.rdev.needs_notification)
        if self.drv_asleep and self.used_while_drv_asleep:
            assert k, "lost wake-up: the driver sleeps but the device does not interrupt"
        if k:
            self.drv_asleep = False

    @precondition(lambda self: not self.dev_asleep)
    @rule()
    def disable_notif(self):
        self._both(self.cdev.disable_notification, self.rdev.disable_notification)

    @precondition(lambda self: not self.dev_asleep)
    @rule(sleep=st.booleans())
    def enable_notif(self, sleep):
        pending = self._both(self.cdev.enable_notification, self.rdev.enable_notification)
        assert pending == bool(self.avail)
        if sleep and not pending:
            self.dev_asleep = True
            self.added_while_dev_asleep = False

    @precondition(lambda self: not (self.avail or self.popped or self.used)
                  and not (self.dev_asleep or self.drv_asleep))
    @rule(k=st.integers(1, 40), shape=st.integers(0, 7))
    def cycle(self, k, shape):
        """k full round trips (moves indices and wrap counters fast)."""
        for i in range(k):
            nout = 1 + (shape + i) % 2
            nin = min((shape >> 1) % 3, self.size - nout) if self.size > nout else 0
            self.add(out=[4] * min(nout, self.size), inn=[8] * nin)
            self.kick()
            self.pop()
            self.use(which=0, notify=bool((shape + i) & 4), fill=i & 0xFF)
            self.get_used()
        self.rings_identical()

    @rule()
    def spurious_wakeup(self):
        self.dev_asleep = self.drv_asleep = False

    @precondition(lambda self: self.fmt == "packed" and not self.dev_asleep)
    @rule()
    def save_restore_device(self):
        """Packed device state round trip; in-flight chains rebuilt from the ring."""
        st_ = self.cdev.state()
        self.cdev = PackedQueue.from_state(self.aspaces[0], st_)
        assert self.cdev.state() == st_
        # documented: a restored packed device notifies at its next check
        if self.rdev.signalled is not None:
            self.rdev.used_since = self.size

    # ---- invariants ----

    @invariant()
    def rings_identical(self):
        for a, n in self.areas:
            assert self.aspaces[0].read(a, n) == self.aspaces[1].read(a, n), f"area {a:#x} differs"

    @invariant()
    def counts(self):
        assert not self.cdrv.broken and not self.cdev.broken
        assert self.cdrv.num_free == self.rdrv.num_free
        assert self.cdrv.in_flight == len(self.avail) + len(self.popped) + len(self.used)

    def teardown(self):
        for a in getattr(self, "aspaces", ()):
            a.close()
        for r in getattr(self, "regions", ()):
            r.close()


VirtqMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestVirtq = VirtqMachine.TestCase
