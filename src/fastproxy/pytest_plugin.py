"""The pytest plugin (entry point `pytest11`: fastproxy): the
`fastproxy_factory` fixture.

    def test_survives_latency(fastproxy_factory):
        proxy = fastproxy_factory("localhost:6379")
        proxy.add_toxic("latency", latency=50)
        client = Redis(*proxy.address)

Each call starts a fastproxy.testing.ToxicProxy (loopback, one worker) in
front of the upstream; every proxy a test made is stopped when the test
ends, whether it passed or failed. The engine is the `fastproxy_engine`
ini option (auto by default) or the FASTPROXY_ENGINE environment variable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Tuple, Union

import pytest

if TYPE_CHECKING:
    from .testing import ToxicProxy

# pytest loads this module in every session of an environment where the
# package is installed: the extension is imported only by a test that asks
# for the fixture.
Factory = Callable[..., "ToxicProxy"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("fastproxy_engine", "engine of the proxies fastproxy_factory makes: auto, epoll or poll",
                  default="auto")


@pytest.fixture
def fastproxy_factory(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Call with an upstream ("host:port" or (host, port)) and any
    ToxicProxy options: returns a started ToxicProxy (`.address` is where
    to connect), stopped at the end of the test."""
    from .testing import ToxicProxy

    made: List[ToxicProxy] = []
    engine = str(request.config.getini("fastproxy_engine") or "auto")

    def make(upstream: Union[str, Tuple[str, int]], **options: Any) -> ToxicProxy:
        options.setdefault("engine", engine)
        proxy = ToxicProxy(upstream, **options)
        proxy.start()
        made.append(proxy)
        return proxy

    yield make
    errors = []
    for proxy in made:
        try:
            proxy.stop()
        except Exception as exc:  # stop every proxy before reporting
            errors.append(exc)
    if errors:
        raise errors[0]
