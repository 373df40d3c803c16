"""True half-open clients: 5,000 clients bridged through a proxy, then
their network vanishes without a FIN or an RST. The proxy, its upstream
and the clients run in two network namespaces the test makes (a veth pair
with link-local addresses between them; the host's interfaces are never
touched). New clients are still served promptly, and the half-open bridges
are reaped by idle_timeout, or, without it, by tcp_keepalive (off by
default: docs/reliability.md, Half-open clients). Each process holds at
most about 10,000 descriptors (the proxy: a client and an upstream socket
per bridge), inside the 20,000 open files each may have. Needs root and
iproute2's `ip`."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from fastproxy import _core
from support.cli import subprocess_env
from support.sockets import stats_over_unix
from support.waits import wait_for

N = 5000
IDLE_TIMEOUT = 6.0
PORT = 8080   # inside the test's own namespace: nothing else listens there
PROXY_IP, CLIENT_IP = "169.254.77.1", "169.254.77.2"

pytestmark = [pytest.mark.linux_only, pytest.mark.slow,
              pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root (netns)"),
              pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")]

ECHO = r"""
import os, selectors, socket, sys
lsock = socket.socket()
lsock.bind(("127.0.0.1", 0))
lsock.listen(4096)
lsock.setblocking(False)
print(lsock.getsockname()[1], flush=True)
sel = selectors.DefaultSelector()
sel.register(lsock, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is lsock:
            try:
                conn, _ = lsock.accept()
            except OSError:
                continue
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ)
        else:
            try:
                data = key.fileobj.recv(65536)
            except OSError:
                data = b""
            if data:
                key.fileobj.send(data)
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()
"""

CLIENTS = r"""
import resource, socket, sys
n, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 256, max(n + 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
held = []
# In batches: one connection at a time, 5,000 round trips through the poll
# engine (each wait over every socket) outlast idle_timeout.
while len(held) < n:
    batch = [socket.create_connection((host, port), timeout=10) for _ in range(min(500, n - len(held)))]
    for s in batch:
        s.sendall(b"h")
    for s in batch:
        assert s.recv(1) == b"h"
    held += batch
# Once more on all of them at once: their idle timers start together.
for s in held:
    s.sendall(b"t")
for i, s in enumerate(held):
    got = s.recv(1)
    assert got == b"t", (i, got)
print("ready", flush=True)
sys.stdin.read()
"""

PROBE = r"""
import socket, sys, time
worst = 0.0
for i in range(int(sys.argv[1])):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5) as s:
        s.sendall(b"new")
        got = b""
        while len(got) < 3:
            chunk = s.recv(3)
            assert chunk, "closed"
            got += chunk
        assert got == b"new"
    worst = max(worst, time.monotonic() - t0)
