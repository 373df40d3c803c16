"""What hooks see and return: Connection, Direction, CloseRecord,
CloseReason, WAIT and CLOSE; how a hook's return value becomes a verdict
for the data plane; and loading hooks named on the command line."""

from __future__ import annotations

import enum
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from . import _core
from .values import ConfigError, format_address

__all__ = [
    "Connection",
    "Direction",
    "CloseReason",
    "CloseRecord",
    "WAIT",
    "CLOSE",
    "Hooks",
    "load_hooks",
]


class Direction(enum.IntEnum):
    """Which way a chunk flows: UPSTREAM is client -> server."""

    UPSTREAM = 0
    DOWNSTREAM = 1


# Defined once, as a cpdef enum in _core.pxd; Cython makes it an IntEnum.
CloseReason = _core.CloseReason
CloseReason.__module__ = __name__
CloseReason.__doc__ = "Why a bridge ended (the values are the data plane's)."


class _Verdict:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"fastproxy.{self.name}"

    def __reduce__(self) -> str:
        return self.name


WAIT = _Verdict("WAIT")
"""on_data: hold this chunk; call again with it joined to the next one."""
CLOSE = _Verdict("CLOSE")
"""on_data: close the bridge."""


@dataclass(frozen=True)
class Connection:
    """One client's bridge, as hooks see it (read-only, safe to keep)."""

    id: int
    client_address: Tuple[str, int]
    listener_address: Tuple[str, int]
    accepted_at: float
    # A listener of route = "sni": the server name of the client's TLS
    # ClientHello (lower case, no trailing dot; None without one) and the
    # protocols its ALPN offers, in its order.
    server_name: Optional[str] = None
    alpn: Tuple[str, ...] = ()


@dataclass(frozen=True)
class CloseRecord:
    """How a bridge ended: given to on_close and written to the access log."""

    id: int
    client_address: Tuple[str, int]
    upstream: Optional[str]
    bytes_upstream: int
    bytes_downstream: int
    duration: float
    accepted_at: float
    reason: CloseReason
    # Seconds: in the wait queue (0.0 if it never waited), to connect to the
    # upstream that took it (only the address that answered; None if it
    # never connected), and from accept to close (as duration).
    queue_time: float = 0.0
    connect_time: Optional[float] = None
    total_time: float = 0.0
    # The ClientHello's server name (route = "sni" listeners), else None.
    server_name: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return {
            "id": self.id,
            "client_address": list(self.client_address),
            "upstream": self.upstream,
            "bytes_upstream": self.bytes_upstream,
            "bytes_downstream": self.bytes_downstream,
            "duration": round(self.duration, 6),
            "accepted_at": round(self.accepted_at, 6),
            "reason": self.reason.name,
            "queue_time": round(self.queue_time, 6),
            "connect_time": None if self.connect_time is None else round(self.connect_time, 6),
            "total_time": round(self.total_time, 6),
            "server_name": self.server_name,
        }


# What an access log line may hold, in the order a line without
# access_log_format writes them.
ACCESS_LOG_FIELDS = ("listener", "id", "client_address", "upstream", "bytes_upstream", "bytes_downstream",
                     "duration", "accepted_at", "reason", "queue_time", "connect_time", "total_time",
                     "server_name")


def parse_access_log_format(value: Any, field: str) -> str:
    """'id, upstream,total_time' -> 'id,upstream,total_time', each name checked."""
    if not isinstance(value, str):
        raise ConfigError(field, value, "expected a comma-separated list of field names")
    names = tuple(n.strip() for n in value.split(","))
    if not any(names):
        raise ConfigError(field, value, "names no field")
    for name in names:
        if name not in ACCESS_LOG_FIELDS:
            raise ConfigError(field, value, f"unknown field {name!r} (known: {', '.join(ACCESS_LOG_FIELDS)})")
    if len(set(names)) != len(names):
        raise ConfigError(field, value, "names a field twice")
    return ",".join(names)


def access_log_fields(value: Optional[str]) -> Optional[Tuple[str, ...]]:
    """A checked access_log_format -> its fields; None (every field) for None."""
    return None if value is None else tuple(value.split(","))


Hook = Callable[..., Any]


