import numpy as np
import numpy.typing as npt

from vmsgamp.errors import RemoteProtocolError

READ_LIMIT: int
"""Default cap of DescriptorChain.read(): 64 MiB."""

class ChainTooLongError(RemoteProtocolError, ValueError):
    """read() refused a readable part longer than the mapped memory (its
    buffers overlap) or than the caller's limit; nothing was allocated."""

class DescriptorChain:
    head: int
    """The id add_used() takes back: split ring, the index of the chain's
    first descriptor; packed ring, its buffer id (name kept for compatibility)."""
    readable_count: int
    def __len__(self) -> int: ...
    @property
    def readable(self) -> list[memoryview]: ...
    @property
    def writable(self) -> list[memoryview]: ...
    @property
    def segments(self) -> list[tuple[int, int, bool]]: ...
    @property
    def readable_len(self) -> int: ...
    @property
    def writable_len(self) -> int: ...
    def read(self, max_bytes: int = ...) -> bytes:
        """All device-readable bytes; ChainTooLongError above the mapped
        memory or ``max_bytes`` (default READ_LIMIT)."""
    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int: ...

class ChainBatch:
    heads: npt.NDArray[np.uint16]
    """Per chain, the id add_used() takes back (split: descriptor index,
    packed: buffer id)."""
    seg_start: npt.NDArray[np.uint32]
    addr: npt.NDArray[np.uint64]
    length: npt.NDArray[np.uint32]
    writable: npt.NDArray[np.uint8]
    offset: npt.NDArray[np.uint64]
    window: npt.NDArray[np.uint16]
    tokens: npt.NDArray[np.uint64]
    used_len: npt.NDArray[np.uint32]
    count: int
    nseg: int
    max_chains: int
    max_segments: int
    def __init__(self, max_chains: int = 256, max_segments: int | None = None) -> None: ...