print("%.4f" % worst, flush=True)
"""


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespaces():
    tag = "fp%d" % os.getpid()
    proxy_ns, client_ns = tag + "p", tag + "c"
    try:
        _ip("netns", "add", proxy_ns)
    except subprocess.CalledProcessError as e:
        pytest.skip("cannot make a network namespace: %s" % e.stderr.decode(errors="replace").strip())
    try:
        _ip("netns", "add", client_ns)
        for ns in (proxy_ns, client_ns):
            _ip("-n", ns, "link", "set", "lo", "up")
        # Made inside the proxy's namespace, its peer moved straight to
        # the clients': no end of it is ever on the host.
        _ip("-n", proxy_ns, "link", "add", "vp", "type", "veth", "peer", "name", "vc", "netns", client_ns)
        _ip("-n", proxy_ns, "addr", "add", PROXY_IP + "/30", "dev", "vp")
        _ip("-n", client_ns, "addr", "add", CLIENT_IP + "/30", "dev", "vc")
        _ip("-n", proxy_ns, "link", "set", "vp", "up")
        _ip("-n", client_ns, "link", "set", "vc", "up")
        yield proxy_ns, client_ns
    finally:
        for ns in (client_ns, proxy_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _in(ns, argv, **kw):
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=subprocess_env(), **kw)


# Timed: 200 new clients within idle_timeout, each within 0.5 s; on CPUs
# other tests share, the probe alone can take longer.
@pytest.mark.serial
def test_half_open_clients_do_not_stop_new_ones_and_are_reaped(namespaces, engine, tmp_path):
    proxy_ns, client_ns = namespaces
    stats_sock = str(tmp_path / "stats.sock")
    procs = []
    try:
        echo = _in(proxy_ns, [sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
        procs.append(echo)
        echo_port = int(echo.stdout.readline())
        proxy = _in(proxy_ns, [sys.executable, "-m", "fastproxy", "--listen", "0.0.0.0:%d" % PORT,
                               "--upstream", "127.0.0.1:%d" % echo_port, "--engine", engine, "--workers", "2",
                               "--idle-timeout", "%gs" % IDLE_TIMEOUT, "--stats", "unix:" + stats_sock,
                               "--log-level", "warning"])
        procs.append(proxy)
        assert wait_for(lambda: os.path.exists(stats_sock), 15), "the proxy did not start"
        clients = _in(client_ns, [sys.executable, "-c", CLIENTS, str(N), PROXY_IP, str(PORT)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(clients)
        assert clients.stdout.readline().strip() == "ready"
        assert wait_for(lambda: stats_over_unix(stats_sock)["active"] == N, 10), stats_over_unix(stats_sock)["active"]

        # Their network vanishes (the veth pair goes with its end), then
        # the clients themselves: nothing they send reaches the proxy.
        _ip("-n", client_ns, "link", "del", "vc")
        vanished = time.monotonic()
        clients.send_signal(signal.SIGKILL)
        clients.wait(10)
        assert stats_over_unix(stats_sock)["active"] == N, "the bridges should be half-open, not closed"

        probe = _in(proxy_ns, [sys.executable, "-c", PROBE, "200", str(PORT)], stdout=subprocess.PIPE, text=True)
        out, _ = probe.communicate(timeout=60)
        assert probe.returncode == 0
        worst = float(out)
        assert worst < 0.5, "a new client waited %.3f s among %d half-open bridges" % (worst, N)
        assert time.monotonic() - vanished < IDLE_TIMEOUT, "the probe ran past idle_timeout: nothing shown"
        # The probe's last bridge may still be closing (its FIN not yet
        # read by a busy worker): the half-open ones are what must remain.
        assert wait_for(lambda: stats_over_unix(stats_sock)["active"] == N, 2), stats_over_unix(stats_sock)["active"]

        assert wait_for(lambda: stats_over_unix(stats_sock)["active"] == 0, IDLE_TIMEOUT + 10), stats_over_unix(stats_sock)["active"]
        reaped = time.monotonic() - vanished
        st = stats_over_unix(stats_sock)
        assert st["accepted"] >= N + 200
        print("half-open: %d bridges reaped %.1f s after their clients vanished (idle_timeout %g s); "
              "slowest of 200 new clients meanwhile: %.1f ms" % (N, reaped, IDLE_TIMEOUT, worst * 1e3))
    finally:
        _stop_all(procs)


def _stop_all(procs):
    """Stops the test's processes, the last started first, and closes their pipes."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()


def _unacked(ns):
    """How many of the proxy's sockets to the clients have bytes in Send-Q."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htn", "state", "established", "dst", CLIENT_IP],
                         check=True, capture_output=True, text=True, timeout=10).stdout
    return sum(1 for line in out.splitlines() if line.split()[1] != "0")


def _timers(ns, dst):
    """The timer `ss -o` shows on each established socket to dst."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htno", "state", "established", "dst", dst],
                         check=True, capture_output=True, text=True, timeout=10).stdout
    return [line.split("timer:(")[1].split(",")[0] if "timer:(" in line else "none" for line in out.splitlines()]


KA_CLIENTS = 200
KA_IDLE, KA_INTERVAL, KA_COUNT = 1, 1, 2


