"""The kit's host example (csrc/examples/ivshmem_device.c) against vmsgamp's
driver side, over an ivshmem server, with the driver's rings and buffers in
a separate RAM file (as `vmsgamp serve --memory RAM@BUS` would map it):
enumerate, rng bytes, EEPROM write/read-back, ping, driver restart.  Run
once as built with -Werror and once under AddressSanitizer/UBSan."""
import json
import os
import shutil
import subprocess

import pytest
from kit_support import driver_session, eeprom_roundtrip, read_rng, rng_pattern, wait_device_left_run

from vmsgamp._core.region import Region
from vmsgamp.carriers.ivshmem import IvshmemServer
from vmsgamp.coproc.build import build_host_program, csrc_root

CC = shutil.which("gcc") or shutil.which("cc")
RAM_BUS = 0x40000000


@pytest.fixture(scope="module", params=[False, True], ids=["werror", "asan-ubsan"])
def example(request, tmp_path_factory):
    if CC is None:
        pytest.skip("no host C compiler (the package could not have been built)")
    d = tmp_path_factory.mktemp("ivshmem_device")
    return build_host_program(csrc_root() / "examples" / "ivshmem_device.c", d / "ivshmem_device", cc=CC,
                              sanitize=request.param)


@pytest.fixture
def served(example, tmp_path):
    sock = str(tmp_path / "ivshmem.sock")
    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.truncate(1 << 20)
    server = IvshmemServer(sock, 64 << 10)
    server.start_thread()
    proc = subprocess.Popen([str(example), "--sock", sock, "--ram", f"{ram}@{RAM_BUS:#x}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hello = json.loads(proc.stdout.readline() or "{}")
        assert hello.get("devices") == [{"dev_num": 0, "name": "rng"}, {"dev_num": 1, "name": "i2c"}], \
            proc.stderr.read()
        shm = Region.from_fd(os.dup(server.shm_fd), 64 << 10, own_fd=True)
        try:
            yield sock, f"file:{ram}#bus_base={RAM_BUS:#x}", proc, shm
        finally:
            shm.close()
    finally:
        if proc.poll() is None:
            proc.terminate()
        _, err = proc.communicate(timeout=20)
        server.close()
    assert proc.returncode == 0, err
    assert "ERROR" not in err and "runtime error" not in err, err


def test_example_serves_the_vmsgamp_driver(served):
    sock, ram_uri, proc, shm = served
    expected = rng_pattern(64 << 10)
    got = b""
    for session in range(2):
        with driver_session(f"ivshmem:{sock}", allocator_start=0, ram_uri=ram_uri) as (drv, bus, carrier):
            assert drv.enumerate() == [0, 1]
            infos = [drv.info(n) for n in (0, 1)]
            assert [(i.device_id, i.num_feature_bits, i.max_virtqueues) for i in infos] == [(4, 64, 1), (34, 64, 1)]
            assert infos[1].features & 1  # VIRTIO_I2C_F_ZERO_LENGTH_REQUEST
            got += read_rng(drv, 0, [4096, 100, 3, 5000])
            assert got == expected[:len(got)], "rng bytes are not the kit's pattern stream"
            page = bytes((0x30 + 11 * i + session) & 0xFF for i in range(8))
            assert eeprom_roundtrip(drv, 1, 0x40, page) == page
            stats = drv.ping(50)
            assert stats["count"] == 50
            assert bus.stats()["rx_malformed"] == 0 and bus.stats()["timeouts"] == 0
        # driver restart: the example sees the peer leave (ivshmem) or the
        # queue head go SHUTDOWN, resets its devices and is READY again
        assert wait_device_left_run(shm) in (0, 1)
    assert proc.poll() is None


def test_example_usage_errors(example, tmp_path):
    p = subprocess.run([str(example), "--sock", str(tmp_path / "s")], capture_output=True, text=True, timeout=20)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "usage" in p.stderr
    p = subprocess.run([str(example), "--sock", str(tmp_path / "nothing"), "--ram", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 1 and "cannot connect" in p.stderr
