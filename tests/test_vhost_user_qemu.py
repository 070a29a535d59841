"""End-to-end: stock QEMU 7.2 (TCG) forwards a Linux guest's virtqueues to
``vmsgamp vhost-user``; the guest's own virtio-rng / virtio_blk drivers run
against our rings.  One boot per test."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmsgamp.testing.qemu_guest import GuestError, QemuGuest, qemu_available

pytestmark = pytest.mark.qemu

ENTROPY = random.Random(7).randbytes(1 << 16)   # deterministic rng source, no repeats


@pytest.fixture(autouse=True)
def _need_qemu():
    ok, why = qemu_available()
    if not ok:
        pytest.skip(why)


class Backend:
    """``vmsgamp -v vhost-user ...`` in its own process (the CLI is part of the test)."""

    def __init__(self, sock: Path, device: str, *extra: str, log_name: str = "backend.log"):
        self.log_path = sock.parent / log_name
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmsgamp", "-v", "vhost-user", "--socket", str(sock), "--device", device,
             "--json", *extra],
            stdout=subprocess.PIPE, stderr=open(self.log_path, "w"), env=env, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("{"), f"backend did not start: {line!r}\n{self.log()}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"backend log never showed {text!r}:\n{self.log()}")
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def hexdump_bytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def section(output: str, name: str) -> str:
    """Text between ``BEGIN name`` and ``END name`` lines of the guest output."""
    body = output.split(f"BEGIN {name}\n", 1)[1]
    return body.split(f"END {name}", 1)[0]


def rng_read(n: int, name: str) -> str:
    return f"echo BEGIN {name}; head -c {n} /dev/hwrng | od -An -v -tx1; echo END {name}\n"


def assert_from_source(data: bytes, source: bytes = ENTROPY) -> int:
    off = source.find(data)
    assert len(data) and off >= 0, f"guest bytes {data[:16].hex()}... are not a slice of the backend's source"
    return off


# ---- (1) vhost-user-rng-pci, split and packed ---------------------------------------------------

@pytest.mark.parametrize("packed", ["off", "on"])
def test_rng_guest_reads_hwrng(tmp_path, packed):
    src = tmp_path / "entropy"
    src.write_bytes(ENTROPY)
    sock = tmp_path / "rng.sock"
    be = Backend(sock, f"rng:{src}")
    t0 = time.monotonic()
    try:
        with QemuGuest(["-chardev", f"socket,id=vu,path={sock}",
                        "-device", f"vhost-user-rng-pci,chardev=vu,packed={packed}"],
                       memfd=True, workdir=tmp_path / "guest") as g:
            res = g.run("cat /sys/class/misc/hw_random/rng_current\n" + rng_read(128, "rng"), timeout=150)
        assert res.rc == 0, res.describe()
    finally:
        assert be.kill() == 0, be.log()
    assert "virtio_rng" in res.output
    data = hexdump_bytes(section(res.output, "rng"))
    assert len(data) == 128
    assert_from_source(data)
    log = be.log()
    assert ("PackedQueue" if packed == "on" else "SplitQueue") in log, log
    assert " refused: " not in log and "broken" not in log.replace("'broken': 0", ""), log
    print(f"rng packed={packed}: {time.monotonic() - t0:.1f} s")


# ---- (2) vhost-user-blk-pci, split (2 queues, 2 vCPUs) and packed -------------------------------

BLK_SCRIPT = """\
set -e
W={wd}
echo queues: $(ls /sys/block/vda/mq | wc -l) sectors: $(cat /sys/block/vda/size)
dd if=$W/pattern of=/dev/vda bs=64k count=16 oflag=direct conv=fsync 2>/dev/null
dd if=$W/pattern of=/dev/vda bs=4k count=64 seek=1024 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | cmp - $W/pattern
dd if=/dev/vda bs=4k count=64 skip=1024 iflag=direct 2>/dev/null | cmp - $W/pattern4k
echo READBACK-OK
"""


@pytest.mark.parametrize("packed,queues,smp", [("off", 2, 2), ("on", 1, 1)])
def test_blk_guest_dd_pattern(tmp_path, packed, queues, smp):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 << 20))
    wd = tmp_path / "guest"
    wd.mkdir()
    pattern = random.Random(11).randbytes(1 << 20)
    (wd / "pattern").write_bytes(pattern)
    (wd / "pattern4k").write_bytes(pattern[:256 << 10])
    sock = tmp_path / "blk.sock"
    be = Backend(sock, f"blk:{disk}", "--queues", str(queues))
    t0 = time.monotonic()
    try:
        with QemuGuest(["-chardev", f"socket,id=vu,path={sock}",
                        "-device", f"vhost-user-blk-pci,chardev=vu,num-queues={queues},packed={packed}"],
                       memfd=True, smp=smp, workdir=wd) as g:
            res = g.run(BLK_SCRIPT.format(wd=wd), timeout=200)
        assert res.rc == 0, res.describe()
    finally:
        assert be.kill() == 0, be.log()
    assert "READBACK-OK" in res.output, res.output
    assert f"queues: {queues} sectors: {(8 << 20) // 512}" in res.output, res.output
    raw = disk.read_bytes()
    assert len(raw) == 8 << 20
    assert raw[:1 << 20] == pattern
    assert raw[4 << 20:(4 << 20) + (256 << 10)] == pattern[:256 << 10]
    log = be.log()
    assert ("PackedQueue" if packed == "on" else "SplitQueue") in log, log
    assert " refused: " not in log and "broken" not in log.replace("'broken': 0", ""), log
    print(f"blk packed={packed} queues={queues}: {time.monotonic() - t0:.1f} s")


# ---- (4) back-end killed and restarted while the guest idles ----------------------------------------

RESTART_SCRIPT = """\
W={wd}
{first}touch $W/ready
i=0
while [ ! -e $W/go ]; do sleep 0.2; i=$((i+1)); [ $i -lt 600 ] || exit 3; done
{second}"""


@pytest.mark.parametrize("packed", ["off", "on"])
def test_rng_backend_restart(tmp_path, packed):
    src = tmp_path / "entropy"
    src.write_bytes(ENTROPY)
    sock = tmp_path / "rng.sock"
    wd = tmp_path / "guest"
    wd.mkdir()
    be = Backend(sock, f"rng:{src}")
    be2 = None
    t0 = time.monotonic()
    try:
        # QEMU 7.2: with reconnect=1 vhost-user-rng-pci must be plugged over QMP
        # into a paused machine once the chardev is connected (see the notes).
        # q35's pcie.0 takes no hot-plug: a root port receives the device.
        with QemuGuest(["-chardev", f"socket,id=vu,path={sock},reconnect=1",
                        "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1"],
                       memfd=True, paused=True, workdir=wd) as g:
            g.start(RESTART_SCRIPT.format(wd=wd, first=rng_read(64, "first"), second=rng_read(64, "second")),
                    timeout=200)
            be.wait_log("front-end connected")
            # The back-end's accept() is not QEMU's connect completion: plug
            # the device only once QEMU counts the chardev connected.
            g.wait_chardev_connected("vu")
            g.qmp("device_add", driver="vhost-user-rng-pci", chardev="vu", id="rng0", bus="rp1", packed=packed)
            g.qmp("cont")
            deadline = time.monotonic() + 150
            while not (wd / "ready").exists():
                if time.monotonic() > deadline or not g.running():
                    raise GuestError("guest never read the first block\n" + g.wait(1).describe())
                time.sleep(0.2)
            time.sleep(1.0)                      # the guest idles
            assert be.kill(signal.SIGKILL) == -signal.SIGKILL
            be2 = Backend(sock, f"rng:{src}", log_name="backend2.log")
            be2.wait_log("queue 0 started")      # QEMU reconnected and resent the start block
            (wd / "go").touch()
            res = g.wait()
        assert res.rc == 0, res.describe()
    finally:
        be.kill(signal.SIGKILL)
        if be2 is not None:
            assert be2.kill() == 0, be2.log()
    first = hexdump_bytes(section(res.output, "first"))
    second = hexdump_bytes(section(res.output, "second"))
    assert len(first) == 64 and len(second) == 64
    assert_from_source(first)
    assert_from_source(second)   # the new back-end's stream (it restarts at offset 0)
    log2 = be2.log()
    if packed == "on":
        # QEMU resent the initial packed base; the position came from guest memory
        assert "packed base is the initial value but the ring is at" in log2, log2
        print(next(line for line in log2.splitlines() if "packed base" in line))
    print(f"rng restart packed={packed}: {time.monotonic() - t0:.1f} s")


BLK_RESTART_SCRIPT = """\
set -e
W={wd}
dd if=$W/a of=/dev/vda bs=64k seek=0 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=64k count=4 iflag=direct 2>/dev/null | cmp - $W/a
touch $W/ready
i=0
while [ ! -e $W/go ]; do sleep 0.2; i=$((i+1)); [ $i -lt 600 ] || exit 3; done
dd if=$W/b of=/dev/vda bs=4k seek=1024 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=4k count=64 skip=1024 iflag=direct 2>/dev/null | cmp - $W/b
dd if=/dev/vda bs=64k count=4 iflag=direct 2>/dev/null | cmp - $W/a
echo RESTART-OK
"""


@pytest.mark.parametrize("packed", ["off", "on"])
def test_blk_backend_restart(tmp_path, packed):
    """vhost-user-blk reconnects by itself (full negotiation, SET_OWNER
    included); the packed ring position is recovered all the same."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 << 20))
    wd = tmp_path / "guest"
    wd.mkdir()
    a, b = random.Random(1).randbytes(256 << 10), random.Random(2).randbytes(256 << 10)
    (wd / "a").write_bytes(a)
    (wd / "b").write_bytes(b)
    sock = tmp_path / "blk.sock"
    be = Backend(sock, f"blk:{disk}")
    be2 = None
    t0 = time.monotonic()
    try:
        with QemuGuest(["-chardev", f"socket,id=vu,path={sock},reconnect=1",
                        "-device", f"vhost-user-blk-pci,chardev=vu,num-queues=1,packed={packed}"],
                       memfd=True, workdir=wd) as g:
            g.start(BLK_RESTART_SCRIPT.format(wd=wd), timeout=200)
            deadline = time.monotonic() + 150
            while not (wd / "ready").exists():
                if time.monotonic() > deadline or not g.running():
                    raise GuestError("guest never finished the first writes\n" + g.wait(1).describe())
                time.sleep(0.2)
            time.sleep(1.0)
            assert be.kill(signal.SIGKILL) == -signal.SIGKILL
            be2 = Backend(sock, f"blk:{disk}", log_name="backend2.log")
            be2.wait_log("queue 0 started")
            (wd / "go").touch()
            res = g.wait()
        assert res.rc == 0, res.describe()
    finally:
        be.kill(signal.SIGKILL)
        if be2 is not None:
            assert be2.kill() == 0, be2.log()
    assert "RESTART-OK" in res.output
    raw = disk.read_bytes()
    assert raw[:256 << 10] == a and raw[4 << 20:(4 << 20) + (256 << 10)] == b
    log2 = be2.log()
    if packed == "on":
        assert "packed base is the initial value but the ring is at" in log2, log2
        print(next(line for line in log2.splitlines() if "packed base" in line))
    print(f"blk restart packed={packed}: {time.monotonic() - t0:.1f} s")
