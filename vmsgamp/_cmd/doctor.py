"""``vmsgamp doctor [URI]``: what this machine offers for the hardware
carriers (UIO devices, PCI devices bound to uio_pci_generic / vfio-pci,
permissions, kernel and modules) and, for a URI, each step needed to open it
with ok / missing / fail and why.

Reads sysfs and /dev only (``VMSGAMP_SYSFS_ROOT`` / ``VMSGAMP_DEV_ROOT`` move
them); with a URI whose checks all pass it finally opens and closes the
carrier (``--no-open`` skips that).  Exit status 1 when a URI was given and
cannot be opened.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import stat
from typing import Any

from vmsgamp._cmd._args import add_command
from vmsgamp._cmd._output import add_json_arg, emit
from vmsgamp.cli import CliError

from vmsgamp.carriers import open_carrier, parse_uri, schemes
from vmsgamp.carriers._hw import (
    DeviceLookupError, dev_root, link_name, mode_string, normalize_bdf, parse_register_spec,
    sysfs_root,
)
from vmsgamp.carriers.pci import USER_SPACE_DRIVERS, PciDevice, default_bar, list_pci_devices
from vmsgamp.carriers.uio import find_uio_device, list_uio_devices

MODULES = ("uio", "uio_pdrv_genirq", "uio_dmem_genirq", "uio_pci_generic", "vfio", "vfio_pci",
           "vfio_pci_core", "vfio_iommu_type1")
USER_DRIVERS = ("uio_pci_generic", "vfio-pci")

OK, MISSING, FAIL, INFO = "ok", "missing", "fail", "info"
# Schemes doctor may open without side effects beyond a mapping.
LOCAL_SCHEMES = ("uio", "pci", "vfio", "shm", "file", "fd", "memfd")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "doctor",
                    help="check UIO/PCI/VFIO devices, permissions and what a URI needs",
                    description="Report what this machine offers for the hardware carriers (UIO "
                                "devices, PCI devices bound to uio_pci_generic or vfio-pci, "
                                "permissions, kernel modules, IOMMU) and, for a URI, each step "
                                "the commands need to open it: ok, missing or fail, and why.  "
                                "Exit 1 when the URI cannot be used as it is.  Nothing is created "
                                "and no ivshmem server is joined.")
    p.add_argument("uri", nargs="?", help="a region URI to check (uio:, pci:, vfio:, ivshmem:, "
                                          "shm:, file:, a path)")
    p.add_argument("--no-open", action="store_true",
                   help="do not try to open the URI after the checks")
    add_json_arg(p, "the report")
    p.set_defaults(func=run)


# ---- machine facts -----------------------------------------------------------------------

def _modules(sroot: str) -> dict[str, bool]:
    # /sys/module/NAME exists for loaded modules (and built-ins with parameters).
    return {m: os.path.isdir(os.path.join(sroot, "module", m)) for m in MODULES}


def _iommu(sroot: str) -> dict[str, Any]:
    groups = os.path.join(sroot, "kernel", "iommu_groups")
    try:
        n = len(os.listdir(groups))
    except OSError:
        n = 0
    try:
        units = sorted(os.listdir(os.path.join(sroot, "class", "iommu")))
    except OSError:
        units = []
    return {"groups": n, "units": units, "enabled": n > 0}


def _permissions(droot: str) -> list[dict[str, Any]]:
    paths = sorted(glob.glob(os.path.join(droot, "uio*")), key=_natural)
    paths += sorted(glob.glob(os.path.join(droot, "vfio", "*")), key=_natural)
    out = []
    for p in paths:
        info = mode_string(p)
        try:
            info["chardev"] = stat.S_ISCHR(os.stat(p).st_mode)
        except OSError:
            info["chardev"] = False
        out.append(info)
    return out


def _natural(path: str) -> tuple[str, int]:
    base = os.path.basename(path)
    digits = "".join(ch for ch in base if ch.isdigit())
    return (base.rstrip("0123456789"), int(digits) if digits else -1)


def collect(uri: str | None = None, *, try_open: bool = True, sysfs: str | None = None,
            dev: str | None = None) -> dict[str, Any]:
    """Everything ``doctor`` reports, as a dict (``checks`` only with a URI)."""
    sroot, droot = sysfs_root(sysfs), dev_root(dev)
    uname = os.uname()
    pci = [d for d in list_pci_devices(sysfs_root=sroot)
           if d.driver in USER_DRIVERS or d.kind is not None]
    report: dict[str, Any] = {
        "kernel": {"release": uname.release, "machine": uname.machine},
        "sysfs_root": sroot, "dev_root": droot,
        "modules": _modules(sroot),
        "iommu": _iommu(sroot),
        "uio": [d.as_dict() for d in list_uio_devices(sysfs_root=sroot, dev_root=droot)],
        "pci": [d.as_dict() for d in pci],
        "permissions": _permissions(droot),
    }
    if uri is not None:
        checks = check_uri(uri, sroot, droot, try_open=try_open)
        report["uri"] = uri
        report["checks"] = checks
        report["ok"] = all(c["status"] in (OK, INFO) for c in checks)
    return report


# ---- per-URI checks ----------------------------------------------------------------------

def _check(checks: list[dict[str, Any]], name: str, status: str, why: str) -> bool:
    checks.append({"check": name, "status": status, "why": why})
    return status in (OK, INFO)


def _node_access(checks: list[dict[str, Any]], name: str, path: str, *, chardev: bool) -> bool:
    info = mode_string(path)
    if not info["exists"]:
        return _check(checks, name, MISSING, f"{path} does not exist")
    if not (info["readable"] and info["writable"]):
        return _check(checks, name, FAIL, f"{path} is mode {info['mode']} uid {info['uid']} gid "
                      f"{info['gid']}: no read/write access for us (run as root or fix it "
                      f"with a udev rule)")
    kind = ""
    if chardev:
        try:
            kind = "" if stat.S_ISCHR(os.stat(path).st_mode) else " (not a character device)"
        except OSError:
            pass
    return _check(checks, name, OK, f"{path} mode {info['mode']}, read/write ok{kind}")


def check_uri(uri: str, sroot: str, droot: str, *, try_open: bool = True) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    try:
        scheme, target, opts = parse_uri(uri)
    except ValueError as e:
        _check(checks, "uri", FAIL, str(e))
        return checks
    if scheme == "file" and re.match(r"^/dev/uio\d+$", target):
        scheme = "uio"
    if scheme not in schemes():
        _check(checks, "scheme", FAIL, f"unknown scheme {scheme!r}; known: "
               f"{', '.join(schemes())}")
        return checks
    _check(checks, "scheme", OK, f"{scheme}: is registered")
    if scheme == "vmsg-lb":
        from vmsgamp._cmd._doctor_vmsg_lb import check_vmsg_lb

        return check_vmsg_lb(checks, uri, target, opts, sroot, droot, try_open=try_open)
    good = True
    if scheme == "ivshmem":
        return _check_ivshmem(checks, target)
    if scheme in ("shm", "file") and _truthy(opts.get("create")):
        return _check_create(checks, scheme, target, opts)
    if scheme == "uio":
        good = _check_uio(checks, target, opts, sroot, droot)
    elif scheme in ("pci", "vfio"):
        good = _check_pci(checks, scheme, target, opts, sroot, droot)
    else:
        _check(checks, "hardware", INFO, f"{scheme}: is not a hardware carrier; nothing "
               f"to check in sysfs")
        if scheme not in LOCAL_SCHEMES:
            # ivshmem: and the like connect to a server and wait for a peer.
            _check(checks, "open", INFO, f"{scheme}: not opened by doctor (it would connect "
                   f"and wait for a peer)")
            return checks
    if good and try_open:
        try:
            with open_carrier(uri) as c:
                bell = type(c.doorbell).__name__
                wait = "interrupt" if getattr(c.doorbell, "can_wait", False) else "polling"
                _check(checks, "open", OK, f"opened: {c.region.size:#x} bytes, doorbell "
                       f"{bell} ({wait})")
                _check_size(checks, c.region.size, c.offset)
        except Exception as e:  # report, never crash: this is a diagnostic
            _check(checks, "open", FAIL, f"{type(e).__name__}: {e}")
    elif not good:
        _check(checks, "open", MISSING, "not attempted: fix the checks above first")
    return checks


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("0", "no", "false", "off")


# The smallest window the AMP layouts work in (layout B's default; layout A's
# two 4 KiB queues): what `serve`, `devices`... need from the layout offset.
MIN_WINDOW = 8192


def _check_size(checks: list[dict[str, Any]], size: int, offset: int) -> bool:
    need = offset + MIN_WINDOW
    if size < need:
        return _check(checks, "size", FAIL, f"region too small: {size} bytes, the AMP layouts "
                      f"need {need}" + (f" (offset {offset:#x} + 8 KiB)" if offset else " (8 KiB)"))
    return _check(checks, "size", OK, f"{size} bytes, enough for the AMP layouts")


def _listening_unix_sockets() -> set[str] | None:
    """Paths of listening UNIX sockets (/proc/net/unix), None if unreadable."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    out = set()
    for line in lines:
        parts = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flags 00010000 = accepting
        if len(parts) >= 8 and int(parts[3], 16) & 0x10000:
            out.add(parts[7])
    return out


