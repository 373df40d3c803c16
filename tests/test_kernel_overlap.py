"""A segment that partially overlaps what the proxy already received reaches
the other side once, on every engine.

Linux queues such a segment whole (tcp_data_queue: "partial packet",
seq < rcv_nxt < end_seq) and a read skips its old head. The kernel engine's
verdict gets the skb whole (tcp_read_skb): forwarding it as it is sends the
old head a second time, whether it redirects the skb to the peer or passes
it to the worker. CI hit it as a retransmission in about 1 run of 5 of
test_transfer's 64 MiB each way; support.overlap makes the segment on
purpose, after the bridge joined the sockmap.

On epoll and poll the proxy reads with recv, which skips the overlap: those
runs check the test itself.

An overlap the verdict cannot cut (more than its calls can take: 4095
bytes each) is dropped with everything after it, and the bridge is reset
both ways. The program is built with 256 calls (1 MiB), more than one
segment can overlap, so the tests build it with fewer
(_core._kernel_trim_calls) to reach that path."""
import os
import socket

import pytest

from fastproxy import _core
from support.overlap import repair_unavailable, resend_overlapping, wait_acked
from support.servers import Listener
from support.sockets import connect, read_all, readable, recv_exact
from support.waits import wait_for

pytestmark = [
    pytest.mark.linux_only,
    pytest.mark.skipif(bool(repair_unavailable()), reason=str(repair_unavailable())),
]

# (len(first), overlap, len(rest)): a small one; a byte; as big as one
# segment goes (support.overlap's limit: 32755 on lo).
SIZES = {"small": (1024, 300, 700), "byte": (1024, 1, 1), "big": (40000, 20000, 12000)}


