"""Tracer: record every message a bus sends and receives, to pcapng.

The hot path (``BusTap.tx`` / ``BusTap.rx``, called by :class:`AmpBus` for each
message) is C (:mod:`vmsgamp.trace._sink`): it reads the clock and appends the
message as a finished Enhanced Packet Block to a buffer.  A writer thread
wakes every ``flush_interval`` seconds, takes the buffer (O(1)) and writes
it; the GIL is released while it writes.  So a message costs the bus thread
well under a microsecond, the writer does no work per message, and the file
is at most ``flush_interval`` behind (a killed process loses at most that
much).

Why the encoding is not the writer's: the writer shares the GIL with the bus
thread, which needs it back each time its spin (GIL released) sees a
message.  A Python writer encoding 0.1 s of traffic held the GIL for
milliseconds (about 0.4 us per message), and giving it back between chunks
did not help: a thread that releases the GIL and asks again at once (a
``write()``) gets it back before the woken bus thread does, so the bus waited
for most of the batch.  Encoding in small slices with sleeps in between
spread the same CPU time over many more wake-ups and measured worse on a
2-core host, where the writer takes its CPU from a spinning bus loop.
"""
from __future__ import annotations

import os
import threading
from collections import Counter
from typing import BinaryIO

from vmsgamp.trace._pcapng import DESCRIPTIONS, DIR_INBOUND, DIR_OUTBOUND, Interface, PcapngWriter
from vmsgamp.trace._sink import EpbSink, SinkTap

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
    ``rx(data)`` for each it received.  ``data``: ``bytes`` (other bytes-like
    objects are copied first).  The
    direction in the capture follows the bus's role (a driver's tx is
    outbound, a device's tx is inbound)."""

    __slots__ = ("tracer", "interface", "role", "tx", "rx", "_sink_tap")

    def __init__(self, tracer: Tracer, interface: int, role: str):
        self.tracer = tracer
        self.interface = interface
        self.role = role
        out_dir, in_dir = (DIR_OUTBOUND, DIR_INBOUND) if role == "driver" else (DIR_INBOUND, DIR_OUTBOUND)
        # The bus calls the C methods directly: no Python frame per message.
        self._sink_tap = SinkTap(tracer._sink, interface, out_dir, in_dir)
        self.tx = self._sink_tap.tx
        self.rx = self._sink_tap.rx

    def disable(self) -> None:
        self.tx = self.rx = _noop

    def counts(self) -> dict[tuple[int, int], int]:
        """Messages this tap recorded: (interface, direction) -> count."""
        t = self._sink_tap
        return {(t.interface, t.tx_direction): t.tx_count, (t.interface, t.rx_direction): t.rx_count}


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
        self._sink = EpbSink()   # messages recorded, already encoded, not yet written
        self._lock = threading.Lock()          # one writer at a time: the thread, flush(), close()
        self._ifaces: dict[tuple[str, str, str], int] = {}
        self._taps: list[BusTap] = []
        self._recorded: Counter[tuple[int, int]] = Counter()   # by record(): (interface, direction)
        self.written = 0         # messages written to the file
        self.flushes = 0         # buffers written (each one take() and one write())
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
        self._sink.record(interface, direction & 3, data, time_ns)
        self._recorded[(interface, direction & 3)] += 1

    # ---- writing ---------------------------------------------------------------------
    def _write_pending(self) -> int:
        """Write everything recorded so far (caller holds the lock)."""
        if not self._sink.pending:
            return 0
        buf, n = self._sink.take()
        self._writer.write_encoded(buf)
        self.written += n
        self.flushes += 1
        return n

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
            if self._sink.pending:
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

    @property
    def pending(self) -> int:
        """Messages recorded and not yet written."""
        return self._sink.pending

    @property
    def counts(self) -> dict[tuple[int, int], int]:
        """Messages recorded so far (all written after flush() or close()):
        (interface, direction) -> count."""
        total: Counter[tuple[int, int]] = Counter(self._recorded)
        for tap in self._taps:
            total.update(tap.counts())
        return {k: n for k, n in total.items() if n}

    def summary(self) -> dict[str, object]:
        """``messages``: packets written so far; per direction: packets
        recorded (the same after a flush or close, unless writing failed)."""
        out = sum(n for (_i, d), n in self.counts.items() if d == DIR_OUTBOUND)
        inn = sum(n for (_i, d), n in self.counts.items() if d == DIR_INBOUND)
        return {"file": self.path, "messages": self.written, "driver_to_device": out,
                "device_to_driver": inn}
