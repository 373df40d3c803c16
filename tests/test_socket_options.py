"""Both sockets of a bridge have TCP_NODELAY: small writes (a ping, a
request) leave at once instead of waiting for an ACK; and TCP_NOTSENT_LOWAT,
by default 1 MiB with either engine. On Linux the
client side inherits both from the listener (no setsockopt per client), so
this reads the options of the proxy's own sockets, found by address in
/proc/self/fd."""
import json
import os
import socket
import subprocess
import sys

import pytest

from fastproxy import _core
from fastproxy.values import AVAILABLE_CONGESTION, LOOPBACK_SOCKET_BUFFER, parse_size
from support.cli import assert_one_line_error, run_cli
from support.netns import HOST_SIDE, NS_SIDE
from support.procfs import proc_fds
from support.sockets import connect, recv_exact

TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", None)


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


def _bridge_sockets(p, echo_server, c):
    """The proxy's two sockets of the bridge client c goes through."""
    c.sendall(b"ping")
    assert recv_exact(c, 4) == b"ping"   # the bridge is up on both sides
    # Only the proxy has a socket whose peer is this client, bound to its
    # listener's address; and only the proxy connects to the echo server
    # (the server's own sockets are bound to its address).
    client_side = _find(c.getsockname()[:2], p.address)
    upstream_side = _find((echo_server.host, echo_server.port))
    assert client_side is not None, "the proxy's socket for this client was not found"
    assert upstream_side is not None, "the proxy's upstream socket was not found"
    return client_side, upstream_side


def _across_reloads(engine, echo_server, steps):
    """For each of `steps` (listener options: the first at start, each next
    by a reload of the same listener), (options, socket) for both of the
    proxy's sockets of a new client's bridge."""
    from fastproxy import Config, Proxy
    from support.waits import stop_bounded

    def config(options, port=0):
        return [Config.build(listen="127.0.0.1:%d" % port, upstreams=[echo_server.addr], engine=engine,
                             workers=1, **options)]

    p = Proxy.from_config(config(steps[0])).start()
    try:
        for i, options in enumerate(steps):
            if i:
                p.reload(config(options, p.address[1]))
            with connect(p.address) as c:
                client_side, upstream_side = _bridge_sockets(p, echo_server, c)
                with client_side, upstream_side:
                    for side in (client_side, upstream_side):
                        yield options, side
    finally:
        stop_bounded(p)


@pytest.mark.linux_only
def test_bridge_sockets_have_nodelay(make_proxy, echo_server, engine):
    p = make_proxy(echo_server.addr, workers=1)
    with connect(p.address) as c:
        for side in _bridge_sockets(p, echo_server, c):
            with side:
                assert side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                if TCP_NOTSENT_LOWAT is not None:
                    # The default: 1 MiB on both engines, where the build
                    # has the option (the portable build has not).
                    lowat = side.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT)
                    assert lowat == (1 << 20 if _core.HAVE_NOTSENT_LOWAT else 0), (engine, lowat)


@pytest.mark.linux_only
@pytest.mark.skipif(not _core.HAVE_NOTSENT_LOWAT, reason="this build has no TCP_NOTSENT_LOWAT")
@pytest.mark.parametrize("value,expect", [("16k", 16384), (262144, 262144), ("0", 0)])
def test_notsent_lowat_is_set_on_both_bridge_sockets(make_proxy, echo_server, value, expect):
    p = make_proxy(echo_server.addr, workers=1, notsent_lowat=value)
    with connect(p.address) as c:
        for side in _bridge_sockets(p, echo_server, c):
            with side:
                assert side.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT) == expect


@pytest.mark.parametrize("text,size", [("0", 0), (65536, 65536), ("64k", 65536), ("64KiB", 65536),
                                       (" 1m ", 1 << 20), ("1MiB", 1 << 20), ("1024M", 1 << 30)])
def test_sizes_accepted(text, size):
    assert parse_size(text, "notsent_lowat") == size


@pytest.mark.linux_only
def test_socket_buffer_is_set_on_both_bridge_sockets(make_proxy, echo_server):
    """SO_SNDBUF and SO_RCVBUF (Linux reports twice what was set: its
    bookkeeping share) on the client side, set per client, and on the
    upstream side, set before connect()."""
    p = make_proxy(echo_server.addr, workers=1, socket_buffer="48k")
    with connect(p.address) as c:
        for side in _bridge_sockets(p, echo_server, c):
            with side:
                assert side.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 48 * 1024
                assert side.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 48 * 1024


