"""``vmsgamp vhost-user``: serve a device model to QEMU as a vhost-user back-end."""
from __future__ import annotations

import argparse
import logging
import os

from vmsgamp._cmd._args import add_command, add_wait_args, int_range, wait_policy
from vmsgamp._cmd._output import add_json_arg, emit
from vmsgamp.cli import CliError, stop_on_signals
from vmsgamp.devices._base import VirtioDevice, build_device as build_model, parse_device_spec
from vmsgamp.devices._features import feature_names

log = logging.getLogger("vmsgamp.vhost_user")

DEVICES = ("rng", "blk")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "vhost-user", help="serve a device model to QEMU over vhost-user (vhost-user-rng/blk-pci)",
        description="Run a vhost-user back-end on a UNIX socket until stopped: SIGTERM is the "
                    "normal stop (exit 0), Ctrl-C exits 130; the socket is removed either way.  "
                    "QEMU side: -chardev socket,id=vu,path=PATH[,reconnect=1] "
                    "-device vhost-user-blk-pci,chardev=vu (guest RAM shared: "
                    "-object memory-backend-memfd,id=mem,size=...,share=on -machine memory-backend=mem).  "
                    "After serving requests the back-end spins on the rings with the guest's kicks "
                    "suppressed, up to --spin-us (less for a guest slower than that), then re-enables "
                    "them and sleeps (--idle-backoff-ms has no effect here: kicks arrive on eventfds).")
    p.add_argument("--socket", required=True, metavar="PATH", help="UNIX socket to listen on (replaced if stale)")
    p.add_argument("--device", required=True, metavar="ITEM",
                   help="one device item as for serve --devices: rng[:SOURCE] (default source "
                        "os.urandom) or blk:FILE, or the key=value form (blk:file=disk.img;readonly)")
    p.add_argument("--queues", type=int_range(1, 64), default=None, metavar="N",
                   help="request queues (blk only; default 1)")
    p.add_argument("--readonly", action="store_true", help="blk: expose the disk read-only")
    p.add_argument("--no-packed", action="store_true", help="do not offer VIRTIO_F_RING_PACKED")
    add_wait_args(p)
    add_json_arg(p, "the listening information")
    p.set_defaults(func=run, sigterm_exit=0)


def build_device(spec: str, queues: int | None, readonly: bool) -> VirtioDevice:
    try:
        kind, opts = parse_device_spec(spec)
    except ValueError as e:
        raise CliError(f"--device {spec}: {e}") from None
    if kind not in DEVICES:
        raise CliError(f"--device {spec}: vhost-user serves {' and '.join(DEVICES)}, not {kind}")
    if kind != "blk" and (queues is not None or readonly):
        raise CliError(f"{'--queues' if queues is not None else '--readonly'} applies to blk only")
    if kind == "blk" and not opts.get("file"):
        raise CliError("--device blk needs a disk image: --device blk:FILE")
    if queues is not None:
        opts["queues"] = str(queues)
    if readonly:
        opts["readonly"] = "1"
    item = kind + (":" + ";".join(f"{k}={v}" for k, v in opts.items()) if opts else "")
    try:
        return build_model(item)
    except ValueError as e:
        raise CliError(f"--device {spec}: {e}") from None


def run(args: argparse.Namespace) -> int:
    from vmsgamp.vhost_user import VhostUserBackend

    device = build_device(args.device, args.queues, args.readonly)
    path = os.path.abspath(args.socket)
    if os.path.isdir(path):
        device.close()
        raise CliError(f"--socket {path}: is a directory; give the socket's path, e.g. {path}/vu.sock")
    if os.path.exists(path) and not _is_socket(path):
        device.close()
        raise CliError(f"--socket {path}: exists and is not a socket (refusing to replace it)")
    try:
        backend = VhostUserBackend(device, path, offer_packed=not args.no_packed, wait=wait_policy(args))
    except OSError as e:
        device.close()
        raise CliError(f"--socket {path}: cannot listen: {e.strerror or e}") from None
    try:
        info = {"socket": path, "pid": os.getpid(), "device": device.describe(),
                "num_queues": device.num_queues, "features": backend.offered_features,
                "feature_names": feature_names(backend.offered_features, device.device_id),
                "protocol_features": backend.offered_protocol_features,
                "wait": {"spin_us": backend.wait_policy.spin_us, "busy_poll": backend.wait_policy.busy_poll}}
        qemu = {"rng": "vhost-user-rng-pci", "blk": "vhost-user-blk-pci"}[device.name]
        emit(args, info, f"vmsgamp vhost-user: {device.name} on {path} (pid {os.getpid()}), waiting for QEMU\n"
                         f"  features: {' '.join(info['feature_names'])}\n"
                         f"  QEMU: -chardev socket,id=vu,path={path} -device {qemu},chardev=vu"
                         + (f",num-queues={device.num_queues}" if device.name == "blk" else ""))
        with stop_on_signals(backend.stop):    # the loop ends cleanly, then the signal counts
            backend.serve_forever()
        return 0
    finally:
        log.info("stopped: %s", backend.stats)
        backend.close()
        device.close()


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.lstat(path).st_mode)
