"""The traffic harness (support/traffic.py) passes clean traffic, through the
proxy too, and fails on damaged traffic: a relay that flips a byte, cuts a
stream or resets, a target that never answers, a port that refuses."""
import contextlib
import socket
import threading
import time

import pytest

from support.servers import Listener, TagServer
from support.sockets import ipv6_available, reserve_refusing_port, set_linger0
from support.traffic import (HEADER_SIZE, KiB, ConnectLoop, StreamLoad, Stream,
                             VerifyingServer)


class DamagingRelay:
    """A relay to `upstream`, a thread per direction, that damages every
    connection's `direction` ('up' or 'down') at byte `at` of its stream:
    'flip' inverts that byte, 'cut' forwards an EOF instead of it and what
    follows, 'reset' resets both sides there."""

    def __init__(self, upstream, direction, at, how):
        self.upstream = upstream
        self.direction, self.how = direction, how
        # The client's header precedes its up stream.
        self.at = at + (HEADER_SIZE if direction == "up" else 0)
        self.listener = Listener()
        self._socks = []
        self._threads = []
        self._closed = False
        self._spawn(self._accept)

    @property
    def address(self):
        return ("127.0.0.1", self.listener.port)

    def _spawn(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self):
        while not self._closed:
            try:
                client = self.listener.accept(timeout=0.2)
            except OSError:  # the timeout, or the listener closed
                continue
            upstream = socket.create_connection(self.upstream, timeout=5)
            self._socks += [client, upstream]
            reset = threading.Event()
            self._spawn(self._pump, client, upstream, self.direction == "up", reset)
            self._spawn(self._pump, upstream, client, self.direction == "down", reset)

    def _pump(self, src, dst, damaged, reset):
        src.settimeout(30)
        pos = 0
        try:
            while True:
                data = bytearray(src.recv(65536))
                if not data:
                    if not reset.is_set():
                        dst.shutdown(socket.SHUT_WR)
                    return
                if damaged and pos <= self.at < pos + len(data):
                    i = self.at - pos
                    if self.how == "flip":
                        data[i] ^= 0xFF
                    elif self.how == "cut":
                        dst.sendall(data[:i])
                        dst.shutdown(socket.SHUT_WR)
                        while src.recv(65536):   # swallow the rest: the sender finishes
                            pass
                        return
                    else:
                        dst.sendall(data[:i])
                        # The other pump may sit in recv() on one of these:
                        # a close() alone would not end it, nor send the RST
                        # until it returns. SHUT_RD wakes it, the flag keeps
                        # it from forwarding that as an EOF.
                        reset.set()
                        for s in (src, dst):
                            set_linger0(s)
                            with contextlib.suppress(OSError):  # ENOTCONN: that peer is gone
                                s.shutdown(socket.SHUT_RD)
                            s.close()
                        return
                dst.sendall(data)
                pos += len(data)
        except OSError:
            pass

    def close(self):
        self._closed = True
        self.listener.close()
        for s in self._socks:
            s.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_stream_is_the_same_however_split():
    whole = Stream(7, "up").take(200 * KiB)
    s = Stream(7, "up")
    parts = [s.take(n) for n in (1, 3, 65535, 65536, 70000)]
    assert b"".join(parts) == whole[:sum(map(len, parts))]
    assert Stream(8, "up").take(64) != whole[:64] != Stream(7, "down").take(64)


def test_direct_all_ok_both_close_orders():
    with VerifyingServer() as srv, StreamLoad(srv.address, n=200, server=srv) as load:
        result = load.wait(30)
        result.assert_all_ok()
        assert load.bytes_moved() == load.total_bytes
        orders = result.close_orders()
        assert orders["client first"] > 20 and orders["server first"] > 20, orders
        srv.assert_all_ok()
        assert len(srv.conns) == 200


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
def test_direct_ipv6():
    with VerifyingServer("::1") as srv, StreamLoad(srv.addr, n=20, max_pause=0.02, server=srv) as load:
        load.assert_all_ok(20)


