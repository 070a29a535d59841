"""An emulated Cortex-M4 co-processor: QEMU's mps2-an386 running the kit's
firmware, its 16 MiB PSRAM (0x21000000) backed by a host file so that a
vmsgamp driver maps the same memory.

::

    with M4Machine(build_firmware().path, doorbell="uart") as m4:
        carrier = open_carrier(m4.uri)      # copro:/dev/shm/...#uart=...&bus_base=0x21000000
        ...

``doorbell="uart"`` wires the firmware's doorbell UART to a UNIX socket the
carrier connects to; ``"poll"`` leaves it unconnected (both sides poll).
The firmware log (its second UART) goes to a file: :meth:`log`.  QEMU runs
with ``-accel tcg``: timings are those of an emulated CPU.
"""
from __future__ import annotations

import itertools
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["M4Machine", "PSRAM_BASE", "PSRAM_SIZE", "FIFO_OFFSET", "DRIVER_MEMORY_OFFSET", "M4Error"]

PSRAM_BASE = 0x21000000
PSRAM_SIZE = 16 << 20
FIFO_OFFSET = 0x0              # the Gen B layout (board.h BOARD_FIFO_OFFSET)
FIFO_WINDOW = 0x2000
DRIVER_MEMORY_OFFSET = 0x4000  # where a driver puts rings and buffers (inside the firmware's window)
_LAYOUT_MAGIC = 0x4C4F
_DEV_HEAD = 64                 # the firmware's queue head (fixed by its layout writer)
_STATES = {0: "INIT", 1: "READY", 2: "RUN", 3: "SHUTDOWN", 4: "PEER_DEAD"}
_counter = itertools.count()


class M4Error(RuntimeError):
    """QEMU or the firmware did not come up."""


class M4Machine:
    def __init__(self, firmware: str | os.PathLike[str], *, doorbell: str = "uart",
                 qemu: str = "qemu-system-arm", boot_timeout: float = 20.0,
                 shm_dir: str = "/dev/shm") -> None:
        if doorbell not in ("uart", "poll"):
            raise ValueError(f"doorbell must be 'uart' or 'poll', not {doorbell!r}")
        self.firmware = Path(firmware)
        self.doorbell = doorbell
        self.qemu = qemu
        self.boot_timeout = boot_timeout
        d = shm_dir if os.path.isdir(shm_dir) else tempfile.gettempdir()
        self.memory_path = os.path.join(d, f"vmsgamp-m4-{os.getpid()}-{next(_counter)}")
        self._tmp = tempfile.mkdtemp(prefix="vmsgamp-m4-")
        self.uart_path = os.path.join(self._tmp, "doorbell.sock")
        self.log_path = os.path.join(self._tmp, "firmware.log")
        self.qemu_log_path = os.path.join(self._tmp, "qemu.stderr")
        self.proc: subprocess.Popen[bytes] | None = None
        self._map: mmap.mmap | None = None
        self.boot_seconds = 0.0

    # ---- lifecycle ------------------------------------------------------------
    @property
    def command(self) -> list[str]:
        serial0 = ["-chardev", f"socket,id=db,path={self.uart_path},server=on,wait=off",
                   "-serial", "chardev:db"] if self.doorbell == "uart" else ["-serial", "null"]
        return [self.qemu, "-M", "mps2-an386", "-accel", "tcg", "-display", "none", "-monitor", "none",
                "-kernel", str(self.firmware),
                "-object", f"memory-backend-file,id=mem,size={PSRAM_SIZE // (1 << 20)}M,"
                           f"mem-path={self.memory_path},share=on",
                "-machine", "memory-backend=mem", *serial0, "-serial", f"file:{self.log_path}"]

    def start(self) -> "M4Machine":
        if shutil.which(self.qemu) is None:
            raise FileNotFoundError(f"{self.qemu} is not installed (Debian package qemu-system-arm)")
        # A fresh, zeroed file: no stale layout from an earlier run may look like a live one.
        fd = os.open(self.memory_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, PSRAM_SIZE)
            self._map = mmap.mmap(fd, 4096)
        finally:
            os.close(fd)
        t0 = time.monotonic()
        with open(self.qemu_log_path, "wb") as err:   # a file: QEMU can never block on a full pipe
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err)
        try:
            self._wait_boot(t0)
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - t0
        return self

    def _wait_boot(self, t0: float) -> None:
        assert self._map is not None and self.proc is not None
        while struct.unpack_from("<H", self._map, FIFO_OFFSET)[0] != _LAYOUT_MAGIC:
            if self.proc.poll() is not None:
                with open(self.qemu_log_path, errors="replace") as f:
                    err = f.read().strip()
                raise M4Error(f"QEMU exited with {self.proc.returncode}: "
                              f"{err.splitlines()[-1] if err else 'no message'}")
            if time.monotonic() - t0 > self.boot_timeout:
                raise M4Error(f"the firmware wrote no layout within {self.boot_timeout} s; its log: "
                              f"{self.log()[-200:]!r}")
            time.sleep(0.005)
        if self.doorbell == "uart":
            while not os.path.exists(self.uart_path) and time.monotonic() - t0 < self.boot_timeout:
                time.sleep(0.005)

    def close(self) -> None:
        """Stop QEMU and remove the memory file and the socket.  Idempotent."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self._map is not None:
            self._map.close()
            self._map = None
        for path in (self.memory_path,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "M4Machine":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what a driver needs -------------------------------------------------------
    @property
    def uri(self) -> str:
        """The region URI of the co-processor (copro: scheme)."""
        opts = f"bus_base={PSRAM_BASE:#x}&offset={FIFO_OFFSET:#x}"
        if self.doorbell == "uart":
            opts = f"uart={self.uart_path}&" + opts
        return f"copro:{self.memory_path}#{opts}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def device_state(self) -> str:
        """State of the firmware's queue head (INIT/READY/RUN/...)."""
        if self._map is None:
            raise ValueError("the machine is not running")
        st = struct.unpack_from("<H", self._map, FIFO_OFFSET + _DEV_HEAD + 2)[0] & 0x1F
        return _STATES.get(st, f"UNKNOWN({st})")

    def wait_device_state(self, *states: str, timeout: float = 5.0) -> str:
        """Wait until the firmware's queue head shows one of ``states``.

        A driver that restarts uses this between sessions: the handshake
        wakes nobody, so the firmware notices a driver that left only on its
        next tick, and a driver that comes back before that would run
        against the firmware's old indices."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.device_state()
            if st in states:
                return st
            if time.monotonic() >= deadline:
                raise M4Error(f"the firmware's queue head stayed {st} for {timeout} s "
                              f"(expected {'/'.join(states)})")
            time.sleep(0.001)

    def log(self) -> str:
        """The firmware's log (its second UART) so far."""
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""