@pytest.mark.linux_only
def test_socket_buffer_0_leaves_the_kernels_sizes(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, workers=1, socket_buffer=0)
    with connect(p.address) as c:
        for side in _bridge_sockets(p, echo_server, c):
            with side:
                assert side.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) != 2 * LOOPBACK_SOCKET_BUFFER


def _buffers_of_auto(side, engine):
    """What socket_buffer "auto" set, or None where it left the kernel's."""
    snd = side.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    rcv = side.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if snd != 2 * LOOPBACK_SOCKET_BUFFER:
        return None
    # The kernel engine fixes an offloaded bridge's receive buffer at its
    # budget when the bridge joins the sockmap (docs/architecture.md).
    assert rcv == snd or (engine == "kernel" and rcv == 1 << 20), rcv   # the 1 MiB budget
    return snd


@pytest.mark.linux_only
def test_socket_buffer_auto_bounds_sockets_whose_peer_is_loopback(make_proxy, echo_server, engine):
    """The default: 256k on both sockets when client and upstream are on
    loopback (where it lifts throughput: docs/benchmarks.md)."""
    p = make_proxy(echo_server.addr, workers=1)
    with connect(p.address) as c:
        for side in _bridge_sockets(p, echo_server, c):
            with side:
                assert _buffers_of_auto(side, engine) == 2 * LOOPBACK_SOCKET_BUFFER


NS_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.sendall(b"ping")
assert c.recv(4) == b"ping"
print(c.getsockname()[1], flush=True)
sys.stdin.read()
"""


@pytest.mark.linux_only
def test_socket_buffer_auto_leaves_a_peer_that_is_not_loopback_to_the_kernel(make_proxy, echo_server, engine,
                                                                             netns):
    """A client from another network namespace (over a veth pair): its
    socket keeps the kernel's autotuning, while the upstream socket of the
    same bridge, on loopback, is bounded."""
    p = make_proxy(echo_server.addr, listen=f"{HOST_SIDE}:0", workers=1)
    client = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", NS_CLIENT, *map(str, p.address)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(client.stdout.readline())
        client_side = _find((NS_SIDE, port), p.address)
        upstream_side = _find((echo_server.host, echo_server.port))
        assert client_side is not None and upstream_side is not None
        with client_side, upstream_side:
            assert _buffers_of_auto(client_side, engine) is None
            assert _buffers_of_auto(upstream_side, engine) == 2 * LOOPBACK_SOCKET_BUFFER
    finally:
        client.stdin.close()
        client.wait(timeout=10)
        client.stdout.close()


@pytest.mark.parametrize("value", ["1k", 4095, "lots", -1, "2g", True])
def test_socket_buffer_refuses(value):
    from fastproxy import ConfigError, Proxy
    with pytest.raises(ConfigError) as info:
        Proxy("127.0.0.1:0", "127.0.0.1:9", socket_buffer=value)
    assert "socket_buffer" in str(info.value) and str(value) in str(info.value)


@pytest.mark.linux_only
def test_a_reload_changes_socket_buffer_for_new_clients_even_back_to_the_kernels(engine, echo_server):
    """Set per client, not on the shared listening socket: a reload that
    turns it off leaves new clients with the kernel's sizes."""
    steps = [{"socket_buffer": size} for size in (48 * 1024, 0, 32 * 1024)]
    for options, side in _across_reloads(engine, echo_server, steps):
        size = options["socket_buffer"]
        rcvbuf = side.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert (rcvbuf == 2 * size) if size else (rcvbuf != 2 * 48 * 1024), (size, rcvbuf)


@pytest.mark.linux_only
@pytest.mark.skipif(not _core.HAVE_KEEPALIVE_TIMERS, reason="this build has no TCP_KEEPIDLE/TCP_KEEPINTVL/TCP_KEEPCNT")
def test_tcp_keepalive_is_set_on_both_bridge_sockets(make_proxy, echo_server, engine):
    """The client side, set per accepted client, and the upstream side, set
    before connect(): each asked of the kernel from outside the data plane."""
    p = make_proxy(echo_server.addr, workers=1, tcp_keepalive="7s:3s:4")
    with connect(p.address) as c:
        for side in _bridge_sockets(p, echo_server, c):
            with side:
                assert side.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert side.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
                assert side.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
                assert side.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4


