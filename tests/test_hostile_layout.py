"""A hostile Gen B layout must never make us do a misaligned access: slot sizes
that are not a multiple of 8 and queue heads or element arrays off an 8-byte
boundary are refused, naming the field."""
import pytest

from vmsgamp._core.fifo import MsgFifo, default_layout, validate_layout
from vmsgamp._core.region import Region
from vmsgamp.errors import LayoutError
from vmsgamp.testing.fifo_model import PyFifoPeer


def _good_layout():
    lay = default_layout(8192)
    lay.update(magic=0x4C4F, length=64, version=1, features=0, num_notif=0,
               num_vq_notif_per_device=0, reserved=0, dev_notif_offset=0, drv_notif_offset=0)
    return lay


@pytest.mark.parametrize("slot", [63, 9, 12, 60])
def test_slot_size_not_a_multiple_of_8_is_refused(slot):
    lay = _good_layout()
    lay["size_queue_elements"] = slot   # 63 * 63 still fits the window: only alignment is wrong
    with pytest.raises(LayoutError, match="size_queue_elements: .*multiple of 8") as ei:
        validate_layout(lay, 8192)
    assert ei.value.field == "size_queue_elements"


@pytest.mark.parametrize("field,value", [
    ("dev_queue_elements_offset", 81),
    ("drv_queue_elements_offset", 4113),
    ("dev_queue_elements_offset", 84),
    ("dev_queue_head_offset", 66),      # 2-aligned was enough before
    ("drv_queue_head_offset", 76),
])
def test_areas_off_an_8_byte_boundary_are_refused(field, value):
    lay = _good_layout()
    lay[field] = value
    with pytest.raises(LayoutError, match="not 8-byte aligned") as ei:
        validate_layout(lay, 8192)
    assert ei.value.field == field


def test_what_real_peers_write_is_accepted():
    # Linux and QEMU: 64-byte slots at 8-aligned offsets; smaller 8-multiples too.
    for window in (8192, 16384, 65536):
        for slot in (8, 16, 64, 256):
            lay = _good_layout()
            lay.update(default_layout(window, slot))
            assert validate_layout(lay, window) is lay


@pytest.mark.parametrize("field,value", [("size_queue_elements", 63), ("size_queue_elements", 9),
                                         ("dev_queue_elements_offset", 81),
                                         ("drv_queue_elements_offset", 4113)])
def test_driver_refuses_a_hostile_device_layout(field, value):
    """End to end: the driver side reads the layout a device wrote and refuses
    it before doing a single access at an odd address."""
    region = Region.memfd(8192)
    peer = PyFifoPeer(region.view(), role="device")
    peer.write_layout()
    lay = peer.read_layout()
    offsets = {"size_queue_elements": 12, "dev_queue_elements_offset": 32,
               "drv_queue_elements_offset": 56}
    (region.store16 if field == "size_queue_elements" else region.store64)(offsets[field], value)
    drv = MsgFifo(region, role="driver")
    with pytest.raises(LayoutError) as ei:
        drv.start(timeout=1)
    assert ei.value.field == field and lay["magic"] == 0x4C4F
    assert region.read(72, 8) == b"\0" * 8     # the driver never wrote its queue head
    drv.close()
    peer.release()
    region.close()


def test_local_misalignment_is_refused_up_front():
    region = Region.memfd(16384)
    for slot in (63, 9, 4, 0x10000):
        with pytest.raises(LayoutError, match="size_queue_elements"):
            MsgFifo(region, role="device", slot_size=slot)
        with pytest.raises(LayoutError, match="size_queue_elements"):
            default_layout(8192, slot)
    for layout in ("b", "a"):
        with pytest.raises(ValueError, match="not 8-byte aligned"):
            MsgFifo(region, role="driver", layout=layout, offset=4)
    region.close()
