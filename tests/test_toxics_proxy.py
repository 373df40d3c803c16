"""Toxics in the data plane, through a running proxy on both engines: each
kind's effect, toxicity, live changes, atomic sets, and the per-bridge
commands.

Timing tolerances: a delay must be at least what was asked (the data plane
never releases early) and at most 60 ms more at the median (a loaded 2-CPU
box wakes a thread late by tens of ms, rarely by more); rates within 10 %
over 3 s.
"""

import socket
import statistics
import threading
import time

import pytest

from fastproxy import CloseReason, Config, UnknownNameError, toxic
from support.servers import Listener
from support.sockets import closed_by_peer, connect, recv_exact, recv_until_eof
from support.traffic import StreamLoad, VerifyingServer
from support.waits import wait_for

SLACK = 0.06


def ping(sock, n=16):
    t = time.monotonic()
    sock.sendall(b"p" * n)
    recv_exact(sock, n)
    return time.monotonic() - t


def median_ping(sock, times=5):
    return statistics.median(ping(sock) for _ in range(times))


class Blaster:
    """An upstream that, per connection, sends `total` bytes (None: until the
    client goes) as fast as it can, then closes; it records what it read."""

    def __init__(self, total=None, chunk=65536):
        self.listener = Listener()
        self.addr = self.listener.addr
        self.total, self.chunk = total, chunk
        self.received = []
        self._threads = []
        self._stop = False
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self):
        self.listener.sock.settimeout(0.2)
        while not self._stop:
            try:
                s, _ = self.listener.sock.accept()
            except (socket.timeout, OSError):
                continue
            t = threading.Thread(target=self._serve, args=(s,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, s):
        got = bytearray()
        self.received.append(got)
        s.settimeout(10)
        data = bytes(range(256)) * (self.chunk // 256)
        sent = 0
        try:
            while not self._stop and (self.total is None or sent < self.total):
                n = len(data) if self.total is None else min(len(data), self.total - sent)
                s.sendall(data[:n])
                sent += n
            s.shutdown(socket.SHUT_WR)
            while True:
                more = s.recv(65536)
                if not more:
                    break
                got += more
        except OSError:
            pass
        finally:
            s.close()

    def close(self):
        self._stop = True
        for t in self._threads:
            t.join(5)
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def recorder():
    records = []
    return records, lambda conn, record: records.append(record.reason)


# ---- latency

def test_latency_adds_its_delay_to_its_stream_only(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    with connect(p.address) as c:
        base = median_ping(c)
        p.add_toxic(toxic("latency", "downstream", latency=100))
        down = median_ping(c)
        assert 0.100 <= down <= 0.100 + base + SLACK, down
        p.set_toxics([toxic("latency", "upstream", latency=70)])
        up = median_ping(c)
        assert 0.070 <= up <= 0.070 + base + SLACK, up
        p.add_toxic(toxic("latency", "downstream", latency=40))
        both = median_ping(c)
        assert 0.110 <= both <= 0.110 + base + SLACK, both
        p.set_toxics([])
        assert median_ping(c) < 0.05


def test_jitter_spreads_delays_and_never_reorders(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    p.add_toxic(toxic("latency", "downstream", latency=60, jitter=50))
    with connect(p.address) as c:
        delays = []
        sent = {}
        got = b""
        c.settimeout(5)
        for i in range(40):
            msg = b"%04d" % i
            sent[i] = time.monotonic()
            c.sendall(msg)
            time.sleep(0.004)
            c.setblocking(False)
            try:
                got += c.recv(4096)
            except BlockingIOError:
                pass
            c.setblocking(True)
        c.settimeout(5)
        while len(got) < 160:
            got += c.recv(4096)
        # Arrival times are not kept above (reads were batched); measure again
        # one message at a time.
        for i in range(15):
            t = time.monotonic()
            c.sendall(b"x")
            recv_exact(c, 1)
            delays.append(time.monotonic() - t)
    assert got == b"".join(b"%04d" % i for i in range(40))
    assert min(delays) >= 0.010
    assert max(delays) <= 0.110 + SLACK + 0.05
    assert max(delays) - min(delays) > 0.010, delays   # jitter spread them


def test_latency_on_a_bulk_transfer_stays_on_splice(make_proxy, engine):
    """64 MiB under a 20 ms latency toxic: it all arrives, in order, and the
    flow holds a pipe grown to pipe-max-size (splice: the copy path holds no
    pipe), which bounds throughput to about pipe size / latency."""
    if engine != "epoll":
        pytest.skip("the poll engine copies")
    total = 64 * 1024 * 1024
    with Blaster(total=total) as up:
        p = make_proxy(up.addr)
        p.add_toxic(toxic("latency", "downstream", latency=20))
        from fastproxy import _core
        grown = []
        with connect(p.address, timeout=30) as c:
            got = 0
            pattern = bytes(range(256)) * 256
            t0 = time.monotonic()
            while got < total:
                data = c.recv(1 << 20)
                assert data, "EOF after %d bytes" % got
                expect = (pattern * 2)[got % 65536:got % 65536 + len(data)] if len(data) <= 65536 else None
                if expect is not None:
                    assert data == expect
                got += len(data)
                if not grown and got > 8 << 20:
                    grown = _pipe_sizes()
            elapsed = time.monotonic() - t0
        assert got == total
        assert _core.pipe_max_size() in grown, grown
        # At most one pipe's worth in flight per 20 ms, plus socket buffers.
        assert elapsed >= total / (_core.pipe_max_size() + 16 * 1024 * 1024) * 0.020


def _pipe_sizes():
    import fcntl
    import os
    sizes = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + name).startswith("pipe:"):
                sizes.append(fcntl.fcntl(int(name), 1032))   # F_GETPIPE_SZ
        except OSError:
            pass
    return sizes


def test_no_loss_or_reordering_under_latency_and_slicer(make_proxy):
    with VerifyingServer() as v:
        p = make_proxy(v.addr)
        p.set_toxics([toxic("latency", "upstream", latency=5, jitter=3),
                      toxic("latency", "downstream", latency=5, jitter=3),
                      toxic("slicer", "downstream", average_size=3000, size_variation=2000, delay=100)])
        load = StreamLoad(p.address, n=20, up_len=(0, 128 * 1024), down_len=(0, 256 * 1024),
                          max_pause=0.05, seed=17, server=v).start()
        load.assert_all_ok(timeout=60)


def test_a_hooked_flow_gets_the_latency_of_what_on_data_answers(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, on_data=lambda conn, direction, data: bytes(data).upper())
    p.add_toxic(toxic("latency", "downstream", latency=80))
    with connect(p.address) as c:
        t = time.monotonic()
        c.sendall(b"abc")
        assert recv_exact(c, 3) == b"ABC"
        assert 0.080 <= time.monotonic() - t <= 0.080 + SLACK + 0.05


def test_slicer_cuts_writes_and_waits_between_them(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    p.add_toxic(toxic("slicer", "downstream", average_size=100, size_variation=0, delay=20_000))
    with connect(p.address) as c:
        t = time.monotonic()
        c.sendall(b"s" * 500)
        pieces = []
        while sum(pieces) < 500:
            pieces.append(len(c.recv(4096)))
        elapsed = time.monotonic() - t
    assert max(pieces) <= 100 and len(pieces) == 5, pieces   # 20 ms apart: read one by one
    assert elapsed >= 0.080, elapsed


# ---- bandwidth, limit_data

def test_bandwidth_holds_the_rate(make_proxy):
    with Blaster() as up:
        p = make_proxy(up.addr)
        p.add_toxic(toxic("bandwidth", "downstream", rate=200))   # 200,000 bytes/s
        with connect(p.address, timeout=10) as c:
            recv_exact(c, 100_000)   # past the start (and the burst)
            got = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3.0:
                got += len(c.recv(65536))
            rate = got / (time.monotonic() - t0)
    assert 180_000 <= rate <= 220_000, rate


def test_limit_data_closes_after_exactly_n_bytes(make_proxy):
    with Blaster(total=1_000_000) as up:
        records, on_close = recorder()
        p = make_proxy(up.addr, on_close=on_close)
        p.add_toxic(toxic("limit_data", "downstream", bytes=123_457))
        with connect(p.address) as c:
            data = recv_until_eof(c)    # a FIN, as toxiproxy's close
        assert len(data) == 123_457
        assert data == _blast_prefix(123_457)
        assert wait_for(lambda: records == [CloseReason.TOXIC_CLOSED], 5), records


def _blast_prefix(n):
    block = bytes(range(256)) * 256
    return (block * (n // len(block) + 1))[:n]


# ---- toxicity, live changes, atomic sets

@pytest.mark.parametrize("toxicity", [0.0, 1.0, 0.5])
def test_toxicity_is_the_share_of_bridges(make_proxy, echo_server, toxicity):
    p = make_proxy(echo_server.addr)
    p.add_toxic(toxic("latency", "downstream", latency=1, toxicity=toxicity))
    socks = [connect(p.address) for _ in range(50)]
    try:
        for s in socks:
            ping(s)
        applied = [b["toxics"] == ["latency_downstream"] for b in p.bridges()]
        assert len(applied) == 50
        if toxicity == 0.0:
            assert not any(applied)
        elif toxicity == 1.0:
            assert all(applied)
        else:
            assert 5 <= sum(applied) <= 45, sum(applied)   # P(outside) < 1e-8
    finally:
        for s in socks:
            s.close()


def test_update_keeps_a_bridges_draw_and_a_new_toxic_is_drawn(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    p.add_toxic(toxic("latency", "downstream", latency=1, toxicity=0.5))
    socks = [connect(p.address) for _ in range(40)]
    try:
        for s in socks:
            ping(s)
        before = {b["id"]: b["toxics"] for b in p.bridges()}
        p.update_toxic("latency_downstream", latency=2)
        assert {b["id"]: b["toxics"] for b in p.bridges()} == before
        p.update_toxic("latency_downstream", toxicity=1.0)   # the draw stays: toxicity counts at the draw
        assert {b["id"]: b["toxics"] for b in p.bridges()} == before
        with pytest.raises(UnknownNameError):
            p.update_toxic("nope", latency=1)
    finally:
        for s in socks:
            s.close()


def test_a_toxic_added_and_removed_takes_effect_on_a_live_bridge(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    with connect(p.address) as c:
        assert median_ping(c) < 0.05
        p.add_toxic(toxic("latency", "upstream", latency=120))
        assert median_ping(c, 3) >= 0.120
        p.remove_toxic("latency_upstream")
        assert median_ping(c) < 0.05
        with pytest.raises(UnknownNameError):
            p.remove_toxic("latency_upstream")


def test_a_set_is_atomic(make_proxy, echo_server):
    """While sets with two toxics come and go, no bridge ever shows one
    without the other."""
    p = make_proxy(echo_server.addr)
    pair = [toxic("latency", "downstream", latency=1), toxic("limit_data", "upstream", bytes=10**9)]
    socks = [connect(p.address) for _ in range(30)]
    stop = threading.Event()
    seen = []

    def flip():
        while not stop.is_set():
            p.set_toxics(pair)
            p.set_toxics([])

    t = threading.Thread(target=flip)
    t.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            seen.extend(sorted(b["toxics"]) for b in p.bridges())
    finally:
        stop.set()
        t.join(10)
        for s in socks:
            s.close()
    assert seen
    assert all(names in ([], ["latency_downstream", "limit_data_upstream"]) for names in seen)
    assert any(names for names in seen) and any(not names for names in seen)


# ---- timeout, reset_peer, slow_close

def test_timeout_stops_forwarding_then_closes(make_proxy, echo_server):
    records, on_close = recorder()
    p = make_proxy(echo_server.addr, on_close=on_close)
    with connect(p.address) as c:
        ping(c)
        t = time.monotonic()   # the clock starts when the toxic applies, within add_toxic
        p.add_toxic(toxic("timeout", "upstream", timeout=300))
        c.sendall(b"lost?")
        assert closed_by_peer(c, 3.0) == "eof"    # nothing came back first
        assert 0.300 <= time.monotonic() - t <= 0.300 + SLACK + 0.1
    assert wait_for(lambda: records == [CloseReason.TOXIC_CLOSED], 5), records


def test_timeout_zero_holds_until_removed_and_loses_nothing(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    with connect(p.address) as c:
        ping(c)
        p.add_toxic(toxic("timeout", "downstream", timeout=0))
        c.sendall(b"held" * 1000)
        c.settimeout(0.4)
        with pytest.raises(socket.timeout):
            c.recv(10)
        p.remove_toxic("timeout_downstream")
        c.settimeout(5)
        assert recv_exact(c, 4000) == b"held" * 1000
        assert ping(c) < 0.5


def test_reset_peer_resets_both_sides_timeout_after_its_streams_first_bytes(make_proxy, echo_server):
    # toxiproxy's reset_peer: its stream forwards nothing from when it
    # applies; the first bytes that come on it start the clock, and
    # `timeout` later both sides are reset. An idle connection is not reset.
    records, on_close = recorder()
    p = make_proxy(echo_server.addr, on_close=on_close)
    p.add_toxic(toxic("reset_peer", "downstream", timeout=200))
    with connect(p.address) as c:
        c.settimeout(0.5)
        with pytest.raises(socket.timeout):   # idle: no reset
            c.recv(100)
        t = time.monotonic()
        c.sendall(b"ping")   # goes up; the echo's answer is the downstream's first bytes
        c.settimeout(3)
        with pytest.raises(ConnectionResetError):
            assert c.recv(100) == b"", "the answer must not arrive"
        assert 0.200 <= time.monotonic() - t <= 0.200 + SLACK + 0.1
    assert wait_for(lambda: records == [CloseReason.TOXIC_CLOSED], 5), records


def test_reset_peer_upstream_holds_the_bytes_and_an_end_starts_it_too(make_proxy):
    # On the upstream stream the server never sees the client's bytes; a
    # stream that ends (FIN) without bytes starts the clock as well.
    records, on_close = recorder()
    with Listener() as srv:
        p = make_proxy(srv.addr, on_close=on_close)
        p.add_toxic(toxic("reset_peer", "upstream", timeout=0))
        with connect(p.address) as c:
            up = srv.accept(5)
            t = time.monotonic()
            c.sendall(b"never seen")
            c.settimeout(3)
            with pytest.raises(ConnectionResetError):
                c.recv(100)
            assert time.monotonic() - t <= SLACK + 0.1
        up.settimeout(3)
        with pytest.raises(ConnectionResetError):
            assert up.recv(100) == b"", "the server must not get the bytes"
        up.close()
        p.remove_toxic("reset_peer_upstream")
        p.add_toxic(toxic("reset_peer", "upstream", timeout=150))
        with connect(p.address) as c:
            up = srv.accept(5)
            t = time.monotonic()
            c.shutdown(socket.SHUT_WR)
            c.settimeout(3)
            with pytest.raises(ConnectionResetError):
                c.recv(100)
            assert 0.150 <= time.monotonic() - t <= 0.150 + SLACK + 0.1
            up.close()
    assert wait_for(lambda: records == [CloseReason.TOXIC_CLOSED] * 2, 5), records


def test_slow_close_delays_the_fin(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    p.add_toxic(toxic("slow_close", "downstream", delay=300))
    with connect(p.address) as c:
        assert ping(c) < 0.2
        t = time.monotonic()
        c.shutdown(socket.SHUT_WR)    # the echo server answers with its own FIN
        assert recv_until_eof(c) == b""
        assert 0.300 <= time.monotonic() - t <= 0.300 + SLACK + 0.1


# ---- per-bridge commands

def test_reset_bridge(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    with connect(p.address) as c:
        ping(c)
        (b,) = p.bridges()
        assert p.reset_bridge(b["id"])
        c.settimeout(3)
        with pytest.raises(ConnectionResetError):
            while c.recv(100):
                pass
        assert not p.reset_bridge(b["id"])


def test_half_close_bridge_closes_one_stream(make_proxy):
    with Listener() as srv:
        p = make_proxy(srv.addr)
        with connect(p.address) as c:
            c.sendall(b"hi")
            with srv.accept() as s:
                assert recv_exact(s, 2) == b"hi"
                (b,) = p.bridges()
                assert p.half_close_bridge(b["id"], "downstream")
                assert recv_until_eof(c) == b""     # the client got a FIN
                c.sendall(b"still up")              # its stream flows on
                assert recv_exact(s, 8) == b"still up"
        with pytest.raises(ValueError):
            p.half_close_bridge(1, "sideways")


def test_pause_and_resume_bridge(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    with connect(p.address) as c:
        ping(c)
        (b,) = p.bridges()
        assert p.pause_bridge(b["id"], "downstream")
        assert p.bridges()[0]["paused"] == ["downstream"]
        c.sendall(b"wait for it")
        c.settimeout(0.4)
        with pytest.raises(socket.timeout):
            c.recv(10)
        assert p.resume_bridge(b["id"], "downstream")
        assert p.bridges()[0]["paused"] == []
        c.settimeout(5)
        assert recv_exact(c, 11) == b"wait for it"
    assert not p.pause_bridge(10**12, "upstream")


def test_toxics_survive_a_reload_and_show_in_stats(make_proxy, echo_server, engine):
    p = make_proxy(echo_server.addr, name="front")
    p.add_toxic(toxic("latency", "downstream", latency=80))
    assert p.stats()["listeners"]["front"]["toxics"] == ["latency_downstream"]
    port = p.address[1]
    with connect(p.address) as old:
        assert median_ping(old, 3) >= 0.080
        p.reload([Config.build(listen=f"127.0.0.1:{port}", upstreams=[echo_server.addr], engine=engine,
                               name="front", idle_timeout=30)])
        assert p.toxics() == [toxic("latency", "downstream", latency=80)]
        with connect(p.address) as c:
            assert median_ping(c, 3) >= 0.080
        # A bridge of the block the reload replaced gets later changes too.
        p.add_toxic(toxic("latency", "upstream", latency=50))
        assert median_ping(old, 3) >= 0.130
