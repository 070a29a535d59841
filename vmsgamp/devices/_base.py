"""VirtioDevice: the base of every device model, independent of the transport.

A transport (the virtio-msg AMP bus today, vhost-user or others later) owns
feature negotiation, the status state machine and the virtqueues; it calls
into the model through this small interface:

* ``device_id``, ``features`` (device-specific bits only; the transport adds
  VERSION_1, INDIRECT_DESC, EVENT_IDX, RING_PACKED), ``num_queues``,
  ``queue_max_size``, ``config`` (a bytearray) and ``config_generation``;
* ``features_ok(features)`` when the driver sets FEATURES_OK (return False to
  refuse), ``activate(queues, features)`` at DRIVER_OK, ``reset()`` on a
  status write of 0 (or when the peer went away);
* ``handle_queue(index, queue)`` after the driver kicked queue ``index``:
  pop every available chain (keep the ones that cannot complete yet, e.g.
  receive buffers waiting for input), complete them with ``queue.add_used``;
  return True if anything was used (the transport then decides whether to
  interrupt the driver).  The transport suppresses kicks around the call and
  calls again if chains arrived meanwhile;
* ``read_config`` / ``write_config``.

A model that produces work on its own (console input, GPIO interrupts) calls
``self.notify_queue(index)`` after adding used buffers, and may expose
``fileno()``-style sources through ``poll_fds()`` / ``on_fd_ready(fd)`` for
the serving loop.  A malformed request from the driver must complete with the
device type's error status; an exception escaping ``handle_queue`` is treated
by the transport as a broken queue (DEVICE_NEEDS_RESET), never as a crash.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("vmsgamp.devices")

# Transport feature bits (virtio 1.x "Reserved Feature Bits").
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34


def offered_features(device: "VirtioDevice", *, packed: bool = True, event_idx: bool = True,
                     indirect: bool = True) -> int:
    """What a transport offers for ``device``: its own bits, VERSION_1
    always, and the ring features it implements.  Never NOTIFICATION_DATA
    (Linux's virtio-msg encoding of it is broken) nor RING_RESET."""
    bits = device.features | 1 << VIRTIO_F_VERSION_1
    if indirect:
        bits |= 1 << VIRTIO_F_INDIRECT_DESC
    if event_idx:
        bits |= 1 << VIRTIO_F_EVENT_IDX
    if packed:
        bits |= 1 << VIRTIO_F_RING_PACKED
    return bits


# QEMU uses 0x554D4551 ("QEMU"); ours spells "VMSG".
VMSGAMP_VENDOR_ID = 0x47534D56


class VirtioDevice:
    """Base class for device models.  Subclasses set the class attributes and
    override what they need."""

    device_id: int = 0
    name: str = "virtio"
    features: int = 0          # device-type feature bits offered
    num_queues: int = 1
    queue_max_size: int = 256
    vendor_id: int = VMSGAMP_VENDOR_ID

    def __init__(self) -> None:
        self.config = bytearray(self.config_size())
        self.config_generation = 0
        self.negotiated = 0
        self.queues: list[Any | None] = []
        self.active = False
        # Set by the transport: callback(index) -> None sends the used-buffer
        # notification if the queue says so; callback() -> None for config.
        self._notify_queue: Callable[[int], None] | None = None
        self._notify_config: Callable[[], None] | None = None

    # ---- description ------------------------------------------------------
    def config_size(self) -> int:
        """Size of the device-specific configuration space."""
        return 0

    def describe(self) -> dict[str, Any]:
        """Facts for `vmsgamp serve` output and `emulate` reports."""
        return {"name": self.name, "device_id": self.device_id}

    # ---- negotiation and lifecycle --------------------------------------------
    def features_ok(self, features: int) -> bool:
        """The driver picked ``features`` (already checked to be a subset of
        what was offered).  Return False to refuse FEATURES_OK."""
        return True

    def activate(self, queues: Sequence[Any | None], features: int) -> None:
        """DRIVER_OK: ``queues[i]`` is the device-side queue i (None if the
        driver did not set it up)."""
        self.queues = list(queues)
        self.negotiated = features
        self.active = True

    def reset(self) -> None:
        """Back to the initial state (status 0, peer gone, re-negotiation)."""
        self.queues = []
        self.negotiated = 0
        self.active = False

    def queue_reset(self, index: int) -> None:
        """RESET_VQUEUE: forget queue ``index`` and every chain held from it
        (its ring memory now belongs to the driver again)."""
        if index < len(self.queues):
            self.queues[index] = None

    def has_feature(self, bit: int) -> bool:
        return bool(self.negotiated >> bit & 1)

    # ---- queues -----------------------------------------------------------------
    def handle_queue(self, index: int, queue: Any) -> bool:
        """The driver made buffers available on queue ``index``."""
        return False

    def notify_queue(self, index: int) -> None:
        """Used buffers were added outside handle_queue (device-initiated)."""
        if self._notify_queue is not None:
            self._notify_queue(index)

    # ---- configuration space -----------------------------------------------------
    def read_config(self, offset: int, length: int) -> bytes:
        return bytes(self.config[offset:offset + length])

    def write_config(self, offset: int, data: bytes) -> bool:
        """Driver write; return False to refuse.  Default: read-only."""
        return False

    def set_config(self, offset: int, data: bytes, *, notify: bool = True) -> None:
        """Device-side config change: bump the generation and tell the driver."""
        self.config[offset:offset + len(data)] = data
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if notify and self._notify_config is not None:
            self._notify_config()

    # ---- asynchronous sources ------------------------------------------------------
    def poll_fds(self) -> Sequence[int]:
        """File descriptors the serving loop should watch for this device."""
        return ()

    def on_fd_ready(self, fd: int) -> None:
        """One of poll_fds() is readable."""

    def close(self) -> None:
        """Release host resources (ptys, files, sockets)."""


# ---- registry for `--devices TYPE:key=value;...` ---------------------------------

_REGISTRY: dict[str, tuple[Callable[..., VirtioDevice], dict[str, str]]] = {}


def register_device(type_name: str, factory: Callable[..., VirtioDevice], keys: dict[str, str]) -> None:
    """Make ``type_name`` usable in ``--devices``; ``keys`` maps each accepted
    option to a one-line help text."""
    _REGISTRY[type_name] = (factory, keys)


def device_types() -> dict[str, dict[str, str]]:
    _load_builtin()
    return {name: keys for name, (_, keys) in sorted(_REGISTRY.items())}


def _load_builtin() -> None:
    import importlib

    for mod in ("rng", "console", "i2c", "gpio", "blk"):
        try:
            importlib.import_module(f"vmsgamp.devices.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"vmsgamp.devices.{mod}":
                raise


def parse_device_list(spec: str) -> list[VirtioDevice]:
    """``rng:source=/path,console:pty,i2c:sim,gpio:lines=8`` -> models, in
    order (device numbers are assigned in this order).  An item is
    ``TYPE[:key=value[;key=value]]``; a bare word after the colon is a flag
    (``console:pty`` means ``console:pty=1``).  Unknown types or keys raise
    ValueError listing what exists."""
    _load_builtin()
    devices: list[VirtioDevice] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        type_name, _, opts = item.partition(":")
        if type_name not in _REGISTRY:
            known = ", ".join(sorted(_REGISTRY)) or "none"
            raise ValueError(f"unknown device type {type_name!r}; known types: {known}")
        factory, keys = _REGISTRY[type_name]
        kwargs: dict[str, str] = {}
        for opt in filter(None, (o.strip() for o in opts.split(";"))):
            key, eq, value = opt.partition("=")
            if key not in keys:
                known = ", ".join(sorted(keys)) or "none"
                raise ValueError(f"device {type_name!r} has no option {key!r}; options: {known}")
            kwargs[key] = value if eq else "1"
        devices.append(factory(**kwargs))
    return devices
