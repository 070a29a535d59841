"""End to end in a real Linux guest (QEMU, TCG): the guest runs this machine's
Python and vmsgamp over a 9p root (vmsgamp.testing.qemu_guest).

1. smoke: the guest boots and imports vmsgamp;
2. ivshmem-doorbell + VFIO: `vmsgamp serve --region ivshmem:SOCK` on the host,
   the guest driver over ``vfio:BDF`` (BAR2 memory, BAR0 doorbell, MSI-X
   through a VFIO eventfd): enumerate, entropy checked against the
   deterministic source, i2c EEPROM write/read-back;
3. the same over ``pci:BDF`` (sysfs resources, polling);
4. ivshmem-plain + uio_pci_generic: /dev/uio0, sysfs discovery, and bytes
   crossing the shared memory both ways.

They skip only when QEMU is not installed (.ci/run installs it).  One boot per
scenario; every wait has a timeout.
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmsgamp.testing import qemu_guest as qg

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent
BUILDER = REPO / "tools" / "guest" / "build-guest.sh"
IVSHMEM_SIZE = 4 << 20
GUEST_TIMEOUT = 150          # one boot + the guest's work, seconds


@pytest.fixture(scope="module")
def guest_image():
    ok, why = qg.qemu_available()
    if not ok:
        pytest.skip(why)
    if BUILDER.is_file():
        os.environ.setdefault("VMSGAMP_GUEST_BUILDER", str(BUILDER))
    t0 = time.monotonic()
    img = qg.ensure_guest()
    print(f"guest image ready in {time.monotonic() - t0:.1f} s: {img}")
    return img


def _schemes() -> set[str]:
    from vmsgamp.carriers import schemes

    return set(schemes())


def entropy_source(path: Path, size: int = 64 << 10) -> bytes:
    """A deterministic 'entropy' file: a SHA-256 counter stream."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(b"vmsgamp-qemu-guest-%d" % i).digest()
        i += 1
    data = bytes(out[:size])
    path.write_bytes(data)
    return data


# ---- 1. smoke -----------------------------------------------------------------------------

def test_guest_boots_and_imports_vmsgamp(guest_image):
    """Also the harness features the vhost-user tests need: guest RAM in a
    shared memfd, start paused (-S), a device plugged over QMP, then cont."""
    with qg.QemuGuest(image=guest_image, memfd=True, paused=True, hotplug_ports=1) as g:
        script = (qg.python_cmd("-c", "import sys, vmsgamp, vmsgamp._core.fifo; "
                                      "print('vmsgamp from', vmsgamp.__file__); "
                                      "print('python', sys.version.split()[0])")
                  + "\necho kernel $(uname -r)"
                  + "\necho hwrng $(cat /sys/class/misc/hw_random/rng_current)"
                  + "\ndd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1"
                  + "\nexit 7\n")
        g.start(script, timeout=GUEST_TIMEOUT)
        assert g.qmp("query-status")["status"] == "prelaunch"
        g.qmp("device_add", driver="virtio-rng-pci", id="rng0", bus="hp0")
        g.qmp("cont")
        res = g.wait()
    print(f"smoke: {res.seconds:.1f} s (guest command started at uptime {res.boot_seconds} s)\n"
          f"{res.output}")
    assert res.rc == 7, res.describe()
    assert "vmsgamp from" in res.output, res.describe()
    assert f"python {sys.version.split()[0]}" in res.output, res.describe()
    assert "kernel 6." in res.output, res.describe()
    assert "hwrng virtio_rng.0" in res.output, res.describe()


# ---- the guest-side driver ------------------------------------------------------------------

