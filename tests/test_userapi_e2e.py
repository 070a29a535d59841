"""The whole vmsg-lb path against the fake user-API kernel: the kernel's
drivers (vmsgamp's driver side in the Linux message order) probe rng,
i2c:sim and console:echo served by UserApiServer through the vmsg-lb
carrier; entropy, an EEPROM write/read-back, console echo, REMOVE and a
poweroff reset, with every kernel message answered exactly once."""
from __future__ import annotations

import errno

import pytest

from userapi_helpers import assert_one_response_per_read, loopback, names
from vmsgamp.bus.userapi import VIRTIO_F_ACCESS_PLATFORM
from vmsgamp.carriers.vmsg_lb import VmsgLbError
from vmsgamp.devices._base import parse_device_list
from vmsgamp.devices.blk import BlkDevice
from vmsgamp.devices.rng import RngDevice
from vmsgamp.protocol import VIRTIO_F_VERSION_1, decode

# The virtio-rng probe as the 2026 kernel sends it, then ADD returns.
LINUX_RNG_PROBE = [
    "GET_DEVICE_INFO", "SET_DEVICE_STATUS",
    "GET_DEVICE_STATUS", "SET_DEVICE_STATUS", "GET_DEVICE_STATUS", "SET_DEVICE_STATUS",
    "GET_DEVICE_FEATURES", "SET_DRIVER_FEATURES",
    "GET_DEVICE_STATUS", "SET_DEVICE_STATUS", "GET_DEVICE_STATUS",
    "GET_VQUEUE", "SET_VQUEUE",
    "GET_DEVICE_STATUS", "SET_DEVICE_STATUS",
    "EVENT_AVAIL", "GET_DEVICE_STATUS",
]
LINUX_RNG_REMOVE = ["SET_DEVICE_STATUS", "RESET_VQUEUE", "GET_DEVICE_STATUS", "GET_DEVICE_STATUS",
                    "SET_DEVICE_STATUS"]


def counting_source():
    """Entropy 0, 1, 2, ... (mod 256) across calls: what the kernel reads is checkable."""
    done = 0

    def source(n: int) -> bytes:
        nonlocal done
        out = bytes((done + i) & 0xFF for i in range(n))
        done += n
        return out

    return source


def test_rng_i2c_console_through_the_kernel_path():
    with loopback() as (kernel, carrier, server):
        for n, dev in enumerate(parse_device_list("rng,i2c:sim,console:echo")):
            server.add_device(n, dev, timeout=30)
        assert kernel.bound() == [0, 1, 2]

        entropy = kernel.read_entropy(0, 200)
        assert len(entropy) == 200 and len(set(entropy)) > 50
        with kernel.locked():
            i2c = kernel.client(1)
            i2c.write_i2c_block_data(0x50, 0x20, list(b"vmsg-lb"))
            assert bytes(i2c.read_i2c_block_data(0x50, 0x20, 7)) == b"vmsg-lb"
            con = kernel.client(2)
            con.write(b"hello kernel\n")
            assert con.readline(timeout=5) == b"hello kernel\n"

        # poweroff: SET_DEVICE_STATUS 0 for every device, answered; the models forget their queues
        kernel.transcript.clear()
        kernel.poweroff()
        assert names(kernel) == ["SET_DEVICE_STATUS"] * 3
        assert all(t.status == 0 and not t.queues for t in server.transports.values())

        for n in (2, 1, 0):
            server.begin_remove(n).result(10)
        assert kernel.devices == {} and server.transports == {}
        assert_one_response_per_read(kernel)
        assert server.stats["malformed"] == server.stats["handler_errors"] == 0
        assert server.stats["write_errors"] == server.stats["loop_errors"] == 0
        assert server.stats["messages"] == kernel.stats["transfers"]


def test_probe_and_remove_follow_linux_and_entropy_is_the_models():
    with loopback() as (kernel, carrier, server):
        server.add_device(0, RngDevice(counting_source()), timeout=30)
        assert names(kernel) == LINUX_RNG_PROBE
        # every message has its size on the wire: 8 for GET_DEVICE_INFO, 16 EVENT_AVAIL, 48 SET_VQUEUE
        sizes = {decode(d, max_size=50).NAME: len(d) for k, d in kernel.transcript if k == "read"}
        assert (sizes["GET_DEVICE_INFO"], sizes["EVENT_AVAIL"], sizes["SET_VQUEUE"]) == (8, 16, 48)
        feats = kernel.devices[0].driver.info.features
        assert feats >> VIRTIO_F_VERSION_1 & 1 and feats >> VIRTIO_F_ACCESS_PLATFORM & 1
        assert kernel.devices[0].driver.features >> VIRTIO_F_ACCESS_PLATFORM & 1

        data = kernel.read_entropy(0, 128)
        # the probe's first buffer took bytes 0..63, so the reads continue the pattern
        assert data == bytes(i & 0xFF for i in range(128))

        kernel.transcript.clear()
        server.begin_remove(0).result(10)
        assert names(kernel) == LINUX_RNG_REMOVE
        assert_one_response_per_read(kernel)


def test_same_dev_id_added_again_after_remove():
    with loopback() as (kernel, carrier, server):
        for _ in range(2):
            server.add_device(3, RngDevice(), timeout=30)
            assert len(kernel.read_entropy(3, 32)) == 32
            server.begin_remove(3).result(10)
        assert kernel.ioctls == [("ADD", 3), ("REMOVE", 3)] * 2


def test_duplicate_dev_id_is_refused_and_explained():
    with loopback() as (kernel, carrier, server):
        server.add_device(0, RngDevice(), timeout=30)
        with pytest.raises(ValueError, match="already served"):
            server.begin_add(0, RngDevice())
        # Another device side adding the same dev_id gets EEXIST, explained.
        with pytest.raises(VmsgLbError, match="already on the loopback bus") as e:
            carrier.add_device(0)
        assert e.value.errno == errno.EEXIST
        assert len(kernel.read_entropy(0, 8)) == 8      # still served


def test_config_travels_in_30_byte_chunks(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 << 10))
    blk = BlkDevice(str(disk))
    with loopback() as (kernel, carrier, server):
        server.add_device(0, blk, timeout=30)
        assert len(blk.config) > 30
        kernel.transcript.clear()
        with kernel.locked():
            data = kernel.devices[0].driver.read_config(0, len(blk.config))
        assert data == bytes(blk.config)
        lengths = [decode(d, max_size=50).length for k, d in kernel.transcript
                   if k == "post" and decode(d, max_size=50).NAME == "GET_CONFIG"]
        assert max(lengths) == 30 and sum(lengths) == len(blk.config)
        assert all(len(d) <= 50 for k, d in kernel.transcript if k == "write")
