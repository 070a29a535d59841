"""``vmsgamp vhost-user``: serve a device model to QEMU as a vhost-user back-end."""
from __future__ import annotations

import argparse
import logging
import os
import signal

from vmsgamp._cmd._common import emit
from vmsgamp.cli import CliError
from vmsgamp.devices._base import VirtioDevice, parse_device_list

log = logging.getLogger("vmsgamp.vhost_user")

DEVICES = ("rng", "blk")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vhost-user", help="serve a device model to QEMU over vhost-user (vhost-user-rng/blk-pci)",
        description="Run a vhost-user back-end on a UNIX socket until Ctrl-C or SIGTERM.  "
                    "QEMU side: -chardev socket,id=vu,path=PATH[,reconnect=1] "
                    "-device vhost-user-blk-pci,chardev=vu (guest RAM shared: "
                    "-object memory-backend-memfd,id=mem,size=...,share=on -machine memory-backend=mem).")
    p.add_argument("--socket", required=True, metavar="PATH", help="UNIX socket to listen on (replaced if stale)")
    p.add_argument("--device", required=True, metavar="rng[:SOURCE]|blk:FILE",
                   help="rng (optional entropy file, default os.urandom) or blk with its disk image; "
                        "the registry form TYPE:key=value;... also works (e.g. blk:file=disk.img;readonly)")
    p.add_argument("--queues", type=int, default=None, metavar="N", help="request queues (blk only; default 1)")
    p.add_argument("--readonly", action="store_true", help="blk: expose the disk read-only")
    p.add_argument("--no-packed", action="store_true", help="do not offer VIRTIO_F_RING_PACKED")
    p.add_argument("--json", action="store_true", help="print one JSON object when listening")
    p.set_defaults(func=run)


def build_device(spec: str, queues: int | None, readonly: bool) -> VirtioDevice:
    kind, _, rest = spec.partition(":")
    if kind not in DEVICES:
        raise CliError(f"--device {spec!r}: unknown device {kind!r}; choose one of {', '.join(DEVICES)}")
    if queues is not None and kind != "blk":
        raise CliError("--queues applies to blk only (vhost-user-rng has one queue)")
    if queues is not None and not 1 <= queues <= 64:
        raise CliError(f"--queues {queues}: outside 1..64")
    if "=" in rest:
        opts = rest
    elif kind == "blk":
        if not rest:
            raise CliError("--device blk needs a disk image: --device blk:FILE")
        opts = f"file={rest}"
    else:
        opts = f"source={rest}" if rest else ""
    if kind == "blk":
        if queues is not None:
            opts += f";queues={queues}"
        if readonly:
            opts += ";readonly"
    elif readonly:
        raise CliError("--readonly applies to blk only")
    try:
        (device,) = parse_device_list(f"{kind}:{opts}" if opts else kind)
    except FileNotFoundError as e:
        raise CliError(f"--device {spec!r}: {e.filename}: no such file") from None
    except (ValueError, OSError) as e:
        raise CliError(f"--device {spec!r}: {e}") from None
    return device


def run(args: argparse.Namespace) -> int:
    from vmsgamp.vhost_user import VhostUserBackend

    device = build_device(args.device, args.queues, args.readonly)
    path = os.path.abspath(args.socket)
    if os.path.exists(path) and not os.path.isdir(path) and not _is_socket(path):
        device.close()
        raise CliError(f"--socket {path}: exists and is not a socket (refusing to replace it)")
    # Before anything prints "listening": a SIGTERM right after must still clean up.
    stop_requested: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    try:
        backend = VhostUserBackend(device, path, offer_packed=not args.no_packed)
    except OSError as e:
        device.close()
        raise CliError(f"--socket {path}: cannot listen: {e.strerror or e}") from None
    try:
        info = {"socket": path, "pid": os.getpid(), "device": device.describe(),
                "num_queues": device.num_queues, "features": backend.offered_features,
                "protocol_features": backend.offered_protocol_features}
        qemu = {"rng": "vhost-user-rng-pci", "blk": "vhost-user-blk-pci"}[device.name]
        emit(args, info, f"vmsgamp vhost-user: {device.name} on {path} (pid {os.getpid()}), waiting for QEMU\n"
                         f"  QEMU: -chardev socket,id=vu,path={path} -device {qemu},chardev=vu"
                         + (f",num-queues={device.num_queues}" if device.name == "blk" else ""))
        signal.signal(signal.SIGTERM, lambda *_: backend.stop())
        if stop_requested:
            backend.stop()
        try:
            backend.serve_forever()
        except KeyboardInterrupt:
            pass
        log.info("stopped: %s", backend.stats)
        return 0
    finally:
        backend.close()
        device.close()


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.lstat(path).st_mode)
