"""stats()["hook_queue"]: hook calls waiting for a hook thread, process wide."""
import socket
import threading

from support.waits import wait_for


def test_hook_queue_counts_waiting_calls_and_returns_to_zero(make_proxy, echo_server):
    release = threading.Event()

    def on_connect(conn):
        release.wait(10)

    p = make_proxy(echo_server.addr, hook_threads=1, on_connect=on_connect)
    assert p.stats()["hook_queue"] == 0
    clients = [socket.create_connection(p.address, timeout=5) for _ in range(40)]
    try:
        assert wait_for(lambda: p.stats()["hook_queue"] > 0, 5), p.stats()["hook_queue"]
        release.set()
        assert wait_for(lambda: p.stats()["hook_queue"] == 0, 10), p.stats()["hook_queue"]
        for s in clients:
            s.sendall(b"q")
            assert s.recv(1) == b"q"
    finally:
        release.set()
        for s in clients:
            s.close()
