"""``vmsgamp decode HEX [HEX ...]``: decode virtio-msg messages given as hex."""
from __future__ import annotations

import argparse
import json
import string
import sys
from typing import Any

from vmsgamp.protocol import SLOT_SIZE, RemoteProtocolError, decode, describe

_HEX_DIGITS = frozenset(string.hexdigits)
# Values printed in hex in the human output (addresses, ids, feature words).
_HEX_KEYS = ("addr", "address", "vendor_id", "features")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "decode",
        help="decode virtio-msg messages given as hex",
        description="Decode virtio-msg messages given as hex, one message per argument "
                    "(spaces, colons, dashes and a 0x prefix are allowed; quote a message that contains spaces). "
                    "Bytes beyond msg_size are ignored, as in a FIFO slot.",
    )
    p.add_argument("hex", nargs="*", metavar="HEX", help="one message as hex, e.g. '00 02 00 00 05 00 08 00'")
    p.add_argument("--pcap", metavar="FILE",
                   help="decode a capture (pcapng from --trace or `vmsgamp trace -w`, or pcap) "
                        "instead: one line per message as `vmsgamp trace` prints them; with --json, "
                        "JSON Lines as `vmsgamp trace --json` and a last {\"record\": \"end\"}")
    p.add_argument("--profile", choices=("g2", "g1"), default="g2",
                   help="header generation: g2 = 8-byte header with token (default), g1 = 6-byte header")
    p.add_argument("--max-size", type=int, default=SLOT_SIZE, metavar="BYTES",
                   help=f"largest msg_size accepted (default {SLOT_SIZE}, the slot size; QEMU uses 48)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per message, one per line")
    p.set_defaults(func=run)


def parse_hex(text: str) -> bytes:
    """Hex with optional separators (space, colon, dash, underscore, comma) and 0x prefixes."""
    cleaned = text.strip()
    for sep in (" ", "\t", "\n", ":", "-", "_", ","):
        cleaned = cleaned.replace(sep, "")
    cleaned = cleaned.replace("0x", "").replace("0X", "")
    if not cleaned:
        raise ValueError("empty hex string")
    bad = sorted(set(cleaned) - _HEX_DIGITS)
    if bad:
        raise ValueError(f"not hex: {''.join(bad)!r}")
    if len(cleaned) % 2:
        raise ValueError(f"odd number of hex digits ({len(cleaned)})")
    return bytes.fromhex(cleaned)


def decode_one(text: str, profile: str, max_size: int) -> dict[str, Any]:
    """describe() of the message, or {"hex": ..., "error": ...}."""
    try:
        data = parse_hex(text)
    except ValueError as e:
        return {"hex": text, "error": f"bad hex: {e}"}
    try:
        msg = decode(data, profile=profile, max_size=max_size)
    except RemoteProtocolError as e:
        return {"hex": data.hex(), "error": str(e)}
    return describe(msg, profile)


def _fmt_value(key: str, value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_fmt_value(key, v) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool) and (key.endswith(_HEX_KEYS) or value > 0xFFFF):
        return f"0x{value:x}"
    if isinstance(value, str) and key in ("data", "bitmap"):
        return value or "''"
    return str(value)


def format_line(index: int, entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"[{index}] ERROR {entry['error']}  ({entry['hex']})"
    what = "response" if entry["response"] else ("event" if entry["msg_id"] & 0x40 else "request")
    head = (f"[{index}] {entry['kind']} {entry['name']} {what}  "
            f"dev_num={entry['dev_num']} token={entry['token']} msg_size={entry['msg_size']}")
    fields = " ".join(f"{k}={_fmt_value(k, v)}" for k, v in entry["payload"].items())
    return f"{head}  {fields}" if fields else head


def run(args: argparse.Namespace) -> int:
    if args.pcap is not None or not args.hex:
        if args.hex or args.pcap is None:
            print("vmsgamp decode: error: give HEX messages or --pcap FILE (not both)", file=sys.stderr)
            return 2
        from vmsgamp._cmd.trace import print_capture

        return print_capture(args, args.pcap)
    entries = [decode_one(text, args.profile, args.max_size) for text in args.hex]
    failed = [(i, e) for i, e in enumerate(entries) if "error" in e]
    if args.json:
        # One object per message, one per line (JSON Lines): a single message
        # is exactly one JSON object.
        for entry in entries:
            print(json.dumps(entry))
    else:
        for i, entry in enumerate(entries):
            print(format_line(i, entry))
    for i, entry in failed:
        print(f"vmsgamp decode: message {i}: {entry['error']}", file=sys.stderr)
    return 1 if failed else 0
