"""The endpoint commands as a user runs them: separate processes."""
import functools
import json
import os
import signal
import time
import uuid

import pytest
from cli_support import run_vmsgamp, spawn


vm = functools.partial(run_vmsgamp, timeout=60, check=True)


def stop(p):
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    return out, err


def wait_for(path, timeout=10):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture
def ivshmem(tmp_path):
    sock = str(tmp_path / "ivshmem.sock")
    server = spawn("ivshmem-server", sock, "--size", "1M")
    wait_for(sock)
    yield sock
    stop(server)


def test_serve_devices_ping_dump_over_ivshmem(ivshmem):
    region = f"ivshmem:{ivshmem}"
    serve = spawn("serve", "--region", region, "--devices", "rng,rng", "--json")
    try:
        info = json.loads(serve.stdout.readline())
        assert [d["name"] for d in info["devices"]] == ["rng", "rng"]
        out = json.loads(vm("devices", "--region", region, "--json").stdout)
        assert [(d["dev_num"], d["device_id"]) for d in out["devices"]] == [(0, 4), (1, 4)]
        assert "VERSION_1" in out["devices"][0]["feature_names"]
        ping = json.loads(vm("ping", "--region", region, "-n", "5", "--json").stdout)
        assert ping["count"] == 5 and ping["p50_us"] > 0
        human = vm("devices", "--region", region).stdout
        assert "2 device(s)" in human and "rng" in human
        dump = json.loads(vm("dump", "--region", region, "--json").stdout)
        assert dump["valid"] and dump["device_head"]["magic_ok"]
    finally:
        stop(serve)


def test_two_processes_through_a_bare_shm_object():
    name = f"vmsgamp-test-{uuid.uuid4().hex[:8]}"
    serve = spawn("serve", "--region", f"shm:{name}#create=1&size=1M", "--devices", "rng", "--json")
    try:
        json.loads(serve.stdout.readline())
        out = json.loads(vm("devices", "--region", f"shm:{name}", "--json").stdout)
        assert [d["name"] for d in out["devices"]] == ["rng"]
    finally:
        stop(serve)
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")


@pytest.mark.parametrize("args,needle", [
    (["devices", "--region", "bogus:x"], "known schemes"),
    (["devices", "--region", "shm:vmsgamp-surely-missing"], "no shared-memory object"),
    (["serve", "--region", "shm:x", "--devices", "toaster"], "known types"),
    (["serve", "--region", "shm:x", "--devices", "rng:colour=red"], "options: source"),
    (["ping", "--region", "ivshmem:/nonexistent/sock"], "ivshmem"),
])
def test_clear_errors(args, needle):
    p = vm(*args, check=False)
    assert p.returncode == 1
    assert needle in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_no_device_side_times_out_clearly(tmp_path):
    f = tmp_path / "region.bin"
    f.write_bytes(bytes(65536))
    p = vm("devices", "--region", str(f), "--timeout", "0.5", check=False)
    assert p.returncode == 1 and "no device side answered" in p.stderr
