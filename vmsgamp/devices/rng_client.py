"""Driver side of virtio-rng: read entropy from a device on the bus.

::

    rng = RngClient.open(amp_driver, dev_num)
    data = rng.read(64)               # 64 bytes (several requests if needed)

The client keeps ``in_flight`` device-writable buffers of ``request`` bytes
posted; ``read(n)`` returns exactly ``n`` bytes, waiting up to ``timeout``
(TimeoutError otherwise; what arrived stays buffered for the next call).  A
used length longer than the buffer is clamped (the device is not trusted).
"""
from __future__ import annotations

from typing import Any

from vmsgamp.devices.rng import VIRTIO_ID_RNG
from vmsgamp.errors import VmsgampError

__all__ = ["RngClient"]


class RngClient:
    """virtio-rng over a probed ``DriverDevice`` (``dev``)."""

    def __init__(self, dev: Any, *, request: int = 4096, in_flight: int = 4,
                 timeout: float | None = None) -> None:
        if request < 1 or in_flight < 1:
            raise ValueError("request and in_flight must be at least 1")
        self.dev = dev
        self.timeout = dev.drv.timeout if timeout is None else timeout
        self.request = request
        self._q = dev.queues[0]
        self._bufs = [dev.alloc(request) for _ in range(min(in_flight, self._q.size))]
        self._free = list(range(len(self._bufs)))
        self._buf = bytearray()
        self.bytes_read = 0
        self._closed = False

    @classmethod
    def open(cls, driver: Any, dev_num: int, *, packed: bool | None = None, **kw: Any) -> "RngClient":
        """Probe ``dev_num`` on ``driver`` (an AmpDriver) and wrap it."""
        info = driver.info(dev_num)
        if info.device_id != VIRTIO_ID_RNG:
            raise VmsgampError(f"device {dev_num} is {info.name}, not rng")
        return cls(driver.open(dev_num, packed=packed), **kw)

    def _post(self) -> None:
        posted = False
        while self._free:
            i = self._free.pop()
            addr, _ = self._bufs[i]
            if not self._q.add([], [(addr, self.request)], token=i):
                self._free.append(i)
                break
            posted = True
        if posted:
            self.dev.notify(0)

    def _collect(self) -> None:
        while (u := self._q.get_used()) is not None:
            i, ln = u
            _, view = self._bufs[i]
            ln = min(ln, self.request)
            self._buf += view[:ln]
            self.bytes_read += ln
            self._free.append(i)

    def read(self, n: int, timeout: float | None = None) -> bytes:
        """Exactly ``n`` bytes of entropy, or TimeoutError."""
        if self._closed:
            raise ValueError("read from a closed RngClient")
        timeout = self.timeout if timeout is None else timeout
        clock = self.dev.drv.bus.clock
        deadline = clock() + timeout
        while len(self._buf) < n:
            self._collect()
            if len(self._buf) >= n:
                break
            self._post()
            left = deadline - clock()
            if left <= 0:
                raise TimeoutError(f"rng device {self.dev.dev_num}: {len(self._buf)} of {n} bytes "
                                   f"arrived within {timeout} s")
            self.dev.wait_used(0, min(left, 0.5))
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def close(self) -> None:
        """Drop the buffer views (idempotent); the device keeps running."""
        if self._closed:
            return
        self._closed = True
        for _, view in self._bufs:
            view.release()
        self._bufs = []

    def __enter__(self) -> "RngClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
