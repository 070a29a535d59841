"""``vmsgamp console`` as a user runs it: a terminal (a pty), raw mode, the
escape key, CR/LF, and the terminal restored on every way out."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import termios
import time
import uuid

import pytest


def _vmsgamp(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmsgamp", *args]


@pytest.fixture
def echo_console():
    """``serve`` with rng at 0 and an echo console at 1 on a fresh shm object."""
    name = f"vmsgamp-test-{uuid.uuid4().hex[:8]}"
    serve = subprocess.Popen(_vmsgamp("serve", "--region", f"shm:{name}#create=1&size=1M&unlink=1",
                                      "--devices", "rng,console:echo", "--json"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(serve.stdout.readline())["devices"][1]["name"] == "console"
        yield f"shm:{name}"
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=20)
        assert serve.returncode == 0, err
    assert not os.path.exists(f"/dev/shm/{name}")


class Terminal:
    """A pty whose slave is the command's stdin, stdout and stderr."""

    def __init__(self, argv: list[str]) -> None:
        self.master, self.slave = os.openpty()
        self.saved = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     start_new_session=True)
        self.seen = b""

    def expect(self, needle: bytes, timeout: float = 20.0) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {needle!r}; got {self.seen!r}"
            if select.select([self.master], [], [], min(left, 0.1))[0]:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:
                    break
        return self.seen

    def raw(self) -> bool:
        return not termios.tcgetattr(self.slave)[3] & termios.ICANON

    def wait_raw(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.raw():
            assert time.monotonic() < deadline, f"the terminal never went to raw mode: {self.seen!r}"
            time.sleep(0.02)

    def restored(self) -> bool:
        return termios.tcgetattr(self.slave) == self.saved

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def test_console_attaches_echoes_and_detaches(echo_console):
    t = Terminal(_vmsgamp("console", "--region", echo_console))
    try:
        t.expect(b"detaches")
        t.wait_raw()
        os.write(t.master, b"hello\x03\r")     # Ctrl-C is a byte for the device in raw mode
        t.expect(b"hello\x03\r")              # the echo device sends it back, CR as typed
        os.write(t.master, b"a\nb")           # a LF from the device is shown as CR LF
        t.expect(b"a\r\nb")
        os.write(t.master, b"\x1d")           # Ctrl-]
        assert t.proc.wait(20) == 0
        t.expect(b"detached")
        assert t.restored()
    finally:
        t.close()


def test_console_restores_the_terminal_on_sigterm(echo_console):
    t = Terminal(_vmsgamp("console", "--region", echo_console, "--enter", "crlf"))
    try:
        t.expect(b"detaches")
        t.wait_raw()
        os.write(t.master, b"x\r")
        t.expect(b"x\r\n")                     # --enter crlf
        t.proc.send_signal(signal.SIGTERM)
        assert t.proc.wait(20) == 143
        t.expect(b"terminated")
        assert t.restored()
    finally:
        t.close()


def test_console_without_a_terminal_json(echo_console):
    p = subprocess.run(_vmsgamp("console", "--region", echo_console, "--json", "--linger", "0.5"),
                       input=b"line one\n", capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["dev_num"] == 1 and out["sent"] == 9 and out["output"] == "line one\n"


def test_console_errors(echo_console):
    p = subprocess.run(_vmsgamp("console", "--region", echo_console, "--dev", "0"),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr == "vmsgamp console: error: device 0 is rng, not a console\n"
    p = subprocess.run(_vmsgamp("console", "--region", echo_console, "--dev", "7", "--json"),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and json.loads(p.stdout)["error"].startswith("no device 7")
