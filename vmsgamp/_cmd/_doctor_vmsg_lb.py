"""``vmsgamp doctor vmsg-lb:``: does this kernel offer the virtio-msg user
API and loopback bus, can we use its nodes, where is the region and can it
be mapped (the memory ACCESS_PLATFORM rings and buffers live in)?

Side-effect free: nothing is read from or written to the message node and
nothing is added; the region is mapped and unmapped.
"""
from __future__ import annotations

import glob
import os
from typing import Any

from vmsgamp._cmd.doctor import FAIL, INFO, MISSING, OK, _check, _node_access
from vmsgamp.carriers import open_carrier
from vmsgamp.carriers.vmsg_lb import (
    CONTROL_NODE, MSG_NODE, BaseNotFound, VmsgLbCarrier, find_base, node_holders,
)


def check_vmsg_lb(checks: list[dict[str, Any]], uri: str, target: str, opts: dict[str, str],
                  sroot: str, droot: str, *, try_open: bool = True) -> list[dict[str, Any]]:
    control = target or os.path.join(droot, CONTROL_NODE)
    msg = opts.get("msg") or os.path.join(droot, MSG_NODE)
    mods = sorted(os.path.basename(p) for p in glob.glob(os.path.join(sroot, "module", "virtio_msg*")))
    _check(checks, "modules", INFO, f"loaded: {', '.join(mods)}" if mods else
           "no virtio_msg* module in /sys/module (fine if built in; the loopback bus and user API "
           "are not upstream Linux: see docs/vmsg-lb.md)")
    good = _node_access(checks, "control node", control, chardev=True)
    good = _node_access(checks, "message node", msg, chardev=True) and good
    base = None
    try:
        base = find_base(opts.get("base"))
        size = f", {base.size:#x} bytes" if base.size else ""
        _check(checks, "base", OK, f"{base.base:#x}{size} from {base.source}")
    except (BaseNotFound, ValueError) as e:
        good = _check(checks, "base", MISSING, str(e))
    holders = node_holders(msg) if os.path.exists(msg) else []
    if holders:
        good = _check(checks, "busy", FAIL, f"{msg} is open in {', '.join(holders)}: another device "
                      f"side serves this bus (two responders race for the same messages)")
    elif os.path.exists(msg):
        _check(checks, "busy", OK, f"no other process has {msg} open")
    if not good:
        _check(checks, "region", MISSING, "not attempted: fix the checks above first")
        return checks
    if not try_open:
        return checks
    try:
        with open_carrier(uri) as c:
            assert isinstance(c, VmsgLbCarrier)
            _check(checks, "region", OK, f"{c.size:#x} bytes mapped at base {c.base:#x}: the kernel "
                   f"offers memory for ACCESS_PLATFORM rings and buffers")
            if base is not None and base.size is not None and base.size != c.size:
                _check(checks, "region size", FAIL, f"{base.source} says {base.size:#x} bytes but the "
                       f"control node reports {c.size:#x}: the base may belong to another range")
    except Exception as e:  # a diagnostic reports, never crashes
        _check(checks, "region", FAIL, f"{type(e).__name__}: {e}")
    return checks
