from dataclasses import dataclass
from typing import Any

from vmsgamp._core.addrspace import AddressSpace, RegionAllocator
from vmsgamp._core.virtq._chain import ChainBatch, DescriptorChain
from vmsgamp.errors import RemoteProtocolError

SPLIT: str
PACKED: str
DESC_F_NEXT: int
DESC_F_WRITE: int
DESC_F_INDIRECT: int
DESC_F_AVAIL: int
DESC_F_USED: int
AVAIL_F_NO_INTERRUPT: int
USED_F_NO_NOTIFY: int
EVENT_F_ENABLE: int
EVENT_F_DISABLE: int
EVENT_F_DESC: int
MAX_SIZE: int
LINE: int
"""Bytes of the cache line that areas written by different sides never share."""
F_INDIRECT_DESC: int
F_EVENT_IDX: int
F_RING_PACKED: int
LAYOUT: dict[str, int]

def need_event(event: int, new_idx: int, old_idx: int) -> bool: ...
def packed_need_notify(ev: int, event_idx: bool, new_off: int, wrap: bool, moved: int,
                       size: int) -> bool: ...
def split_area_sizes(size: int) -> tuple[int, int, int]: ...
def packed_area_sizes(size: int) -> tuple[int, int, int]: ...
def alloc_line(allocator: RegionAllocator, size: int, align: int) -> int: ...

class QueueBrokenError(RemoteProtocolError):
    reason: str
    def __init__(self, reason: str) -> None: ...

@dataclass(frozen=True)
class QueueState:
    format: str
    size: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    event_idx: bool = ...
    indirect: bool = ...
    next_avail: int = ...
    next_used: int = ...
    avail_wrap: bool = ...
    used_wrap: bool = ...
    signalled_used: int | None = ...
    inflight: tuple[tuple[int, int], ...] = ...

def check_state(state: Any, fmt: str) -> None: ...

class _Virtqueue:
    size: int
    event_idx: bool
    indirect: bool
    broken: bool
    broken_reason: str | None
    desc_addr: int
    driver_addr: int
    device_addr: int
    @property
    def aspace(self) -> AddressSpace: ...
    def mark_broken(self, reason: str) -> None: ...

class _DeviceQueue(_Virtqueue):
    def pop(self) -> DescriptorChain | None: ...
    def pop_batch(self, batch: ChainBatch) -> int: ...
