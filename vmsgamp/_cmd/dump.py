"""``vmsgamp dump``: a read-only look at a region's AMP layout, both queue
heads and the messages waiting in each direction, decoded.  Writes nothing
to shared memory."""
from __future__ import annotations

import argparse
import struct
from typing import Any

from vmsgamp._cmd._common import add_command, add_endpoint_args, emit
from vmsgamp._core.fifo import PLACEMENTS, read_layout, state_name, validate_layout
from vmsgamp.carriers import open_carrier
from vmsgamp.errors import LayoutError
from vmsgamp.protocol import RemoteProtocolError, decode, describe

FLAGS = {0x8000: "DEBUGGABLE", 0x4000: "WAITING", 0x2000: "SUPPRESS"}


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "dump", help="read-only view of the layout, queue heads and pending messages",
                    description="Show a region's AMP layout, both queue heads and the messages "
                                "really waiting in each direction, decoded (slots of a session that "
                                "ended are not messages and are not listed).  Writes nothing to "
                                "shared memory; joins an ivshmem server as a peer without waiting.")
    add_endpoint_args(p)
    p.set_defaults(func=run)


def _decode_slot(raw: bytes, profile: str, size_off: int, hdr: int) -> dict[str, Any]:
    msz = struct.unpack_from("<H", raw, size_off)[0]
    if not hdr <= msz <= len(raw):
        return {"hex": raw[:16].hex(), "error": f"msg_size {msz} outside [{hdr}, {len(raw)}]"}
    data = raw[:msz]
    try:
        return describe(decode(data, profile=profile, max_size=len(raw)), profile) | {"hex": data.hex()}
    except RemoteProtocolError as e:
        return {"hex": data.hex(), "error": str(e)}


def _pending(region, base: int, n: int, size: int, cons: int, prod: int, args) -> list[dict[str, Any]]:
    hdr, size_off = (8, 6) if args.profile == "g2" else (6, 4)
    if cons >= n or prod >= n:
        return [{"error": f"index out of range (consumer {cons}, producer {prod}, ring of {n})"}]
    out = []
    i = cons
    while i != prod and len(out) < n:
        out.append({"slot": i} | _decode_slot(region.read(base + i * size, size), args.profile, size_off, hdr))
        i = (i + 1) % n
    return out


def _head(region, off: int) -> dict[str, Any]:
    magic, status, tail, head = struct.unpack("<HHHH", region.read(off, 8))
    return {"offset": off, "magic": f"{magic:#06x}", "magic_ok": magic == 0x514F,
            "state": state_name(status), "flags": [n for b, n in FLAGS.items() if status & b],
            "tail": tail, "head": head}


def dump_b(region, base: int, window: int, args) -> dict[str, Any]:
    lay = read_layout(region, base)
    out: dict[str, Any] = {"layout": "b", "offset": base, "descriptor": lay}
    try:
        validate_layout(dict(lay), min(window, region.size - base))
        out["valid"] = True
    except LayoutError as e:
        out["valid"] = False
        out["error"] = str(e)
        return out
    n, sz = lay["num_queue_elements"], lay["size_queue_elements"]
    dev = _head(region, base + lay["dev_queue_head_offset"])
    drv = _head(region, base + lay["drv_queue_head_offset"])
    out["device_head"], out["driver_head"] = dev, drv
    for name, producer, consumer, elems in (
            ("device_to_driver", dev, drv, lay["dev_queue_elements_offset"]),
            ("driver_to_device", drv, dev, lay["drv_queue_elements_offset"])):
        why = _not_pending(producer, consumer)
        if why is None:
            out[name] = _pending(region, base + elems, n, sz, consumer["head"], producer["tail"], args)
        else:
            out[name] = []
            out[name + "_note"] = why
    return out