GUEST_DRIVER = r'''
"""Runs in the guest: the driver side of the AMP bus over a PCI carrier."""
import json, sys, time, traceback
result = {"uri": sys.argv[1]}
out = sys.argv[2]
def save():
    with open(out, "w") as f:
        json.dump(result, f)
try:
    from vmsgamp._core.addrspace import RegionAllocator
    from vmsgamp._core.fifo import MsgFifo
    from vmsgamp.bus import AmpBus, AmpDriver, WaitPolicy, Waiter
    from vmsgamp.carriers import open_carrier
    from vmsgamp.bus.exercise import EXERCISES
    from vmsgamp.protocol import DriverConnection
    t0 = time.monotonic()
    carrier = open_carrier(sys.argv[1])
    result["carrier"] = repr(carrier)
    result["doorbell"] = type(carrier.doorbell).__name__
    fifo = MsgFifo(carrier.region, role="driver", layout="b", offset=carrier.offset,
                   doorbell=carrier.doorbell, header="g2")
    bus = AmpBus(fifo, DriverConnection(profile="g2", max_msg_size=64))
    bus.start(30)
    start = (carrier.offset + fifo.window + 4095) & ~4095
    drv = AmpDriver(bus, RegionAllocator(carrier.region, start), timeout=20)
    nums = drv.enumerate()
    result["devices"] = [drv.info(n).as_dict() for n in nums]
    result["connect_s"] = time.monotonic() - t0
    for info in result["devices"]:
        if info["device_id"] == 4:        # rng: 3 reads of 256 bytes, in order
            dev = drv.open(info["dev_num"])
            q = dev.queues[0]
            addr, buf = dev.alloc(256)
            got = b""
            for i in range(3):
                q.add([], [(addr, 256)], token=i)
                dev.notify(0)
                if not dev.wait_used(0, 20):
                    raise TimeoutError("rng: no used buffer within 20 s")
                token, ln = q.get_used()
                got += bytes(buf[:ln])
            dev.close()
            result["rng"] = got.hex()
        elif info["device_id"] == 34:     # i2c: EEPROM write + read-back
            r = EXERCISES[34](drv, info["dev_num"])
            result["i2c"] = {k: r[k] for k in ("written", "read_back", "match", "temperature_c")}
    # Pings with no spinning: every wait for an answer sleeps on the doorbell,
    # so with an interrupt source each answer is an interrupt (the bus's
    # adaptive wait would otherwise spin through the host's quick answers).
    bus.waiter = Waiter(WaitPolicy(spin_us=0))
    fifo.spin_ns = 0
    sleeps0 = fifo.sleeps
    result["ping"] = drv.ping(20)
    result["ping_sleeps"] = fifo.sleeps - sleeps0
    result["bus"] = {k: v for k, v in bus.stats().items() if isinstance(v, (int, float, str))}
    db = carrier.doorbell
    # The interrupt path on its own, without a race against a quick host: say
    # we are waiting (the FIFO's WAITING flag) before each PING goes out, so
    # the host rings us for its answer, then sleep on the doorbell itself.
    from vmsgamp.protocol import PingRequest, encode
    woke = 0
    for i in range(5):
        fifo.arm_wait()
        assert fifo.try_send(encode(PingRequest(data=i, token=0xFF00 + i), profile="g2"))
        woke += bool(db.wait(20))
        fifo.disarm_wait()
        assert fifo.recv_bytes(20), "no answer to a raw PING"
    result["raw_ping_wakeups"] = woke
    result["doorbell_repr"] = repr(db)
    result["doorbell_counts"] = {k: getattr(db, k, None)
                                 for k in ("interrupts", "ring_count", "wakeup_count")}
    result["fifo_counts"] = {k: getattr(fifo, k, None) for k in ("sleeps", "rings", "spin_ns")}
    result["proc_interrupts"] = [ln for ln in open("/proc/interrupts") if "vfio" in ln]
    bdf = sys.argv[1].split(":", 1)[1].split("#")[0]
    with open(f"/sys/bus/pci/devices/{bdf}/config", "rb") as f:
        result["pci_command"] = int.from_bytes(f.read(6)[4:6], "little")   # while still open
    drv.close()
    bus.close()
    carrier.close()
    result["ok"] = True
except BaseException as e:
    result["error"] = f"{type(e).__name__}: {e}"
    result["traceback"] = traceback.format_exc()
    save()
    raise
save()
'''

FIND_IVSHMEM = r'''
bdf=""
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1110 ]; then bdf=$(basename $d); fi
done
[ -n "$bdf" ] || { echo "no ivshmem PCI device (1af4:1110) in the guest"; exit 90; }
echo "ivshmem at $bdf"
'''


