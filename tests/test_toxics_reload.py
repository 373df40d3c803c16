"""Toxics across a reload: the block a reload puts in place has the
listener's toxic set before it serves anybody."""
import socket
import threading
import time

from fastproxy import Config, toxic

LIMIT = 3
PAYLOAD = b"abcdefgh"


def _through_limit(addr):
    """What the client gets back for PAYLOAD before the proxy ends it (or
    2 s pass): LIMIT bytes then EOF under limit_data, all of it without."""
    got = b""
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(PAYLOAD)
        s.settimeout(2)
        try:
            while len(got) < len(PAYLOAD):
                chunk = s.recv(64)
                if not chunk:
                    return got, True
                got += chunk
        except (socket.timeout, ConnectionResetError):
            return got, False
        s.settimeout(0.5)
        try:
            return got, s.recv(64) == b""
        except (socket.timeout, ConnectionResetError):
            return got, False


def test_no_client_escapes_a_toxic_while_reloads_replace_its_block(make_proxy, echo_server, engine):
    # Clients keep connecting while reloads replace the listener's block
    # back to back: each one meets limit_data, none is accepted by a block
    # that has not got the set yet.
    p = make_proxy(echo_server.addr, name="front", workers=2)
    p.add_toxic(toxic("limit_data", "downstream", bytes=LIMIT))
    port = p.address[1]
    stop = threading.Event()
    results, errors = [], []
    reloads = [0]

    def reloader():
        try:
            while not stop.is_set():
                reloads[0] += 1
                p.reload([Config.build(listen=f"127.0.0.1:{port}", upstreams=[echo_server.addr],
                                       engine=engine, workers=2, name="front",
                                       idle_timeout=30 + reloads[0] % 2)])
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    def client():
        try:
            while not stop.is_set():
                results.append(_through_limit(p.address))
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reloader)] + [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert reloads[0] > 20, reloads[0]
    assert len(results) > 100, len(results)
    escaped = [r for r in results if r != (PAYLOAD[:LIMIT], True)]
    assert not escaped, f"{len(escaped)} of {len(results)} clients got no toxic: {escaped[:5]}"
    assert p.toxics() == [toxic("limit_data", "downstream", bytes=LIMIT)]

