from typing import Any, Dict, List, Tuple

ENGINES: Tuple[str, ...]

class Engine:
    engine: str
    @property
    def workers(self) -> int: ...
    def __init__(
        self,
        listen_fd: int,
        upstreams: List[Tuple[str, List[Tuple[int, tuple]]]],
        *,
        workers: int,
        engine: str,
        connect_timeout: float,
        half_close_timeout: float,
        pipe_size: int = ...,
        buf_size: int = ...,
        pool_max: int = ...,
    ) -> None: ...
    def run_worker(self, i: int) -> None: ...
    def stop(self, drain: float) -> None: ...
    def accepting(self) -> int: ...
    def stats(self) -> Dict[str, Any]: ...
    def close(self) -> None: ...