@pytest.mark.linux_only
def test_tcp_keepalive_on_keeps_the_kernels_timers(make_proxy, echo_server):
    with open("/proc/sys/net/ipv4/tcp_keepalive_time") as f:
        kernel_idle = int(f.read())
    p = make_proxy(echo_server.addr, workers=1, tcp_keepalive="on")
    with connect(p.address) as c:
        for side in _bridge_sockets(p, echo_server, c):
            with side:
                assert side.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                if hasattr(socket, "TCP_KEEPIDLE"):
                    assert side.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == kernel_idle


@pytest.mark.linux_only
def test_tcp_keepalive_is_off_by_default(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, workers=1)
    with connect(p.address) as c:
        for side in _bridge_sockets(p, echo_server, c):
            with side:
                assert side.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


@pytest.mark.linux_only
@pytest.mark.skipif(not _core.HAVE_KEEPALIVE_TIMERS, reason="this build has no TCP_KEEPIDLE/TCP_KEEPINTVL/TCP_KEEPCNT")
def test_a_reload_turns_tcp_keepalive_off_for_new_clients(engine, echo_server):
    """Set per client, not on the shared listening socket (which Linux
    would pass on): after a reload to off, new clients have none."""
    steps = [{"tcp_keepalive": "5s:2s:3"}, {"tcp_keepalive": "off"}]
    for options, side in _across_reloads(engine, echo_server, steps):
        expect = 0 if options["tcp_keepalive"] == "off" else 1
        assert side.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == expect, options


@pytest.mark.parametrize("text,expect", [
    ("60s:10s:6", (60, 10, 6)), ("1m", (60, 0, 0)), (" 2m:5 ", (120, 5, 0)), ("30s::3", (30, 0, 3)),
    (45, (45, 0, 0)), ("on", (0, 0, 0)), (True, (0, 0, 0)), ("off", None), ("0", None), (0, None),
    (False, None), (None, None), ("1h:1s:127", (3600, 1, 127)), ("9h:32767s", (32400, 32767, 0))])
def test_tcp_keepalive_values(text, expect):
    from fastproxy.values import parse_tcp_keepalive
    if any(expect or ()) and not _core.HAVE_KEEPALIVE_TIMERS:
        pytest.skip("this build has no keepalive timers")
    got = parse_tcp_keepalive(text, "tcp_keepalive")
    assert (tuple(got) if got is not None else None) == expect
    if got is not None:   # shown as it is written, and read back the same
        assert parse_tcp_keepalive(str(got), "tcp_keepalive") == got


@pytest.mark.parametrize("value", ["1500ms", "0s:1s", "10s:0", "10s:1s:0", "10s:1s:128", "10h", "1s:2s:3:4",
                                   "lots", "10s:x", "-5", 1.5, [60], "60s:10s:\uff16", "400d", "32768", 1 << 80])
def test_tcp_keepalive_refuses(value):
    from fastproxy import ConfigError, Proxy
    with pytest.raises(ConfigError) as info:
        Proxy("127.0.0.1:0", "127.0.0.1:9", tcp_keepalive=value)
    text = str(info.value)
    assert text.startswith("tcp_keepalive: ") and "\n" not in text and repr(value)[:20] in text


def test_cli_refuses_a_bad_tcp_keepalive_in_one_line():
    from support.cli import assert_one_line_error, run_cli
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--tcp-keepalive", "10s:1s:500"])
    assert_one_line_error(rc, out, err, "--tcp-keepalive", "10s:1s:500")


@pytest.mark.skipif(_core.HAVE_KEEPALIVE_TIMERS, reason="this build has the keepalive timers")
def test_tcp_keepalive_timers_are_refused_by_a_build_without_them():
    from fastproxy import ConfigError, Proxy
    with pytest.raises(ConfigError) as info:
        Proxy("127.0.0.1:0", "127.0.0.1:9", tcp_keepalive="60s:10s:6")
    assert str(info.value).startswith("tcp_keepalive: '60s:10s:6': cannot be used here")
    Proxy("127.0.0.1:0", "127.0.0.1:9", tcp_keepalive="on")   # SO_KEEPALIVE alone is everywhere


TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)   # Linux's number; Python 3.11 lacks the name
needs_user_timeout = pytest.mark.skipif(not _core.HAVE_TCP_USER_TIMEOUT, reason="this build has no TCP_USER_TIMEOUT")


@pytest.mark.linux_only
@needs_user_timeout
def test_tcp_user_timeout_is_set_on_both_bridge_sockets(make_proxy, echo_server, engine):
    p = make_proxy(echo_server.addr, workers=1, tcp_user_timeout="2500ms")
    with connect(p.address) as c:
        for side in _bridge_sockets(p, echo_server, c):
            with side:
                assert side.getsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT) == 2500


@pytest.mark.linux_only
@needs_user_timeout
def test_tcp_user_timeout_is_off_by_default_and_a_reload_turns_it_off_for_new_clients(engine, echo_server):
    steps = [{}, {"tcp_user_timeout": "3s"}, {"tcp_user_timeout": "off"}]
    for options, side in _across_reloads(engine, echo_server, steps):
        expect = 3000 if options.get("tcp_user_timeout") == "3s" else 0
        assert side.getsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT) == expect, options


@pytest.mark.parametrize("text, expect", [("2s", 2.0), ("1500ms", 1.5), (3, 3.0), ("1ms", 0.001), ("off", None),
                                          ("0", None), (0, None), (None, None)])
def test_tcp_user_timeout_values(text, expect):
    from fastproxy.values import parse_tcp_user_timeout
    if expect is not None and not _core.HAVE_TCP_USER_TIMEOUT:
        pytest.skip("this build has no TCP_USER_TIMEOUT")
    assert parse_tcp_user_timeout(text, "tcp_user_timeout") == expect


@pytest.mark.skipif(not _core.HAVE_TCP_USER_TIMEOUT, reason="this build has no TCP_USER_TIMEOUT")
def test_tcp_user_timeout_takes_every_whole_millisecond():
    """Written in ms or in s: a float's error (0.036 * 1000 is not 36) must
    not refuse a whole number of milliseconds, nor move it."""
    from fastproxy.values import parse_tcp_user_timeout
    for ms in list(range(1, 5000)) + [86_400_000, 2_147_483_647]:
        for text in ("%dms" % ms, "%.3fs" % (ms / 1000)):
            assert round(parse_tcp_user_timeout(text, "tcp_user_timeout") * 1000) == ms, text
            assert parse_tcp_user_timeout(text, "tcp_user_timeout") == ms / 1000, text


@pytest.mark.parametrize("value", ["1.5ms", "0.0001", "600h", "2147483648ms", "-1s", "24d", "soon", True])
def test_tcp_user_timeout_refuses(value):
    from fastproxy import ConfigError, Proxy
    with pytest.raises(ConfigError) as info:
        Proxy("127.0.0.1:0", "127.0.0.1:9", tcp_user_timeout=value)
    assert str(info.value).startswith("tcp_user_timeout: ") and "\n" not in str(info.value)


def test_cli_refuses_a_bad_tcp_user_timeout_in_one_line():
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--tcp-user-timeout", "1.5ms"])
    assert_one_line_error(rc, out, err, "--tcp-user-timeout", "1.5ms", "whole milliseconds")


HOST_CONGESTION = "/proc/sys/net/ipv4/tcp_congestion_control"


def _congestion(sock):
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()


def _host_congestion():
    with open(HOST_CONGESTION) as f:
        return f.read().strip()


def _settable(name):
    """Whether this process may set `name` (root may set any loaded one)."""
    try:
        with socket.socket() as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        return True
    except OSError:
        return False


needs_congestion = pytest.mark.skipif(not _core.HAVE_TCP_CONGESTION or not os.path.exists(HOST_CONGESTION),
                                      reason="this build or platform has no TCP_CONGESTION")


@pytest.mark.linux_only
@needs_congestion
def test_congestion_control_is_set_on_both_bridge_sockets(make_proxy, echo_server, engine):
    # One that is not the host's, so the host's default cannot pass for it.
    name = "reno" if _host_congestion() != "reno" else "cubic"
    if not _settable(name):
        pytest.skip(f"this process may not set {name} (tcp_allowed_congestion_control)")
    p = make_proxy(echo_server.addr, workers=1, congestion_control=name)
    with connect(p.address) as c:
        for side in _bridge_sockets(p, echo_server, c):
            with side:
                assert _congestion(side) == name


