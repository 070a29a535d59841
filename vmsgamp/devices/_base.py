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

_REGISTRY: dict[str, tuple[Callable[..., VirtioDevice], dict[str, str], str | None]] = {}


def register_device(type_name: str, factory: Callable[..., VirtioDevice], keys: dict[str, str],
                    *, path_key: str | None = None) -> None:
    """Make ``type_name`` usable in ``--devices``; ``keys`` maps each accepted
    option to a one-line help text.  ``path_key`` names the option a bare
    path stands for (``blk:disk.img`` = ``blk:file=disk.img``)."""
    _REGISTRY[type_name] = (factory, keys, path_key)


def device_types() -> dict[str, dict[str, str]]:
    _load_builtin()
    return {name: keys for name, (_, keys, _p) in sorted(_REGISTRY.items())}


def device_path_keys() -> dict[str, str]:
    """type -> the option a bare path stands for, for the types that have one."""
    _load_builtin()
    return {name: p for name, (_, _k, p) in sorted(_REGISTRY.items()) if p}


def _load_builtin() -> None:
    import importlib

    for mod in ("rng", "console", "i2c", "gpio", "blk"):
        try:
            importlib.import_module(f"vmsgamp.devices.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"vmsgamp.devices.{mod}":
                raise


class DeviceSpecError(ValueError):
    """A ``--devices`` item is wrong; the message names the item and, where
    it can, the option."""


def parse_device_spec(item: str) -> tuple[str, dict[str, str]]:
    """``TYPE[:OPTIONS]`` -> (type, options), checked against the registry.

    OPTIONS are ``key=value`` separated by ``;``; a bare word is a flag
    (``console:pty`` = ``console:pty=1``), except that for a type with a
    path option a first bare word that is not one of its keys is that path
    (``blk:disk.img``, ``rng:/dev/hwrng``).  Unknown types or keys raise
    DeviceSpecError listing what exists."""
    _load_builtin()
    type_name, _, opts = item.strip().partition(":")
    if type_name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise DeviceSpecError(f"unknown device type {type_name!r}; known types: {known}")
    _factory, keys, path_key = _REGISTRY[type_name]
    kwargs: dict[str, str] = {}
    for i, opt in enumerate(filter(None, (o.strip() for o in opts.split(";")))):
        key, eq, value = opt.partition("=")
        if not eq and i == 0 and path_key is not None and key not in keys:
            key, value, eq = path_key, opt, "="
        if key not in keys:
            known = ", ".join(sorted(keys)) or "none"
            hint = f" (a bare path means {path_key}=PATH only as the first option)" if path_key else ""
            raise DeviceSpecError(f"{type_name}: no option {key!r}; options: {known}{hint}")
        kwargs[key] = value if eq else "1"
    return type_name, kwargs


def build_device(item: str) -> VirtioDevice:
    """One device model from a ``--devices`` item; a bad option value
    raises DeviceSpecError (an OSError of the same type for a file that
    cannot be opened) naming the device and the option."""
    type_name, kwargs = parse_device_spec(item)
    factory = _REGISTRY[type_name][0]
    try:
        return factory(**kwargs)
    except OSError as e:
        # keep the type (FileNotFoundError, PermissionError...) for callers
        raise type(e)(e.errno, _option_error(type_name, kwargs, e)) from None
    except (ValueError, TypeError) as e:
        raise DeviceSpecError(_option_error(type_name, kwargs, e)) from None


def _option_error(type_name: str, kwargs: dict[str, str], e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror[0].lower() + e.strerror[1:]
    else:
        text = str(e)
        if text.startswith("invalid literal for int()"):
            text = "not an integer: " + text.rpartition(": ")[2]
        elif text.startswith("could not convert string to float"):
            text = "not a number: " + text.rpartition(": ")[2]
    for prefix in (f"{type_name}: ", f"{type_name} "):
        text = text.removeprefix(prefix)
    culprit = None
    for key, value in kwargs.items():
        if (isinstance(e, OSError) and e.filename == value) or f"'{value}'" in text \
                or text.startswith(f"{key} ") or f"{key}=" in text:
            culprit = key
            break
    if culprit is None and len(kwargs) == 1 and (isinstance(e, OSError) or text.startswith("not a")):
        culprit = next(iter(kwargs))
    if culprit is not None:
        return f"{type_name}: {culprit}={kwargs[culprit]}: {text}"
    return f"{type_name}: {text}"


def parse_device_list(spec: str) -> list[VirtioDevice]:
    """``rng:source=/path,console:pty,i2c:sim,gpio:lines=8`` -> models, in
    order (device numbers are assigned in this order); each item as
    :func:`parse_device_spec` reads it.  Models built before a bad item are
    closed again."""
    devices: list[VirtioDevice] = []
    try:
        items = [s.strip() for s in spec.split(",") if s.strip()]
        for item in items:
            parse_device_spec(item)          # every item's grammar first: no pty opened in vain
        for item in items:
            devices.append(build_device(item))
    except BaseException:
        for d in devices:
            d.close()
        raise
    return devices
