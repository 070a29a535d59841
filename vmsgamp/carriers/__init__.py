"""Where the shared memory and the doorbell come from, behind one URI grammar.

``open_carrier(uri)`` returns a :class:`Carrier` (``region``, ``doorbell``,
``offset``, ``own_id``/``peer_id``); ``open_region(uri)`` keeps only the
region.  Built-in schemes: ``shm:NAME``, ``file:PATH`` (or a bare path),
``fd:N`` / ``memfd:N`` and ``ivshmem:SOCKET``.  Later carriers add theirs
with :func:`register_scheme`.
"""
from vmsgamp.carriers._registry import (
    COMMON_OPTIONS,
    Carrier,
    open_carrier,
    open_region,
    parse_size,
    parse_uri,
    register_scheme,
    schemes,
    shm_path,
)
from vmsgamp.carriers import ivshmem as _ivshmem  # noqa: F401  (registers ivshmem:)
from vmsgamp.carriers import uio as _uio  # noqa: F401  (registers uio: and /dev/uioN)
from vmsgamp.carriers import pci as _pci  # noqa: F401  (registers pci:)
from vmsgamp.carriers import vfio as _vfio  # noqa: F401  (registers vfio:)
from vmsgamp.carriers import vmsg_lb as _vmsg_lb  # noqa: F401  (registers vmsg-lb:)
from vmsgamp.carriers import copro as _copro  # noqa: F401  (registers copro:)
from vmsgamp.carriers.ivshmem import (
    IvshmemCarrier,
    IvshmemClient,
    IvshmemProtocolError,
    IvshmemServer,
)

__all__ = [
    "COMMON_OPTIONS", "Carrier", "IvshmemCarrier", "IvshmemClient", "IvshmemProtocolError",
    "IvshmemServer", "open_carrier", "open_region", "parse_size", "parse_uri",
    "register_scheme", "schemes", "shm_path",
]