@pytest.mark.linux_only
@needs_congestion
def test_congestion_control_host_keeps_the_hosts(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, workers=1, congestion_control="host")
    with connect(p.address) as c:
        for side in _bridge_sockets(p, echo_server, c):
            with side:
                assert _congestion(side) == _host_congestion()


# Runs in a network namespace whose own default is reno (the sysctl is per
# namespace), so that "auto"'s cubic cannot be the host's passing for it:
# a proxy from the API, an echo upstream on the namespace's loopback, and a
# client on loopback too, or (argv[3] "outside") the test's, over the veth
# pair. Prints the proxy's port, then, once a line comes on stdin (the
# client's bridge is up), the algorithm of the proxy's two sockets of it,
# found among this process's own: the one on the proxy's port ("client
# side"), the one connected to the echo server ("upstream side").
NS_CONGESTION = """
import json, os, socket, sys, threading
from fastproxy import Proxy

echo = socket.create_server(("127.0.0.1", 0))
def serve():
    while True:
        s, _ = echo.accept()
        threading.Thread(target=lambda s=s: [s.sendall(d) for d in iter(lambda: s.recv(65536), b"")],
                         daemon=True).start()
threading.Thread(target=serve, daemon=True).start()
p = Proxy("0.0.0.0:0", "127.0.0.1:%d" % echo.getsockname()[1], engine=sys.argv[1], workers=1,
          **json.loads(sys.argv[2])).start()
print(p.address[1], flush=True)
if sys.argv[3] == "loopback":
    c = socket.create_connection(("127.0.0.1", p.address[1]), timeout=5)
    c.sendall(b"ping")
    assert c.recv(4) == b"ping"
sys.stdin.readline()
sides = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        s = socket.socket(fileno=os.dup(int(fd)))
    except OSError:
        continue
    try:
        if s.type == socket.SOCK_STREAM and s.family == socket.AF_INET:
            cc = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\\0")[0].decode()
            if s.getsockname()[1] == p.address[1] and s.getpeername():
                sides["client side"] = cc
            elif s.getpeername()[1] == echo.getsockname()[1]:
                sides["upstream side"] = cc
    except OSError:
        pass   # a listening socket has no peer
    s.close()
print(json.dumps(sides), flush=True)
sys.stdin.read()
os._exit(0)   # what is checked is read: no graceful stop to wait for
"""


