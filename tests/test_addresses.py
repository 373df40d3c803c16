"""Listen and upstream addresses: IPv4, IPv6, dual-stack, host names."""
import socket
import time

import pytest

from support.servers import EchoServer
from support.sockets import (blackhole_listener, echo_roundtrip, how_closed,
                             ipv6_available, refusing_port_on, reserve_refusing_port)
from support.waits import wait_for

needs_v6 = pytest.mark.skipif(not ipv6_available(), reason="no IPv6 on this host")


@needs_v6
def test_ipv6_listen_and_upstream(make_proxy):
    with EchoServer("::1") as srv:
        p = make_proxy(srv.addr, listen="[::1]:0")
        host, port = p.address
        assert host == "::1" and port > 0
        assert echo_roundtrip(("::1", port), b"v6 both ways") == b"v6 both ways"
        assert srv.addr in p.stats()["upstreams"]  # key is "[::1]:PORT"


@needs_v6
def test_ipv4_listen_ipv6_upstream(make_proxy):
    with EchoServer("::1") as srv:
        p = make_proxy(srv.addr, listen="127.0.0.1:0")
        assert echo_roundtrip(p.address, b"4 to 6") == b"4 to 6"


@needs_v6
def test_ipv6_listen_ipv4_upstream(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, listen="[::1]:0")
    assert echo_roundtrip(("::1", p.address[1]), b"6 to 4") == b"6 to 4"


@needs_v6
def test_port_only_listen_is_dual_stack(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, listen=":0")
    host, port = p.address
    assert port > 0
    assert host in ("::", "0.0.0.0", ""), host
    assert echo_roundtrip(("127.0.0.1", port), b"via v4") == b"via v4"
    assert echo_roundtrip(("::1", port), b"via v6") == b"via v6"


def test_hostname_upstream(make_proxy):
    with EchoServer("127.0.0.1") as srv:
        up = "localhost:%d" % srv.port
        p = make_proxy(up)
        assert echo_roundtrip(p.address, b"by name") == b"by name"
        assert wait_for(lambda: p.stats()["active"] == 0, 5)
        st = p.stats()
        assert set(st["upstreams"]) == {up}, "per-upstream key must be the configured string"
        assert st["upstreams"][up]["accepted"] == 1


def _localhost_families():
    fams = []
    for fam, *_ in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM):
        if fam not in fams:
            fams.append(fam)
    return fams


@pytest.mark.skipif(len(_localhost_families()) < 2 or not ipv6_available(),
                    reason="'localhost' resolves to a single address family here")
def test_hostname_upstream_tries_next_address(make_proxy):
    # Listen only on the address family resolved LAST: the first attempt is refused
    # and the proxy must try the next address.
    last = _localhost_families()[-1]
    host = "::1" if last == socket.AF_INET6 else "127.0.0.1"
    with EchoServer(host) as srv:
        p = make_proxy("localhost:%d" % srv.port)
        for i in range(3):
            assert echo_roundtrip(p.address, b"next %d" % i) == b"next %d" % i
        assert p.stats()["connect_failures"] == 0


def test_hostname_listen(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, listen="localhost:0")
    assert p.address[1] > 0
    assert echo_roundtrip(p.address, b"named listen") == b"named listen"


@needs_v6
def test_cli_port_only_listen_is_dual_stack(cli_proxy, echo_server):
    proxy = cli_proxy("--listen", ":0", "--upstream", echo_server.addr)
    port = proxy.address[1]
    assert port > 0
    assert echo_roundtrip(("127.0.0.1", port), b"cli v4") == b"cli v4"
    assert echo_roundtrip(("::1", port), b"cli v6") == b"cli v6"


def _fake_name(monkeypatch, name, hosts):
    """Make `name` resolve to `hosts`, in that order, inside this process only."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kw):
        if host != name:
            return real(host, port, *args, **kw)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (h, port)) for h in hosts]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_name_with_refused_first_address_uses_the_next(make_proxy, monkeypatch):
    with EchoServer("127.0.0.2") as srv:
        try:
            hole = reserve_refusing_port("127.0.0.1", srv.port)
        except OSError:
            pytest.skip("the port is taken on 127.0.0.1")
        with hole:
            _fake_name(monkeypatch, "two.test", ["127.0.0.1", "127.0.0.2"])
            p = make_proxy("two.test:%d" % srv.port)
            for i in range(3):
                assert echo_roundtrip(p.address, b"next %d" % i) == b"next %d" % i
            st = p.stats()
            assert st["connect_failures"] == 0
            assert st["upstreams"]["two.test:%d" % srv.port]["accepted"] == 3


def test_name_with_silent_first_address_times_out_to_the_next(make_proxy, monkeypatch):
    lst, fillers = blackhole_listener()
    try:
        port = lst.getsockname()[1]
        try:
            srv = EchoServer("127.0.0.2", port=port)
        except OSError:
            pytest.skip("the port is taken on 127.0.0.2")
        with srv:
            _fake_name(monkeypatch, "slow.test", ["127.0.0.1", "127.0.0.2"])
            p = make_proxy("slow.test:%d" % port, connect_timeout="300ms")
            t0 = time.monotonic()
            assert echo_roundtrip(p.address, b"after a timeout") == b"after a timeout"
            took = time.monotonic() - t0
            assert 0.25 < took < 3.0, took   # waited out the first address, then served
            assert p.stats()["connect_failures"] == 0
    finally:
        for s in fillers:
            s.close()
        lst.close()


def test_name_with_no_working_address_counts_one_failure(make_proxy, monkeypatch):
    with refusing_port_on("127.0.0.1", "127.0.0.2") as port:
        _fake_name(monkeypatch, "none.test", ["127.0.0.1", "127.0.0.2"])
        p = make_proxy("none.test:%d" % port)
        assert how_closed(p.address) == "reset"
        assert wait_for(lambda: p.stats()["connect_failures"] == 1, 5), p.stats()
