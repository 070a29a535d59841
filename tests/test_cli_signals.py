"""Ctrl-C and SIGTERM for every long-running command, as a user meets them.

Ctrl-C is SIGINT to the terminal's whole foreground process group, so each
command runs in a session of its own and gets the signal through its group,
children included.  Wanted: one line ``vmsgamp CMD: interrupted`` and exit
130; SIGTERM exits 143 (0 for serve, ivshmem-server and vhost-user, whose
normal end it is); and nothing left behind: no child process, no temporary
directory, no socket, no ``unlink=1`` shared-memory object.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest


def _spawn(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "vmsgamp", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _maps(p: subprocess.Popen[str], path: str) -> bool:
    """``p`` has ``path`` mapped: it is past start-up, using the region."""
    try:
        with open(f"/proc/{p.pid}/maps") as f:
            return path in f.read()
    except OSError:
        return False


def _wait_until(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stop(p: subprocess.Popen[str], how: str) -> tuple[int, str, str]:
    if how == "SIGINT":
        os.killpg(p.pid, signal.SIGINT)          # what Ctrl-C in the terminal does
    else:
        p.send_signal(signal.SIGTERM)
    try:
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"did not stop on {how}: {err}") from None
    return p.returncode, out, err


def _check(cmd: str, how: str, rc: int, err: str, sigterm_rc: int = 143) -> None:
    if how == "SIGINT":
        assert (rc, err) == (130, f"vmsgamp {cmd}: interrupted\n"), (rc, err)
    else:
        assert rc == sigterm_rc, (rc, err)
        assert err == ("" if sigterm_rc == 0 else f"vmsgamp {cmd}: terminated\n"), err


@pytest.fixture
def served_shm(tmp_path):
    name = f"vmsgamp-test-{uuid.uuid4().hex[:8]}"
    serve = _spawn(tmp_path, "serve", "--region", f"shm:{name}#create=1&size=1M&unlink=1",
                   "--devices", "rng", "--json")
    json.loads(serve.stdout.readline())
    yield f"shm:{name}"
    _stop(serve, "SIGTERM")


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_serve_removes_its_unlink_object(tmp_path, how):
    name = f"vmsgamp-test-{uuid.uuid4().hex[:8]}"
    for _ in range(2):                      # the README's create=1 works twice in a row
        p = _spawn(tmp_path, "serve", "--region", f"shm:{name}#create=1&size=1M&unlink=1",
                   "--devices", "rng,console:pty", "--json")
        assert json.loads(p.stdout.readline())["devices"][1]["name"] == "console"
        assert os.path.exists(f"/dev/shm/{name}")
        rc, _, err = _stop(p, how)
        _check("serve", how, rc, err, sigterm_rc=0)
        assert not os.path.exists(f"/dev/shm/{name}")


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_emulate_stops_its_device_process_and_removes_its_socket(tmp_path, how):
    p = _spawn(tmp_path, "emulate", "--duration", "5")
    kids: set[int] = set()

    def device_process_started() -> bool:
        kids.update(_descendants(p.pid))
        return bool(kids) and any((tmp_path / "tmp").iterdir())

    _wait_until(device_process_started, "the device process")
    time.sleep(1.0)                          # into the exercises
    rc, out, err = _stop(p, how)
    _check("emulate", how, rc, err)
    assert out == ""
    assert not [k for k in kids if _alive(k)], "a child of emulate is still running"
    assert list((tmp_path / "tmp").iterdir()) == []       # temp dir and ivshmem socket gone


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_ivshmem_server_removes_its_socket(tmp_path, how):
    sock = tmp_path / "ivshmem.sock"
    p = _spawn(tmp_path, "ivshmem-server", str(sock), "--size", "64K", "--json")
    json.loads(p.stdout.readline())
    assert sock.exists()
    rc, _, err = _stop(p, how)
    _check("ivshmem-server", how, rc, err, sigterm_rc=0)
    assert not sock.exists()


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("busy", [False, True])
def test_vhost_user_removes_its_socket(tmp_path, how, busy):
    """Also while a front-end is connected and reading: the serving loop
    stops at a clean point (an exception raised in the middle of it once
    left a closed socket in the selector: 'Invalid file descriptor: -1')."""
    from vmsgamp.testing.vhost_user_frontend import FakeFrontend

    sock = tmp_path / "vu.sock"
    p = _spawn(tmp_path, "vhost-user", "--socket", str(sock), "--device", "rng", "--json")
    json.loads(p.stdout.readline())
    assert sock.exists()
    if busy:
        with FakeFrontend(str(sock)) as fe:
            fe.realize()
            fe.start(fmt="packed")
            for _ in range(20):
                assert fe.driver(0).add_chain([], [64], token=1)
                fe.kick(0)
                assert fe.wait_used(0)[1] == 64
            rc, _, err = _stop(p, how)
    else:
        rc, _, err = _stop(p, how)
    _check("vhost-user", how, rc, err, sigterm_rc=0)
    assert not sock.exists()


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_ping_leaves_the_bus_usable(tmp_path, served_shm, how):
    p = _spawn(tmp_path, "ping", "--region", served_shm, "-n", "100000000", "--json")
    _wait_until(lambda: _maps(p, "/dev/shm/" + served_shm[4:]), "ping to map the region")
    time.sleep(0.5)
    rc, out, err = _stop(p, how)
    _check("ping", how, rc, err)
    assert json.loads(out) == {"command": "ping", "error": err.split(": ", 1)[1].strip(),
                               "exit_code": rc}
    again = subprocess.run([sys.executable, "-m", "vmsgamp", "ping", "--region", served_shm,
                            "-n", "3", "--json"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and json.loads(again.stdout)["count"] == 3, again.stderr


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_devices_waiting_for_a_device_side(tmp_path, how):
    region = tmp_path / "region.bin"
    region.write_bytes(bytes(65536))
    p = _spawn(tmp_path, "devices", "--region", str(region), "--timeout", "60")
    _wait_until(lambda: _maps(p, str(region)), "devices to map the region")
    time.sleep(0.5)
    rc, _, err = _stop(p, how)
    _check("devices", how, rc, err)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_bench_devices_stops_its_forked_device_process(tmp_path, how):
    """(Before the fix: ~60 lines of chained tracebacks from both processes.)"""
    p = _spawn(tmp_path, "bench", "devices", "--duration", "5")
    kids: set[int] = set()

    def forked() -> bool:
        kids.update(_descendants(p.pid))
        return bool(kids)

    _wait_until(forked, "the device process")
    time.sleep(1.0)
    rc, out, err = _stop(p, how)
    _check("bench", how, rc, err)        # one line: no traceback from any process
    assert out == ""
    assert not [k for k in kids if _alive(k)], "a child of bench devices is still running"
