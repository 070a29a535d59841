"""Driver-side exercises for each device type: what `vmsgamp emulate` runs
and `vmsgamp bench devices` measures.  Each takes an AmpDriver and a device
number and returns a small dict of facts and rates."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vmsgamp.bus._driver_side import AmpDriver

Exercise = Callable[..., dict[str, Any]]
EXERCISES: dict[int, Exercise] = {}


def exercise(device_id: int) -> Callable[[Exercise], Exercise]:
    def deco(fn: Exercise) -> Exercise:
        EXERCISES[device_id] = fn
        return fn

    return deco


def exercise_all(drv: AmpDriver, infos: Any, *, duration: float, packed: bool | None) -> list[dict[str, Any]]:
    """Each device's info and the result of its exercise (or why there is
    none); one device failing is reported and the others still run."""
    out: list[dict[str, Any]] = []
    for info in infos:
        entry: dict[str, Any] = info.as_dict()
        fn = EXERCISES.get(info.device_id)
        if fn is None:
            entry["result"] = {"skipped": "no exercise for this device type"}
        else:
            try:
                entry["result"] = fn(drv, info.dev_num, duration=duration, packed=packed)
            except Exception as e:  # report it, keep exercising the others
                entry["result"] = {"error": f"{type(e).__name__}: {e}"}
        out.append(entry)
    return out


@exercise(4)
def rng(drv: AmpDriver, dev_num: int, *, duration: float = 0.5, request: int = 4096,
        in_flight: int = 32, packed: bool | None = None) -> dict[str, Any]:
    """Read entropy with ``in_flight`` requests of ``request`` bytes queued."""
    dev = drv.open(dev_num, packed=packed)
    try:
        q = dev.queues[0]
        bufs = [dev.alloc(request) for _ in range(in_flight)]
        for i, (addr, _) in enumerate(bufs):
            q.add([], [(addr, request)], token=i)
        dev.notify(0)
        total = 0
        requests = 0
        sample = b""
        t0 = time.perf_counter()
        end = t0 + duration
        while True:
            if not dev.wait_used(0, 5):
                raise TimeoutError(f"rng device {dev_num}: no entropy within 5 s "
                                   f"({requests} requests done, {q.in_flight} in flight, {q!r})")
            added = False
            while (used := q.get_used()) is not None:
                token, ln = used
                total += ln
                requests += 1
                if not sample:
                    sample = bytes(bufs[token][1][:16])
                if time.perf_counter() < end:
                    q.add([], [(bufs[token][0], request)], token=token)
                    added = True
            if added:
                dev.notify(0)   # every buffer added must be kicked, deadline or not
            elif q.in_flight == 0:
                break
        secs = time.perf_counter() - t0
        return {"bytes": total, "requests": requests, "seconds": secs,
                "mb_per_s": total / secs / 1e6, "sample": sample.hex(), "packed": dev.packed}
    finally:
        dev.close()


@exercise(34)
def i2c(drv: AmpDriver, dev_num: int, *, duration: float = 0.5, packed: bool | None = None,
        eeprom: int = 0x50, sensor: int = 0x48) -> dict[str, Any]:
    """EEPROM (24C02-like) write and read-back, then a temperature read."""
    from vmsgamp.devices.i2c_client import I2cClient, I2cError

    client = I2cClient.open(drv, dev_num, packed=packed)
    try:
        pattern = bytes((0xA5 ^ i * 7) & 0xFF for i in range(8))   # one 8-byte page
        t0 = time.perf_counter()
        client.write_i2c_block_data(eeprom, 0x10, pattern)
        back = bytes(client.read_i2c_block_data(eeprom, 0x10, len(pattern)))
        rtt_us = (time.perf_counter() - t0) * 1e6
        result: dict[str, Any] = {"eeprom_addr": eeprom, "written": pattern.hex(), "read_back": back.hex(),
                                  "match": back == pattern, "write_read_us": rtt_us}
        try:
            raw = client.read_word_data(sensor, 0)
            # LM75: big-endian on the wire, 9 significant bits, 0.5 degC steps
            temp = int.from_bytes(raw.to_bytes(2, "little"), "big", signed=True) / 256
            result["temperature_c"] = round(temp * 2) / 2
        except I2cError:
            result["temperature_c"] = None
        if not result["match"]:
            raise RuntimeError(f"EEPROM read-back {back.hex()} != written {pattern.hex()}")
        result["summary"] = (f"EEPROM @{eeprom:#04x}: wrote {len(pattern)} bytes, read back "
                             f"{'identical' if result['match'] else 'DIFFERENT'} "
                             f"({rtt_us:.0f} us); temperature sensor @{sensor:#04x}: "
                             f"{result['temperature_c']} C")
        return result
    finally:
        client.close()


@exercise(41)
def gpio(drv: AmpDriver, dev_num: int, *, duration: float = 0.5, packed: bool | None = None,
         out_line: int = 0, in_line: int = 1) -> dict[str, Any]:
    """Toggle an output wired (device option loopback=OUT:IN) to an input
    with a falling-edge interrupt armed, and wait for the interrupt."""
    from vmsgamp.devices.gpio_client import Direction, GpioClient, IrqStatus, IrqType

    client = GpioClient.open(drv, dev_num, packed=packed)
    try:
        names = client.line_names() if client.names_size else []
        client.direction_output(out_line, 1)
        client.set_direction(in_line, Direction.IN)
        high = client.get_value(in_line)
        client.set_irq_type(in_line, IrqType.EDGE_FALLING)
        t0 = time.perf_counter()
        client.set_value(out_line, 0)
        status = client.wait_irq(in_line, 5.0)
        irq_us = (time.perf_counter() - t0) * 1e6
        low = client.get_value(in_line)
        client.set_irq_type(in_line, IrqType.NONE)
        ok = status == IrqStatus.VALID
        result: dict[str, Any] = {"ngpio": client.ngpio, "names": names[:4], "input_before": high,
                                  "input_after": low, "irq": None if status is None else status.name,
                                  "toggle_to_irq_us": irq_us}
        if not ok:
            raise RuntimeError(f"no interrupt on line {in_line} after toggling line {out_line} "
                               f"(got {status}); is the device's loopback={out_line}:{in_line} set?")
        result["summary"] = (f"{client.ngpio} lines; line {out_line} 1->0 toggled input {in_line} "
                             f"{high}->{low}, falling-edge interrupt {status.name} after {irq_us:.0f} us")
        return result
    finally:
        client.close()


@exercise(3)
def console(drv: AmpDriver, dev_num: int, *, duration: float = 0.5, packed: bool | None = None,
            rounds: int = 200) -> dict[str, Any]:
    """Echo round trips through port 0 (the device side runs console:echo)."""
    from vmsgamp.devices.console_client import ConsoleClient

    dev = drv.open(dev_num, packed=packed)
    client = ConsoleClient(dev)
    try:
        msg = b"vmsgamp console echo\n"
        client.write(msg)
        first = client.read(len(msg), timeout=5)
        if first != msg:
            raise RuntimeError(f"console echo: sent {msg!r}, got {first!r} (device backend not echo?)")
        samples = []
        end = time.perf_counter() + duration
        while len(samples) < rounds and time.perf_counter() < end:
            t0 = time.perf_counter()
            client.write(b"x")
            if client.read(1, timeout=5) != b"x":
                raise RuntimeError("console echo lost a byte")
            samples.append((time.perf_counter() - t0) * 1e6)
        samples.sort()
        p50 = samples[len(samples) // 2]
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        return {"echoed": first.decode().strip(), "round_trips": len(samples), "rtt_p50_us": p50,
                "rtt_p99_us": p99,
                "summary": f"echo of {len(msg)} bytes came back intact; {len(samples)} one-byte "
                           f"round trips, p50 {p50:.0f} us, p99 {p99:.0f} us"}
    finally:
        client.close()
        dev.close()
