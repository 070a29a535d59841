"""``vmsgamp bench codec``: what the sans-I/O protocol layer costs per message.

One process, no I/O: encode and decode of the messages on the hot path
(PING, EVENT_AVAIL, EVENT_USED and the probe's requests and responses), the
state-machine steps a bus round trip pays (driver send, device
receive_bytes, device respond, driver receive_bytes), and a whole PING
exchanged between a DriverConnection and a DeviceConnection in memory.  The
Python call floor (an empty function call) is measured in the same run so
each figure can be read against it.

Each figure is the fastest of ``--repeat`` timings of ``--iters`` loop
iterations (``timeit`` on this thread's CPU time; the loop itself costs
~10 ns and is included), in nanoseconds per operation; ``--runs N`` reports
the median over runs.
``bench/compare_codec.py`` runs the same suite interleaved against the
protocol package of another git revision.
"""
from __future__ import annotations

import argparse
import statistics
import time
import timeit
from types import ModuleType
from typing import Any

from vmsgamp._bench.verdict import check, format_lines

Result = dict[str, Any]

# Targets from issue 14: hot messages well under 1 us to encode and decode.
HOT_LIMIT_NS = 1000.0


def _messages(p: ModuleType) -> dict[str, Any]:
    """One instance per hot message, as the bus and the probe send them."""
    return {
        "ping_req": p.PingRequest(data=0x5A000001, token=7),
        "ping_resp": p.PingResponse(data=0x5A000001, token=7),
        "event_avail": p.EventAvail(dev_num=1, vq_index=0),
        "event_used": p.EventUsed(dev_num=1, vq_index=0),
        "get_devices_req": p.GetDevicesRequest(offset=0, count=32, token=1),
        "get_devices_resp": p.GetDevicesResponse.from_devices([0, 1, 2], token=1),
        "get_device_info_req": p.GetDeviceInfoRequest(dev_num=1, token=2),
        "get_device_info_resp": p.GetDeviceInfoResponse(dev_num=1, token=2, device_id=4,
                                                        vendor_id=0x47534D56, num_feature_bits=64,
                                                        config_size=0, max_virtqueues=1),
        "get_features_req": p.GetDeviceFeaturesRequest(dev_num=1, token=3, block_index=0, num_blocks=2),
        "get_features_resp": p.GetDeviceFeaturesResponse(dev_num=1, token=3, block_index=0,
                                                         features=(0x30000000, 0x5)),
        "set_features_req": p.SetDriverFeaturesRequest(dev_num=1, token=4, block_index=0,
                                                       features=(0x30000000, 0x1)),
        "set_features_resp": p.SetDriverFeaturesResponse(dev_num=1, token=4),
        "set_status_req": p.SetDeviceStatusRequest(dev_num=1, token=5, status=0x0F),
        "set_status_resp": p.SetDeviceStatusResponse(dev_num=1, token=5, status=0x0F),
        "get_vqueue_req": p.GetVqueueRequest(dev_num=1, token=6, index=0),
        "get_vqueue_resp": p.GetVqueueResponse(dev_num=1, token=6, index=0, max_size=256),
        "set_vqueue_req": p.SetVqueueRequest(dev_num=1, token=7, index=0, size=256, desc_addr=0x10000,
                                             driver_addr=0x11000, device_addr=0x12000),
        "set_vqueue_resp": p.SetVqueueResponse(dev_num=1, token=7),
        "get_config_req": p.GetConfigRequest(dev_num=1, token=8, offset=0, length=8),
        "get_config_resp": p.GetConfigResponse(dev_num=1, token=8, generation=1, offset=0,
                                               data=bytes(8)),
    }



def _time(stmt: str, ns: dict[str, Any], iters: int, repeat: int, setup: str = "pass") -> float:
    """ns per execution of ``stmt``: the fastest of ``repeat`` timings.  The
    clock is this thread's CPU time, so time spent descheduled on a shared
    machine does not count (the work is pure CPU: no I/O, no waiting)."""
    timer = timeit.Timer(stmt, setup, timer=time.thread_time, globals=ns)
    return min(timer.repeat(repeat, iters)) / iters * 1e9


def run_suite(p: ModuleType | None = None, *, iters: int = 5_000, repeat: int = 15) -> Result:
    """One run of every measurement against protocol module ``p`` (default
    ``vmsgamp.protocol``).  Keys: ``encode_<msg>_ns``, ``decode_<msg>_ns``,
    ``step_<what>_ns``, ``call_floor_ns``."""
    if p is None:
        import vmsgamp.protocol as p
    msgs = _messages(p)
    ns: dict[str, Any] = {"p": p, "encode": p.encode, "decode": p.decode}
    out: Result = {}
    for name, msg in msgs.items():
        ns["m"] = msg
        ns["b"] = p.encode(msg)
        out[f"encode_{name}_ns"] = _time("encode(m)", ns, iters, repeat)
        out[f"decode_{name}_ns"] = _time("decode(b)", ns, iters, repeat)

    # Slot-padded encode (what a bus with pad_to=64 pays) and decode of a
    # whole 64-byte slot (what the FIFO hands over).
    ns["m"] = msgs["ping_req"]
    out["encode_ping_req_padded_ns"] = _time("encode(m, pad_to=64)", ns, iters, repeat)
    ns["b"] = p.encode(msgs["ping_req"], pad_to=64)
    out["decode_ping_req_slot_ns"] = _time("decode(b)", ns, iters, repeat)

    out.update(_steps(p, iters, repeat))

    def empty() -> None:
        pass

    ns["empty"] = empty
    out["call_floor_ns"] = _time("empty()", ns, iters, repeat)
    out["loop_floor_ns"] = _time("pass", ns, iters, repeat)
    return out


