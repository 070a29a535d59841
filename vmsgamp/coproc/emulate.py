"""``vmsgamp emulate --coprocessor m4``: the device side is the kit's firmware
on an emulated Cortex-M4 (QEMU mps2-an386, TCG) instead of a vmsgamp
process.  Builds the firmware if needed, boots it, and runs the same
exercises, summary and ``--json`` report as ``vmsgamp emulate``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from vmsgamp.cli import CliError

FIRMWARE_DEVICES = "rng,i2c"


def run_m4(args: argparse.Namespace) -> int:
    from vmsgamp._core.addrspace import RegionAllocator
    from vmsgamp._core.fifo import MsgFifo
    from vmsgamp.bus import AmpBus, AmpDriver
    from vmsgamp.carriers import open_carrier
    from vmsgamp.coproc.build import build_firmware, missing_tools
    from vmsgamp.coproc.m4 import DRIVER_MEMORY_OFFSET, M4Error, M4Machine
    from vmsgamp.bus.exercise import exercise_all
    from vmsgamp.protocol import DriverConnection

    if args.devices and args.devices != FIRMWARE_DEVICES:
        raise CliError(f"--devices cannot be chosen with --coprocessor m4: the firmware serves "
                       f"{FIRMWARE_DEVICES}")
    if args.layout != "b":
        raise CliError("--layout a cannot be used with --coprocessor m4: the firmware writes the Gen B layout")
    missing = missing_tools("arm-none-eabi-gcc", "qemu-system-arm")
    if missing:
        raise CliError(f"--coprocessor m4 needs arm-none-eabi-gcc and qemu-system-arm: "
                       f"apt-get install {' '.join(missing)}")
    try:
        fw = build_firmware()
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise CliError(str(e)) from None
    packed = {"auto": None, "on": True, "off": False}[args.packed]
    report: dict[str, Any] = {"devices_spec": FIRMWARE_DEVICES, "layout": "b"}
    report["coprocessor"] = {"machine": "mps2-an386", "cpu": "cortex-m4", "accel": "tcg",
                             "doorbell": args.m4_doorbell, "firmware": fw.as_dict()}
    m4 = M4Machine(fw.path, doorbell=args.m4_doorbell)
    carrier = fifo = bus = drv = None
    try:
        try:
            m4.start()
        except (M4Error, OSError) as e:
            raise CliError(f"the Cortex-M4 did not come up: {e}") from None
        report["coprocessor"]["boot_ms"] = m4.boot_seconds * 1e3
        report["coprocessor"]["region"] = m4.uri
        report["device_process"] = {"pid": m4.pid, "devices": []}
        t0 = time.perf_counter()
        carrier = open_carrier(m4.uri, timeout=10)
        fifo = MsgFifo(carrier.region, role="driver", layout="b", offset=carrier.offset,
                       doorbell=carrier.doorbell)
        bus = AmpBus(fifo, DriverConnection())
        bus.start(10)
        drv = AmpDriver(bus, RegionAllocator(carrier.region, DRIVER_MEMORY_OFFSET), timeout=5)
        infos = [drv.info(n) for n in drv.enumerate()]
        report["connect_ms"] = (time.perf_counter() - t0) * 1e3
        report["device_process"]["devices"] = [{"dev_num": i.dev_num, "name": i.name, "device_id": i.device_id}
                                               for i in infos]
        report["devices"] = exercise_all(drv, infos, duration=args.duration, packed=packed)
        report["ping"] = drv.ping(200)
        report["bus"] = bus.stats()
    finally:
        if drv is not None:
            try:
                drv.close()
            except Exception:
                pass
        if bus is not None:
            bus.close()
        elif fifo is not None:
            fifo.close()
        if carrier is not None:
            carrier.close()
        log = m4.log()
        alive = m4.running
        m4.close()
        report.setdefault("device_process", {"pid": m4.pid, "devices": []})
        # QEMU ran until we stopped it: 0, as a device process that exits on SIGTERM
        report["device_process"]["exit_code"] = 0 if alive else (m4.proc.returncode if m4.proc else None)
        report["coprocessor"]["log"] = log.splitlines()
    failed = [d for d in report.get("devices", []) if "error" in d.get("result", {})]
    if args.json:
        print(json.dumps(report, sort_keys=True, default=str))
    else:
        print(_human(report))
    return 1 if failed or report["device_process"].get("exit_code") not in (0, None) else 0


def _human(r: dict[str, Any]) -> str:
    c = r["coprocessor"]
    fw = c["firmware"]
    lines = [f"vmsgamp emulate: Cortex-M4 firmware on QEMU {c['machine']} (pid {r['device_process'].get('pid')}, "
             f"TCG) + driver process (pid {os.getpid()}), {c['doorbell']} doorbell, layout B",
             f"  firmware {fw['path']} ({fw['text']} text, {fw['data']} data, {fw['bss']} bss bytes"
             f"{', cached' if fw['cached'] else ', built now'}), booted in {c.get('boot_ms', 0):.0f} ms",
             f"  enumerated {len(r.get('devices', []))} device(s) in {r.get('connect_ms', 0):.1f} ms"]
    for d in r.get("devices", []):
        res = d["result"]
        head = f"  [{d['dev_num']}] {d['name']:8}"
        if "error" in res:
            lines.append(f"{head} FAILED: {res['error']}")
        elif "skipped" in res:
            lines.append(f"{head} {res['skipped']}")
        elif "summary" in res:
            lines.append(f"{head} {res['summary']}")
        elif d["name"] == "rng":
            lines.append(f"{head} read {res['bytes']} bytes in {res['requests']} requests "
                         f"({res['mb_per_s']:.1f} MB/s, {'packed' if res['packed'] else 'split'} ring), "
                         f"first bytes {res['sample'][:16]}")
        else:
            lines.append(f"{head} " + ", ".join(f"{k}={v}" for k, v in res.items()))
    p = r.get("ping")
    if p:
        lines.append(f"  bus ping: {p['count']} round trips, p50 {p['p50_us']:.1f} us, p99 {p['p99_us']:.1f} us")
    b = r.get("bus")
    if b:
        lines.append(f"  messages: {b['tx_messages']} sent, {b['rx_messages']} received, "
                     f"{b['rx_malformed']} malformed, {b['timeouts']} timeouts")
    lines.append("  (emulated CPU: rates and round trips are TCG timings, not a real M4's)")
    return "\n".join(lines)