def _data(n, overlap, rest):
    first = (bytes(range(251)) * (n // 251 + 1))[:n]   # a duplicate shows where it came from
    return first, first[-overlap:], b"R" * rest


def _rmem_max():
    with open("/proc/sys/net/core/rmem_max") as f:
        return int(f.read())


# A bridge that joined the sockmap has both sockets' SO_RCVBUF fixed at the
# budget (1 MiB; docs/architecture.md), which the kernel doubles from half
# of it, within rmem_max. The join shows nowhere else.
JOINED_RCVBUF = 2 * min((1 << 20) // 2, _rmem_max())


def _rcvbuf_of_socket_with_peer(peer):
    # The proxy runs in this process: its sockets are among our fds.
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink("/proc/self/fd/" + name).startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.getpeername() == peer:
                return s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except OSError:
            pass
        finally:
            s.close()
    return None


def _joined(client, server):
    ends = (client.getsockname(), server.getsockname())
    return all(_rcvbuf_of_socket_with_peer(e) == JOINED_RCVBUF for e in ends)


def _what_came(got, old, rest):
    if got == old + rest:
        return "the overlap came twice: first's last %d bytes again, then rest (%d bytes, not %d)" % (
            len(old), len(got), len(rest))
    return "after first: %d bytes, not rest's %d: %r..." % (len(got), len(rest), got[:32])


def _resend(direction, c, s, sender, old, rest):
    """resend_overlapping on the sender, which replaces its socket:
    (client, server, sender) with the new one in its place."""
    sender = resend_overlapping(sender, old, rest)
    return (sender, s, sender) if direction == "upstream" else (c, sender, sender)


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("verdict", ["redirect", "pass"])
@pytest.mark.parametrize("direction", ["upstream", "downstream"])
def test_overlapping_segment_reaches_the_other_side_once(make_proxy, engine, direction, verdict, sizes):
    first, old, rest = _data(*SIZES[sizes])
    with Listener() as srv:
        p = make_proxy(srv.addr)
        c = connect(p.address)
        s = srv.accept()
        sender, receiver = (c, s) if direction == "upstream" else (s, c)
        try:
            sender.sendall(first)
            assert recv_exact(receiver, len(first)) == first
            if engine == "kernel":
                assert wait_for(lambda: _joined(c, s), 5), (
                    "the bridge did not join the sockmap: the proxy's sockets never had SO_RCVBUF %d"
                    % JOINED_RCVBUF)
            (bridge,) = p.bridges()
            if verdict == "pass":
                # A paused stream has the verdict pass every skb to the
                # worker (its budget is 0 once pause_bridge returns).
                assert p.pause_bridge(bridge["id"], direction)
            wait_acked(sender)
            c, s, sender = _resend(direction, c, s, sender, old, rest)
            if verdict == "pass":
                # Passed, not redirected: the paused worker holds it.
                assert not wait_for(lambda: readable(receiver), 0.2), "the paused stream forwarded"
                assert p.resume_bridge(bridge["id"], direction)
            sender.shutdown(socket.SHUT_WR)
            got, end = read_all(receiver)   # after first, read above
            assert end == "eof", "no EOF after %d bytes" % len(got)
            assert got == rest, _what_came(got, old, rest)
            # The other direction still works, then both ends close.
            receiver.sendall(b"reply")
            assert recv_exact(sender, 5) == b"reply"
            receiver.shutdown(socket.SHUT_WR)
            assert read_all(sender) == (b"", "eof")
        finally:
            c.close()
            s.close()


CUT = 4095   # bytes one bpf_skb_adjust_room call cuts


@pytest.fixture
def cut_calls():
    """set(n): proxies started after it build their verdict with n cut
    calls. The default comes back after the test."""
    before = []

    def set_calls(n):
        before.append(_core._kernel_trim_calls(n))

    yield set_calls
    if before:
        _core._kernel_trim_calls(before[0])


def _joined_bridge(make_proxy, srv, direction, first):
    """A proxied connection whose bridge joined the sockmap after `first`
    went through: (client, server, sender, receiver)."""
    p = make_proxy(srv.addr)
    c = connect(p.address)
    s = srv.accept()
    sender, receiver = (c, s) if direction == "upstream" else (s, c)
    sender.sendall(first)
    assert recv_exact(receiver, len(first)) == first
    assert wait_for(lambda: _joined(c, s), 5), (
        "the bridge did not join the sockmap: the proxy's sockets never had SO_RCVBUF %d" % JOINED_RCVBUF)
    wait_acked(sender)
    return p, c, s, sender, receiver


def _assert_reset(p, no_memory_before, sender, receiver, sent_after_first):
    """The bridge ended with a reset both ways, the receiver got no byte of
    a broken stream but a prefix, and no_memory counted it once."""
    got, end = read_all(receiver)
    assert sent_after_first.startswith(got), "after first: %d bytes, not a prefix of the %d sent: %r..." % (
        len(got), len(sent_after_first), got[:32])
    assert end == "reset", "the receiver saw %s after %d bytes, not a reset" % (end or "nothing", len(got))
    assert read_all(sender) == (b"", "reset"), "the sender was not reset"
    assert wait_for(lambda: p.stats()["no_memory"] == no_memory_before + 1, 2), (
        "no_memory moved by %d, not 1" % (p.stats()["no_memory"] - no_memory_before))
    assert p.bridges() == []


@pytest.mark.parametrize("engine", ["kernel"], indirect=True)
@pytest.mark.parametrize("then", ["nothing", "more", "fin"])
@pytest.mark.parametrize("direction", ["upstream", "downstream"])
def test_uncuttable_overlap_resets_the_bridge_both_ways(make_proxy, engine, cut_calls, direction, then):
    # No call: any overlap is uncuttable. After the dropped skb, nothing
    # more (only the worker's fold can notice), more bytes, which the
    # verdict drops too, or a FIN, which the worker sees at once and must
    # not pass on: the receiver would take the hole for a clean end.
    cut_calls(0)
    first, old, rest = _data(*SIZES["small"])
    more = b"M" * (5000 if then == "more" else 0)
    with Listener() as srv:
        p, c, s, sender, receiver = _joined_bridge(make_proxy, srv, direction, first)
        try:
            no_memory = p.stats()["no_memory"]
            c, s, sender = _resend(direction, c, s, sender, old, rest)
            if more:
                sender.sendall(more)
            if then == "fin":
                sender.shutdown(socket.SHUT_WR)
            _assert_reset(p, no_memory, sender, receiver, rest + more)
        finally:
            c.close()
            s.close()


# (calls, overlap, what happens): an overlap is cut exactly when it fits
# calls x 4095 bytes; the default cuts what one call fewer could not.
LIMITS = {
    "1-call-4095": (1, CUT, "exact"),
    "1-call-4096": (1, CUT + 1, "reset"),
    "1-call-8000": (1, 8000, "reset"),
    "2-calls-8000": (2, 8000, "exact"),
    "default-8000": (None, 8000, "exact"),
}


@pytest.mark.parametrize("engine", ["kernel"], indirect=True)
@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("direction", ["upstream", "downstream"])
def test_the_number_of_cut_calls_decides_between_cut_and_reset(make_proxy, engine, cut_calls, direction, limit):
    calls, overlap, outcome = LIMITS[limit]
    if calls is not None:
        cut_calls(calls)
    first, old, rest = _data(20000, overlap, 1000)
    with Listener() as srv:
        p, c, s, sender, receiver = _joined_bridge(make_proxy, srv, direction, first)
        try:
            no_memory = p.stats()["no_memory"]
            c, s, sender = _resend(direction, c, s, sender, old, rest)
            if outcome == "reset":
                _assert_reset(p, no_memory, sender, receiver, rest)
                return
            sender.shutdown(socket.SHUT_WR)
            got, end = read_all(receiver)
            assert end == "eof", "no EOF after %d bytes" % len(got)
            assert got == rest, _what_came(got, old, rest)
            receiver.sendall(b"reply")
            assert recv_exact(sender, 5) == b"reply"
            assert p.stats()["no_memory"] == no_memory
        finally:
            c.close()
            s.close()