def _not_pending(producer: dict[str, Any], consumer: dict[str, Any]) -> str | None:
    """Why the slots between the consumer's head and the producer's tail are
    not messages waiting (None when they are).

    They wait only while the consumer runs (it will read them) and the
    producer runs or has just shut down (what it published before SHUTDOWN
    is still delivered).  Otherwise an index was reset by a handshake or
    belongs to a session that ended: the slots hold leftovers."""
    if consumer["state"] != "RUN":
        return (f"nothing pending: the consumer is in {consumer['state']}; "
                f"the slots hold leftovers of an earlier session")
    if producer["state"] not in ("RUN", "SHUTDOWN"):
        return (f"nothing pending: the producer is in {producer['state']} (its index was "
                f"reset); the slots hold leftovers of an earlier session")
    return None


def dump_a(region, base: int, args) -> dict[str, Any]:
    drv_off, dev_off = PLACEMENTS[args.placement]
    out: dict[str, Any] = {"layout": "a", "offset": base, "placement": args.placement}
    for name, off in (("driver_to_device", drv_off), ("device_to_driver", dev_off)):
        blk = base + off
        head, tail = region.load32(blk, "acquire"), region.load32(blk + 64, "acquire")
        out[name + "_indices"] = {"offset": blk, "head": head, "tail": tail}
        out[name] = _pending(region, blk + 128, 62, 64, tail, head, args)
    return out


def _human(d: dict[str, Any]) -> str:
    lines = [f"layout {d['layout'].upper()} at offset {d['offset']:#x}"]
    if d["layout"] == "b":
        lay = d["descriptor"]
        lines.append(f"  descriptor: magic {lay['magic']:#06x} v{lay['version']} "
                     f"{lay['num_queue_elements']} x {lay['size_queue_elements']}-byte elements, "
                     f"heads dev@{lay['dev_queue_head_offset']:#x} drv@{lay['drv_queue_head_offset']:#x}, "
                     f"elements dev@{lay['dev_queue_elements_offset']:#x} drv@{lay['drv_queue_elements_offset']:#x}")
        if not d["valid"]:
            lines.append(f"  INVALID: {d['error']}")
            return "\n".join(lines)
        for who in ("device", "driver"):
            h = d[f"{who}_head"]
            lines.append(f"  {who} head: {h['state']}{' ' + '|'.join(h['flags']) if h['flags'] else ''}"
                         f"{'' if h['magic_ok'] else ' (no QO magic)'} tail {h['tail']} head {h['head']}")
    else:
        for name in ("driver_to_device", "device_to_driver"):
            ix = d[name + "_indices"]
            lines.append(f"  {name.replace('_', ' ')} block @{ix['offset']:#x}: head {ix['head']} tail {ix['tail']}")
    for name in ("driver_to_device", "device_to_driver"):
        msgs = d[name]
        if name + "_note" in d:
            lines.append(f"  {name.replace('_', ' ')}: {d[name + '_note']}")
            continue
        lines.append(f"  {name.replace('_', ' ')}: {len(msgs)} pending")
        for m in msgs:
            if "error" in m:
                lines.append(f"    [{m.get('slot', '?')}] MALFORMED {m['error']} {m.get('hex', '')}")
            else:
                pay = ", ".join(f"{k}={v}" for k, v in m["payload"].items())
                lines.append(f"    [{m['slot']}] {m['name']}{' response' if m['response'] else ''} "
                             f"dev {m['dev_num']} token {m['token']} size {m['msg_size']}  {pay}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    opts: dict[str, Any] = {}
    if not args.region.startswith("ivshmem:"):
        opts["readonly"] = 1
    else:
        opts["wait_peer"] = 0
    with open_carrier(args.region, **opts) as carrier:
        region = carrier.region
        base = carrier.offset if args.offset is None else args.offset
        if args.layout == "b":
            d = dump_b(region, base, args.window or 8192, args)
        else:
            d = dump_a(region, base, args)
    emit(args, d | {"region": args.region}, _human(d))
    return 0
