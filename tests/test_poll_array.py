"""The poll engine's array, kept between waits (worker.pxi, poll_mark):
entries follow their bridges through opens, closes (swap-removal) and
state changes, and a new client costs no more waits than it must."""
import random
import socket
import time

import pytest

from fastproxy import ENGINES
from support.servers import EchoServer
from support.sockets import recv_exact
from support.waits import stop_bounded, wait_for

pytestmark = pytest.mark.skipif("poll" not in ENGINES, reason="poll engine not compiled in")


def _echo(s, payload):
    s.sendall(payload)
    assert recv_exact(s, len(payload)) == payload


def test_bridges_keep_flowing_while_others_close_in_any_order():
    # Closing a bridge moves the array's last entries into its place: the
    # moved bridges must still be watched, for both their sockets.
    from fastproxy import Proxy

    rng = random.Random(16)
    with EchoServer("127.0.0.1") as srv:
        p = Proxy(listen="127.0.0.1:0", upstream=srv.addr, engine="poll", workers=1)
        p.start()
        held = []
        try:
            for round_ in range(6):
                for _ in range(60):
                    s = socket.create_connection(p.address, timeout=5)
                    _echo(s, b"o%d" % round_)
                    held.append(s)
                rng.shuffle(held)
                for s in held[:40]:
                    if rng.random() < 0.5:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.close()
                del held[:40]
                for i, s in enumerate(held):
                    _echo(s, b"%d-%d" % (round_, i))
            assert wait_for(lambda: p.stats()["active"] == len(held), 10), p.stats()["active"]
        finally:
            for s in held:
                s.close()
            stop_bounded(p, timeout=2.0, limit=20.0)


@pytest.mark.serial  # counts loop waits, which a loaded CPU changes
def test_a_new_client_costs_few_waits():
    # What a client sent while its upstream connected is read when the
    # connect completes, not after one more wait over every socket: about
    # 5.4 waits per client (accept, connect, answer, two FINs) against 6.2
    # before.
    from fastproxy import Proxy

    with EchoServer("127.0.0.1") as srv:
        p = Proxy(listen="127.0.0.1:0", upstream=srv.addr, engine="poll", workers=1)
        p.start()
        try:
            def one():
                with socket.create_connection(p.address, timeout=5) as s:
                    _echo(s, b"x" * 64)

            one()
            # The count depends on how events happen to coalesce, and a busy
            # machine splits them: the best of up to three batches of 100
            # (5.0-5.6 here when quiet, 5.8 once in a loaded suite run; 6.0-6.7
            # without the early read).
            seen = []
            for _ in range(3):
                assert wait_for(lambda: p.stats()["active"] == 0, 5)
                time.sleep(0.1)
                before = p.stats()["workers"][0]["iterations"]
                n = 100
                for _ in range(n):
                    one()
                assert wait_for(lambda: p.stats()["active"] == 0, 5)
                time.sleep(0.1)
                seen.append((p.stats()["workers"][0]["iterations"] - before) / n)
                if seen[-1] < 5.8:
                    break
            assert min(seen) < 5.8, seen
        finally:
            stop_bounded(p, timeout=2.0, limit=20.0)