def _congestion_in_namespace(netns, engine, client, preload=None, **options):
    """{"client side": algorithm, "upstream side": algorithm} of the proxy's
    two sockets of one bridge, in `netns` with reno as its default; the
    proxy's process with `preload` as LD_PRELOAD."""
    ip = ["ip", "netns", "exec", netns]
    subprocess.run(ip + ["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    subprocess.run(ip + ["sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno"], check=True, timeout=10)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    if preload is not None:
        env["LD_PRELOAD"] = preload
    proc = subprocess.Popen(ip + [sys.executable, "-c", NS_CONGESTION, engine, json.dumps(options), client],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    outside = None
    try:
        port = int(proc.stdout.readline())
        if client == "outside":
            outside = connect((NS_SIDE, port))
            outside.sendall(b"ping")
            assert recv_exact(outside, 4) == b"ping"
        proc.stdin.write("\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())
    finally:
        if outside is not None:
            outside.close()
        proc.stdin.close()
        proc.wait(timeout=15)
        proc.stdout.close()


def _available_congestion():
    try:
        with open(AVAILABLE_CONGESTION) as f:
            return set(f.read().split())
    except OSError:
        return set()


needs_namespace_congestion = pytest.mark.skipif(
    not _core.HAVE_TCP_CONGESTION or not {"reno", "cubic"} <= _available_congestion(),
    reason="this build or kernel has no TCP_CONGESTION with reno and cubic")


@pytest.mark.linux_only
@needs_namespace_congestion
def test_congestion_control_auto_is_cubic_on_loopback_sockets(netns, engine):
    """The default: a bridge whose client and upstream are both on loopback
    runs cubic on both of the proxy's sockets, whatever the host's default
    (reno in this namespace): BBR, a common default, reorders the proxy's
    own sending on loopback (docs/benchmarks.md)."""
    sides = _congestion_in_namespace(netns, engine, "loopback")
    assert sides == {"client side": "cubic", "upstream side": "cubic"}


@pytest.mark.linux_only
@needs_namespace_congestion
def test_congestion_control_auto_leaves_a_peer_that_is_not_loopback_to_the_host(netns, engine):
    """A client over the veth pair keeps the namespace's default on its
    socket; the same bridge's loopback upstream runs cubic."""
    sides = _congestion_in_namespace(netns, engine, "outside")
    assert sides == {"client side": "reno", "upstream side": "cubic"}


@pytest.mark.linux_only
@needs_namespace_congestion
@pytest.mark.parametrize("value, expect", [("host", "reno"), ("cubic", "cubic")])
def test_congestion_control_set_applies_to_every_socket(netns, engine, value, expect):
    """"host" keeps the host's on loopback too; a name is set on a socket
    whose peer is not loopback too."""
    sides = _congestion_in_namespace(netns, engine, "outside", congestion_control=value)
    assert sides == {"client side": expect, "upstream side": expect}


@pytest.fixture(scope="module")
def no_cubic(tmp_path_factory):
    """A shared object that, preloaded, makes setting cubic fail with EPERM
    (tests/support/no_cubic.c): this process, as root, may set any loaded
    algorithm, and the allowed list is host-wide."""
    source = os.path.join(os.path.dirname(__file__), "support", "no_cubic.c")
    out = str(tmp_path_factory.mktemp("preload") / "no_cubic.so")
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-o", out, source, "-ldl"], check=True, timeout=60,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C compiler to build the preload shim: {exc}")
    return out


@pytest.mark.linux_only
@needs_namespace_congestion
def test_congestion_control_auto_keeps_the_hosts_where_cubic_may_not_be_set(netns, engine, no_cubic):
    """auto never fails the start: where this process may not set cubic
    (no CAP_NET_ADMIN, not allowed), the bridge runs on the host's
    algorithm (reno in this namespace) and flows."""
    sides = _congestion_in_namespace(netns, engine, "loopback", preload=no_cubic)
    assert sides == {"client side": "reno", "upstream side": "reno"}


@pytest.mark.linux_only
@needs_congestion
def test_cli_names_a_congestion_control_it_may_not_set_in_one_line(no_cubic, echo_server):
    """A name given outright that this process may not set fails the
    start: one line naming the option and the value, exit 2."""
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                            "--congestion-control", "cubic"], env={"LD_PRELOAD": no_cubic})
    assert_one_line_error(rc, out, err, "--congestion-control", "'cubic'", "tcp_allowed_congestion_control")


@pytest.mark.parametrize("value", ["", "no such", "x" * 16, "tcp-x", 5, "nosuchalgorithm"])
def test_congestion_control_refuses(value):
    from fastproxy import ConfigError, Proxy
    with pytest.raises(ConfigError) as info:
        Proxy("127.0.0.1:0", "127.0.0.1:9", congestion_control=value)
    assert "congestion_control" in str(info.value) and str(value) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.linux_only
@needs_congestion
def test_a_reload_back_to_the_hosts_congestion_control_reaches_new_clients(engine, echo_server):
    """Set per client, not on the shared listening socket (whose setting
    Linux passes on to the sockets it accepts): a reload that drops it
    leaves new clients with the host's algorithm."""
    name = "reno" if _host_congestion() != "reno" else "cubic"
    if not _settable(name):
        pytest.skip(f"this process may not set {name} (tcp_allowed_congestion_control)")
    steps = [{"congestion_control": cc} for cc in (name, None, name)]
    for options, side in _across_reloads(engine, echo_server, steps):
        assert _congestion(side) == (options["congestion_control"] or _host_congestion()), options


@pytest.mark.parametrize("text, expect", [("auto", "auto"), (" AUTO ", "auto"), ("host", None), ("Host", None),
                                          (None, None)])
def test_congestion_control_words(text, expect):
    from fastproxy.values import parse_congestion_control
    assert parse_congestion_control(text, "congestion_control") == expect
