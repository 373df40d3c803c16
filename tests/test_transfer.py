"""Byte-exact forwarding: bulk in both directions at once, many concurrent bridges."""
import hashlib
import os
import selectors
import socket
import threading
import time

import pytest

from support.servers import Listener
from support.sockets import MiB, connect, open_many
from support.waits import wait_for


def _sender(sock, data, errors):
    try:
        view = memoryview(data)
        for off in range(0, len(data), 256 * 1024):
            sock.sendall(view[off:off + 256 * 1024])
        sock.shutdown(socket.SHUT_WR)
    except Exception as e:
        errors.append(("send", repr(e)))


def _receiver(sock, out, errors):
    try:
        h, n = hashlib.sha256(), 0
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        out["n"], out["sha"] = n, h.hexdigest()
    except Exception as e:
        errors.append(("recv", repr(e)))


@pytest.mark.slow
def test_64mib_each_way_at_once(make_proxy):
    size = 64 * MiB
    up_data, down_data = os.urandom(size), os.urandom(size)
    with Listener() as srv:
        p = make_proxy(srv.addr)
        client = connect(p.address, timeout=30)
        server = srv.accept(timeout=10)
        server.settimeout(30)
        errors, got_up, got_down = [], {}, {}
        threads = [
            threading.Thread(target=_sender, args=(client, up_data, errors)),
            threading.Thread(target=_sender, args=(server, down_data, errors)),
            threading.Thread(target=_receiver, args=(server, got_up, errors)),
            threading.Thread(target=_receiver, args=(client, got_down, errors)),
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.1, 90 - (time.monotonic() - t0)))
        assert not any(t.is_alive() for t in threads), "transfer did not finish in 90 s"
        client.close()
        server.close()
    assert not errors, errors
    assert got_up["n"] == size and got_down["n"] == size
    assert got_up["sha"] == hashlib.sha256(up_data).hexdigest(), "client->server bytes differ"
    assert got_down["sha"] == hashlib.sha256(down_data).hexdigest(), "server->client bytes differ"
    assert wait_for(lambda: p.stats()["active"] == 0, 5)
    st = p.stats()
    assert st["bytes_upstream"] == size and st["bytes_downstream"] == size


@pytest.mark.slow
def test_1000_concurrent_bridges(make_proxy, echo_server):
    n = 1000
    p = make_proxy(echo_server.addr)
    clients = open_many(p.address, n, timeout=30)
    try:
        assert len(clients) == n, "only %d of %d clients connected" % (len(clients), n)
        # All bridges exist at the same time.
        assert wait_for(lambda: p.stats()["active"] == n, 20), p.stats()
        assert wait_for(lambda: echo_server.open_connections == n, 10), echo_server.open_connections
        # Two rounds: every bridge echoes its own unique payload, byte-exact.
        for rnd in range(2):
            expect = {}
            sel = selectors.DefaultSelector()
            for i, c in enumerate(clients):
                msg = b"bridge %d round %d " % (i, rnd) + os.urandom(64)
                c.sendall(msg)
                c.setblocking(False)
                expect[c] = [msg, bytearray()]
                sel.register(c, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            left = n
            while left and time.monotonic() < deadline:
                for key, _ in sel.select(0.2):
                    c = key.fileobj
                    data = c.recv(65536)
                    assert data, "bridge closed early"
                    buf = expect[c][1]
                    buf += data
                    if len(buf) >= len(expect[c][0]):
                        sel.unregister(c)
                        left -= 1
            sel.close()
            assert left == 0, "%d bridges did not echo within 30 s" % left
            bad = [i for i, c in enumerate(clients) if bytes(expect[c][1]) != expect[c][0]]
            assert not bad, "bridges with wrong bytes: %r" % bad[:10]
            for c in clients:
                c.setblocking(True)
                c.settimeout(5)
        st = p.stats()
        assert st["peak_active"] >= n and st["accepted"] >= n
    finally:
        for c in clients:
            c.close()
    assert wait_for(lambda: p.stats()["active"] == 0, 20), p.stats()
    assert wait_for(lambda: echo_server.open_connections == 0, 10)
