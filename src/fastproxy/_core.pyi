import enum
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from typing_extensions import disjoint_base

ENGINES: Tuple[str, ...]
PORTABLE: bool
HAVE_NOTSENT_LOWAT: bool
UNIX_PATH_MAX: int
BALANCE_ALGORITHMS: Tuple[str, ...]

# cpdef enums of _core.pxd: the one definition of these numbers.
class CloseReason(enum.IntEnum):
    CLIENT_CLOSED = 1
    UPSTREAM_CLOSED = 2
    CLIENT_RESET = 3
    UPSTREAM_RESET = 4
    CONNECT_FAILED = 5
    REFUSED = 6
    TIMEOUT = 7
    HOOK_CLOSED = 8
    HOOK_ERROR = 9
    SHUTDOWN = 10
    HOOK_TIMEOUT = 11

class HookBit(enum.IntEnum):
    HOOK_CONNECT = 1
    HOOK_DATA_UP = 2
    HOOK_DATA_DOWN = 4
    HOOK_RECORDS = 8

class Verdict(enum.IntEnum):
    V_PROCEED = 0
    V_REFUSE = 1
    V_ERROR = 2
    V_ROUTE = 3
    V_PASS = 4
    V_REPLACE = 5
    V_WAIT = 6
    V_CLOSE = 7

class EventKind(enum.IntEnum):
    EVT_CONNECT = 0
    EVT_DATA = 1

_Sockaddrs = List[Tuple[int, tuple]]

@disjoint_base
class UpstreamGroup:
    algorithm: str
    names: Tuple[str, ...]
    upstreams: Tuple[Any, ...]
    index: Dict[str, int]
    changes: int
    refs: int
    live_bridges: int
    def __init__(self, upstreams: Sequence[Any], addresses: Optional[Sequence[_Sockaddrs]] = ..., *,
                 balance: str = ..., max_fails: int = ..., fail_timeout: float = ...,
                 seed: Optional[int] = ...) -> None: ...
    def __len__(self) -> int: ...
    def acquire(self, client_ip: str = ..., tried: Sequence[int] = ..., now_ns: Optional[int] = ...) -> int: ...
    def release(self, i: int) -> None: ...
    def connect_result(self, i: int, ok: bool, now_ns: Optional[int] = ...) -> bool: ...
    def set_health(self, i: int, up: bool) -> bool: ...
    def state(self, i: int, now_ns: Optional[int] = ...) -> Dict[str, Any]: ...
    def stats(self) -> Dict[str, Dict[str, Any]]: ...

def live_group_blocks() -> int: ...

@disjoint_base
class AccessList:
    allow: Tuple[Any, ...]
    deny: Tuple[Any, ...]
    @property
    def ranges(self) -> Tuple[int, int]: ...
    def __init__(self, allow: Sequence[Any] = ..., deny: Sequence[Any] = ...) -> None: ...
    def __len__(self) -> int: ...
    def admits(self, ip: str) -> bool: ...

@disjoint_base
class RateLimiter:
    count: int
    period: float
    rate_limit_table: int
    def __init__(self, count: int, period_seconds: float, rate_limit_table: int = ...) -> None: ...
    def take(self, ip: str, now_ns: int) -> bool: ...
    def entries(self) -> int: ...

def parse_proxy_header(data: bytes, max_v2: int = ...) -> Optional[Tuple[int, bool, Tuple[str, int], Tuple[str, int]]]: ...
def build_proxy_header(version: int, src: Tuple[str, int], dst: Tuple[str, int]) -> bytes: ...

@disjoint_base
@disjoint_base
class ListenerHandle:
    id: int
    @property
    def group(self) -> UpstreamGroup: ...
    @property
    def bridges(self) -> int: ...
    def swap_group(self, group: UpstreamGroup) -> None: ...
    def free(self) -> None: ...
    def set_admit(self, open_: bool) -> None: ...
    def close_all(self, reason: int = ...) -> None: ...
    def stop_accepting(self) -> None: ...
    # Counters and gauges, "upstreams", "routed", and "histograms":
    # {"connect_seconds" | "duration_seconds": {"bounds": [ascending upper
    # bounds, the last inf], "counts": [per bucket, not cumulative],
    # "sum": float, "count": int}}.
    def stats(self) -> Dict[str, Any]: ...

@disjoint_base
class DataPlane:
    engine: str
    @property
    def workers(self) -> int: ...
    def __init__(
        self,
        process: Any,
        *,
        hook_slots: int = ...,
        pool_max: int = ...,
        pipe_size: int = ...,
        buf_size: int = ...,
        hook_read: int = ...,
    ) -> None: ...
    def add_listener(self, listen_fd: int, group: UpstreamGroup, config: Any, *, hooks: int = ...,
                     replaces: Optional[ListenerHandle] = ...) -> ListenerHandle: ...
    def listener(self, listener: int) -> ListenerHandle: ...
    def listeners(self) -> Dict[int, ListenerHandle]: ...
    def free_listener(self, h: ListenerHandle) -> None: ...
    def running(self) -> int: ...
    def run_worker(self, i: int) -> None: ...
    def stop(self, drain: float) -> None: ...
    def accepting(self) -> int: ...
    def stats(self) -> Dict[str, Any]: ...
    def now_ns(self) -> int: ...
    @property
    def hook_slots(self) -> int: ...
    # (EVT_CONNECT, listener, handle, id, client, accepted_ns) or
    # (EVT_DATA, listener, handle, id, direction, chunks, client, accepted_ns)
    def next_event(self, slot: int, timeout_ms: int = ...) -> Union[None, Literal[False], tuple]: ...
    def answer_connect(self, handle: int, verdict: int, upstream: int = ...,
                       route: Optional[_Sockaddrs] = ..., group: Optional[UpstreamGroup] = ...) -> None: ...
    def answer_data(self, handle: int, verdict: int, data: Optional[bytes] = ..., *, keep: int = ...,
                    tail: Optional[bytes] = ..., hold: int = ..., then: int = ...) -> None: ...
    # (listener, id, client, upstream, route, bytes_up, bytes_down, accepted_ns,
    # closed_ns, reason, queue_ns, connect_ns); connect_ns -1: never connected.
    def next_records(self, max_records: int = ..., timeout_ms: int = ...) -> Optional[List[tuple]]: ...
    def close_hooks(self) -> None: ...
    def close(self) -> None: ...
