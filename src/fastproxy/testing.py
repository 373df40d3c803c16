"""Fault injection for tests: a proxy on a free loopback port in front of
one upstream, with toxics (toxics.py), down (cut / restore) and per-bridge
commands, in toxiproxy's vocabulary.

    from fastproxy.testing import ToxicProxy

    with ToxicProxy("127.0.0.1:6379") as redis_proxy:
        client = Redis(*redis_proxy.address)
        redis_proxy.add_toxic("latency", latency=100)
        ...
        redis_proxy.cut()          # the service is gone: refused, bridges closed
        redis_proxy.restore()

The pytest plugin (pytest_plugin.py) hands these out as the
`fastproxy_factory` fixture. docs/testing.md.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from .proxy import Proxy
from .toxics import Toxic, ToxicError, toxic
from .values import ConfigError, format_address, parse_address

__all__ = ["ToxicProxy", "Bridge"]

Address = Tuple[str, int]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _upstream_text(upstream: Union[str, Address]) -> str:
    if isinstance(upstream, tuple):
        if len(upstream) < 2:
            raise ConfigError("upstream", upstream, "expected (host, port) or 'host:port'")
        return format_address(str(upstream[0]), int(upstream[1]))
    if not isinstance(upstream, str):
        raise ConfigError("upstream", upstream, "expected (host, port) or 'host:port'")
    return upstream


@dataclass(frozen=True)
class Bridge:
    """One live bridge of a ToxicProxy (a snapshot of its figures when
    bridges() was called), and commands on it. Each command returns False
    when the bridge has ended meanwhile."""

    id: int
    client: Address
    upstream: Optional[str]
    state: str
    bytes_upstream: int
    bytes_downstream: int
    age: float
    toxics: Tuple[str, ...] = ()
    paused: Tuple[str, ...] = ()
    _proxy: Optional[Proxy] = field(default=None, repr=False, compare=False)

    def _serving(self) -> Proxy:
        if self._proxy is None:
            raise RuntimeError("this bridge belongs to no proxy")
        return self._proxy

    def close(self) -> bool:
        """Close both sides with a FIN (what was forwarded still arrives)."""
        return self._serving().close_bridge(self.id)

    def reset(self) -> bool:
        """Reset both sides (RST), as a crashed peer or middlebox would."""
        return self._serving().reset_bridge(self.id)

    def half_close(self, stream: str) -> bool:
        """End `stream` ("upstream": the server sees the client's FIN;
        "downstream": the client sees the server's) after what is queued in
        it; the other stream keeps flowing."""
        return self._serving().half_close_bridge(self.id, stream)

    def pause(self, stream: str) -> bool:
        """Stop forwarding `stream`; its bytes wait (backpressure)."""
        return self._serving().pause_bridge(self.id, stream)

    def resume(self, stream: str) -> bool:
        """Forward `stream` again after pause(); nothing is lost."""
        return self._serving().resume_bridge(self.id, stream)


class ToxicProxy:
    """A fastproxy Proxy with one listener on a free loopback port (or
    `listen`, which must be a loopback address) in front of `upstream`
    ("host:port" or (host, port)): a context manager, or start() and
    stop(). `engine` ("auto", "epoll", "poll") and `workers` (1: tests
    want few threads) as for Proxy; other Proxy options pass through
    (`connect_timeout="2s"`, say). Mistakes raise ConfigError (a
    ValueError) naming the field and the value."""

    def __init__(self, upstream: Union[str, Address], *, listen: str = "127.0.0.1:0",
                 engine: str = "auto", workers: int = 1, **options: Any) -> None:
        self.upstream = _upstream_text(upstream)
        host, _ = parse_address(listen, "listen", listen=True)
        if not _loopback(host):
            raise ConfigError("listen", listen, "a testing proxy listens on loopback only "
                              "(127.0.0.0/8, ::1, localhost)")
        self.proxy = Proxy(listen=listen, upstreams=[self.upstream], engine=engine, workers=workers,
                           **options)

    # ---- lifecycle

    def start(self) -> "ToxicProxy":
        """Bind and serve; returns once the proxy accepts."""
        self.proxy.start()
        return self

    def stop(self, timeout: Optional[float] = 0.0) -> None:
        """Stop at once (no drain by default: a test is over); idempotent."""
        self.proxy.stop(timeout)

    def __enter__(self) -> "ToxicProxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        try:
            where = format_address(*self.address)
        except RuntimeError:
            where = "not started"
        return f"<ToxicProxy {where} -> {self.upstream}{' (down)' if self._down() else ''}>"

    # ---- where clients connect

    @property
    def address(self) -> Address:
        """(host, port) to connect to; the real port once started."""
        address = self.proxy.address
        assert isinstance(address, tuple)
        return address

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    # ---- toxics (Proxy's toxic methods)

    @property
    def toxics(self) -> List[Toxic]:
        """The toxics set, in the order added."""
        return self.proxy.toxics()

    def add_toxic(self, kind: Union[str, Toxic], stream: str = "downstream", *, toxicity: float = 1.0,
                  name: str = "", **attributes: int) -> Toxic:
        """Add a toxic: a Toxic, or its kind and toxiproxy's attributes
        (add_toxic("latency", latency=100, jitter=10); stream "downstream"
        by default, as toxiproxy's). Returns it (its name defaults to
        KIND_STREAM). Applies to live bridges from their next event and to
        every new one. ToxicError if a toxic has that name."""
        if isinstance(kind, Toxic):
            if attributes or name or stream != "downstream" or toxicity != 1.0:
                raise ToxicError("toxic", kind, "pass either a Toxic or a kind with its attributes, not both")
            made = kind
        else:
            made = toxic(kind, stream, toxicity=toxicity, name=name, **attributes)
        return self.proxy.add_toxic(made)

    def update_toxic(self, name: str, *, toxicity: Optional[float] = None, **attributes: int) -> Toxic:
        """Change a toxic's toxicity and/or attributes; UnknownNameError if absent."""
        changes: Dict[str, Any] = dict(attributes)
        return self.proxy.update_toxic(name, toxicity=toxicity, **changes)

    def remove_toxic(self, name: str) -> None:
        """Remove a toxic; UnknownNameError if absent."""
        self.proxy.remove_toxic(name)

    def set_toxics(self, toxics: Iterable[Toxic]) -> None:
        """Replace every toxic at once: no bridge ever sees half of it."""
        self.proxy.set_toxics(toxics)

    # ---- down

    def cut(self) -> None:
        """The service is gone: new clients are refused (as by a closed
        port) and live bridges close."""
        self.proxy.set_down(True, cut=True)

    def refuse(self) -> None:
        """New clients are refused; live bridges keep flowing."""
        self.proxy.set_down(True, cut=False)

    def restore(self) -> None:
        """Accept again, on the same address."""
        self.proxy.set_down(False)

    @property
    def down(self) -> bool:
        return self._down()

    def _down(self) -> bool:
        try:
            return self.proxy.is_down()
        except RuntimeError:
            return False

    def reset(self) -> None:
        """Back to a clean proxy, as toxiproxy's /reset: every toxic
        removed and the proxy accepting again (live bridges are left)."""
        if self.proxy.toxics():
            self.proxy.set_toxics([])
        self.proxy.set_down(False)

    # ---- bridges

    def bridges(self) -> List[Bridge]:
        """The live bridges, oldest first."""
        out = []
        for b in self.proxy.bridges():
            out.append(Bridge(
                id=int(b["id"]), client=tuple(b["client"]),
                upstream=b.get("upstream"), state=str(b.get("state", "")),
                bytes_upstream=int(b.get("bytes_upstream", 0)), bytes_downstream=int(b.get("bytes_downstream", 0)),
                age=float(b.get("age", 0.0)), toxics=tuple(b.get("toxics", ())), paused=tuple(b.get("paused", ())),
                _proxy=self.proxy))
        return out

    def stats(self) -> Dict[str, Any]:
        """The proxy's counters (Proxy.stats())."""
        return self.proxy.stats()
