"""virtio-rng (device id 4): one request queue, no configuration space.

The driver posts device-writable buffers; the device fills them from a
source and reports the bytes written as the used length (the driver must use
that length, virtio spec "Entropy Device").

Sources: ``os.urandom`` (default), a file or character device
(``source=PATH``), and two that cost (almost) nothing, for measuring the
device path rather than the entropy: ``source=zero`` (zero bytes) and
``source=pattern`` (bytes 0, 1, ..., 255, 0, 1, ... continuing across
requests, so a reader can check order and completeness).  They are not
entropy: never offer them to a guest that needs randomness.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from vmsgamp.devices._base import VirtioDevice, register_device

VIRTIO_ID_RNG = 4


class FileSource:
    """Bytes from a file, wrapping around at its end (a deterministic source
    for tests), or from a character device such as /dev/hwrng."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "rb", buffering=0)

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self._f.read(n - len(out))
            if not chunk:
                if out or self._f.seekable():
                    self._f.seek(0)
                    chunk = self._f.read(n - len(out))
                if not chunk:
                    break  # empty file: give what we have (the driver sees a short used length)
            out += chunk
        return out

    def close(self) -> None:
        self._f.close()


class ZeroSource:
    """Zero bytes, served as views of one preallocated buffer (no per-request
    allocation: what a benchmark of the device path wants)."""

    path = "zero"

    def __init__(self) -> None:
        self._zeros = memoryview(bytes(0))

    def __call__(self, n: int) -> memoryview:
        if n > len(self._zeros):
            self._zeros = memoryview(bytes(max(n, 2 * len(self._zeros))))
        return self._zeros[:n]


class PatternSource:
    """Bytes ``i & 0xFF`` for a running byte count ``i``: the stream
    continues across requests, so the driver can check it."""

    path = "pattern"

    def __init__(self) -> None:
        self._pattern = memoryview(bytes(range(256)))
        self._pos = 0

    def __call__(self, n: int) -> memoryview:
        if n + 256 > len(self._pattern):  # one buffer covering any start offset
            self._pattern = memoryview(bytes(range(256)) * ((n + 511) // 256))
        start = self._pos
        self._pos = (start + n) & 0xFF
        return self._pattern[start:start + n]


SOURCES: dict[str, Callable[[], Callable[[int], Any]]] = {"zero": ZeroSource, "pattern": PatternSource}


class RngDevice(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    name = "rng"
    num_queues = 1

    def __init__(self, source: Callable[[int], Any] | str | None = None, *, max_request: int = 1 << 20):
        """``source``: None (os.urandom), "zero", "pattern", a file path, or a
        callable ``n -> bytes-like`` (at most n bytes; fewer = short read)."""
        super().__init__()
        if source is None:
            self.source: Callable[[int], Any] = os.urandom
        elif isinstance(source, str):
            self.source = SOURCES[source]() if source in SOURCES else FileSource(source)
        else:
            self.source = source
        self.max_request = max_request
        self.bytes_served = 0

    def handle_queue(self, index: int, queue: Any) -> bool:
        used = False
        while True:
            chain = queue.pop()
            if chain is None:
                return used
            want = min(chain.writable_len, self.max_request)
            data = self.source(want) if want else b""
            written = chain.write(data) if len(data) else 0
            queue.add_used(chain.head, written)
            self.bytes_served += written
            used = True

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["source"] = getattr(self.source, "path", "os.urandom")
        return d

    def close(self) -> None:
        if isinstance(self.source, FileSource):
            self.source.close()


def _factory(source: str | None = None) -> RngDevice:
    return RngDevice(source)


register_device("rng", _factory, {"source": "file or device to read entropy from (default os.urandom); "
                                            "'zero' or 'pattern' for benchmarks (not entropy)"},
                path_key="source")
