"""``vmsgamp serve --region vmsg-lb:...``: device models for the machine's
own kernel, through the virtio-msg user API and loopback bus.

Order matters because the kernel trusts us to answer: the responder runs
first, then each device is ADDed (dev_id = its number in ``--devices``;
ADD returns once the kernel's probe has been answered); on Ctrl-C or
SIGTERM every device is REMOVEd while the responder still answers, each
REMOVE with a bounded wait because this kernel version can deadlock there.
Nothing is added when the bus cannot be served (nodes missing, not root,
another device side on the node, no base address).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

from vmsgamp._cmd._common import emit
from vmsgamp.bus.userapi import PendingCall, UserApiServer
from vmsgamp.carriers import open_carrier, parse_uri
from vmsgamp.carriers.vmsg_lb import VmsgLbCarrier
from vmsgamp.cli import CliError
from vmsgamp.devices._base import VirtioDevice

REMOVE_TIMEOUT = 5.0      # seconds one REMOVE may take before we call it stuck
ADD_NOTE_EVERY = 5.0      # remind the user what an ADD that takes long waits for


def is_vmsg_lb(uri: str) -> bool:
    try:
        return parse_uri(uri)[0] == "vmsg-lb"
    except ValueError:
        return False


def _say(text: str) -> None:
    print(f"vmsgamp serve: {text}", file=sys.stderr, flush=True)


class _Signals:
    """SIGINT/SIGTERM set ``stop``; a second one sets ``force``."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.force = threading.Event()
        self.first: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on)
        return self

    def _on(self, signum: int, _frame: Any) -> None:
        if self.first is None:
            self.first = signum
        elif self.stop.is_set():
            self.force.set()
        self.stop.set()

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(args: argparse.Namespace, devices: list[VirtioDevice]) -> int:
    for given, flag in ((args.memory, "--memory"), (args.region_at is not None, "--region-at"),
                        (args.keepalive, "--keepalive")):
        if given:
            raise CliError(f"{flag} does not apply to vmsg-lb: (the kernel's rings and buffers are "
                           f"in the loopback region; there is no bus to ping)")
    server: UserApiServer | None = None
    carrier: VmsgLbCarrier | None = None
    try:
        try:
            opened = open_carrier(args.region)
        except (OSError, ValueError) as e:
            raise CliError(f"{e}; nothing was added") from None
        assert isinstance(opened, VmsgLbCarrier)
        carrier = opened
        holders = carrier.holders()
        if holders:
            raise CliError(f"{carrier.msg_path} is already open in {', '.join(holders)}: another device "
                           f"side serves this bus and two responders would race for the same "
                           f"messages; stop it first (nothing was added)")
        server = UserApiServer(carrier, offer_packed=carrier.packed and not args.no_packed,
                               on_late=_say)
        with _Signals() as sigs:
            return _serve(args, carrier, server, devices, sigs)
    finally:
        if server is not None:
            server.close()       # closes the models it attached
        for d in devices:
            try:
                d.close()        # idempotent for the attached ones; frees the others
            except Exception:
                pass
        if carrier is not None:
            carrier.close()


def _serve(args: argparse.Namespace, carrier: VmsgLbCarrier, server: UserApiServer,
           devices: list[VirtioDevice], sigs: _Signals) -> int:
    info: dict[str, Any] = {"region": args.region, **carrier.describe(), "devices": []}
    human = not args.json
    if human:
        print(f"vmsgamp serve: {args.region} base {carrier.base:#x} (from {carrier.base_source}), "
              f"region {carrier.size:#x} bytes; control {carrier.control_path}, messages "
              f"{carrier.msg_path}", flush=True)
    server.start()
    added: list[int] = []
    failure: str | None = None
    try:
        for n, dev in enumerate(devices):
            if sigs.stop.is_set():
                break
            t0 = time.monotonic()
            call = server.begin_add(n, dev)
            if not _wait_add(call, n, sigs):
                failure = (f"ADD of dev_id {n} did not return: the kernel's probe is stuck; "
                           f"still answering")
                break
            if call.error is not None:
                failure = f"{call.error}"
                break
            added.append(n)
            d = {"dev_id": n, "probe_ms": round((time.monotonic() - t0) * 1e3, 3), **dev.describe()}
            info["devices"].append(d)
            if human:
                extras = ", ".join(f"{k}={v}" for k, v in d.items()
                                   if k not in ("dev_id", "name", "device_id", "probe_ms"))
                print(f"  dev_id {n}: {d['name']} (virtio id {d['device_id']}) added, probe answered in "
                      f"{d['probe_ms']:.1f} ms" + (f"  {extras}" if extras else ""), flush=True)
        if failure is None and not sigs.stop.is_set():
            if human:
                print("serving the kernel's drivers; Ctrl-C or SIGTERM removes the devices", flush=True)
            else:
                emit(args, info, "")
            while not sigs.stop.wait(0.5):
                pass
    finally:
        left = _remove_all(server, added, sigs)
        server.stop()
    stats = server.stats
    summary = (f"{len(added) - len(left)} device(s) removed; {stats['messages']} kernel messages "
               f"answered ({stats['malformed']} malformed, {stats['late']} late, "
               f"{stats['unknown_device']} for unknown devices)")
    if left:
        raise CliError(f"quit with dev_id {', '.join(map(str, left))} still on the loopback bus "
                       f"(REMOVE did not return); {summary}")
    if failure is not None:
        raise CliError(failure + ("" if not added else f"; {summary}"))
    if human:
        print(f"vmsgamp serve: {summary}", flush=True)
    if sigs.first == signal.SIGINT:
        raise KeyboardInterrupt
    return 0


def _wait_add(call: PendingCall, dev_id: int, sigs: _Signals) -> bool:
    """Wait for an ADD (it returns when the probe has been answered); after
    a stop request give it REMOVE_TIMEOUT more, since it cannot be called off."""
    note = time.monotonic() + ADD_NOTE_EVERY
    stop_at: float | None = None
    while not call.wait(0.2):
        now = time.monotonic()
        if sigs.stop.is_set() and stop_at is None:
            stop_at = now + REMOVE_TIMEOUT
        if stop_at is not None and (now >= stop_at or sigs.force.is_set()):
            return False
        if now >= note:
            note = now + ADD_NOTE_EVERY
            _say(f"ADD of dev_id {dev_id} is still waiting for the kernel's probe "
                 f"({now - call.started:.0f} s; the responder has answered "
                 f"everything it was sent)")
    return True


def _remove_all(server: UserApiServer, ids: list[int], sigs: _Signals) -> list[int]:
    """REMOVE in reverse order while the responder answers; the ids still
    on the bus when the user gives up (a second signal) are returned."""
    todo = list(reversed(ids))
    while todo:
        n = todo[0]
        call = server.begin_remove(n)
        if not call.wait(REMOVE_TIMEOUT):
            _say(f"REMOVE of dev_id {n} has not returned after {REMOVE_TIMEOUT:g} s: the kernel's "
                 f"remove path looks stuck (this kernel version can deadlock in REMOVE). Still "
                 f"answering; Ctrl-C again quits anyway, leaving dev_id "
                 f"{', '.join(map(str, todo))} on the bus")
            while not call.wait(0.2):
                if sigs.force.is_set():
                    return todo
            _say(f"REMOVE of dev_id {n} returned after {time.monotonic() - call.started:.1f} s")
        if call.error is not None:
            _say(f"{call.error}")
        todo.pop(0)
    return []
