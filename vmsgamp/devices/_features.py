"""Feature bit names, for people: the transport bits every device shares
(virtio 1.x "Reserved Feature Bits") and each device type's own bits."""
from __future__ import annotations

TRANSPORT_FEATURES: dict[int, str] = {
    28: "INDIRECT_DESC", 29: "EVENT_IDX", 30: "VHOST_USER_F_PROTOCOL_FEATURES", 32: "VERSION_1", 33: "ACCESS_PLATFORM",
    34: "RING_PACKED", 35: "IN_ORDER", 36: "ORDER_PLATFORM", 37: "SR_IOV",
    38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA", 40: "RING_RESET", 41: "ADMIN_VQ",
}

# device id -> {bit: name} (virtio 1.3 device chapters)
DEVICE_FEATURES: dict[int, dict[int, str]] = {
    2: {1: "BLK_SIZE_MAX", 2: "BLK_SEG_MAX", 4: "BLK_GEOMETRY", 5: "BLK_RO", 6: "BLK_BLK_SIZE",
        9: "BLK_FLUSH", 10: "BLK_TOPOLOGY", 11: "BLK_CONFIG_WCE", 12: "BLK_MQ", 13: "BLK_DISCARD",
        14: "BLK_WRITE_ZEROES", 15: "BLK_LIFETIME", 16: "BLK_SECURE_ERASE", 17: "BLK_ZONED"},
    3: {0: "CONSOLE_SIZE", 1: "CONSOLE_MULTIPORT", 2: "CONSOLE_EMERG_WRITE"},
    4: {},
    34: {0: "I2C_ZERO_LENGTH_REQUEST"},
    41: {0: "GPIO_IRQ"},
}


def feature_names(bits: int, device_id: int | None = None) -> list[str]:
    """Names of the set bits, lowest first; a bit without a name is
    ``bitN``."""
    own = DEVICE_FEATURES.get(device_id, {}) if device_id is not None else {}
    return [TRANSPORT_FEATURES.get(b) or own.get(b) or f"bit{b}"
            for b in range(64) if bits >> b & 1]
