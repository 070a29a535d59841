"""Adaptive waiting: how every loop of the bus waits for the peer.

A peer that is talking answers within microseconds; one that is idle may
stay silent for hours.  So each loop waits in three phases (``WaitPolicy``
holds the knobs, one ``Waiter`` per loop applies them):

1. **spin** for ``spin_us`` after the last activity (a message sent or
   received on the FIFO, or what the loop reports with ``activity()``):
   the FIFO's own C loop polls the producer index without the GIL and
   without a syscall, so a message that arrives within the window costs no
   wake-up at all, and the peer is not asked to ring;
2. **block**, on carriers with a doorbell (eventfd, UIO interrupt): arm the
   notification (the FIFO's WAITING flag, closing the lost-wake-up race
   with a fence) and sleep on the doorbell together with the loop's other
   file descriptors;
3. **sleep-poll**, on carriers without one (``shm:``, ``file:``, polled
   ``pci:``): sleep, look, sleep twice as long, up to ``idle_backoff_ms``,
   so a waiting loop costs next to no CPU while the first message after a
   quiet spell waits at most that long.

``busy_poll`` never sleeps (benchmark runs: lowest latency, one CPU per
loop); it still spins in bounded slices so timeouts, housekeeping and
Ctrl-C keep working.  Every wait is bounded by its timeout, and every
sleep is interruptible: the C spin runs at most ``SPIN_SLICE_S`` at a
time, blocking waits check signals.
"""
from __future__ import annotations

import math
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_SPIN_US = 100.0          # a Python peer answers well within it; costs nothing when idle
DEFAULT_IDLE_BACKOFF_MS = 4.0    # longest sleep between looks on a carrier without a doorbell (idle CPU ~1%)
BACKOFF_START_S = 20e-6          # first sleep once the spin window has passed
SPIN_SLICE_S = 0.01              # longest C spin without a look at signals and housekeeping
FD_CHECK_S = 50e-6               # while spinning, the loop's other fds are looked at this often
_SPIN_FOREVER_NS = 1 << 62       # FIFO spin setting for "spin until the timeout"
_SPIN_MIN_S = 1e-7               # less spin window than this left: it is over
SIZE_POLL_S = 0.1                # idle sleep-poll: fstat the shared object this often

SPIN = "spin"
BLOCK = "block"
SLEEP = "sleep"


@dataclass(frozen=True)
class WaitPolicy:
    """How long loops spin after activity and how far idle polling backs off.

    ``spin_us``: spin window after the last activity (0: block or poll at
    once).  ``idle_backoff_ms``: longest sleep between looks on carriers
    without a doorbell.  ``busy_poll``: never sleep (benchmarks)."""

    spin_us: float = DEFAULT_SPIN_US
    idle_backoff_ms: float = DEFAULT_IDLE_BACKOFF_MS
    busy_poll: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.spin_us) and self.spin_us >= 0):
            raise ValueError(f"spin_us must be a finite number >= 0, not {self.spin_us!r}")
        if not (math.isfinite(self.idle_backoff_ms) and self.idle_backoff_ms > 0):
            raise ValueError(f"idle_backoff_ms must be a finite number > 0, not {self.idle_backoff_ms!r}")