class Hooks:
    """The hooks registered on one Proxy."""

    def __init__(self) -> None:
        self.on_connect: Optional[Hook] = None
        self.on_data: Dict[Direction, Hook] = {}
        self.on_close: Optional[Hook] = None

    def set_connect(self, fn: Hook) -> None:
        self.on_connect = _callable(fn, "on_connect")

    def set_data(self, fn: Hook, direction: Optional[Direction] = None) -> None:
        fn = _callable(fn, "on_data")
        if inspect.iscoroutinefunction(fn):
            raise ConfigError("on_data", fn, "must be a plain function (it runs once per chunk)")
        if direction is None:
            self.on_data = {Direction.UPSTREAM: fn, Direction.DOWNSTREAM: fn}
        else:
            self.on_data[Direction(direction)] = fn

    def set_close(self, fn: Hook) -> None:
        self.on_close = _callable(fn, "on_close")

    def load(self, obj: object) -> None:
        """Register the hooks an object (a module, from load_hooks) defines."""
        for name, register in (("on_connect", self.set_connect), ("on_data", self.set_data),
                               ("on_close", self.set_close)):
            fn = getattr(obj, name, None)
            if callable(fn):
                register(fn)

    def is_async(self) -> bool:
        return any(inspect.iscoroutinefunction(f) for f in (self.on_connect, self.on_close) if f)

    def flags(self, access_log: bool) -> int:
        """The HOOK_* bits the data plane acts on."""
        bits = 0
        if self.on_connect is not None:
            bits |= HookBit.HOOK_CONNECT
        if Direction.UPSTREAM in self.on_data:
            bits |= HookBit.HOOK_DATA_UP
        if Direction.DOWNSTREAM in self.on_data:
            bits |= HookBit.HOOK_DATA_DOWN
        if self.on_close is not None or access_log:
            bits |= HookBit.HOOK_RECORDS
        return int(bits)


def _callable(fn: object, field: str) -> Hook:
    if not callable(fn):
        raise ConfigError(field, fn, "must be callable")
    return fn


# ---- verdicts, as the data plane numbers them (plain ints: they go back
# into the data plane on every answer)

HookBit = _core.HookBit
Verdict = _core.Verdict
V_PROCEED = int(Verdict.V_PROCEED)
V_REFUSE = int(Verdict.V_REFUSE)
V_ERROR = int(Verdict.V_ERROR)
V_ROUTE = int(Verdict.V_ROUTE)
V_PASS = int(Verdict.V_PASS)
V_REPLACE = int(Verdict.V_REPLACE)
V_WAIT = int(Verdict.V_WAIT)
V_CLOSE = int(Verdict.V_CLOSE)


def data_verdict(result: object, data: bytes) -> Tuple[int, Optional[bytes]]:
    """on_data's return value -> (verdict, replacement bytes)."""
    if result is None or result is data:
        return V_PASS, None
    if result is WAIT:
        return V_WAIT, None
    if result is CLOSE:
        return V_CLOSE, None
    if isinstance(result, (bytes, bytearray, memoryview)):
        return V_REPLACE, bytes(result)
    raise TypeError(f"on_data returned {type(result).__name__}: expected None, bytes, WAIT or CLOSE")


# ---- loading hooks named on the command line


def load_hooks(spec: str) -> object:
    """'path/to/file.py[:object]' or 'package.module[:object]' -> the object
    whose on_connect / on_data / on_close attributes are the hooks."""
    target, _, attr = spec.partition(":")
    if not target:
        raise ConfigError("hooks", spec, "expected MODULE[:OBJECT] or FILE.py[:OBJECT]")
    if target.endswith(".py") or os.sep in target:
        if not os.path.isfile(target):
            raise ConfigError("hooks", spec, f"no such file: {target}")
        name = "fastproxy_hooks_" + os.path.splitext(os.path.basename(target))[0]
        mod_spec = importlib.util.spec_from_file_location(name, target)
        if mod_spec is None or mod_spec.loader is None:
            raise ConfigError("hooks", spec, "cannot be loaded as a Python file")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError("hooks", spec, f"failed to load: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError("hooks", spec, f"cannot import {target} ({exc})") from None
        except Exception as exc:
            raise ConfigError("hooks", spec, f"failed to load: {type(exc).__name__}: {exc}") from None
    obj: object = module
    for part in filter(None, attr.split(".")):
        if not hasattr(obj, part):
            raise ConfigError("hooks", spec, f"has no attribute {part!r}")
        obj = getattr(obj, part)
    if not any(callable(getattr(obj, n, None)) for n in ("on_connect", "on_data", "on_close")):
        raise ConfigError("hooks", spec, "defines none of on_connect, on_data, on_close")
    return obj


def route_target(result: str, names: Dict[str, int], field: str = "on_connect") -> Tuple[int, Optional[list]]:
    """An address on_connect returned -> (configured upstream index, or -1
    with its resolved addresses)."""
    from .values import parse_address
    from .sockets import resolve_upstream

    host, port = parse_address(result, field)
    key = format_address(host, port)
    if key in names:
        return names[key], None
    return -1, resolve_upstream((host, port), field)

