"""fastproxy.testing.ToxicProxy and the pytest plugin (fastproxy_factory),
the plugin run in a pytest subprocess (pytester), as a user's suite runs it."""
import importlib.metadata
import os
import socket

import pytest

import fastproxy

from fastproxy import ConfigError, ToxicError, UnknownNameError, toxic
from fastproxy.testing import Bridge, ToxicProxy
from support.sockets import closed_by_peer, connect, echo_roundtrip, recv_exact, round_trip_ms
from support.waits import wait_for

pytest_plugins = ["pytester"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fastproxy this test imported (src/ here, site-packages when installed).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastproxy.__file__)))


def test_context_manager_serves_on_loopback_and_stops(echo_server, engine):
    with ToxicProxy(echo_server.addr, engine=engine) as p:
        host, port = p.address
        assert host == "127.0.0.1" and port > 0 and (p.host, p.port) == (host, port)
        assert p.proxy.workers == 1
        assert echo_roundtrip(p.address, b"hello") == b"hello"
        assert "ToxicProxy 127.0.0.1:%d" % port in repr(p)
    # Stopped: the port refuses.
    with pytest.raises(ConnectionRefusedError):
        connect((host, port), timeout=2.0).close()


def test_start_stop_and_upstream_forms(echo_server, any_engine):
    p = ToxicProxy((echo_server.host, echo_server.port), engine=any_engine).start()
    try:
        assert echo_roundtrip(p.address, b"x") == b"x"
    finally:
        p.stop()
        p.stop()   # idempotent


@pytest.mark.parametrize("listen", ["0.0.0.0:0", ":0", "10.1.2.3:0", "example.com:0"])
def test_listens_on_loopback_only(listen, echo_server):
    with pytest.raises(ConfigError, match="listen.*loopback"):
        ToxicProxy(echo_server.addr, listen=listen)


@pytest.mark.parametrize("upstream", [42, ("127.0.0.1",), "nocolon"])
def test_bad_upstream_is_one_clear_error(upstream):
    with pytest.raises(ConfigError, match="upstream"):
        ToxicProxy(upstream)


def test_cut_restore_and_reset(echo_server, engine):
    with ToxicProxy(echo_server.addr, engine=engine) as p:
        with connect(p.address) as live:
            live.sendall(b"ab")
            assert recv_exact(live, 2) == b"ab"
            p.cut()
            assert p.down
            assert closed_by_peer(live, 3.0) in ("eof", "reset")
        with pytest.raises(ConnectionRefusedError):
            connect(p.address, timeout=2.0).close()
        p.restore()
        assert not p.down and echo_roundtrip(p.address, b"back") == b"back"
        with connect(p.address) as kept:
            # A round trip first: a client still in the backlog (not yet a
            # bridge) is reset by refuse(), as docs/testing.md says.
            kept.sendall(b"1")
            assert recv_exact(kept, 1) == b"1"
            p.refuse()
            with pytest.raises(ConnectionRefusedError):
                connect(p.address, timeout=2.0).close()
            kept.sendall(b"still")
            assert recv_exact(kept, 5) == b"still"
            p.reset()   # as toxiproxy's /reset: up again, no toxics
            assert not p.down and p.toxics == []
            assert echo_roundtrip(p.address, b"reset") == b"reset"


def test_bridges_are_objects_with_figures(echo_server, any_engine):
    with ToxicProxy(echo_server.addr, engine=any_engine) as p:
        with connect(p.address) as s:
            s.sendall(b"12345")
            assert recv_exact(s, 5) == b"12345"
            assert wait_for(lambda: len(p.bridges()) == 1 and p.bridges()[0].bytes_downstream == 5, 5)
            (b,) = p.bridges()
            assert isinstance(b, Bridge)
            assert b.client == s.getsockname()[:2]
            assert b.upstream == echo_server.addr
            assert b.bytes_upstream == 5 and b.age >= 0
            assert b.close() is True
            assert closed_by_peer(s, 3.0) == "eof"
        assert wait_for(lambda: p.bridges() == [], 5)
        assert b.close() is False


def test_add_toxic_takes_a_toxic_or_a_kind_but_not_both(echo_server, any_engine):
    p = ToxicProxy(echo_server.addr, engine=any_engine)
    with pytest.raises(ToxicError, match="not both"):
        p.add_toxic(toxic("latency", latency=5), latency=10)
    with pytest.raises(ToxicError, match="type"):
        p.add_toxic("nonsense")


def _plugin_args():
    # Installed (CI: pip install .[test]), the entry point loads the plugin;
    # from the source tree it is named with -p.
    names = [ep.value for ep in importlib.metadata.entry_points(group="pytest11")]
    return [] if "fastproxy.pytest_plugin" in names else ["-p", "fastproxy.pytest_plugin"]


