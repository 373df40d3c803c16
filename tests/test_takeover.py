"""Zero-downtime restarts by listening-socket takeover (--takeover PATH):
real processes, a client loop connecting all the while, and bridges that
stream through the old process while a new one takes its sockets."""
import json
import os
import random
import shutil
import socket
import struct
import tempfile
import threading
import time

import pytest

from fastproxy import ConfigError
from fastproxy.takeover import TakeoverServer, take_over
from support.cli import CliProxy, assert_one_line_error, run_cli
from support.sockets import connect, echo_roundtrip, recv_exact, recv_until_eof
from support.waits import wait_for

BRIDGES = 50
CHUNK = 8192


@pytest.fixture
def sock_dir():
    # Short: a Unix socket path holds at most 107 bytes, pytest's tmp_path
    # can be longer.
    d = tempfile.mkdtemp(prefix="fp-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs():
    made = []
    yield made
    for p in made:
        p.kill()


def start_proxy(procs, engine, upstream, path, *extra):
    cp = CliProxy(["--listen", "127.0.0.1:0", "--upstream", upstream, "--takeover", path,
                   "--engine", engine, "--workers", "2"] + list(extra))
    procs.append(cp)
    return cp


class ClientLoop:
    """New clients one after another, each an echo exchange; every failure
    (refused, reset, short echo) is kept."""

    def __init__(self, addr):
        self.addr = addr
        self.ok = 0
        self.failures = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        i = 0
        while not self._stop.is_set():
            msg = b"client %d" % i
            try:
                got = echo_roundtrip(self.addr, msg)
                if got == msg:
                    self.ok += 1
                else:
                    self.failures.append("client %d: echo %r" % (i, got))
            except OSError as e:
                self.failures.append("client %d: %r" % (i, e))
            i += 1
            time.sleep(0.002)

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()


class ClientLoops:
    """Several client loops at once, so clients are in flight (in the
    backlog, being accepted) at the moment of each handover."""

    def __init__(self, addr, n):
        self.loops = [ClientLoop(addr) for _ in range(n)]

    @property
    def ok(self):
        return sum(loop.ok for loop in self.loops)

    @property
    def failures(self):
        return [f for loop in self.loops for f in loop.failures]

    def stop(self):
        for loop in self.loops:
            loop.stop()


class StreamingBridge:
    """One connection echoing chunks of its own bytes until told to finish;
    each echo is compared with what was sent."""

    def __init__(self, addr, seed):
        self.sock = connect(addr)
        self.sock.settimeout(10)
        rnd = random.Random(seed)
        self.block = bytes(rnd.getrandbits(8) for _ in range(CHUNK * 4))
        self.echoed = 0
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            n = 0
            while not self._stop.is_set():
                off = (n % 4) * CHUNK
                chunk = self.block[off:off + CHUNK]
                self.sock.sendall(chunk)
                got = recv_exact(self.sock, CHUNK)
                if got != chunk:
                    raise AssertionError("chunk %d echoed wrong" % n)
                self.echoed += CHUNK
                n += 1
                time.sleep(0.005)
            self.sock.shutdown(socket.SHUT_WR)
            rest = recv_until_eof(self.sock)
            if rest:
                raise AssertionError("%d bytes after the exchange" % len(rest))
        except BaseException as e:  # noqa: B902 - reported by finish()
            self.error = e
        finally:
            self.sock.close()

    def finish(self):
        self._stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive()
        return self.error


def log_line(cp, pattern, timeout=10.0):
    m = cp.stderr.wait_line(pattern, timeout)
    assert m, "no line %r; stderr:\n%s" % (pattern, cp.stderr.text())
    return m


def test_takeover_loses_no_client_and_no_byte(engine, echo_server, sock_dir, procs):
    path = os.path.join(sock_dir, "takeover.sock")
    old = start_proxy(procs, engine, echo_server.addr, path, "--drain-timeout", "30s")
    assert os.stat(path).st_mode & 0o777 == 0o600
    addr = old.connect_addr()
    clients = ClientLoops(addr, 4)
    bridges = [StreamingBridge(addr, i) for i in range(BRIDGES)]
    try:
        assert wait_for(lambda: all(b.echoed >= CHUNK for b in bridges), 10)

        new = start_proxy(procs, engine, echo_server.addr, path, "--drain-timeout", "30s")
        assert new.address == old.address
        log_line(new, r"took 1 listening socket from process %d" % old.pid)
        log_line(old, r"process %d accepts now: stopping accepting and draining" % new.pid)
        before = [b.echoed for b in bridges]
        # The old process still carries its bridges after it stopped accepting.
        assert wait_for(lambda: all(b.echoed > n for b, n in zip(bridges, before)), 10)
        assert old.alive(), "the old process left before its bridges ended"
        ok_before = clients.ok
        assert wait_for(lambda: clients.ok > ok_before + 20, 10), "no new client served"
    finally:
        errors = [(i, b.finish()) for i, b in enumerate(bridges)]
    assert [e for e in errors if e[1] is not None] == []
    assert all(b.echoed > 0 for b in bridges)
    assert old.wait(20) == 0, old.stderr.text()
    assert "Traceback" not in old.stderr.text()

    # The new process serves the path now: the next upgrade works too.
    newer = start_proxy(procs, engine, echo_server.addr, path)
    assert newer.address == old.address
    log_line(newer, r"took 1 listening socket from process %d" % new.pid)
    assert new.wait(20) == 0, new.stderr.text()
    ok_before = clients.ok
    assert wait_for(lambda: clients.ok > ok_before + 20, 10)
    clients.stop()
    assert clients.failures == [], clients.failures[:5]
    assert clients.ok > 60
    assert echo_roundtrip(addr, b"newest") == b"newest"
    newer.signal(15)
    assert newer.wait(15) == 0
    assert not os.path.exists(path), "the last process left its endpoint behind"


def test_no_process_there_starts_fresh(any_engine, echo_server, sock_dir, procs):
    path = os.path.join(sock_dir, "t.sock")
    # A stale endpoint: a socket file nobody listens on.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    cp = start_proxy(procs, any_engine, echo_server.addr, path)
    log_line(cp, r"no process serves at .*connection refused.*starting fresh")
    assert echo_roundtrip(cp.connect_addr(), b"fresh") == b"fresh"
    # The stale file was replaced by a live endpoint.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(path)


def test_no_file_starts_fresh(any_engine, echo_server, sock_dir, procs):
    cp = start_proxy(procs, any_engine, echo_server.addr, os.path.join(sock_dir, "t.sock"))
    log_line(cp, r"no process serves at .*no such file.*starting fresh")


def test_a_path_that_is_not_a_socket_is_one_line(any_engine, sock_dir):
    path = os.path.join(sock_dir, "file")
    with open(path, "w") as f:
        f.write("mine")
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--takeover", path,
                            "--engine", any_engine])
    assert_one_line_error(rc, out, err, "--takeover", path)
    with open(path) as f:
        assert f.read() == "mine"


