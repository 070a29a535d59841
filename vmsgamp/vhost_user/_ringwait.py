"""How the vhost-user back-end waits: the bus's adaptive wait
(``vmsgamp.bus._wait``) applied to the guest's rings.

A guest that is issuing requests posts the next one within microseconds of
seeing the previous one complete; each kick it sends costs a vmexit (an
ioeventfd write in QEMU) and wakes this process up.  So after the back-end
served chains it does not go back to sleep on the kick eventfds at once:

1. **spin** for a window (at most ``spin_us``, see below) after the last
   served chain, with the guest's
   kicks suppressed on the rings it watches (``disable_notification()``;
   with EVENT_IDX on a split ring the avail event is simply left behind the
   driver, so it has already crossed it and does not kick again), looking at
   each started ring's available index (``has_available()``, a compiled
   call) and serving what appears at once.  The selector (socket messages,
   kicks, host input) is looked at with a zero timeout every ``FD_CHECK_S``;
2. when the window has passed, **arm**: ``enable_notification()`` on every
   ring whose kicks were off.  Its fence closes the lost-kick race (virtio's
   "re-check after enabling"): a chain published meanwhile is reported and
   served instead of sleeping;
3. **block** in the selector as a back-end without spinning does.

The window adapts as KVM's halt polling does, between 0 and ``spin_us``:
when a request wakes the blocked back-end up sooner than ``spin_us`` after
the previous one was served, a longer spin would have caught it, so the
window doubles (from ``GROW_START_S``); when it comes later than that, no
allowed spin would have, so the window halves (below ``GROW_START_S``: no
spin).  A slow guest (QEMU under
TCG takes hundreds of microseconds between requests) thus stops costing the
back-end a spin per request, CPU the guest's own vCPU thread needs, while a
fast one keeps the whole window.

``busy_poll`` spins all the time, in ``SPIN_SLICE_S`` slices so that stop
and Ctrl-C keep working.  ``spin_us=0`` never spins and never leaves kicks
off: every service re-enables them, as before this module existed.  An idle
back-end does not spin (only chains served start a window).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vmsgamp._core.virtq import QueueBrokenError
from vmsgamp.bus._wait import FD_CHECK_S, SPIN_SLICE_S, WaitPolicy

_SPIN_MIN_S = 1e-7   # less window than this left: it is over
GROW_START_S = 10e-6   # the window grows from this (and below it shrinks to none)


class Ring(Protocol):
    """What the wait needs of a vring (``_backend.Vring``)."""

    index: int
    enabled: bool
    queue: Any


class RingWait:
    """One back-end's wait (see the module docstring).  ``stats`` is the
    back-end's counter dict: ``spins`` (spin phases), ``served_while_spinning``
    (services that found chains no kick announced), ``served_at_arm`` (chains
    found by the re-check when the window closed) and ``blocks``."""

    __slots__ = ("policy", "spin_s", "window", "clock", "active_at", "slept", "fd_next", "quiet",
                 "spinning", "stats")

    def __init__(self, policy: WaitPolicy, stats: dict[str, int], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.spin_s = policy.spin_us * 1e-6
        self.window = self.spin_s     # the spin after activity now (adapted, at most spin_s)
        self.clock = clock
        self.active_at = -math.inf   # last chains served
        self.slept = False           # the loop blocked since the last chains served
        self.fd_next = -math.inf     # next zero-timeout look at the selector while spinning
        self.quiet: set[int] = set()  # rings whose kicks are off (armed before any sleep)
        self.spinning = False
        self.stats = stats
        for k in ("spins", "served_while_spinning", "served_at_arm", "blocks"):
            stats.setdefault(k, 0)

    @property
    def polls(self) -> bool:
        """Whether services leave kicks off (the loop spins at all)."""
        return self.policy.busy_poll or self.spin_s > 0

    def activity(self) -> None:
        """Chains were served: spin again (and learn from the sleep before)."""
        now = self.clock()
        if self.slept:
            self.slept = False
            self.adapt(now - self.active_at)
        self.active_at = now

    def adapt(self, gap: float) -> None:
        """The loop slept, and work came ``gap`` seconds after the previous
        work: resize the window."""
        if gap > self.spin_s:
            half = self.window / 2
            self.window = half if half >= GROW_START_S else 0.0
        elif gap > self.window:
            self.window = min(self.spin_s, max(self.window * 2, GROW_START_S))

    def spin_left(self, now: float) -> float:
        if self.policy.busy_poll:
            return SPIN_SLICE_S
        return self.window - (now - self.active_at)

    def forget(self, ring: Ring) -> None:
        """``ring`` stops: leave the guest's kicks on for whoever runs it next."""
        if ring.index in self.quiet:
            self.quiet.discard(ring.index)
            q = ring.queue
            if q is not None and not q.broken:
                try:
                    q.enable_notification()
                except Exception:   # a broken or unmapped ring: nothing to leave on
                    pass

    def wait(self, timeout: float | None, rings: Sequence[Ring], serve: Callable[[Ring], bool],
             look: Callable[[float | None], bool], broken: Callable[[Ring, str], None]) -> None:
        """Wait up to ``timeout`` seconds (None: no limit) for work and do it.

        ``rings``: the started rings (only enabled ones are watched and
        served; every one whose kicks are off is armed); ``serve(ring)`` serves one
        (True if it found chains); ``look(t)`` waits up to ``t`` in the
        selector and handles what it reports (True if anything);
        ``broken(ring, reason)`` reports a ring found corrupted.  Returns after
        the first work done, or when the timeout or one spin slice is over."""
        clock = self.clock
        now = clock()
        deadline = math.inf if timeout is None else now + timeout
        left = self.spin_left(now)
        watched = [r for r in rings if r.enabled and not r.queue.broken]
        if left > _SPIN_MIN_S and watched:
            if not self.spinning:
                self.spinning = True
                self.stats["spins"] += 1
            for r in watched:
                if r.index not in self.quiet:
                    # relaxed in the queue: a hint; _arm's fence closes the race
                    r.queue.disable_notification()
                    self.quiet.add(r.index)
            end = min(now + min(left, SPIN_SLICE_S), deadline)
            while True:
                found = False
                for r in watched:
                    if _ask(r, "has_available", broken):
                        if serve(r):
                            self.stats["served_while_spinning"] += 1
                            found = True
                        else:
                            # Chains the model leaves posted (buffers waiting
                            # for host data): not looked at again this wait.
                            watched = [w for w in watched if w is not r]
                if found:
                    return
                now = clock()
                if now >= self.fd_next:
                    # Counted across waits: a loop that spins again right
                    # after serving must not pay a select() each time.
                    self.fd_next = now + FD_CHECK_S
                    if look(0):
                        return
                if now >= end:
                    break
            if now >= deadline or self.spin_left(now) > _SPIN_MIN_S:
                return   # the caller's timeout, or one slice of a longer window
        self.spinning = False
        if self._arm(rings, serve, broken):
            return
        left = deadline - now
        if left > 0:
            self.stats["blocks"] += 1
            self.slept = True
        look(None if deadline == math.inf else max(left, 0.0))

    def _arm(self, rings: Sequence[Ring], serve: Callable[[Ring], bool],
             broken: Callable[[Ring, str], None]) -> bool:
        """Turn kicks back on; serve rings that have chains already (True)."""
        if not self.quiet:
            return False
        by_index = {r.index: r for r in rings}
        quiet, self.quiet = self.quiet, set()
        found = False
        for index in sorted(quiet):
            r = by_index.get(index)
            if r is None:
                continue   # stopped meanwhile (forget() armed it)
            if _ask(r, "enable_notification", broken) and r.enabled and serve(r):
                self.stats["served_at_arm"] += 1
                found = True
        return found


def _ask(r: Ring, what: str, broken: Callable[[Ring, str], None]) -> bool:
    """``r.queue.<what>()`` of a live ring (True: chains are waiting); a
    queue found broken is reported through ``broken`` and counts as False."""
    q = r.queue
    if q is None or q.broken:
        return False
    try:
        return bool(getattr(q, what)())
    except QueueBrokenError as e:
        broken(r, e.reason)
        return False
