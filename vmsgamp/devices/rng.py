"""virtio-rng (device id 4): one request queue, no configuration space.

The driver posts device-writable buffers; the device fills them from a
source and reports the bytes written as the used length (the driver must use
that length, virtio spec "Entropy Device").
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


class RngDevice(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    name = "rng"
    num_queues = 1

    def __init__(self, source: Callable[[int], bytes] | str | None = None, *, max_request: int = 1 << 20):
        super().__init__()
        if source is None:
            self.source: Callable[[int], bytes] = os.urandom
        elif isinstance(source, str):
            self.source = FileSource(source)
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
            written = chain.write(data) if data else 0
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


register_device("rng", _factory, {"source": "file or device to read entropy from (default os.urandom)"},
                path_key="source")
