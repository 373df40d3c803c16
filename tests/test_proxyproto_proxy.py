"""PROXY protocol end to end (spec: haproxy.org/download/2.9/doc/proxy-protocol.txt).

Send: a raw loopback server checks the header byte by byte, then the client's
bytes. Accept: headers from trusted peers (whole, split, LOCAL, with TLVs) set
the address rules, limits and hooks see; bad ones close that client only.
Headers here are built from the spec, not with the proxy's own builder."""
import resource
import socket
import struct
import time

import pytest

from support.hooks import Recorder
from support.servers import Listener
from support.sockets import (connect, connect_from, fmt_addr, ipv6_available, read_all, recv_exact,
                             recv_until_eof)
from support.waits import wait_stat

needs_ipv6 = pytest.mark.skipif(not ipv6_available(), reason="no IPv6 on this host")

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src, sport, dst, dport):
    fam = "TCP6" if ":" in src else "TCP4"
    return ("PROXY %s %s %s %d %d\r\n" % (fam, src, dst, sport, dport)).encode()


def v2(src, sport, dst, dport, tlvs=b""):
    af, fam = (socket.AF_INET6, 0x21) if ":" in src else (socket.AF_INET, 0x11)
    body = (socket.inet_pton(af, src) + socket.inet_pton(af, dst)
            + struct.pack("!HH", sport, dport) + tlvs)
    return SIG + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def v2_local(body=b""):
    return SIG + b"\x20\x00" + struct.pack("!H", len(body)) + body


def header(version, *args):
    return v1(*args) if version == "v1" else v2(*args)


class Seen:
    """An on_connect hook remembering each client_address."""

    def __init__(self):
        self.addresses = []

    def __call__(self, conn):
        self.addresses.append(conn.client_address)


def client(addr, src=None):
    if src is None:
        return connect(addr)
    if ":" in src:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(5)
        s.bind((src, 0))
        s.connect(addr)
        return s
    return connect_from(addr, src)


def upstream_receives(lst, c, data):
    """c sends data and half-closes; returns everything the upstream got."""
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    with lst.accept() as srv:
        return recv_until_eof(srv)


def assert_closed_unserved(c, timeout=1.0):
    t0 = time.monotonic()
    data, how = read_all(c, timeout=timeout)
    assert how in ("eof", "reset") and data == b"", "client not closed (%r, %r)" % (how, data)
    return time.monotonic() - t0


# ---------------------------------------------------------------- send

SEND_CASES = [
    # (listen, client source, connect host, header family)
    ("127.0.0.1:0", "127.0.0.2", "127.0.0.1", "TCP4"),
    pytest.param("[::1]:0", "::1", "::1", "TCP6", marks=needs_ipv6),
    pytest.param(":0", "127.0.0.3", "127.0.0.1", "TCP4", marks=needs_ipv6),   # mapped client
]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("listen,src,host,fam", SEND_CASES)
def test_send_header_before_client_bytes(make_proxy, version, listen, src, host, fam):
    with Listener() as lst:
        p = make_proxy(lst.addr, listen=listen, send_proxy=version)
        if listen == ":0" and p.address[0] != "::":
            pytest.skip("no dual-stack listener")
        with client((host, p.address[1]), src) as c:
            sport = c.getsockname()[1]
            got = upstream_receives(lst, c, b"client bytes\r\n")
    if version == "v1":
        want = b"PROXY %s %s %s %d %d\r\n" % (fam.encode(), src.encode(), host.encode(), sport, p.address[1])
    else:
        af = socket.AF_INET6 if fam == "TCP6" else socket.AF_INET
        alen = 16 if fam == "TCP6" else 4
        want = (SIG + b"\x21" + (b"\x21" if fam == "TCP6" else b"\x11")
                + struct.pack("!H", 2 * alen + 4)
                + socket.inet_pton(af, src) + socket.inet_pton(af, host)
                + struct.pack("!HH", sport, p.address[1]))
    assert got == want + b"client bytes\r\n"


# ---------------------------------------------------------------- accept

ACCEPT_CASES = [
    ("v1", ("192.0.2.7", 5555, "198.51.100.1", 443), b""),
    ("v1", ("2001:db8::7", 5556, "2001:db8::1", 443), b""),
    ("v2", ("192.0.2.8", 5557, "198.51.100.1", 443), b""),
    ("v2", ("2001:db8::8", 5558, "2001:db8::1", 443), b""),
    ("v2", ("192.0.2.9", 5559, "198.51.100.1", 443), b"\x04\x00\x03abc\x01\x00\x02h2"),  # TLVs
]


