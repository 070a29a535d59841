"""Device-status state machine helpers (virtio 1.x "Device Initialization").

Driver order: 0 -> ACKNOWLEDGE -> +DRIVER -> +FEATURES_OK -> +DRIVER_OK; FAILED
at any time; writing 0 resets.  Bits are only added, never removed, except by a
reset.  DEVICE_NEEDS_RESET belongs to the device.
"""
from __future__ import annotations

from vmsgamp.errors import LocalProtocolError

from ._constants import DeviceStatus

__all__ = ["PROBE_STATUS_SEQUENCE", "check_driver_status_write", "device_status_after_write"]

S = DeviceStatus

# The writes Linux performs while probing (docs/virtio-msg.md#the-probe-sequence).
PROBE_STATUS_SEQUENCE: tuple[int, ...] = (
    S.ACKNOWLEDGE,
    S.ACKNOWLEDGE | S.DRIVER,
    S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK,
    S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK,
)

_PREREQUISITE = (
    (S.DRIVER, S.ACKNOWLEDGE),
    (S.FEATURES_OK, S.DRIVER),
    (S.DRIVER_OK, S.DRIVER),  # FEATURES_OK is skipped by legacy (no VERSION_1) drivers
)


def check_driver_status_write(current: int | None, new: int) -> None:
    """Raise LocalProtocolError if a driver must not write ``new`` now.

    ``current`` is the last status the device reported (None = unknown, then
    only the bit-order rules are checked).
    """
    if new < 0 or new > 0xFF:
        raise LocalProtocolError(f"device status 0x{new:x} is not an 8-bit value")
    if new == 0 or new & S.FAILED:
        return
    for bit, needed in _PREREQUISITE:
        if new & bit and not new & needed:
            raise LocalProtocolError(f"status 0x{new:02x}: {bit.name} needs {needed.name}")
    if current is not None:
        # The device may have set DEVICE_NEEDS_RESET or dropped FEATURES_OK; the
        # driver only may not clear bits it set itself.
        cleared = current & ~new & ~(S.DEVICE_NEEDS_RESET | S.FEATURES_OK)
        if cleared:
            raise LocalProtocolError(
                f"status 0x{new:02x} clears bits 0x{cleared:02x} of 0x{current:02x}; only a reset (0) may")


def device_status_after_write(current: int, requested: int, *, features_acceptable: bool = True) -> int:
    """Status a device reports after the driver writes ``requested``.

    0 resets.  FEATURES_OK is refused (left clear) when the negotiated features
    are not acceptable.  DEVICE_NEEDS_RESET sticks until a reset.
    """
    requested &= 0xFF
    if requested == 0:
        return 0
    result = requested
    if result & S.FEATURES_OK and not features_acceptable:
        result &= ~S.FEATURES_OK
    result |= current & S.DEVICE_NEEDS_RESET
    return int(result)
