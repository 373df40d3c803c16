"""The stats endpoint's request and response, as its handlers see them:
plain values, so that a handler (stats, status page, admin) is a function
from one to the other, testable without a socket."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

__all__ = ["Request", "Response"]


@dataclass(frozen=True)
class Request:
    method: str                      # "GET", "POST", ...
    path: str                        # without the query string
    query: Dict[str, List[str]]
    headers: Mapping[str, str]       # names in lower case
    body: bytes
    peer: Any                        # (host, port) for TCP; "unix" for a Unix socket


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Tuple[Tuple[str, str], ...] = ()
