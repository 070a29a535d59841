"""Boot a tiny Linux guest in QEMU (TCG) that runs this machine's own Python.

The guest is the Debian kernel plus a busybox initramfs built and cached by
``build-guest.sh`` (shipped in the package beside this module, in
``guest/``; ``tools/guest/build-guest.sh`` in a checkout runs the same); it mounts the host's root file system
read-only over 9p and runs a shell script inside ``chroot /host``, so
``sys.executable`` and the installed (or in-tree) vmsgamp work in the guest
unchanged.  Used by the carriers' end-to-end tests (``ivshmem-doorbell`` +
``vfio:``/``pci:``, ``ivshmem-plain`` + UIO) and by the vhost-user tests
(guest RAM as ``memory-backend-memfd,share=on``, QMP with ``-S``,
``device_add`` and ``cont``)::

    from vmsgamp.testing.qemu_guest import QemuGuest, python_cmd

    with QemuGuest(extra_args=["-device", "ivshmem-plain,memdev=m", ...]) as g:
        res = g.run(python_cmd("-c", "import vmsgamp; print('ok')"), timeout=120)
    assert res.rc == 0, res.describe()

    # issue 7 style: start paused, plug a device over QMP, then go
    with QemuGuest(memfd=True, qmp=True, paused=True, extra_args=[...]) as g:
        g.start(script)
        g.qmp("device_add", driver="vhost-user-rng-pci", chardev="vu", id="rng0")
        g.qmp("cont")
        res = g.wait(timeout=120)

Everything has a timeout; on expiry or error QEMU is terminated (SIGTERM,
then SIGKILL) and :class:`GuestError` carries the console tail.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "GuestError", "GuestImage", "GuestResult", "QemuGuest", "QMP", "ensure_guest",
    "qemu_available", "qemu_binary", "python_cmd", "build_script", "take_reports", "INSTALL_HINT",
]

QEMU = "qemu-system-x86_64"
INSTALL_HINT = ("apt-get install -y qemu-system-x86 busybox-static cpio "
                "(.ci/run does this when it runs as root)")
_BUILDER = Path(__file__).resolve().parent / "guest" / "build-guest.sh"
_EXIT_MARK = "VMSGAMP-GUEST-EXIT"


class GuestError(RuntimeError):
    """The guest could not be built, booted, or did not finish in time."""


# What each guest closed since the last take_reports() left behind (QEMU's
# stderr, the console tail): tests/conftest.py attaches it to the report of
# every failed QEMU test, whatever failed.
_REPORTS: list[str] = []


def take_reports() -> list[str]:
    """The logs of the guests closed since the last call, oldest first."""
    out = list(_REPORTS)
    _REPORTS.clear()
    return out


# ---- availability and the guest image --------------------------------------------------

def qemu_binary() -> str | None:
    return os.environ.get("VMSGAMP_QEMU") or shutil.which(QEMU)


def qemu_available() -> tuple[bool, str]:
    """``(True, path)``, or ``(False, reason)`` -- the reason is a skip message."""
    path = qemu_binary()
    if not path:
        return False, f"{QEMU} is not installed ({INSTALL_HINT})"
    for tool in ("apt-get", "dpkg-deb", "gzip"):
        if shutil.which(tool) is None and not _cached_image_exists():
            return False, f"{tool} is missing: cannot fetch the guest kernel (Debian packages)"
    return True, path


def build_script() -> Path:
    """The image builder (``guest/build-guest.sh`` beside this module;
    ``VMSGAMP_GUEST_BUILDER`` overrides it)."""
    env = os.environ.get("VMSGAMP_GUEST_BUILDER")
    if env:
        return Path(env)
    if _BUILDER.is_file():
        return _BUILDER
    raise GuestError(f"the guest builder {_BUILDER} is missing from this installation "
                     f"(reinstall vmsgamp, or set VMSGAMP_GUEST_BUILDER to build-guest.sh)")


def cache_dir() -> Path:
    env = os.environ.get("VMSGAMP_GUEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmsgamp" / "guest"


def _cached_image_exists() -> bool:
    d = cache_dir()
    return any(d.glob("vmlinuz-*")) and any(d.glob("initramfs-*.cpio.gz"))


@dataclass(frozen=True)
class GuestImage:
    kernel: str
    initrd: str


_IMAGE: GuestImage | None = None


def ensure_guest(*, rebuild: bool = False, timeout: float = 900.0) -> GuestImage:
    """Build (first time) or find (cached) the guest kernel and initramfs.

    Runs ``build-guest.sh``, which downloads the Debian kernel and
    busybox-static with ``apt-get download`` into :func:`cache_dir` and is a
    no-op when both files are cached for the current script version.
    """
    global _IMAGE
    if _IMAGE is not None and not rebuild and all(map(os.path.exists, (_IMAGE.kernel, _IMAGE.initrd))):
        return _IMAGE
    script = build_script()
    cmd = ["bash", str(script), "--cache", str(cache_dir())] + (["--force"] if rebuild else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise GuestError(f"{script} did not finish within {timeout:.0f} s") from None
    vals = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    if p.returncode != 0 or "KERNEL" not in vals or "INITRD" not in vals:
        tail = "\n".join((p.stderr or "").strip().splitlines()[-15:])
        raise GuestError(f"building the guest image failed (rc {p.returncode}):\n{tail}")
    _IMAGE = GuestImage(vals["KERNEL"], vals["INITRD"])
    return _IMAGE


# ---- what the guest runs ----------------------------------------------------------------

def python_cmd(*args: str, env: dict[str, str] | None = None) -> str:
    """A shell line running this interpreter (``sys.executable``, a venv's
    python included) in the guest with this vmsgamp importable."""
    import vmsgamp

    pkg_parent = str(Path(vmsgamp.__file__).resolve().parent.parent)
    pyenv = {"PYTHONPATH": pkg_parent, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    pyenv.update(env or {})
    assign = " ".join(f"{k}={shlex.quote(v)}" for k, v in pyenv.items())
    return f"env {assign} {shlex.quote(sys.executable)} " + " ".join(shlex.quote(a) for a in args)


# ---- QMP -------------------------------------------------------------------------------------

class QMP:
    """A minimal QMP client (one command at a time; events are kept in
    :attr:`events`)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"QMP socket {path} did not come up in {timeout} s") from None
                time.sleep(0.05)
        s.settimeout(timeout)
        self.sock = s
        self.timeout = timeout
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read()
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise GuestError(f"QMP: no answer within {self.timeout} s") from None
            if not chunk:
                raise GuestError("QMP: QEMU closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise GuestError(f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()


# ---- the guest -------------------------------------------------------------------------------

@dataclass
class GuestResult:
    rc: int
    output: str
    console: str
    seconds: float                 # QEMU start to QEMU exit (host wall clock)
    boot_seconds: float | None     # guest uptime when the command started
    qemu_log: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def describe(self, tail: int = 40) -> str:
        con = "\n".join(self.console.splitlines()[-tail:])
        return (f"guest rc={self.rc} after {self.seconds:.1f} s (boot {self.boot_seconds} s)\n"
                f"--- output ---\n{self.output}\n--- console (tail) ---\n{con}\n"
                f"--- qemu ---\n{self.qemu_log}")


class QemuGuest:
    """One QEMU process running the vmsgamp guest.

    ``extra_args``: more QEMU arguments (``-device``, ``-object``,
    ``-chardev`` ...).  ``iommu=True``: q35 with ``kernel-irqchip=split``,
    ``intel-iommu,intremap=on`` and ``intel_iommu=on`` (what VFIO needs
    under TCG).  ``memfd=True``: guest RAM is
    ``memory-backend-memfd,share=on`` (vhost-user).  ``qmp=True``: a QMP
    socket (:meth:`qmp`); ``paused=True`` adds ``-S`` (resume with
    ``qmp("cont")``).  q35's root bus takes no hot-plugged devices, so
    ``hotplug_ports=N`` adds PCIe root ports ``hp0``..: ``device_add`` with
    ``bus="hp0"`` (or use ``machine="pc"``, whose root bus does).  ``workdir`` is shared writable with the guest at the
    same path (default: a fresh temporary directory, removed on exit unless
    ``keep=True`` or ``VMSGAMP_GUEST_KEEP=1``).
    """

    def __init__(self, extra_args: Sequence[str] = (), *, memory: str = "512M", smp: int = 1,
                 iommu: bool = False, memfd: bool = False, qmp: bool = False, paused: bool = False,
                 kernel_args: Iterable[str] = (), workdir: str | os.PathLike[str] | None = None,
                 keep: bool | None = None, image: GuestImage | None = None,
                 cpu: str = "max", machine: str = "q35", hotplug_ports: int = 0) -> None:
        self.extra_args = list(extra_args)
        self.memory = memory
        self.smp = smp
        self.iommu = iommu
        self.memfd = memfd
        self.want_qmp = qmp or paused
        self.paused = paused
        self.kernel_args = list(kernel_args)
        self.cpu = cpu
        if iommu and machine != "q35":
            raise ValueError("iommu=True needs machine='q35'")
        self.machine = machine
        self.hotplug_ports = hotplug_ports
        self.keep = bool(int(os.environ.get("VMSGAMP_GUEST_KEEP", "0"))) if keep is None else keep
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="vmsgamp-guest-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.image = image
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMP | None = None
        self._t0 = 0.0
        self._deadline: float | None = None
        self._reported = False

    # paths in the shared directory
    @property
    def console_path(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qmp_path(self) -> Path:
        return self.workdir / "qmp.sock"

    def path(self, name: str) -> Path:
        """A file in the shared directory (same path in the guest)."""
        return self.workdir / name

    def __enter__(self) -> "QemuGuest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- command line --------------------------------------------------------------------

    def command_line(self, timeout: float | None = None) -> list[str]:
        img = self.image or ensure_guest()
        qemu = qemu_binary()
        if not qemu:
            raise GuestError(f"{QEMU} is not installed ({INSTALL_HINT})")
        machine = self.machine
        args = [qemu, "-accel", "tcg", "-cpu", self.cpu, "-smp", str(self.smp),
                "-m", self.memory, "-nodefaults", "-display", "none", "-no-user-config",
                "-no-reboot", "-serial", f"file:{self.console_path}"]
        if self.iommu:
            machine += ",kernel-irqchip=split"
        if self.memfd:
            args += ["-object", f"memory-backend-memfd,id=vmsgamp-ram,size={self.memory},share=on"]
            machine += ",memory-backend=vmsgamp-ram"
        args += ["-machine", machine]
        if self.iommu:
            # must come before the PCI devices it translates for
            args += ["-device", "intel-iommu,intremap=on"]
        for i in range(self.hotplug_ports):
            # q35's pcie.0 takes no hot-plugged devices: device_add ...,bus=hpN
            args += ["-device", f"pcie-root-port,id=hp{i},chassis={i + 1},slot={i + 1}"]
        wd = str(self.workdir)
        if "," in wd:
            raise GuestError(f"the work directory {wd!r} contains a comma (QEMU option syntax)")
        args += ["-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,"
                            "readonly=on,multidevs=remap",
                 "-virtfs", f"local,path={wd},mount_tag=run,security_model=none,multidevs=remap"]
        if self.want_qmp:
            args += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.paused:
            args += ["-S"]
        kargs = ["console=ttyS0", "panic=-1", "loglevel=5", f"vmsgamp.run={wd}"]
        if timeout:
            kargs.append(f"vmsgamp.timeout={int(timeout)}")
        if self.iommu:
            kargs.append("intel_iommu=on")
        kargs += self.kernel_args
        args += ["-kernel", img.kernel, "-initrd", img.initrd, "-append", " ".join(kargs)]
        return args + self.extra_args

    # ---- running -------------------------------------------------------------------------

    def start(self, script: str, timeout: float = 180.0) -> None:
        """Boot the guest running ``script`` (a POSIX sh script, run from /
        inside the chroot; its stdout+stderr is the result's output).
        ``timeout`` bounds the whole run (boot included) for :meth:`wait`."""
        if self.proc is not None:
            raise GuestError("this guest was already started")
        for name in ("output", "rc", "boot_uptime", "console.log"):
            try:
                (self.workdir / name).unlink()
            except FileNotFoundError:
                pass
        prologue = f"cut -d' ' -f1 /proc/uptime > {shlex.quote(str(self.workdir))}/boot_uptime\n"
        (self.workdir / "cmd.sh").write_text(prologue + script + "\n")
        # the guest command gets killed a little before our own deadline so its
        # partial output and rc come back
        cmd = self.command_line(timeout=max(10, timeout - 15))
        self._qemu_log = open(self.workdir / "qemu.log", "wb")
        self._t0 = time.monotonic()
        self._deadline = self._t0 + timeout
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._qemu_log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if self.want_qmp:
            try:
                self._qmp = QMP(str(self.qmp_path), timeout=min(30.0, timeout))
            except GuestError:
                self._terminate()
                raise GuestError("QMP did not come up:\n" + self._read("qemu.log")) from None

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command (needs ``qmp=True`` or ``paused=True``).  If
        QEMU dies meanwhile, the GuestError carries its stderr and console."""
        if self._qmp is None:
            raise GuestError("no QMP connection (QemuGuest(qmp=True) and start() first)")
        try:
            return self._qmp.execute(command, **arguments)
        except (OSError, GuestError) as e:
            if self.proc is not None and not isinstance(e, GuestError):
                try:
                    self.proc.wait(timeout=5)     # QEMU is probably dying: let it finish its log
                except subprocess.TimeoutExpired:
                    pass
            raise GuestError(f"QMP {command}: {type(e).__name__}: {e}\n"
                             + self._snapshot().describe()) from None

    def wait_chardev_connected(self, chardev: str, timeout: float = 30.0) -> None:
        """Wait until QEMU itself counts the socket chardev ``chardev`` as
        connected.

        A client chardev with ``reconnect=N`` connects asynchronously: the
        server's accept() returns as soon as the kernel has connected, but
        QEMU marks the chardev connected (and able to pass fds) only when its
        main loop runs the completion.  A vhost-user device plugged in
        between fails to send its first message ("Failed to set msg fds."),
        and QEMU 7.2's vhost-user-rng then aborts on a double error_setg.
        ``query-chardev`` shows ``disconnected:`` in the filename until then.
        """
        deadline = time.monotonic() + timeout
        while True:
            for c in self.qmp("query-chardev"):
                if c.get("label") == chardev:
                    if not c.get("filename", "").startswith("disconnected:"):
                        return
                    break
            else:
                raise GuestError(f"no chardev {chardev!r} in query-chardev")
            if time.monotonic() > deadline:
                raise GuestError(f"chardev {chardev!r} not connected within {timeout} s\n"
                                 + self._snapshot().describe())
            time.sleep(0.05)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for the guest to power off; raises :class:`GuestError` (after
        killing QEMU) if it does not within the deadline."""
        if self.proc is None:
            raise GuestError("start() the guest first")
        left = (self._deadline - time.monotonic()) if timeout is None else timeout
        try:
            self.proc.wait(timeout=max(0.1, left if left is not None else 180.0))
        except subprocess.TimeoutExpired:
            self._terminate()
            raise GuestError(f"the guest did not finish in time ({time.monotonic() - self._t0:.0f} s)\n"
                             + self._snapshot().describe()) from None
        res = self._snapshot()
        if res.rc < 0:
            raise GuestError(f"the guest stopped without reporting an exit code (QEMU rc "
                             f"{self.proc.returncode})\n" + res.describe())
        return res

    def run(self, script: str, timeout: float = 180.0) -> GuestResult:
        """:meth:`start` + :meth:`wait`."""
        self.start(script, timeout)
        return self.wait()

    def _read(self, name: str) -> str:
        try:
            return (self.workdir / name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _snapshot(self) -> GuestResult:
        rc_text = self._read("rc").strip()
        console = self._read("console.log")
        if not rc_text:   # no shared-dir rc: fall back to the console marker
            for line in reversed(console.splitlines()):
                if line.startswith(_EXIT_MARK):
                    rc_text = line.split()[-1]
                    break
        try:
            rc = int(rc_text)
        except ValueError:
            rc = -1
        try:
            boot = float(self._read("boot_uptime").strip())
        except ValueError:
            boot = None
        return GuestResult(rc=rc, output=self._read("output"), console=console,
                           seconds=time.monotonic() - self._t0, boot_seconds=boot,
                           qemu_log=self._read("qemu.log"))

    def _terminate(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                return
            try:
                p.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        self._terminate()
        if self.proc is not None and not self._reported:
            self._reported = True
            _REPORTS.append(f"QEMU guest in {self.workdir} (QEMU exit status "
                            f"{self.proc.returncode}):\n{self._snapshot().describe(tail=60)}")
        if getattr(self, "_qemu_log", None) is not None:
            self._qemu_log.close()
            self._qemu_log = None
        if self._own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