@pytest.mark.parametrize("version,addrs,tlvs", ACCEPT_CASES)
def test_accept_header_from_trusted_peer(make_proxy, version, addrs, tlvs):
    seen, rec = Seen(), Recorder()
    payload = b"PROXY looks like a header but is payload\r\n" + bytes(range(256))
    hdr = v1(*addrs) if version == "v1" else v2(*addrs, tlvs=tlvs)
    with Listener() as lst:
        p = make_proxy(lst.addr, accept_proxy_from=["127.0.0.0/8"], on_connect=seen, on_close=rec)
        with client(p.address) as c:
            assert upstream_receives(lst, c, hdr + payload) == payload
    assert seen.addresses == [(addrs[0], addrs[1])]
    assert rec.one().client_address == (addrs[0], addrs[1])
    assert p.stats()["proxy_header_errors"] == 0


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_split_across_segments(make_proxy, version):
    seen = Seen()
    hdr = header(version, "203.0.113.5", 40000, "127.0.0.1", 80)
    with Listener() as lst:
        p = make_proxy(lst.addr, accept_proxy=True, on_connect=seen, workers=1)
        with client(p.address) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for piece in (hdr[:1], hdr[1:5], hdr[5:13], hdr[13:-2]):
                c.sendall(piece)
                time.sleep(0.08)
            assert seen.addresses == [], "admitted before the header was complete"
            assert upstream_receives(lst, c, hdr[-2:] + b"tail bytes") == b"tail bytes"
    assert seen.addresses == [("203.0.113.5", 40000)]


def test_v2_local_uses_peer_address(make_proxy, echo_server):
    seen = Seen()
    p = make_proxy(echo_server.addr, accept_proxy=True, on_connect=seen)
    for body in (b"", b"\x04\x00\x01z"):
        with connect_from(p.address, "127.0.0.2") as c:
            c.sendall(v2_local(body) + b"health?")
            assert recv_exact(c, 7) == b"health?"
            assert seen.addresses[-1] == ("127.0.0.2", c.getsockname()[1])
    # ...so the IP rules see the peer too.
    q = make_proxy(echo_server.addr, accept_proxy=True, deny=["127.0.0.2"])
    with connect_from(q.address, "127.0.0.2") as c:
        c.sendall(v2_local())
        assert_closed_unserved(c)
    assert wait_stat(q, "denied", 1)["denied"] == 1


def test_ip_rules_and_rate_limits_use_header_address(make_proxy, echo_server):
    # The peer (127.0.0.1) is denied itself: only the header's address counts.
    p = make_proxy(echo_server.addr, accept_proxy=True, deny=["1.2.3.4", "127.0.0.0/8"],
                   rate_limit_per_ip="1/30s")
    with connect(p.address) as c:
        c.sendall(v1("1.2.3.4", 1000, "127.0.0.1", 80))
        assert_closed_unserved(c)
    for src, ok in (("192.0.2.1", True), ("192.0.2.2", True), ("192.0.2.1", False)):
        with connect(p.address) as c:
            c.sendall(v2(src, 1000, "127.0.0.1", 80) + b"hi")
            if ok:
                assert recv_exact(c, 2) == b"hi"
            else:
                assert_closed_unserved(c)
    st = wait_stat(p, "rate_limited", 1)
    assert st["denied"] == 1 and st["rate_limited"] == 1 and st["proxy_header_errors"] == 0
    assert echo_server.accepted == 2


def test_untrusted_peer_is_refused(make_proxy, echo_server):
    seen = Seen()
    p = make_proxy(echo_server.addr, accept_proxy_from=["127.0.0.2"], on_connect=seen)
    with connect_from(p.address, "127.0.0.3") as c:
        c.sendall(v1("192.0.2.50", 1234, "127.0.0.1", 80) + b"forged")
        assert_closed_unserved(c)
    assert wait_stat(p, "denied", 1)["denied"] == 1
    assert echo_server.accepted == 0 and seen.addresses == []
    with connect_from(p.address, "127.0.0.2") as c:
        c.sendall(v1("192.0.2.50", 1234, "127.0.0.1", 80) + b"trusted")
        assert recv_exact(c, 7) == b"trusted"
    assert seen.addresses == [("192.0.2.50", 1234)]


