"""The Gen B layout descriptor (``vmamp_shmem``, csrc/vmamp_shmem.h).

The device side writes a 64-byte descriptor at the start of the FIFO window
(magic last) that gives the ring size, the slot size and the offsets of the
two queue heads and the two element arrays; the driver side reads it back
and validates every field before it touches anything the descriptor points
at.  This module holds both halves: what the device writes
(:func:`default_layout`, ``layout_*`` for Cython callers) and what the driver
reads (:func:`read_layout`, :func:`read_layout_stable`,
:func:`validate_layout`).  docs/virtio-msg.md describes the layout.

Memory order: R0/A0 is the device's release store of the magic after every
other field / the driver's acquire load of it.  A device that rewrites the
layout first clears the magic (then a release fence), so a driver that reads
the descriptor twice and gets the magic and equal fields both times has a
consistent copy (:func:`read_layout_stable`).
"""
from libc.stdint cimport uint16_t, uint32_t, uint64_t

from vmsgamp._core.io cimport (
    VM_RELAXED, VM_ACQUIRE, VM_RELEASE,
    vm_load8, vm_load16, vm_load64, vm_store16, vm_store64, vm_fence_acquire,
)
from vmsgamp._core.region cimport Region

from vmsgamp.errors import LayoutError

STATE_NAMES = {VMAMP_STATE_INIT: "INIT", VMAMP_STATE_READY: "READY", VMAMP_STATE_RUN: "RUN",
               VMAMP_STATE_SHUTDOWN: "SHUTDOWN", VMAMP_STATE_PEER_DEAD: "PEER_DEAD"}


cdef inline uint64_t _align(uint64_t v, uint64_t a) noexcept:
    return (v + a - 1) & ~(a - 1)


def state_name(int status):
    """The state of a queue-head status word ('RUN', ...); flag bits ignored."""
    cdef int st = status & VMAMP_STATE_MASK
    return STATE_NAMES.get(st, f"UNKNOWN({st})")


def default_layout(size_t window, uint32_t slot_size=64):
    """The Gen B layout a device writes for a window: offsets and N, as the
    2026 QEMU device does (8 KiB -> elements at 80, N = 63)."""
    cdef uint64_t first = _align(VMAMP_LAYOUT_SIZE + 2 * VMAMP_QUEUE_HEAD_SIZE, VMAMP_ALIGN)
    if slot_size < 8 or slot_size % VMAMP_ALIGN or slot_size > 0xFFFF:
        raise LayoutError("size_queue_elements", f"{slot_size}: a slot size must be a multiple of "
                                                 f"{VMAMP_ALIGN} between 8 and 65528")
    if window < first + 4 * slot_size:
        raise ValueError(f"window of {window} bytes is too small for a Gen B FIFO "
                         f"(need at least {first + 4 * slot_size})")
    n = (window - first) // (2 * slot_size)
    n = min(n, 0xFFFF)
    return {
        "num_queue_elements": n,
        "size_queue_elements": slot_size,
        "dev_queue_head_offset": VMAMP_LAYOUT_SIZE,
        "drv_queue_head_offset": VMAMP_LAYOUT_SIZE + VMAMP_QUEUE_HEAD_SIZE,
        "dev_queue_elements_offset": first,
        "drv_queue_elements_offset": first + n * slot_size,
    }


def device_layout(size_t window, uint32_t slot_size=64):
    """Every descriptor field the device side writes: :func:`default_layout`
    plus the fixed ones (version 1, no features, no notification areas), in
    the form :func:`read_layout` returns."""
    lay = default_layout(window, slot_size)
    lay.update(magic=VMAMP_LAYOUT_MAGIC, length=VMAMP_LAYOUT_LENGTH, version=VMAMP_LAYOUT_VERSION,
               features=0, num_notif=0, num_vq_notif_per_device=0, reserved=0,
               dev_notif_offset=0, drv_notif_offset=0)
    return lay


