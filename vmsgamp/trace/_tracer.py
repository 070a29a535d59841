"""Tracer: record every message a bus sends and receives, to pcapng.

The hot path (``BusTap.tx`` / ``BusTap.rx``, called by :class:`AmpBus` for each
message) only appends ``(time_ns, key, bytes)`` to a deque; a writer thread
wakes every ``flush_interval`` seconds, encodes what piled up into Enhanced
Packet Blocks in one go and writes them with one ``write()``.  So a message
costs a clock read and an append on the bus thread, and the file is at most
``flush_interval`` behind (a killed process loses at most that much).
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from operator import itemgetter
from typing import BinaryIO

from vmsgamp.trace._pcapng import (
    DESCRIPTIONS, DIR_INBOUND, DIR_OUTBOUND, Interface, PcapngWriter, encode_packets,
)

_CHUNK = 512     # messages encoded per write()

# Region URI options that only matter when creating the object: two ends of
# one bus name it the same way in their captures.
_CREATE_OPTIONS = frozenset({"create", "size", "mode", "unlink", "timeout", "wait_peer"})


def interface_name(uri: str | None) -> str:
    """The capture's ``if_name`` for a region URI (creation-only options dropped)."""
    if not uri:
        return "region"
    body, sep, frag = uri.partition("#")
    if not sep:
        return uri
    keep = [item for item in frag.split("&") if item and item.partition("=")[0] not in _CREATE_OPTIONS]
    return body + ("#" + "&".join(keep) if keep else "")


def _noop(data: bytes) -> None:
    return None


class BusTap:
    """What a bus calls per message: ``tx(data)`` for each message it sent,
    ``rx(data)`` for each it received.  ``data`` must be ``bytes``.  The
    direction in the capture follows the bus's role (a driver's tx is
    outbound, a device's tx is inbound)."""

    __slots__ = ("tracer", "interface", "role", "tx", "rx")

    def __init__(self, tracer: Tracer, interface: int, role: str):
        self.tracer = tracer
        self.interface = interface
        self.role = role
        out_dir, in_dir = (DIR_OUTBOUND, DIR_INBOUND) if role == "driver" else (DIR_INBOUND, DIR_OUTBOUND)
        append = tracer._queue.append
        now = time.time_ns
        ktx = interface << 2 | out_dir
        krx = interface << 2 | in_dir

        def tx(data: bytes) -> None:
            append((now(), ktx, data))

        def rx(data: bytes) -> None:
            append((now(), krx, data))

        self.tx = tx
        self.rx = rx

    def disable(self) -> None:
        self.tx = self.rx = _noop


class Tracer:
    """A pcapng capture being written.

    ``Tracer(path_or_binary_file)``; ``tap(name, profile, role)`` gives the
    per-bus hooks (:meth:`AmpBus.attach_tracer` calls it); ``record()`` adds a
    message by hand (the passive observer uses it).  ``close()`` (idempotent)
    writes what is pending and closes the file; a context manager.
    """

    def __init__(self, file: str | os.PathLike[str] | BinaryIO, *, flush_interval: float = 0.1,
                 application: str = "vmsgamp", background: bool = True):
        self._writer = PcapngWriter(file, application=application)
        self.path = self._writer.path
        self.flush_interval = flush_interval
        self._queue: deque[tuple[int, int, bytes]] = deque()
        self._lock = threading.Lock()          # one writer at a time: the thread, flush(), close()
        self._ifaces: dict[tuple[str, str, str], int] = {}
        self._taps: list[BusTap] = []
        self.counts: dict[tuple[int, int], int] = {}   # (interface, direction) -> packets written
        self.written = 0
        self.closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writer.flush()
        if background:
            self._thread = threading.Thread(target=self._run, name="vmsgamp-trace", daemon=True)
            self._thread.start()

    # ---- interfaces and taps -----------------------------------------------------
    def interface(self, name: str, profile: str = "g2", comment: str = "") -> int:
        """The interface id for a bus (an IDB is written the first time)."""
        if profile not in DESCRIPTIONS:
            raise ValueError(f"profile must be 'g2' or 'g1', not {profile!r}")
        key = (name, profile, comment)
        with self._lock:
            if self.closed:
                raise ValueError("the tracer is closed")
            iface = self._ifaces.get(key)
            if iface is None:
                # Packets of earlier interfaces go out first; the IDB precedes any
                # packet that names it.
                self._write_pending()
                iface = self._writer.add_interface(Interface(name, DESCRIPTIONS[profile], comment=comment))
                self._writer.flush()
                self._ifaces[key] = iface
        return iface

    def tap(self, name: str, *, profile: str = "g2", role: str = "driver") -> BusTap:
        """Hooks for one bus endpoint of ``role`` ('driver' or 'device')."""
        if role not in ("driver", "device"):
            raise ValueError(f"role must be 'driver' or 'device', not {role!r}")
        iface = self.interface(interface_name(name), profile, f"captured by the {role} side (pid {os.getpid()})")
        tap = BusTap(self, iface, role)
        self._taps.append(tap)
        return tap

    def record(self, interface: int, direction: int, data: bytes, time_ns: int | None = None) -> None:
        """Add one message (``direction``: DIR_OUTBOUND or DIR_INBOUND)."""
        self._queue.append((time.time_ns() if time_ns is None else time_ns,
                            interface << 2 | (direction & 3), bytes(data)))

    # ---- writing ---------------------------------------------------------------------
    def _write_pending(self) -> int:
        """Encode and write everything queued (caller holds the lock)."""
        q = self._queue
        total = 0
        pop = q.popleft        # taps only append meanwhile: len(q) items are there
        while q:
            # In chunks: each write() releases the GIL, so a bus thread waiting
            # for it is not held up for a whole second's worth of encoding.
            items = [pop() for _ in range(min(len(q), _CHUNK))]
            out = bytearray()
            encode_packets(items, out)
            self._writer.write_encoded(out)
            for key, n in Counter(map(itemgetter(1), items)).items():
                k = (key >> 2, key & 3)
                self.counts[k] = self.counts.get(k, 0) + n
            self.written += len(items)
            total += len(items)
        return total

    def flush(self) -> int:
        """Write what is pending now; returns the number of packets written."""
        with self._lock:
            if self.closed:
                return 0
            n = self._write_pending()
            self._writer.flush()
            return n

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            if self._queue:
                try:
                    self.flush()
                except (OSError, ValueError):
                    # Disk full or file closed under us: stop tracing, keep the bus running.
                    for tap in self._taps:
                        tap.disable()
                    return

    def close(self) -> None:
        if self.closed:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            for tap in self._taps:
                tap.disable()
            try:
                self._write_pending()
            finally:
                self.closed = True
                self._writer.close()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> dict[str, object]:
        """Packets written so far, per direction (after a flush or close)."""
        out = sum(n for (_i, d), n in self.counts.items() if d == DIR_OUTBOUND)
        inn = sum(n for (_i, d), n in self.counts.items() if d == DIR_INBOUND)
        return {"file": self.path, "messages": self.written, "driver_to_device": out,
                "device_to_driver": inn}