def test_through_proxy_200_bridges(make_proxy):
    with VerifyingServer() as srv:
        p = make_proxy(srv.addr)
        with StreamLoad(p.address, n=200, server=srv) as load:
            # What a reload test would do: act while traffic is mid-flight.
            moved = load.wait_progress(0.3)
            assert moved < load.total_bytes and load.active() > 0
            result = load.wait(60)
        result.assert_all_ok()
        assert all(c.server is not None and c.server.ok for c in result.conns)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_flipped_byte_is_named_with_its_offset(direction):
    with VerifyingServer() as srv, DamagingRelay(srv.address, direction, 54321, "flip") as relay:
        with StreamLoad(relay.address, n=4, up_len=100 * KiB, down_len=100 * KiB,
                        max_pause=0.01, server=srv) as load:
            result = load.wait(20)
    assert len(result.bad) == 4
    with pytest.raises(AssertionError) as info:
        result.assert_all_ok()
    # The damaged direction's receiver names the offset: the client for
    # down, the server for up.
    who = "server: up" if direction == "up" else "down"
    assert info.value.args[0].count("%s: mismatch at offset 54321" % who) == 4, info.value


def test_cut_stream_is_reported_as_cut_early():
    with VerifyingServer() as srv, DamagingRelay(srv.address, "down", 5000, "cut") as relay:
        with StreamLoad(relay.address, n=3, up_len=20 * KiB, down_len=20 * KiB,
                        max_pause=0.01, server=srv) as load:
            result = load.wait(20)
    with pytest.raises(AssertionError, match="down: cut early: EOF after 5000 of 20480 bytes"):
        result.assert_all_ok()


def test_reset_is_reported():
    with VerifyingServer() as srv, DamagingRelay(srv.address, "down", 5000, "reset") as relay:
        with StreamLoad(relay.address, n=3, up_len=20 * KiB, down_len=20 * KiB,
                        max_pause=0.01, server=srv) as load:
            result = load.wait(20)
    assert len(result.bad) == 3
    for c in result.bad:
        assert "down: reset after" in c.describe(), c.describe()


def test_silent_target_times_out_within_the_deadline():
    # Accepted by the kernel, never read: the bridges would wait forever.
    with Listener() as silent:
        t0 = time.monotonic()
        with StreamLoad(silent.sock.getsockname(), n=3, up_len=1000, down_len=1000) as load:
            result = load.wait(1.0)
        assert time.monotonic() - t0 < 5
    assert result.timed_out
    with pytest.raises(AssertionError, match="timeout after 1.0s.*down: no EOF after 0 of 1000 bytes"):
        result.assert_all_ok()


def test_connect_loop_counts_refusals():
    with reserve_refusing_port() as held:
        with ConnectLoop(held.getsockname()) as loop:
            time.sleep(0.3)
            counts = loop.stop()
    assert counts.refused > 10 and counts.refused == counts.total, counts


def test_connect_loop_through_proxy(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    with ConnectLoop(p.address, max_rate=300) as loop:
        time.sleep(1.0)
        counts = loop.stop()
    assert counts.failed == 0 and counts.ok > 100, counts
    # The rate bound holds.
    assert counts.total <= 300 * 1.0 + 20, counts


def test_connect_loop_counts_wrong_answers():
    # TagServer says its name before echoing: not the echo the loop expects.
    with TagServer("A") as tag, ConnectLoop(tag.addr, max_rate=100) as loop:
        time.sleep(0.3)
        counts = loop.stop()
    assert counts.wrong > 5 and counts.wrong == counts.total, counts
    assert counts.samples[0].startswith("wrong: "), counts.samples


def test_connect_loop_counts_resets():
    lst = Listener()
    stop = threading.Event()

    def reset_all():
        while not stop.is_set():
            try:
                s = lst.accept(timeout=0.1)
            except OSError:
                continue
            set_linger0(s)
            s.close()

    t = threading.Thread(target=reset_all, daemon=True)
    t.start()
    try:
        with ConnectLoop(lst.sock.getsockname(), max_rate=100) as loop:
            time.sleep(0.3)
            counts = loop.stop()
    finally:
        stop.set()
        t.join(5)
        lst.close()
    # Reset before or after the ping was sent: a reset, or EOF ('wrong').
    assert counts.reset > 0 and counts.ok == 0, counts
