"""stats(): counters are exact and per-upstream."""
import os
import socket

from support.servers import EchoServer, Listener
from support.sockets import connect, echo_roundtrip, recv_exact, recv_until_eof
from support.waits import wait_for

KEYS = ("active", "peak_active", "accepted", "bytes_upstream", "bytes_downstream",
        "connect_failures")


def test_stats_shape_before_traffic(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    st = p.stats()
    assert isinstance(st, dict)
    for k in KEYS:
        assert st[k] == 0, (k, st)
    assert set(st["upstreams"]) == {echo_server.addr}
    for k in KEYS:
        assert st["upstreams"][echo_server.addr][k] == 0


def test_stats_exact_bytes_and_counts(make_proxy):
    up_bytes, down_bytes = 100_003, 250_007
    with Listener() as srv:
        p = make_proxy(srv.addr)
        c = connect(p.address)
        c.sendall(os.urandom(up_bytes))
        s = srv.accept()
        assert len(recv_exact(s, up_bytes)) == up_bytes
        assert wait_for(lambda: p.stats()["active"] == 1, 3)
        s.sendall(os.urandom(down_bytes))
        assert len(recv_exact(c, down_bytes)) == down_bytes
        c.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""
        s.close()
        assert recv_until_eof(c) == b""
        c.close()
    assert wait_for(lambda: p.stats()["active"] == 0, 5), p.stats()
    st = p.stats()
    per = st["upstreams"][srv.addr]
    for d in (st, per):
        assert d["accepted"] == 1
        assert d["active"] == 0
        assert d["peak_active"] == 1
        assert d["bytes_upstream"] == up_bytes
        assert d["bytes_downstream"] == down_bytes
        assert d["connect_failures"] == 0


def test_stats_accumulate_over_connections(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    total = 0
    for i in range(25):
        msg = os.urandom(1000 + i)
        assert echo_roundtrip(p.address, msg) == msg
        total += len(msg)
    # Three at once: peak_active counts them together. The proxy closes a
    # bridge after its client did: wait, or the last roundtrip counts too.
    assert wait_for(lambda: p.stats()["active"] == 0, 5), p.stats()
    socks = [connect(p.address) for _ in range(3)]
    for s in socks:
        s.sendall(b"z")
        assert recv_exact(s, 1) == b"z"
    assert wait_for(lambda: p.stats()["active"] == 3, 3)
    for s in socks:
        s.close()
    total += 3
    assert wait_for(lambda: p.stats()["active"] == 0, 5), p.stats()
    st = p.stats()
    assert st["accepted"] == 28
    assert st["peak_active"] == 3
    assert st["bytes_upstream"] == total and st["bytes_downstream"] == total
    assert st["upstreams"][echo_server.addr]["accepted"] == 28


def test_stats_per_upstream_with_list(make_proxy):
    with EchoServer() as a, EchoServer() as b:
        p = make_proxy(upstreams=[a.addr, b.addr])
        total = 0
        for i in range(10):
            msg = b"m%d" % i
            assert echo_roundtrip(p.address, msg) == msg
            total += len(msg)
        assert wait_for(lambda: p.stats()["active"] == 0, 5)
        st = p.stats()
        assert set(st["upstreams"]) == {a.addr, b.addr}
        ups = st["upstreams"].values()
        assert sum(u["accepted"] for u in ups) == 10 == st["accepted"]
        assert sum(u["bytes_upstream"] for u in ups) == total == st["bytes_upstream"]
        assert sum(u["bytes_downstream"] for u in ups) == total == st["bytes_downstream"]
        assert a.accepted + b.accepted == 10