def read_layout(Region region, size_t offset=0):
    """Read the Gen B layout descriptor fields (no validation)."""
    cdef char *p = region.ptr(offset, VMAMP_LAYOUT_SIZE)
    return {
        "magic": vm_load16(p + VMAMP_OFF_MAGIC, VM_ACQUIRE),  # A0 <- device R0
        "length": vm_load16(p + VMAMP_OFF_LENGTH, VM_RELAXED),
        "version": vm_load16(p + VMAMP_OFF_VERSION, VM_RELAXED),
        "features": vm_load16(p + VMAMP_OFF_FEATURES, VM_RELAXED),
        "num_notif": vm_load8(p + VMAMP_OFF_NUM_NOTIF, VM_RELAXED),
        "num_vq_notif_per_device": vm_load8(p + VMAMP_OFF_NUM_VQ_NOTIF, VM_RELAXED),
        "num_queue_elements": vm_load16(p + VMAMP_OFF_NUM_ELEMENTS, VM_RELAXED),
        "size_queue_elements": vm_load16(p + VMAMP_OFF_SIZE_ELEMENTS, VM_RELAXED),
        "reserved": vm_load16(p + VMAMP_OFF_RESERVED, VM_RELAXED),
        "dev_notif_offset": vm_load64(p + VMAMP_OFF_DEV_NOTIF, VM_RELAXED),
        "dev_queue_head_offset": vm_load64(p + VMAMP_OFF_DEV_HEAD, VM_RELAXED),
        "dev_queue_elements_offset": vm_load64(p + VMAMP_OFF_DEV_ELEMENTS, VM_RELAXED),
        "drv_notif_offset": vm_load64(p + VMAMP_OFF_DRV_NOTIF, VM_RELAXED),
        "drv_queue_head_offset": vm_load64(p + VMAMP_OFF_DRV_HEAD, VM_RELAXED),
        "drv_queue_elements_offset": vm_load64(p + VMAMP_OFF_DRV_ELEMENTS, VM_RELAXED),
    }


def read_layout_stable(Region region, size_t offset=0):
    """The device's layout, or None while it is absent or being rewritten.
    Read three times with acquire fences between, and taken only when all
    reads agree and carry the magic: the device clears the magic (then a
    release fence) before it rewrites any field, so a read that saw a new
    field value sees the cleared magic or the final one on the second
    pass, and a mix of old and new fields cannot match both times."""
    first = read_layout(region, offset)
    if first["magic"] != VMAMP_LAYOUT_MAGIC:
        return None
    # Three reads, not two: a device rewriting as fast as we read can, with
    # a whole rewrite between two reads (the magic valid again, an ABA the
    # descriptor has no generation field to catch), hand both the same mix
    # of two geometries (tests/test_hostile_races.py saw it once in ~10 runs
    # of 300 attaches).  Each extra agreeing read needs that interleaving
    # again; a device that keeps rewriting is never taken at all.
    for _ in range(2):
        vm_fence_acquire()
        if read_layout(region, offset) != first:
            return None
    region.check_alive()
    return first


def validate_layout(dict lay, size_t window, uint32_t min_slot=8):
    """Check a Gen B layout as the driver side must: every field in range,
    every area aligned, inside the window and not overlapping any other.
    Raises LayoutError naming the field.

    Alignment (csrc/vmamp_shmem.h, VMAMP_ALIGN): the slot size is a multiple
    of 8 and every queue head, element array and notification area starts
    8-byte aligned, so every 16-bit index access and every word-sized slot
    copy is naturally aligned (an unaligned atomic is undefined behaviour,
    and faults on arm64 device memory).  Real devices follow this: Linux and
    QEMU write 64-byte slots at 8-aligned offsets."""
    if lay["magic"] != VMAMP_LAYOUT_MAGIC:
        raise LayoutError("magic", f"{lay['magic']:#06x}, expected {VMAMP_LAYOUT_MAGIC:#06x} ('LO')")
    if lay["length"] != VMAMP_LAYOUT_LENGTH:
        raise LayoutError("length", f"{lay['length']}, expected {VMAMP_LAYOUT_LENGTH}")
    if lay["version"] != VMAMP_LAYOUT_VERSION:
        raise LayoutError("version", f"{lay['version']}, only version {VMAMP_LAYOUT_VERSION} is known")
    if lay["features"] & ~VMAMP_FEAT_KNOWN:
        raise LayoutError("features", f"unknown feature bits {lay['features'] & ~VMAMP_FEAT_KNOWN:#x}")
    if lay["reserved"] != 0:
        raise LayoutError("reserved", f"{lay['reserved']:#x}, must be 0")
    nn = lay["num_notif"]
    if nn > VMAMP_MAX_NUM_NOTIF:
        raise LayoutError("num_notif", f"{nn} > {VMAMP_MAX_NUM_NOTIF}")
    if nn and lay["num_vq_notif_per_device"] not in (1, 2, 4, 8, 16):
        raise LayoutError("num_vq_notif_per_device",
                          f"{lay['num_vq_notif_per_device']}, must be 1, 2, 4, 8 or 16")
    n = lay["num_queue_elements"]
    if n < 2:
        raise LayoutError("num_queue_elements", f"{n}, must be at least 2")
    sz = lay["size_queue_elements"]
    if sz < min_slot:
        raise LayoutError("size_queue_elements", f"{sz}, must be at least {min_slot}")
    if sz % VMAMP_ALIGN:
        raise LayoutError("size_queue_elements", f"{sz} is not a multiple of {VMAMP_ALIGN} "
                                                 f"(slots would start misaligned)")
    areas = [("layout", 0, VMAMP_LAYOUT_SIZE)]
    notif_len = nn * 8 * (3 if lay["features"] & VMAMP_FEAT_MASKED_NOTIF else 2)
    for side in ("dev", "drv"):
        areas.append((f"{side}_queue_head_offset", lay[f"{side}_queue_head_offset"],
                      VMAMP_QUEUE_HEAD_SIZE, VMAMP_ALIGN))
        areas.append((f"{side}_queue_elements_offset", lay[f"{side}_queue_elements_offset"],
                      n * sz, VMAMP_ALIGN))
        if nn:
            areas.append((f"{side}_notif_offset", lay[f"{side}_notif_offset"], notif_len, VMAMP_ALIGN))
        elif lay[f"{side}_notif_offset"] != 0:
            raise LayoutError(f"{side}_notif_offset", "must be 0 when num_notif is 0")
    checked = [("layout", 0, VMAMP_LAYOUT_SIZE)]
    for name, off, ln, align in areas[1:]:
        if off == 0:
            raise LayoutError(name, "is 0 (overlaps the layout descriptor)")
        if off % align:
            raise LayoutError(name, f"{off:#x} is not {align}-byte aligned")
        if off + ln > window:
            raise LayoutError(name, f"area [{off:#x}, {off + ln:#x}) ends outside the {window:#x}-byte window")
        for oname, ooff, oln in checked:
            if off < ooff + oln and ooff < off + ln:
                raise LayoutError(name, f"area [{off:#x}, {off + ln:#x}) overlaps {oname} "
                                        f"[{ooff:#x}, {ooff + oln:#x})")
        checked.append((name, off, ln))
    return lay