class Waiter:
    """One loop's adaptive wait on a MsgFifo (see the module docstring).

    ``plan(now)`` is the decision alone (deterministic, for tests);
    ``wait(fifo, timeout, fds)`` carries it out.  ``clock``, ``sleep`` and
    ``select`` are injectable for tests."""

    __slots__ = ("policy", "spin_s", "cap_s", "clock", "_sleep", "_select", "active_at",
                 "backoff", "_seen", "_size_next", "_fd_next", "spins", "blocks", "sleeps")

    def __init__(self, policy: WaitPolicy | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = time.sleep,
                 select_fn: Callable[..., Any] = select.select) -> None:
        self.policy = policy = policy or WaitPolicy()
        self.spin_s = policy.spin_us * 1e-6
        self.cap_s = policy.idle_backoff_ms * 1e-3
        self.clock = clock
        self._sleep = sleep
        self._select = select_fn
        self.active_at = -math.inf       # last activity
        self.backoff = BACKOFF_START_S   # next idle sleep on a polled carrier
        self._seen = -1                  # the FIFO's sent + received at the last look
        self._size_next = 0.0            # next look at the shared object's size while sleep-polling
        self._fd_next = -math.inf        # next look at the loop's fds while spinning (across waits)
        # what the waits did (reports and tests)
        self.spins = 0
        self.blocks = 0
        self.sleeps = 0

    # ---- the decision -------------------------------------------------------------
    def activity(self, now: float | None = None) -> None:
        """Traffic now: spin again, and restart the idle back-off."""
        self.active_at = self.clock() if now is None else now
        self.backoff = min(BACKOFF_START_S, self.cap_s)

    def observe(self, fifo: Any, now: float) -> None:
        """Count traffic the FIFO saw since the last look as activity."""
        seen = fifo.sent + fifo.received
        if seen != self._seen:
            self._seen = seen
            self.activity(now)

    def plan(self, now: float, *, can_block: bool) -> tuple[str, float]:
        """(SPIN, seconds), (BLOCK, inf) or (SLEEP, seconds) at ``now``."""
        if self.policy.busy_poll:
            return SPIN, SPIN_SLICE_S
        left = self.spin_s - (now - self.active_at)
        if left > _SPIN_MIN_S:
            return SPIN, left
        if can_block:
            return BLOCK, math.inf
        return SLEEP, self.backoff

    def slept(self) -> None:
        """An idle sleep went by without traffic: the next one is longer."""
        self.backoff = min(self.backoff * 2, self.cap_s)

    def spin_left(self, now: float) -> float:
        """Seconds of the spin window left at ``now`` (busy poll: always some)."""
        if self.policy.busy_poll:
            return SPIN_SLICE_S
        return self.spin_s - (now - self.active_at)

    # ---- the doing ----------------------------------------------------------------
    def wait(self, fifo: Any, timeout: float | None, fds: Sequence[int] = (),
             cap: Callable[[float | None], float | None] | None = None,
             arm: Callable[[], bool] | None = None,
             check: Callable[[], bool] | None = None) -> list[int]:
        """Wait until ``fifo`` has a message, one of ``fds`` is readable or
        ``timeout`` seconds (None: no limit) have passed; returns the
        readable fds.  When the spin phase is over: ``cap(timeout)`` shortens
        the rest of the wait (the bus's request deadlines and liveness
        checks: computed only when the loop is about to sleep), and
        ``arm()`` re-enables what was quiet while spinning (queue
        notifications); True from it means work is ready: no sleep.
        ``check()`` is looked at after every idle sleep on a carrier without
        a doorbell (the rings the loop watches): True ends the wait.

        The FIFO's errors (peer left, FIFO broken or closed, shared object
        lost) propagate; so does KeyboardInterrupt."""
        clock = self.clock
        now = clock()
        self.observe(fifo, now)
        deadline = math.inf if timeout is None else now + timeout
        doorbell = fifo.doorbell
        can_block = doorbell.can_wait
        bell = -1
        if can_block and fds:
            try:
                bell = doorbell.fileno()
            except ValueError:   # a doorbell without an fd: poll it like a bare carrier
                can_block = False
        capped = cap is None and arm is None
        # The fds are looked at every FD_CHECK_S while spinning, counted
        # across waits: a loop that waits again right after a message must
        # not pay a select() each time (that would be on the peer's round trip).
        fd_next = self._fd_next
        while True:
            left = deadline - now
            if left <= 0:
                return []
            kind, span = self.plan(now, can_block=can_block)
            if kind is SPIN:
                self.spins += 1
                t = min(span, left, SPIN_SLICE_S)
                if fds:
                    t = min(t, max(fd_next - now, 0.0))
                fifo.spin_ns = _SPIN_FOREVER_NS
                if t > 0 and fifo.wait_readable(t):
                    return []
                now = clock()
                if fds and now >= fd_next:
                    self._fd_next = fd_next = now + FD_CHECK_S
                    ready = self._select(fds, [], [], 0)[0]
                    if ready:
                        return ready
                continue
            if not capped:   # leaving the spin phase: apply the caller's limits
                capped = True
                if arm is not None and arm():
                    return []
                if cap is not None:
                    limit = cap(None if deadline == math.inf else left)
                    if limit is not None and limit < left:
                        deadline = now + limit
                        continue
            if kind is BLOCK:
                self.blocks += 1
                if not fds:
                    fifo.spin_ns = 0
                    fifo.wait_readable(None if deadline == math.inf else left)
                    return []
                return self._block_with_fds(fifo, bell, fds, None if deadline == math.inf else left)
            self.sleeps += 1
            t = min(span, left)
            if fds:
                ready = self._select(fds, [], [], t)[0]
                if ready:
                    return ready
            else:
                self._sleep(t)
            self.slept()
            if fifo.pending() or (check is not None and check()):
                return []
            now = clock()
            if now >= self._size_next:
                # What the FIFO's own idle waits do: sleep-polling touches
                # only the queue heads, so a shared object shrunk below the
                # rest of the window would go unnoticed.
                self._size_next = now + SIZE_POLL_S
                region = getattr(fifo, "region", None)
                if region is not None and region.poll_size():
                    region.check_alive()   # raises SharedObjectLost

    def _block_with_fds(self, fifo: Any, bell: int, fds: Sequence[int], left: float | None) -> list[int]:
        if fifo.arm_wait():            # a message came in meanwhile: do not sleep
            return []
        try:
            ready = self._select([bell, *fds], [], [], left)[0]
        finally:
            fifo.disarm_wait()
        if bell in ready:
            fifo.doorbell.drain()
            ready = [fd for fd in ready if fd != bell]
        return ready


def policy_from(spin_us: float | None = None, idle_backoff_ms: float | None = None,
                busy_poll: bool = False) -> WaitPolicy:
    """A WaitPolicy with the defaults for what is left None."""
    return WaitPolicy(DEFAULT_SPIN_US if spin_us is None else spin_us,
                      DEFAULT_IDLE_BACKOFF_MS if idle_backoff_ms is None else idle_backoff_ms,
                      busy_poll)


__all__ = ["BLOCK", "DEFAULT_IDLE_BACKOFF_MS", "DEFAULT_SPIN_US", "SLEEP", "SPIN", "WaitPolicy",
           "Waiter", "policy_from"]