def test_pyproject_declares_the_entry_point():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert '[project.entry-points.pytest11]\nfastproxy = "fastproxy.pytest_plugin"' in text


def test_plugin_fixture_in_a_user_suite_tears_down_even_on_failure(pytester, echo_server, tmp_path):
    ports = tmp_path / "ports.txt"
    pytester.makepyfile(f"""
        import socket

        UPSTREAM = "127.0.0.1:{echo_server.port}"

        def _roundtrip(addr):
            with socket.create_connection(addr, timeout=5) as s:
                s.sendall(b"ping")
                s.shutdown(socket.SHUT_WR)
                return s.recv(16)

        def test_passes(fastproxy_factory):
            proxy = fastproxy_factory(UPSTREAM)
            assert _roundtrip(proxy.address) == b"ping"
            with open({str(ports)!r}, "a") as f:
                f.write("%d\\n" % proxy.address[1])

        def test_fails(fastproxy_factory):
            a = fastproxy_factory(UPSTREAM)
            b = fastproxy_factory(("127.0.0.1", {echo_server.port}))
            with open({str(ports)!r}, "a") as f:
                f.write("%d\\n%d\\n" % (a.address[1], b.address[1]))
            assert False, "on purpose"
    """)
    env_path = os.pathsep.join([PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")])
    pytester._monkeypatch.setenv("PYTHONPATH", env_path)
    result = pytester.runpytest_subprocess(*_plugin_args(), "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*on purpose*"])
    # Every proxy the tests made was stopped with its test: the ports refuse.
    for port in map(int, ports.read_text().split()):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_plugin_ini_engine_and_bad_upstream(pytester, echo_server):
    pytester.makeini("[pytest]\nfastproxy_engine = poll\n")
    pytester.makepyfile(f"""
        import pytest
        from fastproxy import ConfigError

        def test_engine(fastproxy_factory):
            assert fastproxy_factory("127.0.0.1:{echo_server.port}").proxy.engine == "poll"

        def test_bad(fastproxy_factory):
            with pytest.raises(ConfigError, match="upstream"):
                fastproxy_factory("no-port-here")
    """)
    env_path = os.pathsep.join([PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")])
    pytester._monkeypatch.setenv("PYTHONPATH", env_path)
    result = pytester.runpytest_subprocess(*_plugin_args(), "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2)


def test_toxics_through_a_toxic_proxy(echo_server, engine):
    with ToxicProxy(echo_server.addr, engine=engine) as p:
        before = min(round_trip_ms(p.address) for _ in range(5))
        made = p.add_toxic("latency", latency=80)
        assert made.name == "latency_downstream" and p.toxics == [made]
        assert min(round_trip_ms(p.address) for _ in range(3)) - before >= 75
        changed = p.update_toxic("latency_downstream", latency=10)
        assert changed.attributes["latency"] == 10 and p.toxics == [changed]
        assert min(round_trip_ms(p.address) for _ in range(3)) < before + 60
        p.remove_toxic("latency_downstream")
        assert p.toxics == []
        with pytest.raises(UnknownNameError):
            p.remove_toxic("latency_downstream")
        # A whole set at once, then reset() clears it.
        p.set_toxics([toxic("latency", "upstream", latency=40), toxic("latency", latency=40)])
        assert [t.name for t in p.toxics] == ["latency_upstream", "latency_downstream"]
        assert min(round_trip_ms(p.address) for _ in range(3)) - before >= 75
        p.add_toxic(toxic("limit_data", name="cap", bytes=3))
        p.reset()
        assert p.toxics == [] and min(round_trip_ms(p.address) for _ in range(3)) < before + 60


def test_bridge_commands(echo_server, engine):
    with ToxicProxy(echo_server.addr, engine=engine) as p:
        with connect(p.address) as s:
            s.sendall(b"a")
            assert recv_exact(s, 1) == b"a"
            p.add_toxic("latency", latency=1)
            assert wait_for(lambda: p.bridges() and p.bridges()[0].toxics == ("latency_downstream",), 5)
            (b,) = p.bridges()
            assert b.pause("downstream") is True
            assert p.bridges()[0].paused == ("downstream",)
            s.sendall(b"b")
            s.settimeout(0.3)
            with pytest.raises(socket.timeout):
                s.recv(1)
            s.settimeout(5)
            assert b.resume("downstream") is True
            assert recv_exact(s, 1) == b"b"
            # The server's end reaches the client at once, not at the echo server's.
            assert b.half_close("downstream") is True
            assert s.recv(16) == b""
            assert b.reset() is True
        assert wait_for(lambda: p.bridges() == [], 5)
        assert b.pause("upstream") is False