@pytest.mark.skipif(not _core.HAVE_KEEPALIVE_TIMERS, reason="this build has no TCP_KEEPIDLE/TCP_KEEPINTVL/TCP_KEEPCNT")
def test_tcp_keepalive_reaps_half_open_clients_without_idle_timeout(namespaces, engine, tmp_path):
    """No idle_timeout: only the kernel's keepalive probes, unanswered by
    the vanished clients, end the bridges. The kernel fails each client
    socket with ETIMEDOUT after IDLE + COUNT x INTERVAL (3 s here); the
    bridge ends with CLIENT_RESET (the client's end is gone; its upstream
    gets an RST) and is counted like any other close."""
    proxy_ns, client_ns = namespaces
    stats_sock = str(tmp_path / "stats.sock")
    access_log = tmp_path / "access.log"
    procs = []
    try:
        echo = _in(proxy_ns, [sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
        procs.append(echo)
        echo_port = int(echo.stdout.readline())
        proxy = _in(proxy_ns, [sys.executable, "-m", "fastproxy", "--listen", "0.0.0.0:%d" % PORT,
                               "--upstream", "127.0.0.1:%d" % echo_port, "--engine", engine, "--workers", "2",
                               "--tcp-keepalive", "%ds:%ds:%d" % (KA_IDLE, KA_INTERVAL, KA_COUNT),
                               "--access-log", str(access_log), "--access-log-format", "reason",
                               "--stats", "unix:" + stats_sock, "--log-level", "warning"])
        procs.append(proxy)
        assert wait_for(lambda: os.path.exists(stats_sock), 15), "the proxy did not start"
        clients = _in(client_ns, [sys.executable, "-c", CLIENTS, str(KA_CLIENTS), PROXY_IP, str(PORT)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(clients)
        assert clients.stdout.readline().strip() == "ready"
        assert wait_for(lambda: stats_over_unix(stats_sock)["active"] == KA_CLIENTS, 10)

        # Keepalive probes only a socket with nothing in flight: one whose
        # last bytes await an ACK (the clients' ACKs of "t" may still be
        # delayed) is in retransmission instead, which tcp_keepalive does
        # not shorten (net.ipv4.tcp_retries2: about 15 minutes).
        assert wait_for(lambda: _unacked(proxy_ns) == 0, 5), "the proxy's sends were not all acknowledged"
        # Seen from outside the proxy: the kernel's keepalive timer runs on
        # both sockets of every bridge (the echo server's own sockets have none).
        for dst in (CLIENT_IP, "127.0.0.1:%d" % echo_port):
            timers = _timers(proxy_ns, dst)
            assert len(timers) == KA_CLIENTS and set(timers) == {"keepalive"}, (dst, timers[:5])
        # Their address goes, the link stays: the proxy's probes still
        # leave (with the link gone they would fail to send, and the kernel
        # retries a probe that could not be sent without counting it), and
        # reach a namespace that drops them.
        _ip("-n", client_ns, "addr", "flush", "dev", "vc")
        vanished = time.monotonic()
        clients.send_signal(signal.SIGKILL)
        clients.wait(10)
        assert stats_over_unix(stats_sock)["active"] == KA_CLIENTS, "the bridges should be half-open, not closed"

        expected = KA_IDLE + KA_COUNT * KA_INTERVAL
        assert wait_for(lambda: stats_over_unix(stats_sock)["active"] == 0, expected + 10), \
            stats_over_unix(stats_sock)["active"]
        reaped = time.monotonic() - vanished
        # Not before the probes could have failed: keepalive did it, not something else.
        assert reaped >= expected - 1.0, reaped
        assert wait_for(lambda: access_log.exists() and len(access_log.read_text().splitlines()) == KA_CLIENTS, 10)
        reasons = {json.loads(line)["reason"] for line in access_log.read_text().splitlines()}
        assert reasons == {"CLIENT_RESET"}, reasons
        print("keepalive: %d half-open bridges reaped %.1f s after their clients vanished (tcp_keepalive "
              "%ds:%ds:%d, no idle_timeout)" % (KA_CLIENTS, reaped, KA_IDLE, KA_INTERVAL, KA_COUNT))
    finally:
        _stop_all(procs)


# The echo server, and on each line on its stdin it sends "late" on every
# connection: bytes the proxy then forwards to clients that are gone.
PUSH = ECHO.replace("sel.register(lsock, selectors.EVENT_READ)\n", """sel.register(lsock, selectors.EVENT_READ)
sel.register(sys.stdin, selectors.EVENT_READ)
conns = []
""").replace("        if key.fileobj is lsock:", """        if key.fileobj is sys.stdin:
            sys.stdin.readline()
            for c in conns:
                c.send(b"late")
            print(len(conns), flush=True)
        elif key.fileobj is lsock:""").replace("            sel.register(conn, selectors.EVENT_READ)\n", """            sel.register(conn, selectors.EVENT_READ)
            conns.append(conn)
""")

UT_CLIENTS = 100
USER_TIMEOUT = 2.0


@pytest.mark.skipif(not _core.HAVE_TCP_USER_TIMEOUT, reason="this build has no TCP_USER_TIMEOUT")
def test_tcp_user_timeout_reaps_half_open_clients_with_bytes_in_flight(namespaces, engine, tmp_path):
    """Bytes on their way to clients that vanished: keepalive cannot probe
    such a socket (it is retransmitting), so without tcp_user_timeout the
    bridges stay for net.ipv4.tcp_retries2 (about 15 minutes). Two proxies
    side by side, one with tcp_user_timeout = 2s: its bridges end about 2 s
    after the bytes were sent, as CLIENT_RESET; the other's are still there
    then, retransmitting."""
    proxy_ns, client_ns = namespaces
    procs = []
    socks = {k: str(tmp_path / (k + ".sock")) for k in ("ut", "plain")}
    access_log = tmp_path / "access.log"
    try:
        push = _in(proxy_ns, [sys.executable, "-c", PUSH], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(push)
        push_port = int(push.stdout.readline())
        for i, (kind, extra) in enumerate((("ut", ["--tcp-user-timeout", "%gs" % USER_TIMEOUT, "--access-log",
                                                   str(access_log), "--access-log-format", "reason"]),
                                           ("plain", []))):
            procs.append(_in(proxy_ns, [sys.executable, "-m", "fastproxy", "--listen", "0.0.0.0:%d" % (PORT + i),
                                        "--upstream", "127.0.0.1:%d" % push_port, "--engine", engine,
                                        "--workers", "2", "--stats", "unix:" + socks[kind], "--log-level", "warning",
                                        *extra]))
        for kind in socks:
            assert wait_for(lambda: os.path.exists(socks[kind]), 15), "proxy %s did not start" % kind
        clients = []
        for i in range(2):
            clients.append(_in(client_ns, [sys.executable, "-c", CLIENTS, str(UT_CLIENTS), PROXY_IP, str(PORT + i)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            procs.append(clients[-1])
        for c in clients:
            assert c.stdout.readline().strip() == "ready"

        def active(kind):
            return stats_over_unix(socks[kind])["active"]

        assert wait_for(lambda: active("ut") == UT_CLIENTS and active("plain") == UT_CLIENTS, 10)
        assert wait_for(lambda: _unacked(proxy_ns) == 0, 5), "the proxy's sends were not all acknowledged"
        # The clients' address goes (the link stays, so segments still
        # leave and are dropped there), then the clients themselves.
        _ip("-n", client_ns, "addr", "flush", "dev", "vc")
        for c in clients:
            c.send_signal(signal.SIGKILL)
            c.wait(10)
        push.stdin.write("\n")
        push.stdin.flush()
        assert int(push.stdout.readline()) == 2 * UT_CLIENTS
        sent = time.monotonic()
        # Every bridge now has bytes the vanished client will never ack.
        assert wait_for(lambda: _unacked(proxy_ns) == 2 * UT_CLIENTS, 5), _unacked(proxy_ns)

        assert wait_for(lambda: active("ut") == 0, USER_TIMEOUT + 10), active("ut")
        reaped = time.monotonic() - sent
        assert reaped >= USER_TIMEOUT - 0.5, reaped
        # The control: the same bridges without it, still there, retransmitting.
        assert active("plain") == UT_CLIENTS
        timers = _timers(proxy_ns, CLIENT_IP)
        assert len(timers) == UT_CLIENTS and set(timers) == {"on"}, timers[:5]
        assert wait_for(lambda: access_log.exists() and len(access_log.read_text().splitlines()) == UT_CLIENTS, 10)
        reasons = {json.loads(line)["reason"] for line in access_log.read_text().splitlines()}
        assert reasons == {"CLIENT_RESET"}, reasons
        print("tcp_user_timeout: %d bridges with unacked bytes to vanished clients reaped %.1f s after the bytes "
              "were sent (tcp_user_timeout %gs); without it all %d still there" % (UT_CLIENTS, reaped, USER_TIMEOUT,
                                                                                  UT_CLIENTS))
    finally:
        _stop_all(procs)
