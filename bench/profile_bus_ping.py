#!/usr/bin/env python3
"""Where the microseconds of a bus PING round trip go.

Sets up what ``amp_pair`` does (a DeviceServer in a forked process, an
AmpDriver here, one memfd region, layout B), then:

1. times ``--count`` PINGs without a profiler (p50/p99, the real figure);
2. runs the same PINGs with cProfile in *both* processes and prints, per
   side, the functions with the most own time, as microseconds per PING.

cProfile adds roughly a microsecond to every Python call, so part 2 shows
where the calls and the time are relative to each other, not absolute
costs; ``vmsgamp bench codec`` gives the exact per-call cost of the
protocol layer.  ``--doorbell polling`` emulates the ``shm:`` carrier (no
interrupt: waiters sleep-poll), ``eventfd`` the ``ivshmem:`` one.

    python bench/profile_bus_ping.py --count 2000 --top 20
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import vmsgamp  # noqa: F401
except ImportError:  # run from a checkout without installing: use the tree
    sys.path.insert(0, str(HERE.parent))

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator  # noqa: E402
from vmsgamp._core.doorbell import EventfdDoorbell, PollingDoorbell  # noqa: E402
from vmsgamp._core.fifo import MsgFifo  # noqa: E402
from vmsgamp._core.region import Region  # noqa: E402
from vmsgamp.bus import AmpBus, AmpDriver, DeviceServer  # noqa: E402
from vmsgamp.protocol import DeviceConnection, DriverConnection, PingRequest  # noqa: E402
from vmsgamp.testing.amp import DRIVER_MEMORY_START  # noqa: E402


def _device(region: Region, bell, profile_to: str | None, stop: threading.Event) -> None:
    fifo = MsgFifo(region, role="device", layout="b", doorbell=bell)
    server = DeviceServer(AmpBus(fifo, DeviceConnection()), AddressSpace.identity(region), [])
    prof = cProfile.Profile() if profile_to else None
    started = False
    while not stop.is_set():
        server.step(0.1)
        if prof is not None and not started and server.pings_answered >= 1:
            prof.enable()  # from the first PING on: the handshake is not of interest
            started = True
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile_to)
        with open(profile_to + ".count", "w") as f:
            f.write(str(server.pings_answered - 1))
    fifo.close()


def _pings(drv: AmpDriver, count: int, generic: bool = False) -> list[float]:
    """``count`` round trips: ``AmpDriver.ping_once`` (what `vmsgamp ping`
    does: the connection's PING fast path), or with ``generic`` a
    ``request(PingRequest)`` through the whole request machinery."""
    out = []
    clock = time.perf_counter_ns
    for i in range(count):
        t0 = clock()
        if generic:
            drv.request(PingRequest(data=i))
        else:
            drv.ping_once(i)
        out.append((clock() - t0) / 1000)
    return out


def run(count: int, doorbell: str, profiled: bool, tmp: str,
        generic: bool = False) -> tuple[list[float], str | None, str | None]:
    region = Region.memfd(1 << 20)
    if doorbell == "eventfd":
        dev_bell, drv_bell = EventfdDoorbell.pair()
    else:
        dev_bell, drv_bell = PollingDoorbell(), PollingDoorbell()
    dev_prof = os.path.join(tmp, "device.prof") if profiled else None
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            _device(region, dev_bell, dev_prof, stop)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    fifo = MsgFifo(region, role="driver", layout="b", doorbell=drv_bell)
    drv = AmpDriver(AmpBus(fifo, DriverConnection()), RegionAllocator(region, DRIVER_MEMORY_START))
    drv_prof = os.path.join(tmp, "driver.prof") if profiled else None
    try:
        drv.bus.start(10)
        _pings(drv, min(200, count), generic)  # warm-up (and the device's first PING)
        if profiled:
            prof = cProfile.Profile()
            prof.enable()
            rtts = _pings(drv, count, generic)
            prof.disable()
            prof.dump_stats(drv_prof)
        else:
            rtts = _pings(drv, count, generic)
    finally:
        fifo.close()
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        region.close()
        dev_bell.close()
        drv_bell.close()
    return rtts, drv_prof, dev_prof


def top(path: str, per: int, n: int) -> str:
    stats = pstats.Stats(path)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{Path(file).name}:{line}({fn})" if line else fn))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    out = io.StringIO()
    out.write(f"  total profiled time {total / per * 1e6:8.1f} us per PING (inflated by cProfile)\n")
    out.write(f"  {'own us/ping':>11s} {'cum us/ping':>11s} {'calls/ping':>10s}  function\n")
    for tt, ct, nc, name in rows[:n]:
        out.write(f"  {tt / per * 1e6:11.2f} {ct / per * 1e6:11.2f} {nc / per:10.1f}  {name}\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000, help="PINGs per phase (default 2000)")
    p.add_argument("--doorbell", choices=["eventfd", "polling"], default="eventfd")
    p.add_argument("--top", type=int, default=15, help="functions shown per side")
    p.add_argument("--rtt-only", action="store_true", help="only part 1: the round trip without a profiler")
    p.add_argument("--generic", action="store_true",
                   help="PING through AmpDriver.request (message objects, events) instead of the fast path")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vmsgamp-prof-") as tmp:
        rtts, _, _ = run(args.count, args.doorbell, False, tmp, args.generic)
        rtts.sort()
        print(f"bus PING round trip ({args.doorbell} doorbells, {args.count} PINGs, no profiler): "
              f"p50 {statistics.median(rtts):.1f} us, p99 {rtts[int(len(rtts) * 0.99) - 1]:.1f} us, "
              f"min {rtts[0]:.1f} us")
        if args.rtt_only:
            return 0
        rtts, drv_prof, dev_prof = run(args.count, args.doorbell, True, tmp, args.generic)
        print(f"with cProfile in both processes: p50 {statistics.median(rtts):.1f} us")
        assert drv_prof and dev_prof
        print(f"driver process ({'AmpDriver.request' if args.generic else 'AmpDriver.ping_once'} per PING):")
        print(top(drv_prof, args.count, args.top))
        answered = int(Path(dev_prof + ".count").read_text() or 0) or args.count
        print(f"device process (DeviceServer.step loop, {answered} PINGs):")
        print(top(dev_prof, answered, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
