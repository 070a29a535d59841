"""One device side per FIFO window.

Two device sides on one window both write the layout and both answer the
driver, and the bus is corrupted without anyone noticing.  A device side
therefore *claims* its window before it writes anything, and keeps checking
that what it wrote is still there.  The other device side may be firmware
that cannot take a lock of ours, so the rule reads what the shared layout
itself shows as well.

The rule, in order:

1. **Lock.**  On a region backed by a regular file (``shm:``, ``file:``,
   ``fd:``/memfd, ``ivshmem:``) the device side holds an exclusive
   open-file-description lock on the first byte of its window for as long
   as it runs; the kernel drops it when the process dies, however it dies.
   A lock held by someone else means a live device side: refuse at once.
   Holding it, the device side advertises ``F_LOCKED`` in its queue head.
2. **Evidence.**  The window shows a device side when the layout magic is
   "LO", the layout validates, and the device queue head has magic "QO" with
   state INIT, READY or RUN.  No evidence (or SHUTDOWN / PEER_DEAD): claim.
3. **A dead lock holder.**  Evidence whose head shows ``F_LOCKED`` while we
   got the lock belongs to a process that died holding it: claim at once.
4. **Anyone else** (firmware, QEMU, a vmsgamp device side on a carrier
   without a lock) is watched for ``observe`` seconds (default 1):

   * its queue head changes: it is alive, refuse;
   * the driver is in RUN with messages the device side leaves unconsumed
     for half the window or more: it is dead, claim;
   * otherwise it may be an idle live device side: refuse, naming the
     explicit ``takeover`` option for one known to be dead.

After claiming a window whose previous device side died (3, 4 or takeover),
the first handshake waits for the driver to start anew (INIT or READY): a
driver still in RUN holds indices of the dead session.

While running, :meth:`DeviceSideClaim.verify` compares the layout and our
own queue head with what we wrote.  A difference (another device side, or a
driver scribbling over memory it does not own) ends the session, and the
window is written again only once nothing else is changing it (rule 4's
observation; static leftovers are ours to overwrite, since we still hold
the lock).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass

from vmsgamp._core.fifo import LAYOUT_B, MsgFifo, read_layout, state_name, validate_layout
from vmsgamp.errors import LayoutError, VmsgampError

log = logging.getLogger("vmsgamp.device")

# From csrc/vmamp_shmem.h (tests/test_claim.py compiles the header and compares).
QUEUE_MAGIC = 0x514F
QH_MAGIC, QH_STATUS, QH_TAIL, QH_HEAD = 0, 2, 4, 6
STATE_MASK = 0x001F
STATE_INIT, STATE_READY, STATE_RUN = 0, 1, 2
F_WAITING = 0x4000
F_LOCKED = 0x1000

DEFAULT_OBSERVE_S = 1.0
_SAMPLE_S = 0.005
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)   # Linux value
_FLOCK = struct.Struct("hhqqi4x")                   # struct flock on 64-bit Linux


class DeviceSideActive(VmsgampError):
    """Another device side is active on the FIFO window."""


@dataclass(frozen=True)
class _Heads:
    """One sample of both queue heads (device head first)."""

    dev_magic: int
    dev_status: int
    dev_tail: int
    dev_head: int
    drv_magic: int
    drv_status: int
    drv_tail: int

    @property
    def device_words(self) -> tuple[int, int, int, int]:
        return self.dev_magic, self.dev_status, self.dev_tail, self.dev_head

    @property
    def driver_waiting(self) -> bool:
        """The driver is in RUN with messages the device has not consumed."""
        return (self.drv_magic == QUEUE_MAGIC and self.drv_status & STATE_MASK == STATE_RUN
                and self.drv_tail != self.dev_head)


class DeviceSideClaim:
    """The claim of one device side on ``fifo``'s window (see the module
    docstring for the rule).  ``acquire()`` before the first handshake,
    ``verify()`` while serving, ``release()`` when done."""

    def __init__(self, fifo: MsgFifo, *, observe: float = DEFAULT_OBSERVE_S, takeover: bool = False):
        self.fifo = fifo
        self.region = fifo.region
        self.offset = fifo.offset
        self.observe = observe
        self.takeover = takeover
        uri = getattr(self.region, "uri", None) or "the region"
        self.where = f"{uri} (window at {self.offset:#x})"
        self._lock_fd: int | None = None
        self.fresh_start = False        # the first handshake must wait for a new driver session
        self._written: dict[str, int] | None = None   # the layout as we wrote it

    # ---- acquiring --------------------------------------------------------------------
    def acquire(self) -> None:
        """Claim the window or raise DeviceSideActive (one line)."""
        locked = self._lock()
        if self.fifo.layout != LAYOUT_B or self.fifo.state == "running":
            return      # Gen A has no layout to read; a running FIFO is ours already
        seen = self._evidence()
        if seen is None:
            return
        lay, status = seen
        if self.takeover:
            log.warning("%s: taking over from the device side whose queue head shows %s",
                        self.where, state_name(status))
            self.fresh_start = True
            return
        if locked and status & F_LOCKED:
            log.info("%s: the previous device side died (its lock is free): taking over",
                     self.where)
            self.fresh_start = True
            return
        verdict = self._watch(lay, self.observe)
        if verdict == "dead":
            log.info("%s: the previous device side left driver messages unconsumed for %.1f s: "
                     "taking over", self.where, self.observe)
            self.fresh_start = True
            return
        self.release()
        why = ("its queue head keeps changing" if verdict == "live" else
               f"its queue head shows {state_name(status)}; pass --takeover if it is dead")
        raise DeviceSideActive(f"a device side is already active on {self.where}: {why}")

    def _lock(self) -> bool:
        """Rule 1.  True when we hold the lock; False when the region has none."""
        if self._lock_fd is not None:
            return True
        fd = self.region.fd
        if fd < 0:
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            # Our own open file description: the lock is then ours alone even
            # when other processes share the fd (ivshmem hands one memfd out).
            own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.fcntl(own, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, self.offset, 1, 0))
        except OSError as e:
            os.close(own)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise DeviceSideActive(f"a device side is already active on {self.where}: "
                                       f"another process holds its lock") from None
            return False    # no lock support here: the layout rule alone decides
        self._lock_fd = own
        self.fifo.status_flags |= F_LOCKED
        return True

    def _evidence(self) -> tuple[dict[str, int], int] | None:
        """Rule 2: (layout, device head status) when a device side shows."""
        try:
            lay = validate_layout(read_layout(self.region, self.offset), self.fifo.window)
        except (LayoutError, IndexError, ValueError):
            return None
        head = self.offset + lay["dev_queue_head_offset"]
        if self.region.load16(head + QH_MAGIC, "acquire") != QUEUE_MAGIC:
            return None
        status = self.region.load16(head + QH_STATUS, "acquire")
        if status & STATE_MASK not in (STATE_INIT, STATE_READY, STATE_RUN):
            return None
        return lay, status

    def _sample(self, lay: dict[str, int]) -> _Heads:
        r, dev, drv = self.region, self.offset + lay["dev_queue_head_offset"], \
            self.offset + lay["drv_queue_head_offset"]
        return _Heads(r.load16(dev + QH_MAGIC, "acquire"), r.load16(dev + QH_STATUS, "acquire"),
                      r.load16(dev + QH_TAIL, "acquire"), r.load16(dev + QH_HEAD, "acquire"),
                      r.load16(drv + QH_MAGIC, "acquire"), r.load16(drv + QH_STATUS, "acquire"),
                      r.load16(drv + QH_TAIL, "acquire"))

    def _watch(self, lay: dict[str, int], seconds: float) -> str:
        """Rule 4: 'live', 'dead' or 'idle' after watching for ``seconds``."""
        first = self._sample(lay)
        start = time.monotonic()
        waiting_since = start if first.driver_waiting else None
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            time.sleep(_SAMPLE_S)
            s = self._sample(lay)
            if s.device_words != first.device_words:
                return "live"
            if not s.driver_waiting:
                waiting_since = None
            elif waiting_since is None:
                waiting_since = now
        if waiting_since is not None and time.monotonic() - waiting_since >= seconds / 2:
            return "dead"
        return "idle"

    # ---- while serving ------------------------------------------------------------------
    def started(self) -> None:
        """The handshake succeeded: remember the layout we wrote."""
        self.fresh_start = False
        if self.fifo.layout == LAYOUT_B:
            self._written = read_layout(self.region, self.offset)

    def verify(self) -> str | None:
        """None while the window holds what we wrote, else what changed."""
        if self._written is None or self.fifo.layout != LAYOUT_B:
            return None
        now = read_layout(self.region, self.offset)
        changed = [k for k, v in self._written.items() if now.get(k) != v]
        if changed:
            return f"layout field{'s' if len(changed) > 1 else ''} {', '.join(changed)}"
        head = self.offset + now["dev_queue_head_offset"]
        if self.region.load16(head + QH_MAGIC, "acquire") != QUEUE_MAGIC:
            return "device queue head magic"
        status = self.region.load16(head + QH_STATUS, "acquire")
        if state_name(status) != self.fifo.my_state():
            return f"device queue head state ({state_name(status)}, we wrote {self.fifo.my_state()})"
        want = F_LOCKED if self._lock_fd is not None else 0
        if status & F_LOCKED != want:
            return "device queue head flags"
        return None

    def lost(self) -> None:
        """verify() failed: the session ended; the window is not ours to
        touch again until :meth:`may_reclaim` says so."""
        self._written = None

    def may_reclaim(self) -> bool:
        """After an overwrite: True once nothing else changes the window
        (a live writer keeps changing the device queue head)."""
        try:
            lay = validate_layout(read_layout(self.region, self.offset), self.fifo.window)
        except (LayoutError, IndexError, ValueError):
            return True     # no valid layout: nobody serves this window
        if self._watch(lay, self.observe) == "live":
            return False
        self.fresh_start = True
        return True

    # ---- releasing --------------------------------------------------------------------
    def release(self) -> None:
        """Drop the lock.  Idempotent."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            self.fifo.status_flags &= ~F_LOCKED
            os.close(fd)
