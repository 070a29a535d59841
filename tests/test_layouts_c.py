"""The C headers in csrc/ are the single definition of every shared layout:
compile them and check that the Python side (the Cython core's constants
and the pure-Python reference peer) agrees with sizeof/offsetof."""
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmsgamp._core.fifo import default_layout
from vmsgamp._core.virtq import packed_area_sizes, split_area_sizes
from vmsgamp.testing import fifo_model

CSRC = Path(__file__).resolve().parents[1] / "csrc"

PROGRAM = r"""
#include <stdio.h>
#include "vmamp_shmem.h"
#include "spsc_queue.h"
#include "virtq.h"
#define O(t, f) printf("\"%s.%s\": %zu,\n", #t, #f, offsetof(struct t, f))
#define S(t) printf("\"sizeof %s\": %zu,\n", #t, sizeof(struct t))
int main(void) {
    printf("{\n");
    S(vmamp_shmem_layout); S(vmamp_shmem_queue_head);
    O(vmamp_shmem_layout, magic); O(vmamp_shmem_layout, length); O(vmamp_shmem_layout, version);
    O(vmamp_shmem_layout, features); O(vmamp_shmem_layout, num_notif);
    O(vmamp_shmem_layout, num_vq_notif_per_device); O(vmamp_shmem_layout, num_queue_elements);
    O(vmamp_shmem_layout, size_queue_elements); O(vmamp_shmem_layout, reserved);
    O(vmamp_shmem_layout, dev_notif_offset); O(vmamp_shmem_layout, dev_queue_head_offset);
    O(vmamp_shmem_layout, dev_queue_elements_offset); O(vmamp_shmem_layout, drv_notif_offset);
    O(vmamp_shmem_layout, drv_queue_head_offset); O(vmamp_shmem_layout, drv_queue_elements_offset);
    O(vmamp_shmem_queue_head, magic); O(vmamp_shmem_queue_head, status);
    O(vmamp_shmem_queue_head, tail); O(vmamp_shmem_queue_head, head);
    S(virtq_desc); O(virtq_desc, addr); O(virtq_desc, len); O(virtq_desc, flags); O(virtq_desc, next);
    printf("\"layout_magic\": %u, \"queue_magic\": %u, \"spsc_capacity\": %u,\n",
           VMAMP_LAYOUT_MAGIC, VMAMP_QUEUE_MAGIC, SPSC_CAPACITY);
    printf("\"spsc_head\": %u, \"spsc_tail\": %u, \"spsc_packets\": %u\n}\n",
           SPSC_OFF_HEAD, SPSC_OFF_TAIL, SPSC_OFF_PACKETS);
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler on PATH: the package itself could not have been built either")
    d = tmp_path_factory.mktemp("layout")
    (d / "l.c").write_text(PROGRAM)
    subprocess.run([cc, "-std=gnu11", "-I", str(CSRC), "-o", str(d / "l"), str(d / "l.c")], check=True)
    return json.loads(subprocess.run([str(d / "l")], check=True, capture_output=True, text=True).stdout)


def test_gen_b_layout_matches_python(c_layout):
    assert c_layout["sizeof vmamp_shmem_layout"] == fifo_model._LAYOUT.size == 64
    # struct format of the reference peer, field by field
    fmt = fifo_model._LAYOUT.format.lstrip("<")
    offsets, off = [], 0
    for ch in fmt:
        offsets.append(off)
        off += struct.calcsize("<" + ch)
    names = ["magic", "length", "version", "features", "num_notif", "num_vq_notif_per_device",
             "num_queue_elements", "size_queue_elements", "reserved", "dev_notif_offset",
             "dev_queue_head_offset", "dev_queue_elements_offset", "drv_notif_offset",
             "drv_queue_head_offset", "drv_queue_elements_offset"]
    assert [c_layout[f"vmamp_shmem_layout.{n}"] for n in names] == offsets
    assert c_layout["sizeof vmamp_shmem_queue_head"] == 8
    assert [c_layout[f"vmamp_shmem_queue_head.{n}"] for n in ("magic", "status", "tail", "head")] == [0, 2, 4, 6]
    assert (c_layout["layout_magic"], c_layout["queue_magic"]) == (fifo_model.LAYOUT_MAGIC, fifo_model.QUEUE_MAGIC)
    lay = default_layout(8192)
    assert lay["dev_queue_head_offset"] == c_layout["sizeof vmamp_shmem_layout"]
    assert lay["drv_queue_head_offset"] == 64 + c_layout["sizeof vmamp_shmem_queue_head"]


def test_gen_a_and_virtq_layouts(c_layout):
    assert c_layout["spsc_capacity"] == 62
    assert (c_layout["spsc_head"], c_layout["spsc_tail"], c_layout["spsc_packets"]) == (0, 64, 128)
    assert c_layout["sizeof virtq_desc"] == 16
    assert [c_layout[f"virtq_desc.{f}"] for f in ("addr", "len", "flags", "next")] == [0, 8, 12, 14]
    d, a, u = split_area_sizes(256)
    assert (d, a, u) == (16 * 256, 6 + 2 * 256, 6 + 8 * 256)
    assert packed_area_sizes(5) == (16 * 5, 4, 4)
