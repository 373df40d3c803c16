"""fastproxy: a TCP proxy for Python that forwards at native speed.

The data plane (`fastproxy._core`) runs epoll + splice loops on worker
threads with the GIL released; this package is the control plane.
"""

from ._core import ENGINES
from .config import Config
from .values import ConfigError
from .configfile import ConfigFileError, ProxyConfig
from .control import UnknownNameError, UpstreamControl
from .hooks import CLOSE, WAIT, CloseReason, CloseRecord, Connection, Direction
from .proxy import Proxy
from .toxics import Toxic, ToxicError, toxic
from .upstreams import Upstream
from ._version import __version__


__all__ = [
    "Proxy",
    "Upstream",
    "Config",
    "ConfigError",
    "ConfigFileError",
    "UnknownNameError",
    "UpstreamControl",
    "ProxyConfig",
    "Connection",
    "Direction",
    "CloseReason",
    "CloseRecord",
    "WAIT",
    "CLOSE",
    "ENGINES",
    "Toxic",
    "ToxicError",
    "toxic",
    "__version__",
]