BAD_HEADERS = {
    "not a header": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad v1 address": b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n",
    "bad v1 protocol": b"PROXY UDP4 1.1.1.1 127.0.0.1 1 2\r\n",
    "v1 too long": b"PROXY TCP4 " + b"1" * 120,
    "v2 bad version": SIG + b"\x31\x11\x00\x0c" + b"\x00" * 12,
    "v2 too long": SIG + b"\x21\x11" + struct.pack("!H", 65) + b"\x00" * 65,
    "v2 short addresses": SIG + b"\x21\x21\x00\x0c" + b"\x00" * 12,
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_bad_header_closes_client_only(make_proxy, echo_server, name):
    p = make_proxy(echo_server.addr, accept_proxy=True, proxy_header_max=64,
                   proxy_header_timeout=5, workers=1)
    with connect(p.address) as c:
        c.sendall(BAD_HEADERS[name])
        assert assert_closed_unserved(c) < 1.0
    assert wait_stat(p, "proxy_header_errors", 1)["proxy_header_errors"] == 1
    assert echo_server.accepted == 0
    with connect(p.address) as c:
        c.sendall(v2(*("192.0.2.1", 1, "127.0.0.1", 2), tlvs=b"\x04" + struct.pack("!H", 45) + b"\x00" * 45) + b"ok")
        assert recv_exact(c, 2) == b"ok"   # a 60-byte body: within proxy_header_max=64


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 192.0.2.1 ", SIG + b"\x21\x11\x00"])
def test_header_timeout_does_not_stall_worker(make_proxy, echo_server, sent):
    p = make_proxy(echo_server.addr, accept_proxy=True, proxy_header_timeout=0.4, workers=1)
    with connect(p.address) as slow:
        t0 = time.monotonic()
        if sent:
            slow.sendall(sent)
        for i in range(3):   # served meanwhile, on the same worker
            with connect(p.address) as c:
                c.sendall(v1("192.0.2.%d" % (i + 1), 1, "127.0.0.1", 2) + b"fast")
                assert recv_exact(c, 4) == b"fast"
        assert time.monotonic() - t0 < 0.35
        data, how = read_all(slow, timeout=2.0)
        took = time.monotonic() - t0
    assert how in ("eof", "reset") and data == b""
    assert 0.35 <= took < 1.4, "header timeout after %.2fs, want ~0.4s" % took
    assert wait_stat(p, "proxy_header_errors", 1)["proxy_header_errors"] == 1


def test_truncated_header_then_eof_closes_at_once(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, accept_proxy=True, proxy_header_timeout=5)
    try:
        with connect(p.address) as c:
            c.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 ")
            c.shutdown(socket.SHUT_WR)
            data, how = read_all(c, timeout=1.0)
        assert how in ("eof", "reset")
        assert wait_stat(p, "proxy_header_errors", 1, timeout=0.5)["proxy_header_errors"] == 1
    finally:
        p.stop(0.1)   # do not drain the pending header for the fixture's 2 s


def test_partial_header_does_not_spin(make_proxy, echo_server, engine):
    p = make_proxy(echo_server.addr, accept_proxy=True, proxy_header_timeout=5, workers=1)
    try:
        with connect(p.address) as c:
            c.sendall(b"PROXY TCP4 ")
            time.sleep(0.1)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            time.sleep(0.5)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        p.stop(0.1)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    assert cpu < 0.15, "%.2fs CPU in 0.5s while a partial header waits" % cpu


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_chain_send_proxy_to_accept_proxy(make_proxy, echo_server, version):
    seen = Seen()
    back = make_proxy(echo_server.addr, accept_proxy_from=["127.0.0.1"], deny=["127.0.0.3"],
                      on_connect=seen)
    front = make_proxy(fmt_addr(*back.address), send_proxy=version)
    with connect_from(front.address, "127.0.0.2") as c:
        c.sendall(b"through two proxies")
        assert recv_exact(c, 19) == b"through two proxies"
        assert seen.addresses == [("127.0.0.2", c.getsockname()[1])]
    with connect_from(front.address, "127.0.0.3") as c:   # the back proxy's rule sees .3
        data, how = read_all(c, timeout=2.0)
        assert how in ("eof", "reset") and data == b""
    st = wait_stat(back, "denied", 1)
    assert st["denied"] == 1 and st["proxy_header_errors"] == 0
    assert echo_server.accepted == 1


def test_cli_accept_and_send_proxy(cli_proxy):
    # The header's destination travels on too.
    with Listener() as lst:
        cp = cli_proxy("--listen", "127.0.0.1:0", "--upstream", lst.addr,
                       "--accept-proxy-from", "127.0.0.1", "--send-proxy", "v1",
                       "--proxy-header-timeout", "2s", "--proxy-header-max", "64")
        with connect(cp.address) as c:
            got = upstream_receives(lst, c, v2("192.0.2.7", 1234, "198.51.100.1", 443) + b"data")
        assert got == b"PROXY TCP4 192.0.2.7 198.51.100.1 1234 443\r\ndata"
        with connect(cp.address) as c:
            c.sendall(b"garbage\r\n")
            assert_closed_unserved(c)
