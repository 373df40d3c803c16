"""pytest-benchmark micro-benchmarks: address and duration parsing, Config.build.

    pytest benchmarks/test_hotspots_config.py

These run in-process (no sockets). The parsers run once per listener or
upstream at start-up and on every reconfiguration, not per connection, so the
figures are a regression guard rather than a target. Each benchmark checks
its result too, so a fast wrong answer fails.
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")
config = pytest.importorskip("fastproxy.config")
values = pytest.importorskip("fastproxy.values")

ADDRESSES = [
    ("127.0.0.1:8080", False, ("127.0.0.1", 8080)),
    ("[::1]:443", False, ("::1", 443)),
    ("backend.internal:5432", False, ("backend.internal", 5432)),
    (":9000", True, ("", 9000)),
]

DURATIONS = [
    ("5", 5.0),
    ("500ms", 0.5),
    ("2.5s", 2.5),
    ("2m", 120.0),
    ("1h", 3600.0),
    (30, 30.0),
    (0.25, 0.25),
]


@pytest.mark.parametrize("text,listen,expected", ADDRESSES,
                         ids=[a[0] for a in ADDRESSES])
def test_parse_address(benchmark, text, listen, expected):
    result = benchmark(values.parse_address, text, "upstream", listen=listen)
    assert result == expected


def test_parse_address_rejects(benchmark):
    """The error path builds a message; it should not be pathological."""
    def bad():
        try:
            values.parse_address("::1:80", "upstream")
        except values.ConfigError as e:
            return e
        return None

    err = benchmark(bad)
    assert isinstance(err, values.ConfigError) and err.field == "upstream"


def test_format_address(benchmark):
    assert benchmark(values.format_address, "::1", 443) == "[::1]:443"


@pytest.mark.parametrize("value,expected", DURATIONS, ids=[repr(d[0]) for d in DURATIONS])
def test_parse_duration(benchmark, value, expected):
    assert benchmark(values.parse_duration, value, "connect_timeout") == pytest.approx(expected)


def test_parse_duration_rejects(benchmark):
    def bad():
        try:
            values.parse_duration("5 minutes", "drain_timeout")
        except values.ConfigError as e:
            return e
        return None

    err = benchmark(bad)
    assert isinstance(err, values.ConfigError) and err.field == "drain_timeout"


def test_config_build(benchmark):
    """Everything a CLI start parses: two addresses, three durations."""
    cfg = benchmark(config.Config.build, listen="127.0.0.1:0",
                    upstreams=["127.0.0.1:9000", "[::1]:9001"], workers=2,
                    connect_timeout="5s", drain_timeout="10s", half_close_timeout="5m",
                    engine="epoll")
    assert [u.address for u in cfg.upstream_group.upstreams] == ["127.0.0.1:9000", "[::1]:9001"]
    assert cfg.timeouts.half_close_timeout == 300.0
