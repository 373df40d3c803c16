"""support.overlap, the tool that makes a peer receive a segment partially
overlapping what it already has, checked against plain sockets: the overlap
really goes on the wire (one segment starting before what the receiver
acked), a normal receiver gets each byte once, and the connection carries
on both ways and closes cleanly."""
import socket
import threading

import pytest

from support.capture import LoCapture
from support.overlap import overlapping_send, repair_unavailable, resend_overlapping, wait_acked
from support.servers import Listener
from support.sockets import connect, ipv6_available, read_all, recv_exact
from support.waits import wait_for

pytestmark = [
    pytest.mark.linux_only,
    pytest.mark.skipif(bool(repair_unavailable()), reason=str(repair_unavailable())),
]

FIRST = bytes(range(256)) * 4          # 1024 bytes, each offset recognisable
REST = b"R" * 700
OVERLAP = 300

HOSTS = ["127.0.0.1",
         pytest.param("::1", marks=pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback"))]


def tcp_ext(name):
    """A TcpExt counter of /proc/net/netstat (this network namespace)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for head, values in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            return dict(zip(head.split()[1:], map(int, values.split()[1:])))[name]
    raise AssertionError("no TcpExt in /proc/net/netstat")


def _accept_reading(srv, n, out):
    # The server reads `first` as it comes: the overlap is sent only once
    # the receiver has it (acked, and here read too).
    s = srv.accept(timeout=10)
    out.append(s)
    out.append(recv_exact(s, n))


def _overlap_to_server(host):
    """(client, server) after the client's overlapping segment; the server
    has read FIRST."""
    srv = Listener(host)
    got = []
    t = threading.Thread(target=_accept_reading, args=(srv, len(FIRST), got), daemon=True)
    t.start()
    try:
        c = overlapping_send((host, srv.port), FIRST, OVERLAP, REST)
    finally:
        t.join(10)
        srv.close()
    s, head = got
    assert head == FIRST
    return c, s


@pytest.mark.parametrize("host", HOSTS)
def test_receiver_gets_each_byte_once_and_the_connection_carries_on(host):
    dsacks = tcp_ext("TCPDSACKOldSent")
    c, s = _overlap_to_server(host)
    with c, s:
        assert recv_exact(s, len(REST)) == REST
        # The receiver said it got old data again: a D-SACK for it
        # (RFC 2883). Other sockets on the machine may add theirs.
        assert wait_for(lambda: tcp_ext("TCPDSACKOldSent") > dsacks, 5), "no D-SACK: nothing overlapped"
        c.sendall(b"more from the client")
        assert recv_exact(s, 20) == b"more from the client"
        s.sendall(b"and from the server")
        assert recv_exact(c, 19) == b"and from the server"
        c.shutdown(socket.SHUT_WR)
        assert read_all(s) == (b"", "eof")
        s.shutdown(socket.SHUT_WR)
        assert read_all(c) == (b"", "eof")


def _capture(port):
    try:
        return LoCapture(port)
    except PermissionError:
        pytest.skip("a packet socket on lo needs CAP_NET_RAW")


@pytest.mark.parametrize("host, sizes", [
    ("127.0.0.1", (len(FIRST), OVERLAP, len(REST))),
    pytest.param("::1", (len(FIRST), OVERLAP, len(REST)), marks=HOSTS[1].marks),
    # As big as one segment goes, after a first that took two.
    ("127.0.0.1", (40000, 20000, 12000)),
], ids=["v4", "v6", "v4-big"])
def test_the_overlapping_segment_is_on_the_wire(host, sizes):
    first = (FIRST * (sizes[0] // len(FIRST) + 1))[:sizes[0]]
    old, rest = first[-sizes[1]:], b"R" * sizes[2]
    with Listener(host) as srv, _capture(srv.port) as cap:
        got = []
        t = threading.Thread(target=_accept_reading, args=(srv, len(first), got), daemon=True)
        t.start()
        c = overlapping_send((host, srv.port), first, len(old), rest)
        t.join(10)
        s = got[0]
        with c, s:
            assert recv_exact(s, len(rest)) == rest
            port = c.getsockname()[1]

            def overlap_and_its_ack():
                wire = list(cap.segments)
                at = [i for i, g in enumerate(wire) if g.payload == old + rest]
                return at and any(g.dport == port for g in wire[at[0]:]) and wire

            wire = wait_for(overlap_and_its_ack, 5)
            assert wire, cap.segments
    at = [i for i, g in enumerate(wire) if g.payload == old + rest]
    assert len(at) == 1, wire
    overlap = wire[at[0]]
    before = wire[:at[0]]
    sent = [g for g in before if g.sport == port and g.payload]
    assert b"".join(g.payload for g in sent) == first, sent
    start = sent[0].seq
    # One segment, starting len(old) bytes before the end of first...
    assert overlap.seq == (start + len(first) - len(old)) & 0xFFFFFFFF
    # ...which the server had acked by then.
    assert (start + len(first)) & 0xFFFFFFFF in [g.ack for g in before if g.dport == port]
    # It then acks the lot.
    assert (start + len(first) + len(rest)) & 0xFFFFFFFF in [g.ack for g in wire[at[0]:] if g.dport == port]


def test_from_the_accepting_side():
    # The server's socket shares its port with the listener: the new socket
    # takes over that connection all the same.
    with Listener() as srv:
        c = connect(("127.0.0.1", srv.port))
        s = srv.accept()
        with c:
            s.sendall(FIRST)
            assert recv_exact(c, len(FIRST)) == FIRST
            wait_acked(s)
            s2 = resend_overlapping(s, FIRST[-OVERLAP:], REST)
            with s2:
                assert recv_exact(c, len(REST)) == REST
                c.sendall(b"ping")
                assert recv_exact(s2, 4) == b"ping"
                s2.shutdown(socket.SHUT_WR)
                assert read_all(c) == (b"", "eof")
                c.shutdown(socket.SHUT_WR)
                assert read_all(s2) == (b"", "eof")
            # The listener still accepts.
            with connect(("127.0.0.1", srv.port)) as c2, srv.accept() as s3:
                c2.sendall(b"x")
                assert s3.recv(1) == b"x"


def test_refuses_what_it_cannot_do():
    with Listener() as srv:
        with pytest.raises(ValueError, match="overlap: 0 is not within"):
            overlapping_send(("127.0.0.1", srv.port), FIRST, 0, REST)
        with pytest.raises(ValueError, match="not a loopback address"):
            overlapping_send(("10.0.0.1", srv.port), FIRST, 10, REST)
        with connect(("127.0.0.1", srv.port)) as c, srv.accept() as s:
            s.sendall(b"unread")
            assert wait_for(lambda: c.recv(6, socket.MSG_PEEK) == b"unread", 5)
            with pytest.raises(ValueError, match="unread bytes"):
                resend_overlapping(c, b"x", b"y")
            c.sendall(b"still works")
            assert recv_exact(s, 11) == b"still works"
