from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from typing_extensions import disjoint_base

ENGINES: Tuple[str, ...]
BALANCE_ALGORITHMS: Tuple[str, ...]
CLOSE_REASONS: Dict[str, int]
VERDICTS: Dict[str, int]
HOOK_BITS: Dict[str, int]
EVT_KINDS: Dict[str, int]

_Sockaddrs = List[Tuple[int, tuple]]

@disjoint_base
class Balancer:
    algorithm: str
    names: Tuple[str, ...]
    changes: int
    def __init__(self, upstreams: Sequence[Any], algorithm: str = ..., *, max_fails: int = ...,
                 fail_timeout: float = ..., seed: Optional[int] = ...) -> None: ...
    def __len__(self) -> int: ...
    def acquire(self, client_ip: str = ..., tried: Sequence[int] = ..., now_ns: Optional[int] = ...) -> int: ...
    def release(self, i: int) -> None: ...
    def connect_result(self, i: int, ok: bool, now_ns: Optional[int] = ...) -> bool: ...
    def set_health(self, i: int, up: bool) -> bool: ...
    def state(self, i: int, now_ns: Optional[int] = ...) -> Dict[str, Any]: ...

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
    table_size: int
    def __init__(self, count: int, period_seconds: float, table_size: int = ...) -> None: ...
    def take(self, ip: str, now_ns: int) -> bool: ...
    def entries(self) -> int: ...

def parse_proxy_header(data: bytes, max_v2: int = ...) -> Optional[Tuple[int, bool, Tuple[str, int], Tuple[str, int]]]: ...
def build_proxy_header(version: int, src: Tuple[str, int], dst: Tuple[str, int]) -> bytes: ...

@disjoint_base
class Engine:
    engine: str
    @property
    def workers(self) -> int: ...
    def __init__(
        self,
        listen_fd: int,
        balancer: Balancer,
        upstreams: List[Tuple[str, _Sockaddrs]],
        *,
        workers: int,
        engine: str,
        connect_timeout: float,
        half_close_timeout: float,
        idle_timeout: float = ...,
        max_lifetime: float = ...,
        retries: int = ...,
        max_connections: int = ...,
        max_per_ip: int = ...,
        queue_on_limit: bool = ...,
        queue_size: int = ...,
        queue_timeout: float = ...,
        hooks: int = ...,
        max_hold: int = ...,
        acl: Optional[AccessList] = ...,
        rate: Optional[RateLimiter] = ...,
        reject_reset: bool = ...,
        send_proxy: int = ...,
        accept_proxy: bool = ...,
        proxy_from: Optional[AccessList] = ...,
        proxy_v2_max: int = ...,
        header_timeout: float = ...,
        pipe_size: int = ...,
        buf_size: int = ...,
        hook_read: int = ...,
        pool_max: int = ...,
        hook_threads: int = ...,
        busy_poll: float = ...,
        notsent_lowat: int = ...,
    ) -> None: ...
    def run_worker(self, i: int) -> None: ...
    def stop(self, drain: float) -> None: ...
    def set_admit(self, open_: bool) -> None: ...
    def close_all(self) -> None: ...
    def accepting(self) -> int: ...
    def stats(self) -> Dict[str, Any]: ...
    def now_ns(self) -> int: ...
    def next_event(self, slot: int, timeout_ms: int = ...) -> Union[None, Literal[False], tuple]: ...
    def bridge_client(self, bridge: int) -> Tuple[Tuple[str, int], int]: ...
    def answer_connect(self, worker: int, bridge: int, verdict: int, upstream: int = ...,
                       route: Optional[_Sockaddrs] = ...) -> None: ...
    def answer_data(self, worker: int, bridge: int, direction: int, verdict: int,
                    data: Optional[bytes] = ..., *, keep: int = ..., tail: Optional[bytes] = ...,
                    hold: int = ..., then: int = ...) -> None: ...
    def next_records(self, max_records: int = ..., timeout_ms: int = ...) -> Optional[List[tuple]]: ...
    def close_hooks(self) -> None: ...
    def close(self) -> None: ...
