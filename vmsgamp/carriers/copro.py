"""``copro:`` -- a co-processor's shared memory plus a UART doorbell.

::

    copro:/dev/shm/vmsgamp-m4#bus_base=0x21000000                     polling
    copro:/dev/shm/vmsgamp-m4#uart=/tmp/m4-doorbell.sock&bus_base=0x21000000
    copro:/dev/mem#size=16M&uart=/dev/ttyS1&baud=115200&bus_base=0x21000000  (a real board)

The target is a mappable file: a regular file or POSIX shared memory object
(QEMU's ``memory-backend-file,share=on`` for an emulated co-processor's RAM),
or a character device that maps memory at offset 0.  ``bus_base`` is the
address the co-processor sees for its first byte (ring addresses in
SET_VQUEUE and descriptors are in that space), ``offset`` where the Gen B
layout starts inside it.

The doorbell is one byte each way over a UART, the way an STM32MP1's IPCC
mailbox interrupts each side: writing a byte raises the co-processor's UART
receive interrupt, and a byte it sends makes our end readable.  ``uart=`` is
either a UNIX socket (QEMU's ``-chardev socket,path=...,server=on`` wired to
the firmware's UART) or a tty device (set to raw mode at ``baud``, default
115200).  Without ``uart=`` both sides poll.  Byte values carry nothing;
rings coalesce.  The co-processor's log must go elsewhere (another UART):
any byte on this one counts as a ring.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import termios
import time
from typing import Any

from vmsgamp._core.doorbell import Doorbell
from vmsgamp.carriers._registry import (
    Carrier, _open_path, parse_int, parse_timeout, register_scheme,
)

log = logging.getLogger("vmsgamp.copro")

__all__ = ["UartDoorbell", "open_copro"]

_BAUD = {9600: termios.B9600, 19200: termios.B19200, 38400: termios.B38400, 57600: termios.B57600,
         115200: termios.B115200, 230400: termios.B230400, 460800: termios.B460800,
         921600: termios.B921600}
_EOF_POLL = 0.01   # once the other end is gone, waits sleep in slices this long


class UartDoorbell(Doorbell):
    """One byte towards the peer rings it; bytes from it mean "look at the
    FIFO".  ``path`` is a UNIX stream socket or a tty.  Called by the FIFO
    with the GIL held (a Python doorbell); ``fileno()`` suits event loops."""

    def __init__(self, path: str, *, timeout: float | None = 5.0, baud: int = 115200) -> None:
        self.path = path
        self.name = f"uart doorbell {path}"
        self.ring_count = 0
        self.wakeup_count = 0
        self.peer_gone = False
        self._sock: socket.socket | None = None
        self._fd = -1
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                st = os.stat(path)
                break
            except FileNotFoundError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise FileNotFoundError(errno.ENOENT, f"uart={path}: no such socket or tty "
                                            f"(is the co-processor's emulator running?)") from None
                time.sleep(0.01)
        if stat.S_ISSOCK(st.st_mode):
            self._connect(deadline)
        elif stat.S_ISCHR(st.st_mode):
            self._open_tty(baud)
        else:
            raise ValueError(f"uart={path} is neither a UNIX socket nor a character device")

    def _connect(self, deadline: float | None) -> None:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.path)
            except (ConnectionRefusedError, FileNotFoundError) as e:
                s.close()
                if deadline is not None and time.monotonic() >= deadline:
                    raise ConnectionRefusedError(e.errno, f"uart={self.path}: nobody listens "
                                                 f"on the socket") from None
                time.sleep(0.01)
                continue
            except BaseException:
                s.close()
                raise
            s.setblocking(False)
            self._sock = s
            self._fd = s.fileno()
            return

    def _open_tty(self, baud: int) -> None:
        if baud not in _BAUD:
            raise ValueError(f"baud={baud} is not supported (use one of {', '.join(map(str, _BAUD))})")
        fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            attrs = termios.tcgetattr(fd)
            # raw 8N1, no echo, no flow control, no line discipline
            attrs[0] = 0
            attrs[1] = 0
            attrs[2] = termios.CS8 | termios.CREAD | termios.CLOCAL
            attrs[3] = 0
            attrs[4] = attrs[5] = _BAUD[baud]
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
            termios.tcflush(fd, termios.TCIOFLUSH)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    # ---- the Doorbell interface -------------------------------------------------
    def ring(self) -> None:
        if self.closed:
            raise ValueError(f"{self.name}: doorbell is closed")
        if self.peer_gone:
            return
        try:
            os.write(self._fd, b"\x01")
            self.ring_count += 1
        except BlockingIOError:
            pass   # earlier rings are still unread: the peer is due to wake anyway
        except (BrokenPipeError, ConnectionResetError):
            self._gone()

    def _gone(self) -> None:
        if not self.peer_gone:
            self.peer_gone = True
            log.info("%s: the other end went away", self.name)

    def _take(self) -> bool:
        """Read every pending byte; True if there was any."""
        got = False
        while True:
            try:
                data = os.read(self._fd, 256)
            except BlockingIOError:
                return got
            except (ConnectionResetError, BrokenPipeError):
                self._gone()
                return got
            if not data:
                if self._sock is not None:
                    self._gone()   # EOF on the socket: the emulator closed it
                return got
            got = True

    def wait(self, timeout: float | None = None) -> bool:
        if self.closed:
            raise ValueError(f"{self.name}: doorbell is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self.peer_gone:
                # nothing can ring any more: behave like a polling doorbell
                time.sleep(_EOF_POLL if left is None else min(left, _EOF_POLL))
                return False
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready and self._take():
                self.wakeup_count += 1
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def drain(self) -> None:
        if not self.closed:
            self._take()

    def fileno(self) -> int:
        if self.closed:
            raise ValueError(f"{self.name}: doorbell is closed")
        return self._fd

    @property
    def can_wait(self) -> bool:
        return not self.closed and not self.peer_gone

    def close(self) -> None:
        if self.closed:
            return
        Doorbell.close(self)
        if self._sock is not None:
            self._sock.close()
        elif self._fd >= 0:
            os.close(self._fd)
        self._sock = None
        self._fd = -1

    def __repr__(self) -> str:
        state = " closed" if self.closed else " peer gone" if self.peer_gone else ""
        return f"<UartDoorbell {self.path}{state}>"


def open_copro(target: str, *, uri: str, uart: Any = None, baud: Any = 115200, size: Any = None,
               offset: Any = 0, timeout: Any = 5.0, **opts: Any) -> Carrier:
    """Opener for ``copro:PATH[#uart=SOCKET|TTY][&baud=N][&size=N][&bus_base=..][&offset=..]``."""
    if target.startswith("//"):
        target = target[2:]
    if not target:
        raise ValueError(f"{uri!r}: copro: needs the path of the shared memory, "
                         f"e.g. copro:/dev/shm/vmsgamp-m4#uart=/tmp/m4.sock")
    wait = parse_timeout(timeout)
    carrier = _open_path(target, uri=uri, label=f"co-processor memory {target}",
                         create_hint="start the co-processor (its emulator creates the file)",
                         size=size, offset=offset, timeout=wait, **opts)
    if uart in (None, "", "none", "0"):
        return carrier
    try:
        bell = UartDoorbell(str(uart), timeout=wait, baud=parse_int(baud, "baud"))
    except BaseException:
        carrier.close()
        raise
    carrier.doorbell.close()
    carrier.doorbell = bell
    return carrier


register_scheme("copro", open_copro, options=("uart", "baud", "size"),
                summary="copro:PATH  a co-processor's memory file + UART doorbell (uart=SOCKET|TTY), "
                        "e.g. an emulated Cortex-M4")