# ---- the device side's write, in three steps --------------------------------------
# 1. layout_invalidate: clear the magic (a single relaxed store: the driver
#    polls it).  The caller then clears whatever else must not be paired
#    with the new fields and issues a release fence, so no field written in
#    step 2 becomes visible before the cleared magic.
# 2. layout_write_fields: every other field (relaxed; ordered by step 3).
# 3. layout_publish (R0): the magic, with release.

cdef void layout_invalidate(char *base) noexcept nogil:
    vm_store16(base + VMAMP_OFF_MAGIC, 0, VM_RELAXED)


cdef int layout_write_fields(char *base, dict lay) except -1:
    vm_store16(base + VMAMP_OFF_LENGTH, lay["length"], VM_RELAXED)
    vm_store16(base + VMAMP_OFF_VERSION, lay["version"], VM_RELAXED)
    vm_store16(base + VMAMP_OFF_FEATURES, lay["features"], VM_RELAXED)
    # num_notif (u8) and num_vq_notif_per_device (u8) as one aligned 16-bit word
    vm_store16(base + VMAMP_OFF_NUM_NOTIF, <uint16_t>(lay["num_notif"]
                                                      | (lay["num_vq_notif_per_device"] << 8)),
               VM_RELAXED)
    vm_store16(base + VMAMP_OFF_NUM_ELEMENTS, lay["num_queue_elements"], VM_RELAXED)
    vm_store16(base + VMAMP_OFF_SIZE_ELEMENTS, lay["size_queue_elements"], VM_RELAXED)
    vm_store16(base + VMAMP_OFF_RESERVED, lay["reserved"], VM_RELAXED)
    vm_store64(base + VMAMP_OFF_DEV_NOTIF, lay["dev_notif_offset"], VM_RELAXED)
    vm_store64(base + VMAMP_OFF_DEV_HEAD, lay["dev_queue_head_offset"], VM_RELAXED)
    vm_store64(base + VMAMP_OFF_DEV_ELEMENTS, lay["dev_queue_elements_offset"], VM_RELAXED)
    vm_store64(base + VMAMP_OFF_DRV_NOTIF, lay["drv_notif_offset"], VM_RELAXED)
    vm_store64(base + VMAMP_OFF_DRV_HEAD, lay["drv_queue_head_offset"], VM_RELAXED)
    vm_store64(base + VMAMP_OFF_DRV_ELEMENTS, lay["drv_queue_elements_offset"], VM_RELAXED)
    return 0


cdef void layout_publish(char *base) noexcept nogil:
    # R0 -> driver A0: every layout field must be visible before the magic.
    vm_store16(base + VMAMP_OFF_MAGIC, VMAMP_LAYOUT_MAGIC, VM_RELEASE)
