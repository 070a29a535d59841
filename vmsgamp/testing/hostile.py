"""A hostile-peer soak: real endpoints under a peer that writes garbage.

:func:`soak` forks three processes over one memfd region with eventfd
doorbells:

* a **device side** (``DeviceServer.serve_forever``, as ``vmsgamp serve``
  runs it) serving rng (device 0) and a simulated i2c bus (device 1);
* a **driver side** (``AmpDriver``) that loops enumerate / rng read / i2c
  write + read-back / ping, and after any error ends its session and
  handshakes again;
* a **hostile peer** that, for ``duration`` seconds, writes random and
  adversarial values into every shared field: both FIFO queue heads
  (magic, state, producer and consumer indices), the layout descriptor, the
  slots of both element arrays (headers with impossible msg_size, ids and
  counts), and the driver's memory where the virtqueue rings, descriptor
  tables and buffers live.

Then the hostile peer stops ("behaves again"), the driver starts a new
session, and must complete clean rounds with correct data.  The endpoints
must never crash (a stray access outside a mapping kills a process with
SIGSEGV/SIGBUS: the exit codes show it), never hang (each loop publishes a
heartbeat; the watchdog checks it), and must recover.

The report holds the figures: writes per target (``attacked``), the device
side's counters (sessions ended and restarted, FIFO breaks, overwrites
noticed, malformed messages, broken queues, dispatch errors) and the
driver's (clean rounds, errors by type, restarts, unexpected exceptions).
Run it longer with ``python bench/soak_hostile.py --duration 60``.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import struct
import time
import traceback
from collections import Counter
from typing import Any

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.fifo import MsgFifo, default_layout
from vmsgamp._core.region import Region
from vmsgamp.errors import VmsgampError

__all__ = ["soak"]

REGION_SIZE = 1 << 20
FIFO_WINDOW = 8192
DRIVER_MEMORY = 16384            # driver rings and buffers from here
DRIVER_MEMORY_SPAN = 256 << 10   # where the hostile peer scribbles in driver memory
ROUND_TIMEOUT = 1.0              # driver request timeout while under attack
EEPROM, PAGE = 0x50, bytes(range(0x30, 0x38))

# Values a careful attacker tries first: ring sizes, wrap points, sign bits.
_NASTY16 = (0, 1, 2, 61, 62, 63, 64, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF)
_NASTY32 = (0, 1, 8, 16, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFF, DRIVER_MEMORY,
            REGION_SIZE - 16, REGION_SIZE, REGION_SIZE + 4096)
_NASTY64 = (0, DRIVER_MEMORY, REGION_SIZE - 8, REGION_SIZE, 1 << 32, 1 << 63, (1 << 64) - 16, (1 << 64) - 1)


# ---- the hostile peer ------------------------------------------------------------------------

class _Scribbler:
    """Random and adversarial writes into every shared field."""

    def __init__(self, region: Region, seed: int):
        self.r = region
        self.rng = random.Random(seed)
        lay = default_layout(FIFO_WINDOW)
        self.heads = (lay["dev_queue_head_offset"], lay["drv_queue_head_offset"])
        self.n = lay["num_queue_elements"]
        self.slot = lay["size_queue_elements"]
        self.arrays = (lay["dev_queue_elements_offset"], lay["drv_queue_elements_offset"])
        self.counts: Counter[str] = Counter()

    def _v16(self) -> int:
        return self.rng.choice(_NASTY16) if self.rng.random() < 0.7 else self.rng.getrandbits(16)

    def _v32(self) -> int:
        return self.rng.choice(_NASTY32) if self.rng.random() < 0.6 else self.rng.getrandbits(32)

    def _v64(self) -> int:
        return self.rng.choice(_NASTY64) if self.rng.random() < 0.6 else self.rng.getrandbits(64)

    def head(self) -> None:
        base = self.rng.choice(self.heads)
        field = self.rng.choice((0, 2, 4, 6))
        value = self._v16()
        if field == 0 and self.rng.random() < 0.5:
            value = 0x514F                              # keep "QO": the state and indices count
        if field == 2 and self.rng.random() < 0.5:
            value = (value & 0xF000) | self.rng.randrange(8)   # a state, maybe with flags
        self.r.store16(base + field, value, "release")
        self.counts["queue head words"] += 1

    def layout(self) -> None:
        off = self.rng.randrange(0, 64, 2)
        if off >= 16 and off % 8 == 0 and self.rng.random() < 0.5:
            self.r.store64(off, self._v64(), "release")
        else:
            self.r.store16(off, self._v16(), "release")
        self.counts["layout words"] += 1

    def message(self) -> None:
        """One slot: a plausible header with adversarial fields, then junk."""
        base = self.rng.choice(self.arrays) + self.rng.randrange(self.n) * self.slot
        mtype = self.rng.choice((0, 1, 2, 3, 0xFF))
        msg_id = self.rng.choice((0x02, 0x03, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x0B, 0x0C,
                                  0x40, 0x41, 0x42, self.rng.getrandbits(8)))
        size = self.rng.choice((0, 5, 8, 12, 16, 20, 48, 63, 64, 65, 0xFFFF, self.rng.randrange(8, 65)))
        words = [self._v32() for _ in range((self.slot - 8) // 4)]
        raw = struct.pack("<BBHHH", mtype, msg_id, self._v16(), self._v16(), size)
        raw += struct.pack(f"<{len(words)}I", *words)
        for i in range(0, len(raw), 8):
            self.r.store64(base + i, int.from_bytes(raw[i:i + 8], "little"), "relaxed")
        self.counts["message slots"] += 1

    def ring(self) -> None:
        """Virtqueue rings, descriptor tables and buffers in driver memory."""
        # The first rings are allocated first: most writes go where they live.
        span = 8 << 10 if self.rng.random() < 0.7 else DRIVER_MEMORY_SPAN
        off = DRIVER_MEMORY + self.rng.randrange(0, span, 8)
        kind = self.rng.random()
        if kind < 0.4:
            self.r.store16(off + self.rng.choice((0, 2, 4, 6)), self._v16(), "release")
        elif kind < 0.7:
            self.r.store32(off + self.rng.choice((0, 4)), self._v32(), "release")
        else:
            self.r.store64(off, self._v64(), "release")
        self.counts["ring and descriptor words"] += 1

    def burst(self) -> None:
        pick = self.rng.random()
        if pick < 0.25:
            self.head()
        elif pick < 0.35:
            self.layout()
        elif pick < 0.65:
            self.message()
        else:
            self.ring()


def _hostile_main(region: Region, duration: float, seed: int, out: Any) -> None:
    s = _Scribbler(region, seed)
    end = time.monotonic() + duration
    while time.monotonic() < end:
        for _ in range(s.rng.randrange(1, 8)):
            s.burst()
        # Let the endpoints run between bursts, sometimes long enough for a
        # session to come up so the attack also lands mid-traffic.
        time.sleep(s.rng.choice((0.0002, 0.0005, 0.001, 0.002, 0.02)))
    out.send(dict(s.counts))


# ---- the endpoints ----------------------------------------------------------------------------

def _device_main(region: Region, bell: EventfdDoorbell, beat: Any, out: Any) -> None:
    from vmsgamp.bus import AmpBus, DeviceServer
    from vmsgamp.devices._base import parse_device_list
    from vmsgamp.protocol import DeviceConnection

    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    fifo = MsgFifo(region, role="device", doorbell=bell)
    server = DeviceServer(AmpBus(fifo, DeviceConnection()), AddressSpace.identity(region),
                          parse_device_list("rng,i2c:sim"), handshake_timeout=0.1, observe=0.2)

    def tick() -> None:
        beat.value += 1

    class Stop:
        def is_set(self) -> bool:
            return bool(stopping)

    server.serve_forever(Stop(), on_step=tick)   # type: ignore[arg-type]
    out.send(server.stats() | {"sessions": server.bus.sessions})
    server.close()
    fifo.close()


class _Round:
    """One driver round: every device used once, data checked."""

    def __init__(self, region: Region, bus: Any):
        self.region, self.bus = region, bus

    def run(self) -> None:
        from vmsgamp.bus import AmpDriver
        from vmsgamp.devices.i2c_client import I2cClient

        drv = AmpDriver(self.bus, RegionAllocator(self.region, DRIVER_MEMORY), timeout=ROUND_TIMEOUT)
        if drv.enumerate() != [0, 1]:
            raise _Wrong("enumeration")
        dev = drv.open(0)
        try:
            addr, _ = dev.alloc(32)
            dev.queues[0].add([], [(addr, 32)])
            dev.notify(0)
            if not dev.wait_used(0, ROUND_TIMEOUT):
                raise TimeoutError("rng: no used buffer")
            used = dev.queues[0].get_used()
            if used is None or used[1] != 32:
                raise _Wrong(f"rng used {used}")
        finally:
            dev.close()
        client = I2cClient.open(drv, 1, timeout=ROUND_TIMEOUT)
        try:
            client.write_i2c_block_data(EEPROM, 0, PAGE)
            if bytes(client.read_i2c_block_data(EEPROM, 0, len(PAGE))) != PAGE:
                raise _Wrong("i2c read-back")
        finally:
            client.close()
        drv.ping(1)


class _Wrong(VmsgampError):
    """A round completed with wrong data (possible only while under attack)."""


def _driver_main(region: Region, bell: EventfdDoorbell, beat: Any, calm: Any, out: Any,
                 settle: float) -> None:
    from vmsgamp.bus import AmpBus
    from vmsgamp.protocol import DriverConnection

    fifo = MsgFifo(region, role="driver", doorbell=bell)
    bus = AmpBus(fifo, DriverConnection(request_timeout=ROUND_TIMEOUT))
    rounds = _Round(region, bus)
    report: dict[str, Any] = {"rounds_ok": 0, "restarts": 0, "errors": Counter(), "unexpected": [],
                              "final_rounds_ok": 0, "final_error": None}

    def restart(why: str) -> None:
        if bus.up:
            bus.end_session("soak", why)
        bus.start(ROUND_TIMEOUT)
        report["restarts"] += 1

    while not calm.is_set():
        beat.value += 1
        try:
            if not bus.up:
                restart("down")
            rounds.run()
            report["rounds_ok"] += 1
        except (VmsgampError, TimeoutError, OSError, ValueError, RuntimeError) as e:
            # Expected under attack: the peer broke the FIFO, a queue, the data.
            report["errors"][type(e).__name__] += 1
            if bus.up:
                bus.end_session("soak", str(e))
            time.sleep(0.002)   # a garbage layout fails at once: do not spin on it
        except Exception as e:   # a type of failure no caller would expect
            report["unexpected"].append(f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            if bus.up:
                bus.end_session("soak", str(e))
    # The peer behaves again: a new session must work, with correct data.
    deadline = time.monotonic() + settle
    while report["final_rounds_ok"] < 3 and time.monotonic() < deadline:
        beat.value += 1
        try:
            if report["final_rounds_ok"] == 0 or not bus.up:
                restart("after the attack")
            rounds.run()
            report["final_rounds_ok"] += 1
        except Exception as e:
            report["final_error"] = f"{type(e).__name__}: {e}"
            report["final_rounds_ok"] = 0
            if bus.up:
                bus.end_session("soak", str(e))
            time.sleep(0.05)
    report["errors"] = dict(report["errors"])
    report["bus"] = bus.stats()
    out.send(report)
    fifo.close()


# ---- the harness ------------------------------------------------------------------------------

class SoakFailure(AssertionError):
    pass


def soak(duration: float = 3.0, *, seed: int = 1, settle: float = 20.0, hang: float = 15.0) -> dict[str, Any]:
    """Run the soak (module docstring); returns the report.  Raises
    SoakFailure if an endpoint crashed, hung, or did not recover."""
    ctx = multiprocessing.get_context("fork")
    region = Region.memfd(REGION_SIZE)
    dev_bell, drv_bell = EventfdDoorbell.pair()
    beats = {"device": ctx.Value("Q", 0, lock=False), "driver": ctx.Value("Q", 0, lock=False)}
    calm = ctx.Event()
    pipes = {k: ctx.Pipe(duplex=False) for k in ("device", "driver", "hostile")}
    procs = {
        "device": ctx.Process(target=_device_main, args=(region, dev_bell, beats["device"],
                                                         pipes["device"][1])),
        "driver": ctx.Process(target=_driver_main, args=(region, drv_bell, beats["driver"], calm,
                                                         pipes["driver"][1], settle)),
        "hostile": ctx.Process(target=_hostile_main, args=(region, duration, seed, pipes["hostile"][1])),
    }
    report: dict[str, Any] = {"duration_s": duration, "seed": seed}
    try:
        procs["device"].start()
        procs["driver"].start()
        time.sleep(0.3)                 # let a first session come up
        procs["hostile"].start()
        _watch(procs, beats, until=lambda: not procs["hostile"].is_alive(), limit=duration + hang,
               hang=hang)
        report["attacked"] = _recv(pipes["hostile"][0], "hostile", procs)
        calm.set()
        _watch(procs, beats, until=lambda: not procs["driver"].is_alive() or pipes["driver"][0].poll(),
               limit=settle + hang, hang=hang)
        report["driver"] = _recv(pipes["driver"][0], "driver", procs)
        os.kill(procs["device"].pid, signal.SIGTERM)
        report["device"] = _recv(pipes["device"][0], "device", procs, timeout=hang)
        for name, p in procs.items():
            p.join(hang)
            if p.exitcode != 0:
                raise SoakFailure(f"the {name} process exited with {p.exitcode}")
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join()
        dev_bell.close()
        drv_bell.close()
        region.close()
    report["attacked"]["total"] = sum(report["attacked"].values())
    d = report["driver"]
    if d["unexpected"]:
        raise SoakFailure("unexpected driver-side exceptions:\n" + "\n".join(d["unexpected"][:3]))
    if d["final_rounds_ok"] < 3:
        raise SoakFailure(f"no recovery after the attack: {d['final_error']}")
    return report


def _watch(procs: dict[str, Any], beats: dict[str, Any], *, until: Any, limit: float, hang: float) -> None:
    """Wait for ``until()``; fail on a dead endpoint or a stalled heartbeat."""
    start = time.monotonic()
    last = {k: (v.value, start) for k, v in beats.items()}
    while not until():
        now = time.monotonic()
        if now - start > limit:
            raise SoakFailure(f"the soak did not finish within {limit:.0f} s")
        for name in ("device", "driver"):
            p = procs[name]
            if not p.is_alive() and p.exitcode != 0:
                raise SoakFailure(f"the {name} process died with exit code {p.exitcode}")
            value = beats[name].value
            if value != last[name][0]:
                last[name] = (value, now)
            elif now - last[name][1] > hang and p.is_alive():
                raise SoakFailure(f"the {name} loop hung: no progress for {hang:.0f} s")
        time.sleep(0.05)


def _recv(conn: Any, name: str, procs: dict[str, Any], timeout: float = 30.0) -> Any:
    if not conn.poll(timeout):
        raise SoakFailure(f"no report from the {name} process (exit code {procs[name].exitcode})")
    return json.loads(json.dumps(conn.recv()))