def _steps(p: ModuleType, iters: int, repeat: int) -> Result:
    """The state-machine steps of a bus round trip, each with its codec work."""
    drv, dev = p.DriverConnection(), p.DeviceConnection()
    ns: dict[str, Any] = {"p": p, "drv": drv, "dev": dev, "now": 0.0,
                          "PingRequest": p.PingRequest, "Ping": p.PingRequest(data=1)}
    ping_bytes = p.encode(p.PingRequest(data=1, token=9))
    pong_bytes = p.encode(p.PingResponse(data=1, token=9))
    ns.update(ping_bytes=ping_bytes, pong_bytes=pong_bytes,
              avail_bytes=p.encode(p.EventAvail(dev_num=1, vq_index=0)),
              used_bytes=p.encode(p.EventUsed(dev_num=1, vq_index=0)))
    out: Result = {}
    # Whole PING exchange in memory: build, send, device answers, driver matches.
    out["step_ping_exchange_ns"] = _time(
        "out = drv.send(PingRequest(data=1), now)\n"
        "dev.receive_bytes(out[0], now)\n"
        "drv.receive_bytes(dev.data_to_send()[0], now)", ns, iters, repeat)
    # The device's half: decode PING, answer it, hand out the reply.
    out["step_device_ping_ns"] = _time("dev.receive_bytes(ping_bytes, now)\ndev.data_to_send()",
                                       ns, iters, repeat)
    out["step_driver_ping_ns"] = out["step_ping_exchange_ns"] - out["step_device_ping_ns"]
    # Virtqueue notifications both ways.
    out["step_driver_notify_ns"] = _time("drv.notify(1, 0, now)", ns, iters, repeat)
    out["step_device_event_avail_ns"] = _time("dev.receive_bytes(avail_bytes, now)", ns, iters, repeat)
    out["step_device_notify_used_ns"] = _time("dev.notify_used(1, 0, now)", ns, iters, repeat)
    out["step_driver_event_used_ns"] = _time("drv.receive_bytes(used_bytes, now)", ns, iters, repeat)
    # A probe request answered by the device (respond() names the request).
    ns["Req"], ns["Resp"] = p.SetDeviceStatusRequest, p.SetDeviceStatusResponse
    out["step_request_exchange_ns"] = _time(
        "out = drv.send(Req(dev_num=1, status=1), now)\n"
        "ev = dev.receive_bytes(out[0], now)\n"
        "back = dev.respond(ev[0].request, Resp(status=1))\n"
        "drv.receive_bytes(back[0], now)", ns, iters, repeat)
    return out


def verdicts(r: Result) -> list[Result]:
    """One verdict per target: every hot message encodes and decodes in
    under HOT_LIMIT_NS (the worst one is reported)."""
    out = []
    for op in ("encode", "decode"):
        values = {k: v for k, v in r.items() if k.startswith(f"{op}_") and k.endswith("_ns")
                  and "padded" not in k and "slot" not in k}
        if not values:
            continue
        worst = max(values, key=values.__getitem__)
        out.append(check(f"{op} of every hot message < {HOT_LIMIT_NS / 1000:g} us", values[worst],
                         HOT_LIMIT_NS, unit="ns", detail=f"worst: {worst[len(op) + 1:-3]}"))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iters", type=int, default=5_000, help="loop iterations per timing")
    parser.add_argument("--repeat", type=int, default=15, help="timings per figure (the fastest counts)")
    parser.add_argument("--runs", type=int, default=1, help="repeat the suite and report medians")


def run(args: argparse.Namespace) -> Result:
    runs = [run_suite(iters=args.iters, repeat=args.repeat) for _ in range(max(1, args.runs))]
    out: Result = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out.update(iters=args.iters, repeat=args.repeat, runs=len(runs))
    out["verdicts"] = verdicts(out)
    return out


def format_human(r: Result) -> str:
    names = sorted({k[len("encode_"):-3] for k in r if k.startswith("encode_") and k.endswith("_ns")})
    lines = [f"protocol codec, ns per operation (fastest of {r['repeat']} x {r['iters']}"
             + (f", median of {r['runs']} runs" if r["runs"] > 1 else "") + ")",
             f"  {'message':24s} {'encode':>8s} {'decode':>8s}"]
    for n in names:
        dec = r.get(f"decode_{n}_ns")
        lines.append(f"  {n:24s} {r[f'encode_{n}_ns']:8.0f} {dec if dec is not None else float('nan'):8.0f}")
    lines.append(f"  decode of a whole 64-byte slot (PING)   {r['decode_ping_req_slot_ns']:8.0f}")
    lines.append("state-machine steps (codec included), ns")
    for k in sorted(k for k in r if k.startswith("step_")):
        lines.append(f"  {k[5:-3]:32s} {r[k]:8.0f}")
    lines.append(f"python call floor: empty call {r['call_floor_ns']:.0f} ns, empty loop "
                 f"{r['loop_floor_ns']:.0f} ns")
    lines += format_lines(r["verdicts"])
    return "\n".join(lines)