def _check_ivshmem(checks: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """What joining would fail on, without joining (a peer that connects is
    announced to every other peer, so doctor does not connect)."""
    path = os.path.abspath(target)
    start = f"start one with: vmsgamp ivshmem-server {target}"
    if not os.path.lexists(path):
        _check(checks, "socket", MISSING, f"no ivshmem server socket at {path} ({start})")
    elif os.path.isdir(path):
        _check(checks, "socket", FAIL, f"{path} is a directory, not a socket (give the socket's "
               f"path, e.g. {path.rstrip('/')}/ivshmem.sock)")
    elif not stat.S_ISSOCK(os.stat(path).st_mode):
        _check(checks, "socket", FAIL, f"{path} is not a socket")
    elif not os.access(path, os.R_OK | os.W_OK):
        _check(checks, "socket", FAIL, f"{path}: no read/write access for us (connect needs write)")
    else:
        listening = _listening_unix_sockets()
        if listening is None:
            _check(checks, "socket", OK, f"{path} is a socket (cannot read /proc/net/unix to "
                   f"see whether a server listens)")
        elif path in listening or target in listening:
            _check(checks, "socket", OK, f"{path}: a server is listening")
        else:
            _check(checks, "socket", FAIL, f"nothing is listening on {path} (a stale socket: "
                   f"the server has stopped; {start})")
    _check(checks, "open", INFO, "ivshmem: not joined by doctor (a new peer is announced to "
           "every other peer)")
    return checks


def _check_create(checks: list[dict[str, Any]], scheme: str, target: str,
                  opts: dict[str, str]) -> list[dict[str, Any]]:
    """create=1 fails when the object is already there; never create it here."""
    from vmsgamp.carriers._registry import parse_size, shm_path

    try:
        path = shm_path(target) if scheme == "shm" else target.removeprefix("//")
    except ValueError as e:
        _check(checks, "name", FAIL, str(e))
        return checks
    what = f"shm:{target}" if scheme == "shm" else path
    if os.path.lexists(path):
        _check(checks, "create", FAIL, f"{what} already exists, so create=1 would fail: remove it "
               f"(rm {path}), or open it without create=1; add unlink=1 to remove it when the "
               f"creating process ends")
    elif not os.access(os.path.dirname(path) or ".", os.W_OK):
        _check(checks, "create", FAIL, f"cannot create {path}: no write access to its directory")
    else:
        _check(checks, "create", OK, f"{what} does not exist yet: create=1 will create it")
    try:
        size = parse_size(opts["size"]) if opts.get("size") else 0
    except ValueError as e:
        _check(checks, "size", FAIL, str(e))
        return checks
    if not size:
        _check(checks, "size", FAIL, "create=1 needs size= (e.g. size=1M)")
    else:
        offset = int(opts.get("offset", "0"), 0) if opts.get("offset", "0").strip() else 0
        _check_size(checks, size, offset)
    if not _truthy(opts.get("unlink")):
        _check(checks, "unlink", INFO, "without unlink=1 the object stays after the creating "
               "process ends, and a second create=1 fails")
    _check(checks, "open", INFO, "not created by doctor")
    return checks


def _check_uio(checks: list[dict[str, Any]], target: str, opts: dict[str, str], sroot: str,
               droot: str) -> bool:
    mods = _modules(sroot)
    if not os.path.isdir(os.path.join(sroot, "class", "uio")):
        return _check(checks, "uio module", MISSING, f"no {sroot}/class/uio: modprobe uio "
                      f"(and the driver: uio_pdrv_genirq with of_id=..., or uio_pci_generic)")
    _check(checks, "uio module", OK, "loaded" if mods["uio"] else f"{sroot}/class/uio exists")
    try:
        dev = find_uio_device(target, sysfs_root=sroot, dev_root=droot)
    except DeviceLookupError as e:
        return _check(checks, "device", MISSING, str(e))
    _check(checks, "device", OK, f"{dev.describe()}")
    good = True
    try:
        m = dev.find_map(opts.get("map", 0))
        _check(checks, "map", OK, f"map{m.index} ({m.name or 'unnamed'}) addr {m.addr:#x} size "
               f"{m.size:#x} offset {m.offset:#x}")
    except DeviceLookupError as e:
        good = _check(checks, "map", MISSING, str(e))
    good = _node_access(checks, "device node", dev.dev_path, chardev=True) and good
    irq_mode = opts.get("irq", "auto")
    if dev.driver in ("uio_pdrv_genirq", "uio_dmem_genirq"):
        _check(checks, "interrupt", INFO, f"{dev.driver}: re-enabled by writing 1 after each "
               f"interrupt (irq={irq_mode})")
    elif dev.driver == "uio_pci_generic":
        cfg = dev.config_path
        if cfg is None:
            good = _check(checks, "interrupt", FAIL, "uio_pci_generic without device/config")
        else:
            ok = os.access(cfg, os.W_OK)
            good = _check(checks, "interrupt", OK if ok else FAIL,
                          f"uio_pci_generic: Interrupt Disable is cleared through {cfg}"
                          + ("" if ok else " (not writable for us)")) and good
    for what in ("ring", "ack"):
        if what in opts:
            try:
                parse_register_spec(opts[what], what)
                _check(checks, what, OK, f"{what}={opts[what]}")
            except ValueError as e:
                good = _check(checks, what, FAIL, str(e))
    return good


def _check_pci(checks: list[dict[str, Any]], scheme: str, target: str, opts: dict[str, str],
               sroot: str, droot: str) -> bool:
    try:
        bdf = normalize_bdf(target)
    except ValueError as e:
        return _check(checks, "address", FAIL, str(e))
    try:
        dev = PciDevice.load(bdf, sysfs_root=sroot)
    except DeviceLookupError as e:
        return _check(checks, "device", MISSING, str(e))
    _check(checks, "device", OK, f"{dev.describe()}" + (f", {dev.kind}" if dev.kind else ""))
    good = True
    if scheme == "pci":
        if dev.driver not in USER_SPACE_DRIVERS and opts.get("force") in (None, "0"):
            good = _check(checks, "driver", FAIL, f"bound to the kernel driver {dev.driver}: "
                          f"unbind it or bind uio_pci_generic (or pass force=1)")
        else:
            _check(checks, "driver", OK, f"{dev.driver or 'no driver'}")
    elif dev.driver != "vfio-pci":
        good = _check(checks, "driver", MISSING,
                      f"bound to {dev.driver or 'no driver'}, not vfio-pci: modprobe vfio-pci; "
                      f"echo vfio-pci > {dev.path}/driver_override; "
                      + (f"echo {dev.bdf} > /sys/bus/pci/drivers/{dev.driver}/unbind; "
                         if dev.driver else "")
                      + f"echo {dev.bdf} > /sys/bus/pci/drivers_probe")
    else:
        _check(checks, "driver", OK, "vfio-pci")
    bar = opts.get("bar")
    bar_no = int(bar, 0) if bar is not None and bar.strip().isdigit() else default_bar(dev.kind)
    if bar_no is None:
        good = _check(checks, "bar", MISSING, f"{dev.ids} is not a known device: give #bar=N")
    else:
        b = dev.bar(bar_no)
        if b is None or not b.size:
            good = _check(checks, "bar", MISSING, f"BAR{bar_no} is not implemented")
        else:
            _check(checks, "bar", OK, f"BAR{bar_no}: {b.size:#x} bytes, {b.kind}")
    mem = dev.memory_decoding()
    if mem is False:
        good = _check(checks, "memory decoding", FAIL,
                      f"off; enable the device: echo 1 > {dev.path}/enable")
    if scheme == "pci":
        if bar_no is not None:
            good = _node_access(checks, "resource file", dev.resource_path(bar_no),
                                chardev=False) and good
        if dev.kind == "ivshmem":
            if dev.driver == "uio_pci_generic" and dev.uio and not dev.has_msix():
                _check(checks, "interrupt", OK, f"INTx through /dev/{dev.uio[0]}")
            else:
                _check(checks, "interrupt", INFO, "polling (ivshmem-doorbell signals MSI-X "
                       "only; use vfio: for interrupts)")
        return good
    # vfio:
    mods = _modules(sroot)
    missing_mods = [m for m in ("vfio", "vfio_pci", "vfio_iommu_type1") if not mods[m]]
    if missing_mods:
        _check(checks, "modules", INFO, f"not seen in {sroot}/module: {', '.join(missing_mods)} "
               f"(fine if built in)")
    if dev.iommu_group is None:
        return _check(checks, "iommu group", MISSING, "no IOMMU group: the IOMMU is off (boot "
                      "with intel_iommu=on / amd_iommu=on; QEMU: -device intel-iommu,intremap=on)")
    members = os.path.join(sroot, "kernel", "iommu_groups", str(dev.iommu_group), "devices")
    try:
        names = sorted(os.listdir(members))
    except OSError:
        names = [dev.bdf]
    others = [(n, link_name(os.path.join(members, n, "driver"))) for n in names if n != dev.bdf]
    blocking = [f"{n} ({d})" for n, d in others if d not in (None, "vfio-pci", "pci-stub")]
    if blocking:
        good = _check(checks, "iommu group", FAIL, f"group {dev.iommu_group} is not viable: "
                      f"{', '.join(blocking)} must be bound to vfio-pci or unbound")
    else:
        _check(checks, "iommu group", OK, f"group {dev.iommu_group}"
               + (f" shared with {', '.join(n for n, _ in others)}" if others else " (alone)"))
    good = _node_access(checks, "container", os.path.join(droot, "vfio", "vfio"),
                        chardev=True) and good
    good = _node_access(checks, "group node", os.path.join(droot, "vfio", str(dev.iommu_group)),
                        chardev=True) and good
    return good


# ---- output ------------------------------------------------------------------------------

def _human(r: dict[str, Any]) -> str:
    lines = [f"kernel {r['kernel']['release']} ({r['kernel']['machine']})"]
    lines.append("modules: " + ", ".join(f"{m} {'yes' if v else 'no'}"
                                         for m, v in r["modules"].items()))
    io = r["iommu"]
    lines.append(f"IOMMU: {'on' if io['enabled'] else 'off'} ({io['groups']} groups"
                 + (f"; {', '.join(io['units'])}" if io["units"] else "") + ")")
    lines.append("UIO devices:" + ("" if r["uio"] else " none"))
    for d in r["uio"]:
        lines.append(f"  {d['dev']:<7} {d['name'] or '?':<20} driver {d['driver'] or '?'}"
                     + (f"  parent {d['parent']}" if d["parent"] else ""))
        for m in d["maps"]:
            lines.append(f"    map{m['index']} {m['name'] or '-':<12} addr {m['addr']} size "
                         f"{m['size']:#x} offset {m['offset']:#x}")
    lines.append("PCI devices for user space:" + ("" if r["pci"] else " none"))
    for d in r["pci"]:
        lines.append(f"  {d['bdf']} {d['ids']} {d['kind'] or '':<8} driver {d['driver'] or 'none'}"
                     f"  IOMMU group {d['iommu_group'] if d['iommu_group'] is not None else '-'}"
                     + (f"  {', '.join(d['uio'])}" if d["uio"] else ""))
    lines.append("device nodes:" + ("" if r["permissions"] else " none"))
    for p in r["permissions"]:
        access = ("rw" if p["readable"] and p["writable"]
                  else "r" if p["readable"] else "no access")
        lines.append(f"  {p['path']:<20} mode {p['mode']} uid {p['uid']} gid {p['gid']} ({access})")
    if "checks" in r:
        lines.append(f"checks for {r['uri']}:")
        for c in r["checks"]:
            lines.append(f"  {c['status']:<8} {c['check']:<14} {c['why']}")
        lines.append("result: " + ("ok" if r["ok"] else "cannot be opened as it is"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect(args.uri, try_open=not args.no_open)
    error = None
    if args.uri is not None and not report["ok"]:
        bad = next(c for c in report["checks"] if c["status"] not in (OK, INFO))
        error = f"{args.uri}: {bad['check']}: {bad['why']}"
        report["error"] = error
    emit(args, report, _human(report))
    if error:
        raise CliError(error)
    return 0