def _serve(sock: str, devices: str) -> subprocess.Popen[str]:
    import vmsgamp

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(vmsgamp.__file__).resolve().parent.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    # --spin-us 0: the host blocks on its doorbell after each message, so its
    # answers come after a wake-up; a spinning host answers before the TCG
    # guest has gone to sleep, and the guest's interrupt path (what these tests
    # are for) would go unused.
    p = subprocess.Popen([sys.executable, "-m", "vmsgamp", "serve", "--region", f"ivshmem:{sock}",
                          "--devices", devices, "--json", "--spin-us", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    ready, _, _ = select.select([p.stdout], [], [], 30)
    line = p.stdout.readline() if ready else ""
    if not line:
        p.kill()
        _, err = p.communicate(timeout=10)
        raise AssertionError(f"vmsgamp serve did not start: {err[-2000:]}")
    json.loads(line)
    return p


def _stop(p: subprocess.Popen[str]) -> str:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate(timeout=10)
    return err


def _guest_line(*args: str) -> str:
    """python_cmd(*args), leaving "$bdf" for the guest shell to expand."""
    def q(a: str) -> str:
        return f'"{a}"' if "$bdf" in a and all(c not in a for c in '"`\\') else shlex.quote(a)

    return qg.python_cmd() + " ".join(q(a) for a in args)


def _run_bus_e2e(guest_image, uri_template: str, bind: str, *, iommu: bool) -> dict:
    """Host: ivshmem server + `vmsgamp serve --region ivshmem:SOCK`; guest:
    bind the ivshmem-doorbell device as ``bind`` says, run `vmsgamp devices`
    and GUEST_DRIVER over ``uri_template`` (``{bdf}`` = the device's address)."""
    from vmsgamp.carriers.ivshmem import IvshmemServer

    with qg.QemuGuest(image=guest_image, iommu=iommu) as g:
        sock = str(g.path("ivshmem.sock"))
        src = entropy_source(g.path("entropy.bin"))
        g.path("driver.py").write_text(GUEST_DRIVER)
        uri = uri_template.replace("{bdf}", "$bdf")
        script = "\n".join([
            FIND_IVSHMEM, bind,
            _guest_line("-m", "vmsgamp", "devices", "--region", uri, "--timeout", "30"),
            'echo "devices rc=$?"',
            _guest_line(str(g.path("driver.py")), uri, str(g.path("result.json"))), ""])
        g.extra_args += ["-chardev", f"socket,path={sock},id=ivsh",
                         "-device", "ivshmem-doorbell,chardev=ivsh,vectors=1"]
        ivshmem = IvshmemServer(sock, IVSHMEM_SIZE, vectors=1)
        ivshmem.start_thread()
        serve = None
        try:
            # serve first, so it is ivshmem peer 0 and QEMU peer 1 (the carriers'
            # default peer is "the other one of 0 and 1")
            serve = _serve(sock, f"rng:source={g.path('entropy.bin')},i2c:sim")
            deadline = time.monotonic() + 10
            while not ivshmem.peer_ids and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ivshmem.peer_ids == [0], f"serve should be ivshmem peer 0: {ivshmem.peer_ids}"
            res = g.run(script, timeout=GUEST_TIMEOUT)
        finally:
            serve_err = _stop(serve) if serve is not None else ""
            ivshmem.close()
        try:
            result = json.loads(g.path("result.json").read_text())
        except FileNotFoundError:
            result = {}
    print(f"{uri_template}: guest ran {res.seconds:.1f} s (command started at uptime "
          f"{res.boot_seconds} s)\n{res.output}")
    assert res.rc == 0 and result.get("ok"), (res.describe() + "\n--- serve stderr ---\n"
                                              + serve_err[-3000:] + "\n--- result ---\n"
                                              + json.dumps(result, indent=1))
    print(f"carrier {result['carrier']}, doorbell {result['doorbell_repr']} "
          f"{result['doorbell_counts']} {result['fifo_counts']}, ping sleeps {result['ping_sleeps']}, connect "
          f"{result['connect_s']:.2f} s, ping p50 {result['ping'].get('p50_us', 0):.0f} us, "
          f"i2c {result['i2c']}\nguest /proc/interrupts: {result['proc_interrupts']}")
    names = sorted(d["name"] for d in result["devices"])
    assert names == ["i2c", "rng"], result["devices"]
    assert "devices rc=0" in res.output and "2 device(s)" in res.output, res.describe()
    got = bytes.fromhex(result["rng"])
    assert len(got) == 768 and got == src[:768], (got[:32].hex(), src[:32].hex())
    assert result["i2c"]["match"] and result["i2c"]["read_back"] == result["i2c"]["written"], result
    result["guest"] = {"seconds": res.seconds, "boot_seconds": res.boot_seconds}
    return result


BIND_VFIO = r'''
echo "1af4 1110" > /sys/bus/pci/drivers/vfio-pci/new_id
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/bus/pci/devices/$bdf/iommu_group ] && [ "$(readlink /sys/bus/pci/devices/$bdf/driver)" != "" ] && break; sleep 0.5; done
group=$(basename $(readlink /sys/bus/pci/devices/$bdf/iommu_group))
echo "driver $(basename $(readlink /sys/bus/pci/devices/$bdf/driver)), IOMMU group $group"
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /dev/vfio/$group ] && break; sleep 0.5; done
ls -l /dev/vfio
'''

BIND_NONE = r'''
echo "driver $(readlink /sys/bus/pci/devices/$bdf/driver || echo none)"
'''


def test_ivshmem_doorbell_vfio(guest_image):
    assert "vfio" in _schemes(), "the vfio: carrier is not registered"
    r = _run_bus_e2e(guest_image, "vfio:{bdf}", BIND_VFIO, iommu=True)
    # the host's doorbells arrived as MSI-X through the VFIO eventfd: the guest
    # kernel counted them on a vfio-msix line and the doorbell woke on them
    assert "wait=irq" in r["doorbell_repr"], r["doorbell_repr"]
    msix = [ln for ln in r["proc_interrupts"] if "vfio-msix" in ln]
    count = sum(int(x) for x in msix[0].split()[1:] if x.isdigit()) if msix else 0
    hint = ""
    if not r["pci_command"] & 0x4:
        hint = (f"; PCI_COMMAND is {r['pci_command']:#06x} without Bus Master Enable (0x4): "
                f"QEMU drops MSI-X from a device that is not bus master, so the vfio: carrier "
                f"must set it through the VFIO config region")
    assert count > 0 and r["doorbell_counts"]["wakeup_count"] > 0, (
        f"no MSI-X reached the guest: {r['proc_interrupts']}, doorbell {r['doorbell_counts']}, "
        f"fifo {r['fifo_counts']}{hint}")
    # the guest rang the host through the BAR0 Doorbell register
    assert r["doorbell_counts"]["ring_count"], r["doorbell_counts"]


def test_ivshmem_doorbell_pci_polling(guest_image):
    assert "pci" in _schemes(), "the pci: carrier is not registered"
    r = _run_bus_e2e(guest_image, "pci:{bdf}", BIND_NONE, iommu=False)
    assert "wait=poll" in r["doorbell_repr"] or "wait=status" in r["doorbell_repr"], r["doorbell_repr"]
    assert r["doorbell_counts"]["ring_count"], r["doorbell_counts"]


# ---- 4. UIO ----------------------------------------------------------------------------------

GUEST_UIO = r'''
import json, mmap, os, sys
out = {}
bdf = sys.argv[1]
uio = "/sys/class/uio/uio0"
out["dev_uio0"] = os.path.exists("/dev/uio0")
out["name"] = open(uio + "/name").read().strip()
out["device"] = os.path.basename(os.path.realpath(uio + "/device"))
out["driver"] = os.path.basename(os.path.realpath(uio + "/device/driver"))
out["ids"] = [open(uio + "/device/" + a).read().strip() for a in ("vendor", "device")]
try:
    from vmsgamp.carriers import uio as vuio
    devs = vuio.list_uio_devices()
    out["vmsgamp_list"] = [repr(d) for d in devs]
    d = vuio.find_uio_device("uio0")
    out["vmsgamp_find"] = {"name": d.name, "parent": getattr(d, "parent", None),
                           "driver": getattr(d, "driver", None)}
except Exception as e:
    out["vmsgamp_error"] = f"{type(e).__name__}: {e}"
# the shared memory: BAR2 through the UIO device's PCI parent
res2 = uio + "/device/resource2"
size = os.stat(res2).st_size
out["bar2_size"] = size
fd = os.open(res2, os.O_RDWR | os.O_SYNC)
m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
out["from_host"] = bytes(m[0:32]).hex()
msg = b"written by the guest over UIO/BAR2"
m[4096:4096 + len(msg)] = msg
m.close(); os.close(fd)
# the interrupt fd opens and reads are possible (uio_pci_generic: INTx only, none here)
fd = os.open("/dev/uio0", os.O_RDWR)
os.close(fd)
if "pci" in __import__("vmsgamp.carriers", fromlist=["schemes"]).schemes():
    from vmsgamp.carriers import open_carrier
    c = open_carrier(f"pci:{bdf}#bar=2")
    out["pci_carrier"] = repr(c)
    out["pci_carrier_reads"] = bytes(c.region.view()[4096:4096 + len(msg)]).decode(errors="replace") \
        if hasattr(c.region, "view") else None
    c.close()
# the uio: carrier on the device's first map (BAR0, ivshmem's register block)
try:
    from vmsgamp.carriers import open_carrier
    c = open_carrier("uio:uio0#irq=none")
    out["uio_carrier"] = repr(c)
    out["uio_map0_size"] = c.region.size
    c.close()
except Exception as e:
    out["uio_carrier_error"] = f"{type(e).__name__}: {e}"
json.dump(out, open(sys.argv[2], "w"))
print(json.dumps(out, indent=1))
'''

BIND_UIO = r'''
echo "1af4 1110" > /sys/bus/pci/drivers/uio_pci_generic/new_id
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /dev/uio0 ] && break; sleep 0.5; done
ls -l /dev/uio0 /sys/class/uio/
'''


def test_ivshmem_plain_uio(guest_image):
    with qg.QemuGuest(image=guest_image) as g:
        shm = g.path("plain.shm")
        size = 1 << 20
        with open(shm, "wb") as f:
            f.truncate(size)
        host_pattern = hashlib.sha256(b"host side").digest()
        with open(shm, "r+b") as f:
            f.write(host_pattern)
        g.path("uio.py").write_text(GUEST_UIO)
        g.extra_args += ["-object", f"memory-backend-file,id=plainmem,share=on,mem-path={shm},size={size}",
                         "-device", "ivshmem-plain,memdev=plainmem"]
        script = FIND_IVSHMEM + BIND_UIO + "\n" + _guest_line(
            str(g.path("uio.py")), "$bdf", str(g.path("uio.json"))) + "\n"
        res = g.run(script, timeout=GUEST_TIMEOUT)
        print(f"uio: guest ran {res.seconds:.1f} s\n{res.output}")
        assert res.rc == 0, res.describe()
        out = json.loads(g.path("uio.json").read_text())
        with open(shm, "rb") as f:
            f.seek(4096)
            back = f.read(64)
    assert out["dev_uio0"], out
    assert out["name"] == "uio_pci_generic" and out["driver"] == "uio_pci_generic", out
    assert out["ids"] == ["0x1af4", "0x1110"], out
    assert out["bar2_size"] == size, out
    assert out["from_host"] == host_pattern.hex(), out
    assert back.startswith(b"written by the guest over UIO/BAR2"), back
    # vmsgamp's own sysfs discovery found the device and its PCI parent
    assert out.get("vmsgamp_find", {}).get("parent") == out["device"], out
    assert "uio_carrier_error" not in out, out
    if "pci_carrier" in out:      # pci: maps BAR2 of the same device
        assert out["pci_carrier_reads"] == "written by the guest over UIO/BAR2", out
