"""vhost-user back-end: serve vmsgamp device models to QEMU (``-device
vhost-user-*-pci``) through a UNIX socket.

    from vmsgamp.vhost_user import VhostUserBackend
    from vmsgamp.devices.blk import BlkDevice

    with VhostUserBackend(BlkDevice("disk.img"), "/tmp/vhost.sock") as be:
        be.serve_forever()

The command (``vmsgamp vhost-user``), the QEMU command lines, restarts and
what was tested: ``docs/vhost-user.md``.
"""
from vmsgamp.vhost_user._backend import GuestMemory, VhostUserBackend, VhostUserError, recover_packed_position
from vmsgamp.vhost_user._protocol import Decoder, ProtocolFeature, Request, VhostMessage, VhostProtocolError

__all__ = ["VhostUserBackend", "VhostUserError", "GuestMemory", "recover_packed_position", "Decoder",
           "ProtocolFeature", "Request", "VhostMessage", "VhostProtocolError"]
