"""The scripts in examples/ run as their docstrings say, against loopback servers."""
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from support.cli import LISTEN_RX, LineReader, subprocess_env
from support.servers import TagServer, tag_of
from support.sockets import (closed_by_peer, connect, connect_from, echo_roundtrip, parse_addr,
                             read_all, recv_exact)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


class Script:
    """A command in a subprocess, ready once it logged 'listening on' (stderr)."""

    def __init__(self, cmd, engine, ready_timeout=20.0):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=os.path.dirname(EXAMPLES),
                                     env=subprocess_env({"FASTPROXY_ENGINE": engine}))
        self.stdout = LineReader(self.proc.stdout)
        self.stderr = LineReader(self.proc.stderr)
        m = self.stderr.wait_line(LISTEN_RX, ready_timeout)
        if m is None:
            self.kill()
            raise AssertionError("no 'listening on' within %.0fs; rc=%r stderr:\n%s"
                                 % (ready_timeout, self.proc.poll(), self.stderr.text()))
        assert engine in m.string, m.string
        self.address = parse_addr(m.group(1))

    def stop(self, timeout=10):
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stdout.join(2)
        self.stderr.join(2)


@pytest.fixture
def run_script(engine):
    started = []

    def run(*cmd):
        s = Script(list(cmd), engine)
        started.append(s)
        return s

    yield run
    for s in started:
        s.kill()


class LineServer:
    """Answers each line it receives with b"+OK <line>\\r\\n"; keeps every line."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.lines = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        buf = b""
        c.settimeout(10)
        with c:
            try:
                while True:
                    data = c.recv(4096)
                    if not data:
                        return
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        line = line.rstrip(b"\r")
                        self.lines.append(line)
                        c.sendall(b"+OK " + line + b"\r\n")
            except OSError:
                pass

    def close(self):
        self._stop = True
        self._t.join(5)
        self.sock.close()


def _doc_says(name, how):
    """The example's module docstring tells how to run it."""
    with open(os.path.join(EXAMPLES, name)) as f:
        doc = compile(f.read(), name, "exec").co_consts[0]
    assert isinstance(doc, str) and how in doc, (name, how)


def _ask(sock, line, pieces=1):
    step = max(1, len(line) // pieces)
    for i in range(0, len(line), step):
        sock.sendall(line[i:i + step])
        if pieces > 1:
            time.sleep(0.03)
    want = b"+OK " + line.rstrip(b"\r\n") + b"\r\n"
    return recv_exact(sock, len(want)) == want


def test_redis_filter_via_cli_hooks(run_script):
    _doc_says("redis_filter.py", "fastproxy --listen")
    _doc_says("redis_filter.py", "--hooks examples/redis_filter.py")
    srv = LineServer()
    try:
        p = run_script(sys.executable, "-m", "fastproxy", "--listen", "127.0.0.1:0",
                       "--upstream", srv.addr, "--hooks", "examples/redis_filter.py")
        with connect(p.address) as c:
            assert _ask(c, b"SET a 1\r\n")
            assert _ask(c, b"GET a\r\n", pieces=4)  # split: held with WAIT, then forwarded
            c.sendall(b"*1\r\n$4\r\nPING\r\n")  # RESP passes: the server answers 3 lines
            want = b"+OK *1\r\n+OK $4\r\n+OK PING\r\n"
            assert recv_exact(c, len(want)) == want
        for blocked in (b"FLUSHALL\r\n", b"flushall\r\n", b"*1\r\n$8\r\nFLUSHALL\r\n"):
            with connect(p.address) as c:
                assert _ask(c, b"PING\r\n")
                c.sendall(blocked)
                data, how = read_all(c, timeout=3)
                assert how is not None, "connection still open after %r" % blocked
                assert data == b""
        time.sleep(0.1)
        assert not any(ln.upper() == b"FLUSHALL" for ln in srv.lines), srv.lines
        assert b"SET a 1" in srv.lines and b"GET a" in srv.lines
        assert p.stdout.wait_line(r"blocked FLUSHALL from 127\.0\.0\.1:\d+", 3), p.stdout.text()
    finally:
        srv.close()


def test_hexdump_logger(run_script, echo_server):
    _doc_says("hexdump_logger.py", "python examples/hexdump_logger.py --listen")
    p = run_script(sys.executable, "examples/hexdump_logger.py", "--listen", "127.0.0.1:0",
                   "--upstream", echo_server.addr, "--bytes", "20")
    payload = b"hello hexdump\x00\x01\xff" + b"z" * 100
    assert echo_roundtrip(p.address, payload) == payload
    assert p.stdout.wait_line(r"^#\d+ close (CLIENT|UPSTREAM)_CLOSED up 116 B down 116 B", 3), \
        p.stdout.text()
    out = p.stdout.text()
    assert "client->server 20 bytes" in out and "server->client 20 bytes" in out, out
    assert out.count("68 65 6c 6c 6f 20 68 65 78 64 75 6d 70 00 01 ff") == 2, out
    assert out.count("|hello hexdump...|") == 2 and out.count("|zzzz|") == 2, out
    assert "zzzzz" not in out  # only the first 20 bytes each way
    assert p.stop() == 0


def test_router(run_script):
    _doc_says("router.py", "python examples/router.py --listen")
    with TagServer("default") as d, TagServer("two") as two, TagServer("net") as net:
        p = run_script(sys.executable, "examples/router.py", "--listen", "127.0.0.1:0",
                       "--upstream", d.addr, "--route", "127.0.0.2=%s" % two.addr,
                       "--route", "127.0.0.0/29=%s" % net.addr)
        assert tag_of(p.address, "127.0.0.2") == b"two"   # first match wins
        assert tag_of(p.address, "127.0.0.3") == b"net"
        assert tag_of(p.address, "127.0.0.1") == b"net"
        assert tag_of(p.address, "127.0.0.9") == b"default"
        assert p.stop() == 0

        p = run_script(sys.executable, "examples/router.py", "--listen", "127.0.0.1:0",
                       "--upstream", d.addr, "--route", "127.0.0.2/32=%s" % two.addr,
                       "--deny-unmatched")
        assert tag_of(p.address, "127.0.0.2") == b"two"
        with connect_from(p.address, "127.0.0.5") as c:
            assert closed_by_peer(c, 3) is not None
        assert d.accepted == 1


def test_embedded_asyncio_service(run_script, echo_server):
    _doc_says("embedded.py", "python examples/embedded.py UPSTREAM_HOST:PORT")
    p = run_script(sys.executable, "examples/embedded.py", echo_server.addr)
    assert echo_roundtrip(p.address, b"embedded" * 10) == b"embedded" * 10
    assert p.stop() == 0
    assert p.stdout.wait_line(r"^1 bridges, 160 bytes$", 3), p.stdout.text()
