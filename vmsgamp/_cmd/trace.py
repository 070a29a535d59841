"""``vmsgamp trace``: watch a live bus read-only, or print the dissector's path.

Also the pieces other commands share: ``--trace FILE.pcapng`` on the endpoint
commands (:func:`add_trace_arg`, :func:`open_tracer`) and ``decode --pcap``
(:func:`print_capture`), which prints a capture exactly as ``trace`` prints
a live bus.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from vmsgamp._cmd._output import emit
from vmsgamp.cli import CliError, UsageError

_JSON_HELP = ("JSON Lines on stdout (a stream, also with -c or --duration: the one exception to --json's "
              "single object; with --dissector-path one object), one object per line as it happens: {\"record\": \"message\", time_ns, direction, "
              "interface, profile, hex, and the `vmsgamp decode --json` fields}, {\"record\": \"missed\", "
              "count, at_least, ...} where messages went by unread, {\"record\": \"bus\", text} when the bus "
              "comes up or goes down, and last {\"record\": \"end\", messages, missed, ...}. With -w (and "
              "no --print) only the end record.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace", help="watch a live bus read-only (tcpdump for virtio-msg), or write it to pcapng",
        description="Follow both directions of a live AMP bus without taking part: the region is "
                    "mapped read-only, nothing is written, no doorbell is rung. One line per message "
                    "(time, direction, name, request/response/event, device, token, payload), or a "
                    "pcapng capture with -w. Messages that went by before they could be read are "
                    "reported as missed, never printed as garbage. Ends after -c messages or "
                    "--duration seconds (exit 0), on SIGTERM (exit 0), or on Ctrl-C (exit 130).",
        epilog="Open a capture with: wireshark -X lua_script:$(vmsgamp trace --dissector-path) FILE.pcapng")
    p.add_argument("--dissector-path", action="store_true",
                   help="print the absolute path of the Wireshark Lua dissector and exit")
    p.add_argument("--region", metavar="URI", help="the bus's shared memory (as for serve/devices)")
    p.add_argument("--layout", choices=["b", "a"], default="b", help="FIFO layout (default b)")
    p.add_argument("--profile", choices=["g2", "g1"], default="g2", help="message header (default g2)")
    p.add_argument("--offset", type=_int, default=None, help="where the AMP layout starts in the region")
    p.add_argument("--window", type=_int, default=None,
                   help="layout b: bound for the layout (default: the rest of the region)")
    p.add_argument("--placement", choices=["0/4k", "4k/8k"], default="0/4k",
                   help="layout a only: where the two 4 KiB queues sit")
    p.add_argument("-w", "--write", metavar="FILE.pcapng", help="write the messages to a pcapng capture")
    p.add_argument("--print", action="store_true", help="with -w: print the messages too")
    p.add_argument("-c", "--count", type=int, default=None, help="stop after COUNT messages")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the region to exist (default 10); the layout may "
                        "appear any time later")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(func=run)


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


# ---- --trace on the endpoint commands --------------------------------------------

def add_trace_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", metavar="FILE.pcapng", default=None,
                   help="record every message sent and received to a pcapng capture "
                        "(see `vmsgamp trace --dissector-path`)")


def open_tracer(path: str | None):
    """A Tracer writing ``path``, or None."""
    if not path:
        return None
    from vmsgamp.trace import Tracer

    try:
        return Tracer(path)
    except OSError as e:
        raise CliError(f"--trace {path}: {e.strerror or e}") from None


def close_tracer(tracer, bus=None) -> dict[str, Any] | None:
    """Close the tracer; what it wrote next to what the bus counted."""
    if tracer is None:
        return None
    if bus is not None:
        bus.detach_tracer()
    tracer.close()
    out: dict[str, Any] = dict(tracer.summary())
    if bus is not None:
        c = bus.conn.counters
        out["bus_counters"] = {"tx_messages": c.tx_messages, "rx_messages": c.rx_messages,
                               "rx_malformed": c.rx_malformed}
    return out


def trace_line(summary: dict[str, Any] | None) -> str:
    if not summary:
        return ""
    line = (f"trace {summary['file']}: {summary['messages']} messages "
            f"({summary['driver_to_device']} driver->device, {summary['device_to_driver']} device->driver)")
    c = summary.get("bus_counters")
    if c:
        line += (f"; bus counted {c['tx_messages']} sent, {c['rx_messages']} received, "
                 f"{c['rx_malformed']} malformed")
    return line


# ---- output shared by trace and decode --pcap --------------------------------------

class _Printer:
    def __init__(self, args: argparse.Namespace, *, show: bool):
        self.json = args.json
        self.show = show
        self.out = sys.stdout

    def message(self, time_ns: int, direction: int, data: bytes, profile: str, iface: str,
                label: str | None) -> None:
        if not self.show:
            return
        from vmsgamp.trace import line, message_entry, record

        entry = message_entry(data, profile)
        if self.json:
            self.out.write(json.dumps(record(time_ns, direction, data, entry, profile, iface)) + "\n")
        else:
            self.out.write(line(time_ns, direction, entry, profile, label) + "\n")

    def missed(self, time_ns: int, direction: int, count: int, at_least: bool, reason: str) -> None:
        from vmsgamp.trace import DIRECTION_NAMES
        from vmsgamp.trace._format import ARROWS, clock

        if self.json:
            if self.show:
                self.out.write(json.dumps({"record": "missed", "time_ns": time_ns,
                                           "direction": DIRECTION_NAMES[direction], "count": count,
                                           "at_least": at_least, "reason": reason}) + "\n")
            return
        text = (f"{clock(time_ns)} {ARROWS.get(direction, '?>?')} *** missed "
                f"{'at least ' if at_least else ''}{count} message{'s' if count != 1 else ''}: {reason}")
        print(text, file=self.out if self.show else sys.stderr)

    def notice(self, time_ns: int, text: str) -> None:
        if self.json:
            if self.show:
                self.out.write(json.dumps({"record": "bus", "time_ns": time_ns, "text": text}) + "\n")
        else:
            print(f"vmsgamp trace: {text}", file=sys.stderr)

    def end(self, obj: dict[str, Any], human: str) -> None:
        if self.json:
            self.out.write(json.dumps({"record": "end", **obj}) + "\n")
        else:
            print(human, file=sys.stderr)
        self.out.flush()


def print_capture(args: argparse.Namespace, path: str) -> int:
    """``decode --pcap``: print a capture as ``trace`` prints a live bus
    (with ``--json`` one object holding the records ``trace`` would print)."""
    from vmsgamp.trace import LINKTYPE_USER0, Capture, CaptureFormatError, message_entry, record

    printer = _Printer(args, show=True)
    messages: list[dict[str, Any]] = []
    count = 0
    error = None
    try:
        with Capture(path) as cap:
            for pkt in cap:
                iface = cap.interfaces[pkt.interface]
                if iface.linktype != LINKTYPE_USER0:
                    continue
                label = iface.name if len(cap.interfaces) > 1 else None
                if args.json:
                    messages.append(record(pkt.time_ns, pkt.direction, pkt.data,
                                           message_entry(pkt.data, iface.profile), iface.profile, iface.name))
                else:
                    printer.message(pkt.time_ns, pkt.direction, pkt.data, iface.profile, iface.name, label)
                count += 1
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")    # the reader went away (| head): stop quietly
        return 0
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except CaptureFormatError as e:
        error = f"{path}: {e} (after {count} messages)"
    finally:
        sys.stdout.flush()
    if args.json:
        out: dict[str, Any] = {"messages": messages, "count": count, "file": path}
        if error:
            out["error"] = error
        emit(args, out, "")
    if error:
        raise CliError(error)
    return 0


# ---- trace --------------------------------------------------------------------------

def _open_region(args: argparse.Namespace):
    from vmsgamp.carriers import open_carrier

    opts: dict[str, Any] = {"readonly": 1}
    if args.region.startswith("ivshmem:"):
        opts["wait_peer"] = 0
    opts["timeout"] = args.timeout
    try:
        carrier = open_carrier(args.region, **opts)
    except FileNotFoundError as e:
        raise CliError(f"{args.region}: {e.strerror or e}") from None
    except PermissionError as e:
        raise CliError(f"{args.region}: permission denied ({e})") from None
    offset = carrier.offset if args.offset is None else args.offset
    # Keep only the mapping: an ivshmem observer leaves the server at once, so
    # it is never a peer anybody's doorbell could target.
    return carrier.detach_region(), offset


def run(args: argparse.Namespace) -> int:
    if args.dissector_path:
        from vmsgamp.trace import dissector_path

        path = dissector_path()
        emit(args, {"dissector_path": path}, path)
        return 0
    if not args.region:
        raise UsageError("--region is required (or --dissector-path)")
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    from vmsgamp.trace import Missed, Notice, Observer, Tracer, interface_name

    region, offset = _open_region(args)
    tracer = None
    stop_reason: list[str] = []

    def on_term(*_: object) -> None:
        stop_reason.append("terminated")

    old_term = signal.signal(signal.SIGTERM, on_term)
    seen = 0
    t0 = time.monotonic()
    try:
        try:
            obs = Observer(region, layout=args.layout, offset=offset,
                           window=args.window or max(0, region.size - offset),
                           placement=args.placement, profile=args.profile)
        except (ValueError, IndexError) as e:
            raise CliError(f"{args.region}: {e}") from None
        name = interface_name(args.region)
        if args.write:
            try:
                tracer = Tracer(args.write)
            except OSError as e:
                raise CliError(f"-w {args.write}: {e.strerror or e}") from None
            iface = tracer.interface(name, args.profile, f"passive observer (vmsgamp trace, pid {os.getpid()})")
        printer = _Printer(args, show=not args.write or args.print)
        deadline = None if args.duration is None else t0 + args.duration

        def handle(recs: list) -> None:
            nonlocal seen
            for rec in recs:
                if isinstance(rec, Notice):
                    printer.notice(rec.time_ns, rec.text)
                elif isinstance(rec, Missed):
                    printer.missed(rec.time_ns, rec.direction, rec.count, rec.at_least, rec.reason)
                else:
                    if tracer is not None:
                        tracer.record(iface, rec.direction, rec.data, rec.time_ns)
                    printer.message(rec.time_ns, rec.direction, rec.data, args.profile, name, None)
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        stop_reason.append("count")
                        return
            if recs:
                printer.out.flush()

        pause = 0.0
        interrupted = False
        try:
            try:
                while not stop_reason:
                    recs = obs.poll()
                    handle(recs)
                    if deadline is not None and time.monotonic() >= deadline:
                        stop_reason.append("duration")
                    elif recs:
                        pause = 0.0          # traffic: look again at once
                    else:
                        pause = min(max(pause * 2, 20e-6), 1e-3)
                        time.sleep(pause)
            except KeyboardInterrupt:
                interrupted = True
            if stop_reason[:1] != ["count"]:
                # One last look: what was published before we were told to stop.
                handle(obs.poll(final=True))
        except BrokenPipeError:
            # The reader went away (| head): stop quietly.
            sys.stdout = open(os.devnull, "w")
            stop_reason.append("pipe")
            printer.out = sys.stdout
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if tracer is not None:
            tracer.close()
        region.close()
    missed = obs.missed
    end = {"messages": seen, "missed": missed, "missed_at_least": obs.missed_at_least,
           "sessions": obs.sessions, "seconds": round(time.monotonic() - t0, 3),
           "reason": "interrupted" if interrupted else (stop_reason[0] if stop_reason else "end"),
           "file": args.write}
    human = (f"vmsgamp trace: {'interrupted after ' if interrupted else ''}{seen} message"
             f"{'s' if seen != 1 else ''}, {'at least ' if obs.missed_at_least else ''}{missed} missed"
             + (f", written to {args.write}" if args.write else ""))
    try:
        printer.end(end, human)
    except BrokenPipeError:
        pass
    return 130 if interrupted else 0