@pytest.mark.parametrize("path", ["", "/tmp/" + "x" * 120])
def test_bad_takeover_path_is_one_line(any_engine, path):
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--takeover", path])
    assert_one_line_error(rc, out, err, "--takeover")


def frame(message):
    body = json.dumps(message).encode()
    return struct.pack("!I", len(body)) + body


def read_frame(sock):
    (n,) = struct.unpack("!I", recv_exact(sock, 4))
    return json.loads(recv_exact(sock, n))


def test_version_mismatch_and_garbage_leave_the_old_process_serving(any_engine, echo_server, sock_dir, procs):
    path = os.path.join(sock_dir, "t.sock")
    old = start_proxy(procs, any_engine, echo_server.addr, path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(path)
        c.sendall(frame({"type": "hello", "version": 99, "pid": 1}))
        answer = read_frame(c)
        assert answer["type"] == "error" and "version" in answer["error"]
    log_line(old, r"takeover by process 1 failed .*version 99")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(path)
        c.sendall(b"\x00\x00\x00\x05hello")
    log_line(old, r"takeover by process \? failed .*not JSON")
    # A new process that took the sockets and went away before "ready".
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(path)
        c.sendall(frame({"type": "hello", "version": 1, "pid": 2}))
        msg, fds, _, _ = socket.recv_fds(c, 4096, 4)
        for fd in fds:
            os.close(fd)
        assert len(fds) == 1
    log_line(old, r"takeover by process 2 failed")
    assert old.alive()
    assert echo_roundtrip(old.connect_addr(), b"still") == b"still"
    # And a real takeover still works after all that.
    new = start_proxy(procs, any_engine, echo_server.addr, path)
    assert new.address == old.address
    assert old.wait(15) == 0


def test_a_malformed_answer_is_one_line_and_nothing_starts(any_engine, sock_dir):
    path = os.path.join(sock_dir, "t.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def answer(reply):
        conn, _ = srv.accept()
        with conn:
            read_frame(conn)
            conn.sendall(reply)
            conn.recv(1)

    for reply, needle in [(frame({"type": "error", "version": 1, "error": "go away"}), "go away"),
                          (frame({"type": "sockets", "version": 2, "pid": 1, "listeners": []}), "version 2"),
                          (frame({"type": "sockets", "version": 1, "pid": 1, "listeners": [{"name": "x"}]}),
                           "fds for a listener list")]:
        t = threading.Thread(target=answer, args=(reply,), daemon=True)
        t.start()
        rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--takeover", path,
                                "--engine", any_engine])
        t.join(10)
        assert_one_line_error(rc, out, err, "--takeover", needle)
    srv.close()


def test_server_api_live_endpoint_is_an_error_and_close_keeps_a_newer_one(sock_dir):
    path = os.path.join(sock_dir, "api.sock")
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4)
        handed = threading.Event()
        first = TakeoverServer(path, lambda: {"web": lsock}, handed.set)
        first.publish(replace=False)
        second = TakeoverServer(path, lambda: {}, lambda: None)
        second.bind()
        with pytest.raises(ConfigError, match="another process serves takeovers there"):
            second.publish(replace=False)
        handover = take_over(path, timeout=5)
        assert handover is not None and handover.pid == os.getpid()
        sock = handover.take("web", ("127.0.0.1", 0))
        assert sock is not None and sock.getsockname() == lsock.getsockname()
        third = TakeoverServer(path, lambda: {"web": sock}, lambda: None)
        third.publish(replace=True)
        assert handover.ready()
        assert handed.wait(5)
        first.close()
        assert os.path.exists(path), "the old endpoint removed the new one's path"
        third.close()
        assert not os.path.exists(path)
        sock.close()


