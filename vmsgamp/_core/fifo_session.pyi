from typing import Any, Literal, TypeAlias

from vmsgamp._core.doorbell import Doorbell
from vmsgamp._core.region import Region

Role: TypeAlias = Literal["device", "driver"]
LayoutName: TypeAlias = Literal["b", "a"]
HeaderName: TypeAlias = Literal["g2", "g1"]
PlacementName: TypeAlias = Literal["0/4k", "4k/8k"]

LAYOUT_B: int
LAYOUT_A: int
ROLE_DEVICE: int
ROLE_DRIVER: int
HEADERS: dict[str, tuple[int, int]]
DEFAULT_SPIN_NS: int

class FifoSession:
    region: Region
    doorbell: Doorbell
    layout: int
    role: int
    offset: int
    window: int
    num_slots: int
    slot_size: int
    header_size: int
    broken_reason: str | None
    spin_ns: int
    status_flags: int
    sent: int
    received: int
    dropped: int
    rings: int
    sleeps: int
    def __init__(self, region: Region, *, role: Role = ..., layout: LayoutName = ..., offset: int = ...,
                 window: int | None = ..., doorbell: Doorbell | None = ..., header: HeaderName = ...,
                 placement: PlacementName = ..., slot_size: int = ...,
                 spin_us: float | None = ...) -> None: ...
    def start(self, timeout: float = ..., *, reset: bool = ..., fresh: bool = ...) -> FifoSession: ...
    def rearm(self) -> None: ...
    def shutdown(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> FifoSession: ...
    def __exit__(self, *exc: object) -> None: ...
    @property
    def state(self) -> Literal["new", "running", "stopped", "broken"]: ...
    @property
    def closed(self) -> bool: ...
    @property
    def max_msg_size(self) -> int: ...
    def peer_state(self) -> str | None: ...
    def my_state(self) -> str | None: ...
    def stats(self) -> dict[str, Any]: ...
