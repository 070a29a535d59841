"""Shared pieces of the vmsg-lb tests: a fake user-API kernel, the carrier
opened on it through the real code path, and a running UserApiServer."""
from __future__ import annotations

import struct
from contextlib import contextmanager
from typing import Iterator

from vmsgamp.bus.userapi import UserApiServer
from vmsgamp.carriers import open_carrier
from vmsgamp.carriers.vmsg_lb import HEADER, VmsgLbCarrier
from vmsgamp.protocol import decode
from vmsgamp.testing.fake_userapi import FakeUserApiKernel

BASE = 0x7000_0000


@contextmanager
def loopback(*, start: bool = True, check: bool = True, **kernel_opts) -> Iterator[
        tuple[FakeUserApiKernel, VmsgLbCarrier, UserApiServer]]:
    """(kernel, carrier, server); on exit the kernel must have seen no
    contract violation by user space."""
    kernel_opts.setdefault("hang_timeout", 10.0)
    kernel = FakeUserApiKernel(base=BASE, **kernel_opts)
    carrier = open_carrier(f"vmsg-lb:#base={BASE:#x}", nodes=kernel.open_nodes())
    server = UserApiServer(carrier)
    if start:
        server.start()
    try:
        yield kernel, carrier, server
    finally:
        server.close()
        carrier.close()
        kernel.close()
    if check:
        assert kernel.violations == []
        assert kernel.stats["strays"] == 0
        assert kernel.stats["token_warnings"] == 0
        assert kernel.notes == []


def names(kernel: FakeUserApiKernel, kind: str = "post") -> list[str]:
    """Message names of the transcript entries of one kind."""
    return [decode(d, max_size=50).NAME for k, d in kernel.transcript if k == kind]


def assert_one_response_per_read(kernel: FakeUserApiKernel) -> None:
    """Every message read is followed by exactly one RESPONSE write before
    the next read, and that response echoes msg_id, dev_id and token."""
    pending = None
    for kind, data in kernel.transcript:
        if kind == "read":
            assert pending is None, f"read {data.hex()} while {pending.hex()} was unanswered"
            pending = data
        elif kind == "write" and data[0] & 1:
            assert pending is not None, f"RESPONSE {data.hex()} without a message read"
            _, msg_id, dev_id, token, _ = HEADER.unpack(bytes(pending[:8]).ljust(8, b"\0"))
            rtype, rmsg, rdev, rtoken, _ = HEADER.unpack_from(data)
            assert (rtype & 1, rmsg, rdev, rtoken) == (1, msg_id, dev_id, token), (pending.hex(), data.hex())
            pending = None
    assert pending is None, f"{pending.hex()} was never answered"


def message(msg_id: int, dev_id: int = 0, payload: bytes = b"", *, mtype: int = 0, token: int = 1,
            msg_size: int | None = None) -> bytes:
    size = HEADER.size + len(payload) if msg_size is None else msg_size
    return HEADER.pack(mtype, msg_id, dev_id, token, size) + payload


def status_of(response: bytes) -> int:
    return struct.unpack_from("<I", response, 8)[0]
