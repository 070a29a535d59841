"""``vmsgamp decode HEX [HEX ...]``: decode virtio-msg messages given as hex."""
from __future__ import annotations

import argparse
import string
from typing import Any

from vmsgamp._cmd._args import add_command, positive_int
from vmsgamp._cmd._output import emit
from vmsgamp.cli import CliError, UsageError
from vmsgamp.protocol import SLOT_SIZE, RemoteProtocolError, decode, describe

_HEX_DIGITS = frozenset(string.hexdigits)
# Values printed in hex in the human output (addresses, ids, feature words).
_HEX_KEYS = ("addr", "address", "vendor_id", "features")


def register(subparsers: Any) -> None:
    p = add_command(
        subparsers, "decode",
        help="decode virtio-msg messages given as hex",
        description="Decode virtio-msg messages given as hex, one message per argument "
                    "(spaces, colons, dashes and a 0x prefix are allowed; quote a message that contains spaces). "
                    "Bytes beyond msg_size are ignored, as in a FIFO slot.  Exit 1 if any message "
                    "cannot be decoded (its line says why; the others are still printed).",
    )
    p.add_argument("hex", nargs="*", metavar="HEX", help="one message as hex, e.g. '00 02 00 00 05 00 08 00'")
    p.add_argument("--pcap", metavar="FILE",
                   help="decode a capture (pcapng from --trace or `vmsgamp trace -w`, or pcap) "
                        "instead: one line per message as `vmsgamp trace` prints them; with --json, "
                        "one object {\"messages\": [...], \"count\", \"file\"}, each entry a record as "
                        "`vmsgamp trace --json` prints it")
    p.add_argument("--profile", choices=("g2", "g1"), default="g2",
                   help="message header: g2 = 8 bytes with token, g1 = 6 bytes")
    p.add_argument("--max-msg-size", type=positive_int, default=SLOT_SIZE, metavar="BYTES",
                   help="largest msg_size accepted (the slot size; QEMU-style peers use 48)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object, {"messages": [...]}, each entry the decoded '
                        'message or {"hex", "error"}; with "error" too when any failed')
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
            raise UsageError("give HEX messages or --pcap FILE (not both)")
        from vmsgamp._cmd.trace import print_capture

        return print_capture(args, args.pcap)
    entries = [decode_one(text, args.profile, args.max_msg_size) for text in args.hex]
    failed = [i for i, e in enumerate(entries) if "error" in e]
    error = None
    if failed:
        which = ", ".join(map(str, failed))
        error = (f"message {which} could not be decoded" if len(failed) == 1
                 else f"messages {which} could not be decoded")
    out: dict[str, Any] = {"messages": entries}
    if error:
        out["error"] = error
    emit(args, out, "\n".join(format_line(i, e) for i, e in enumerate(entries)))
    if error:
        raise CliError(error)      # the reasons are on the lines above (once)
    return 0
