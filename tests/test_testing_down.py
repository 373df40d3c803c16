"""Proxy.set_down / is_down: a down listener refuses new clients like a
closed port, cuts or keeps its live bridges, comes back on the same
address, and stays down across a reload."""
import errno

import pytest

from fastproxy import Config, ConfigError, Proxy
from fastproxy.control import UnknownNameError
from support.servers import Servers, which
from support.sockets import closed_by_peer, connect, echo_roundtrip, free_port, recv_exact
from support.waits import stop_bounded, wait_for


def refused(addr):
    """True when a connect to addr is refused (ECONNREFUSED, a SYN answered by RST)."""
    try:
        s = connect(addr, timeout=3.0)
    except ConnectionRefusedError:
        return True
    s.close()
    return False


def test_down_refuses_then_up_serves_on_the_same_address(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, workers=2)
    addr = p.address
    assert p.is_down() is False
    assert echo_roundtrip(addr, b"before")
    p.set_down(True)
    assert p.is_down() is True
    for _ in range(5):
        with pytest.raises(OSError) as info:
            connect(addr, timeout=3.0).close()
        assert info.value.errno == errno.ECONNREFUSED
    p.set_down(False)
    assert p.is_down() is False
    assert p.address == addr
    assert echo_roundtrip(addr, b"after")
    # Idempotent both ways.
    p.set_down(False)
    p.set_down(True)
    p.set_down(True)
    assert refused(addr)
    p.set_down(False)
    assert echo_roundtrip(addr, b"again")


def test_down_with_an_explicit_port_keeps_it(make_proxy, echo_server):
    port = free_port()
    p = make_proxy(echo_server.addr, listen=f"127.0.0.1:{port}", workers=1)
    p.set_down(True)
    assert refused(("127.0.0.1", port))
    p.set_down(False)
    assert p.address == ("127.0.0.1", port)
    assert echo_roundtrip(("127.0.0.1", port), b"x")


def test_cut_closes_live_bridges_and_keep_leaves_them_flowing(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, workers=2)
    with connect(p.address) as cut:
        cut.sendall(b"ping")
        assert recv_exact(cut, 4) == b"ping"
        p.set_down(True, cut=True)
        assert closed_by_peer(cut, 3.0) in ("eof", "reset")
    assert wait_for(lambda: p.stats()["active"] == 0, 5)

    p.set_down(False)
    with connect(p.address) as kept:
        kept.sendall(b"one")
        assert recv_exact(kept, 3) == b"one"
        p.set_down(True, cut=False)
        assert refused(p.address)
        for i in range(20):
            kept.sendall(b"flow%02d" % i)
            assert recv_exact(kept, 6) == b"flow%02d" % i
        assert p.stats()["active"] == 1
        p.set_down(False)
        kept.sendall(b"up")
        assert recv_exact(kept, 2) == b"up"


def test_reload_keeps_a_down_listener_down(engine):
    with Servers(names=["A", "B"]) as srv:
        port = free_port()
        cfg = dict(listen=f"127.0.0.1:{port}", engine=engine, workers=2)
        p = Proxy.from_config([Config.build(upstreams=[srv["A"].addr], **cfg)]).start()
        try:
            p.set_down(True)
            # A changed listener: a new block on the same socket.
            p.reload([Config.build(upstreams=[srv["B"].addr], max_connections=50, **cfg)])
            assert p.is_down()
            assert refused(("127.0.0.1", port))
            # An unchanged one: the same listener.
            p.reload([Config.build(upstreams=[srv["B"].addr], max_connections=50, **cfg)])
            assert p.is_down() and refused(("127.0.0.1", port))
            p.set_down(False)
            assert which(("127.0.0.1", port)) == "B"
            assert p._listeners[0].config.limits.max_connections == 50
        finally:
            stop_bounded(p)


def test_several_listeners_name_the_one(engine):
    with Servers(names=["A", "B"]) as srv:
        pa, pb = free_port(), free_port()
        p = Proxy.from_config([
            Config.build(listen=f"127.0.0.1:{pa}", upstreams=[srv["A"].addr], engine=engine, workers=1, name="a"),
            Config.build(listen=f"127.0.0.1:{pb}", upstreams=[srv["B"].addr], engine=engine, workers=1, name="b"),
        ]).start()
        try:
            with pytest.raises(ConfigError, match="listener"):
                p.set_down(True)
            with pytest.raises(UnknownNameError, match="'nope'"):
                p.set_down(True, listener="nope")
            p.set_down(True, listener="b")
            assert p.is_down("b") and not p.is_down("a")
            assert refused(("127.0.0.1", pb))
            assert which(("127.0.0.1", pa)) == "A"
            p.set_down(False, listener="b")
            assert which(("127.0.0.1", pb)) == "B"
        finally:
            stop_bounded(p)


def test_unix_listener_cannot_be_set_down(make_proxy_any, echo_server, tmp_path):
    p = make_proxy_any(echo_server.addr, listen=f"unix:{tmp_path}/p.sock", workers=1)
    with pytest.raises(ConfigError, match="Unix listener"):
        p.set_down(True)
    assert not p.is_down()


def test_set_down_needs_a_running_proxy(echo_server, any_engine):
    p = Proxy(listen="127.0.0.1:0", upstreams=[echo_server.addr], engine=any_engine)
    with pytest.raises(RuntimeError, match="not running"):
        p.set_down(True)
