"""The access log: one JSON line per closed bridge, through the logger
`fastproxy.access`, so an application can route it like any other log.

`access_log="FILE"` (or `-` for standard output) turns the lines on and adds
one handler for this proxy's lines; a file handler can be reopened after
rotation (`Proxy.reopen_logs()`). Handlers the application puts on the
logger get every proxy's lines as well. The logger does not propagate:
access lines are not error logs, and the command's stderr handler must not
print each one. (Whether to make the lines is the option's say alone, not
the logger's handlers': test runners and log frameworks attach handlers to
every logger.)
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Optional

__all__ = ["ACCESS_LOGGER", "AccessLog", "ReopenableFileHandler"]

ACCESS_LOGGER = logging.getLogger("fastproxy.access")
ACCESS_LOGGER.setLevel(logging.INFO)
ACCESS_LOGGER.propagate = False

_OWNER = "fastproxy_owner"


class ReopenableFileHandler(logging.FileHandler):
    """Appends lines to a file; reopen() starts a new file at the same path
    once a log rotator has moved the old one away."""

    def __init__(self, path: str, on_error: Callable[[], None]) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self._on_error = on_error

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()

    def handleError(self, record: logging.LogRecord) -> None:
        # Counted (hook_errors, as before), not a traceback on stderr per line.
        self._on_error()


class _StdoutHandler(logging.StreamHandler):
    def __init__(self, on_error: Callable[[], None]) -> None:
        super().__init__(sys.stdout)
        self._on_error = on_error

    def handleError(self, record: logging.LogRecord) -> None:
        self._on_error()


class AccessLog:
    """One proxy's writer of access lines. `target`: a path, '-' (standard
    output) or None (no lines)."""

    def __init__(self, owner: object, target: Optional[str], on_error: Callable[[], None]) -> None:
        self._owner = owner
        self.handler: Optional[logging.Handler] = None
        if target is not None:
            handler: logging.Handler = (_StdoutHandler(on_error) if target == "-"
                                        else ReopenableFileHandler(target, on_error))
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler.addFilter(self._mine)
            ACCESS_LOGGER.addHandler(handler)
            self.handler = handler

    def _mine(self, record: logging.LogRecord) -> bool:
        return getattr(record, _OWNER, None) is self._owner

    def write(self, line: str) -> None:
        ACCESS_LOGGER.info(line, extra={_OWNER: self._owner})

    def reopen(self) -> None:
        if isinstance(self.handler, ReopenableFileHandler):
            self.handler.reopen()

    def close(self) -> None:
        if self.handler is not None:
            ACCESS_LOGGER.removeHandler(self.handler)
            if isinstance(self.handler, ReopenableFileHandler):
                self.handler.close()
            else:
                self.handler.flush()
            self.handler = None
