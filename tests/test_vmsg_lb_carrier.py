"""The vmsg-lb carrier without a kernel: where the region base comes from
(base=, /proc/iomem, the device tree), the node errors and what they say,
the real OsNodes on stand-in files, and who else holds the message node."""
from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys

import pytest

from vmsgamp.carriers import open_carrier, parse_uri
from vmsgamp.carriers.vmsg_lb import (
    BaseNotFound, OsNodes, RegionBase, VmsgLbError, base_from_device_tree, base_from_iomem, find_base,
    node_holders,
)
from vmsgamp.testing.fake_userapi import FakeUserApiKernel

IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
00100000-7effffff : System RAM
  01000000-01ffffff : Kernel code
7f000000-7f3fffff : Reserved
  7f000000-7f3fffff : virtio-msg-lb
fee00000-fee00fff : Local APIC
"""


def _proc(tmp_path, iomem: str | None = None, dt: dict | None = None):
    root = tmp_path / "proc"
    root.mkdir()
    if iomem is not None:
        (root / "iomem").write_text(iomem)
    if dt is not None:
        resv = root / "device-tree" / "reserved-memory"
        resv.mkdir(parents=True)
        for name, value in dt.items():
            if isinstance(value, bytes):
                (resv / name).write_bytes(value)
            else:
                node = resv / name
                node.mkdir()
                for attr, data in value.items():
                    (node / attr).write_bytes(data)
    return str(root)


def _cells(*values: int) -> bytes:
    return b"".join(struct.pack(">I", v) for v in values)


def test_base_from_iomem_nested_range(tmp_path):
    found = base_from_iomem(_proc(tmp_path, IOMEM))
    assert found == RegionBase(0x7F000000, f"{tmp_path}/proc/iomem (virtio-msg-lb)", 0x400000)


def test_iomem_hidden_from_non_root_says_so(tmp_path):
    hidden = "00000000-00000000 : System RAM\n  00000000-00000000 : virtio-msg-lb\n"
    with pytest.raises(BaseNotFound, match="only root"):
        base_from_iomem(_proc(tmp_path, hidden))


def test_iomem_with_two_ranges_is_ambiguous(tmp_path):
    two = IOMEM + "80000000-800fffff : virtio-msg-lb.1\n"
    with pytest.raises(BaseNotFound, match="2 virtio-msg-lb ranges"):
        base_from_iomem(_proc(tmp_path, two))


@pytest.mark.parametrize("acells,scells", [(2, 2), (1, 1), (2, 1)])
def test_base_from_device_tree(tmp_path, acells, scells):
    addr, size = 0x8_4000_0000 if acells == 2 else 0x4000_0000, 0x20_0000
    reg = _cells(*([addr >> 32] if acells == 2 else []), addr & 0xFFFFFFFF,
                 *([0] if scells == 2 else []), size)
    dt = {"#address-cells": _cells(acells), "#size-cells": _cells(scells),
          "linux,cma": {"compatible": b"shared-dma-pool\0", "reg": reg},
          "other-pool@1000": {"compatible": b"restricted-dma-pool\0", "reg": reg},
          f"virtio-msg-lb@{addr:x}": {"compatible": b"restricted-dma-pool\0", "reg": reg}}
    found = base_from_device_tree(_proc(tmp_path, dt=dt))
    assert (found.base, found.size) == (addr, size)
    assert "virtio-msg-lb@" in found.source


def test_device_tree_node_must_be_a_restricted_dma_pool(tmp_path):
    dt = {"vmsglb@0": {"compatible": b"shared-dma-pool\0", "reg": _cells(0, 0x1000, 0, 0x1000)}}
    assert base_from_device_tree(_proc(tmp_path, dt=dt)) is None


def test_find_base_order_option_iomem_device_tree(tmp_path):
    dt = {"vmsg-lb@90000000": {"compatible": b"restricted-dma-pool\0",
                               "reg": _cells(0, 0x90000000, 0, 0x1000)}}
    both = _proc(tmp_path, IOMEM, dt)
    assert find_base("0x1000", proc=both) == RegionBase(0x1000, "base= option")
    assert find_base(proc=both).base == 0x7F000000
    os.unlink(os.path.join(both, "iomem"))
    assert find_base(proc=both).base == 0x90000000


def test_no_base_anywhere_asks_for_base_option(tmp_path):
    with pytest.raises(BaseNotFound, match="base=ADDR"):
        find_base(proc=_proc(tmp_path))
    with pytest.raises(ValueError, match="base must be an integer"):
        find_base("lots")


def test_open_finds_the_base_through_the_proc_root(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSGAMP_PROC_ROOT", _proc(tmp_path, IOMEM))
    with FakeUserApiKernel(base=0x7F000000) as k:
        with open_carrier("vmsg-lb:", nodes=k.open_nodes()) as c:
            assert (c.base, c.size) == (0x7F000000, k.size) and "iomem" in c.base_source
            assert c.region.bus_base == 0x7F000000


def test_uri_grammar():
    assert parse_uri("vmsg-lb:") == ("vmsg-lb", "", {})
    assert parse_uri("vmsg-lb:/dev/virtio-msg-lb#msg=/dev/virtio-msg-1&base=0x10") == (
        "vmsg-lb", "/dev/virtio-msg-lb", {"msg": "/dev/virtio-msg-1", "base": "0x10"})
    with FakeUserApiKernel() as k:
        with pytest.raises(ValueError, match="does not apply to vmsg-lb"):
            open_carrier("vmsg-lb:#base=0&bus_base=0x1000", nodes=k.open_nodes())
        assert not k._opens or all(n.closed for n in k._opens)


def test_missing_nodes_are_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSGAMP_DEV_ROOT", str(tmp_path))
    with pytest.raises(VmsgLbError, match="no virtio-msg loopback bus") as e:
        open_carrier("vmsg-lb:#base=0")
    assert e.value.errno == errno.ENOENT and str(tmp_path / "virtio-msg-lb") in str(e.value)
    (tmp_path / "virtio-msg-lb").write_bytes(bytes(4096))
    with pytest.raises(VmsgLbError, match="message node .*virtio-msg-0"):
        open_carrier("vmsg-lb:#base=0")


def test_fake_nodes_paths_and_permissions():
    with FakeUserApiKernel(deny=True) as k:
        with pytest.raises(PermissionError):
            k.open_nodes()
    with FakeUserApiKernel() as k:
        with pytest.raises(FileNotFoundError):
            k.open_nodes("/dev/virtio-msg-lb", "/dev/virtio-msg-7")


def test_permission_denied_is_explained(monkeypatch):
    import vmsgamp.carriers.vmsg_lb as lb

    def deny(control, msg):
        raise PermissionError(errno.EACCES, "Permission denied", control)

    monkeypatch.setattr(lb, "open_nodes", deny)
    with pytest.raises(VmsgLbError, match="root-only"):
        open_carrier("vmsg-lb:#base=0")


class _NoRegion:
    control_path, msg_path = "/dev/virtio-msg-lb", "/dev/virtio-msg-0"
    closed = False

    def seek_end(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


def test_a_bus_without_reserved_memory_is_refused():
    nodes = _NoRegion()
    with pytest.raises(VmsgLbError, match="no memory reserved"):
        open_carrier("vmsg-lb:#base=0x1000", nodes=nodes)
    assert nodes.closed


def test_os_nodes_on_stand_in_files(tmp_path):
    ctl, msg = tmp_path / "virtio-msg-lb", tmp_path / "virtio-msg-0"
    ctl.write_bytes(bytes(range(256)) * 32)       # 8 KiB "region"
    msg.write_bytes(b"")
    nodes = OsNodes(str(ctl), str(msg))
    with open_carrier(f"vmsg-lb:{ctl}#msg={msg}&base=0x5000", nodes=nodes) as c:
        assert c.size == 8192 and c.region.read(0, 4) == bytes([0, 1, 2, 3])
        assert c.read_message() is None           # an empty regular file reads nothing
        with pytest.raises(VmsgLbError, match="not the 2026 loopback bus"):
            c.add_device(0)                       # a regular file has no ioctls: ENOTTY
    assert nodes._ctl == -1 and nodes._msg == -1  # closed with the carrier
    with pytest.raises(ValueError):
        nodes.fileno()


def test_node_holders_sees_other_processes(tmp_path):
    path = tmp_path / "virtio-msg-0"
    path.write_bytes(b"")
    code = f"import sys,time; f=open({str(path)!r}); print('ok', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ok\n"
        held = node_holders(str(path))
        assert held == [f"{child.pid} (python{sys.version_info.major}.{sys.version_info.minor})"] or \
            [h.split()[0] for h in held] == [str(child.pid)]
        with open(path):
            assert [h.split()[0] for h in node_holders(str(path))] == [str(child.pid)]  # not us
    finally:
        child.kill()
        child.wait()
    assert node_holders(str(path)) == []