def test_in_process_proxies_hand_over(make_proxy_any, echo_server, sock_dir):
    """The same through the API: Proxy(takeover=PATH).start() takes the
    running Proxy's socket, and that one stops by itself."""
    path = os.path.join(sock_dir, "api.sock")
    first = make_proxy_any(echo_server.addr, takeover=path)
    live = connect(first.address)
    live.sendall(b"old")
    assert recv_exact(live, 3) == b"old"
    second = make_proxy_any(echo_server.addr, takeover=path)
    assert second.address == first.address
    assert echo_roundtrip(second.address, b"second") == b"second"
    live.sendall(b"still")
    assert recv_exact(live, 5) == b"still"
    live.close()
    assert wait_for(lambda: first._plane is None, 10), "the first proxy did not stop after the handover"
    assert first.stats()["accepted"] >= 1



def test_a_down_listener_stays_down_across_a_takeover(make_proxy_any, echo_server, sock_dir):
    """The new process finds the handed socket not listening: the listener
    is down there too (clients refused, is_down() True) until set up."""
    path = os.path.join(sock_dir, "down.sock")
    first = make_proxy_any(echo_server.addr, takeover=path)
    addr = first.address
    first.set_down(True)
    second = make_proxy_any(echo_server.addr, takeover=path)
    assert wait_for(lambda: first._plane is None, 10), "the first proxy did not stop after the handover"
    assert second.is_down()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr, timeout=2).close()
    assert second.stats()["accepted"] == 0
    second.set_down(False)
    assert not second.is_down() and second.address == addr
    assert echo_roundtrip(addr, b"up again") == b"up again"

def test_every_listener_is_handed_over_by_name(any_engine, echo_server, sock_dir):
    """A process of two named listeners (one on port 0) hands both sockets
    to its successor, which matches them by name and binds a listener of
    its own that the old process did not have."""
    from fastproxy import Config, Proxy

    path = os.path.join(sock_dir, "names.sock")

    def configs(extra=()):
        out = [Config.build(name="a", listen="127.0.0.1:0", upstreams=[echo_server.addr], takeover=path,
                            engine=any_engine, workers=2),
               Config.build(name="b", listen="127.0.0.1:0", upstreams=[echo_server.addr], takeover=path,
                            engine=any_engine, workers=2)]
        return out + list(extra)

    first = Proxy.from_config(configs()).start()
    try:
        live = connect(first.addresses["b"])
        live.sendall(b"old")
        assert recv_exact(live, 3) == b"old"
        extra = Config.build(name="c", listen="127.0.0.1:0", upstreams=[echo_server.addr], takeover=path,
                             engine=any_engine, workers=2)
        second = Proxy.from_config(configs([extra])).start()
        try:
            assert {n: second.addresses[n] for n in ("a", "b")} == first.addresses
            for name in ("a", "b", "c"):
                assert echo_roundtrip(second.addresses[name], name.encode()) == name.encode()
            live.sendall(b"still")
            assert recv_exact(live, 5) == b"still"
            live.close()
            assert wait_for(lambda: first._plane is None, 10), "the first proxy did not stop"
        finally:
            second.stop()
    finally:
        first.stop()


def test_unix_listener_and_stats_endpoint_are_handed_over_with_their_files(make_proxy_any, echo_server, sock_dir):
    """The new process takes the Unix listener and the stats endpoint's
    socket; the old one's stop leaves their files (the new one serves on
    them) and the new one's stop removes them."""
    import urllib.request

    path = os.path.join(sock_dir, "t.sock")
    listen, stats = os.path.join(sock_dir, "l.sock"), os.path.join(sock_dir, "s.sock")
    first = make_proxy_any(echo_server.addr, listen=f"unix:{listen}", stats=f"unix:{stats}", takeover=path)
    second = make_proxy_any(echo_server.addr, listen=f"unix:{listen}", stats=f"unix:{stats}", takeover=path)
    assert wait_for(lambda: first._plane is None, 10), "the first proxy did not stop after the handover"
    assert os.path.exists(listen) and os.path.exists(stats)
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(listen)
        c.sendall(b"after")
        assert recv_exact(c, 5) == b"after"
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(stats)
        c.sendall(b"GET /stats HTTP/1.0\r\n\r\n")
        assert b"200" in recv_until_eof(c).split(b"\r\n", 1)[0]
    second.stop()
    assert not os.path.exists(listen) and not os.path.exists(stats)


def test_a_listener_name_must_be_printable():
    from fastproxy import Config

    with pytest.raises(ConfigError, match="printable"):
        Config.build(name="a\0b", listen="127.0.0.1:0", upstreams=["127.0.0.1:9"])
