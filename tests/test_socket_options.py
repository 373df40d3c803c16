"""Both sockets of a bridge have TCP_NODELAY: small writes (a ping, a
request) leave at once instead of waiting for an ACK. On Linux the client
side inherits it from the listener (no setsockopt per client), so this reads
the options of the proxy's own sockets, found by address in /proc/self/fd."""
import os
import socket

from helpers import connect, proc_fds, recv_exact


def _own_sockets():
    for fd, target in proc_fds(os.getpid()).items():
        if not target.startswith("socket:"):
            continue
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
            s.close()
            continue
        yield s


def _find(peer, local=None):
    """This process's socket connected to `peer` (and bound to `local`)."""
    found = None
    for s in _own_sockets():
        try:
            if found is None and s.getpeername()[:2] == peer and (local is None or s.getsockname()[:2] == local):
                found = s
                continue
        except OSError:
            pass
        s.close()
    return found


def test_bridge_sockets_have_nodelay(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, workers=1)
    with connect(p.address) as c:
        c.sendall(b"ping")
        assert recv_exact(c, 4) == b"ping"   # the bridge is up on both sides
        # Only the proxy has a socket whose peer is this client, bound to
        # its listener's address; and only the proxy connects to the echo
        # server (the server's own sockets are bound to its address).
        client_side = _find(c.getsockname()[:2], p.address)
        upstream_side = _find((echo_server.host, echo_server.port))
        assert client_side is not None, "the proxy's socket for this client was not found"
        assert upstream_side is not None, "the proxy's upstream socket was not found"
        for side in (client_side, upstream_side):
            with side:
                assert side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
