"""One driver-side client per device model, and a way to open the right one.

=============  ==========  =============================================
device         virtio id   client
=============  ==========  =============================================
blk            2           :class:`~vmsgamp.devices.blk_client.BlkClient`
console        3           :class:`~vmsgamp.devices.console_client.ConsoleClient`
rng            4           :class:`~vmsgamp.devices.rng_client.RngClient`
i2c            34          :class:`~vmsgamp.devices.i2c_client.I2cClient`
gpio           41          :class:`~vmsgamp.devices.gpio_client.GpioClient`
=============  ==========  =============================================

Each has ``Client.open(amp_driver, dev_num, ...)`` (probe, negotiate the
features it uses, bring the queues up) and ``close()``.
"""
from __future__ import annotations

import importlib
from typing import Any

from vmsgamp.errors import VmsgampError

__all__ = ["CLIENTS", "client_class", "open_client"]

# virtio device id -> (module, class)
CLIENTS: dict[int, tuple[str, str]] = {
    2: ("vmsgamp.devices.blk_client", "BlkClient"),
    3: ("vmsgamp.devices.console_client", "ConsoleClient"),
    4: ("vmsgamp.devices.rng_client", "RngClient"),
    34: ("vmsgamp.devices.i2c_client", "I2cClient"),
    41: ("vmsgamp.devices.gpio_client", "GpioClient"),
}


def client_class(device_id: int) -> Any:
    """The client class for a virtio device id (KeyError if there is none)."""
    module, name = CLIENTS[device_id]
    return getattr(importlib.import_module(module), name)


def open_client(driver: Any, dev_num: int, **kw: Any) -> Any:
    """The right client for device ``dev_num``, opened."""
    info = driver.info(dev_num)
    if info.device_id not in CLIENTS:
        raise VmsgampError(f"device {dev_num} ({info.name}) has no client")
    return client_class(info.device_id).open(driver, dev_num, **kw)
