"""systemd socket activation: LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES and
sockets inherited from fd 3 on, served without binding."""
import os
import socket
import subprocess
import sys

import pytest

from fastproxy import ConfigError
from fastproxy.activation import ListenerSockets, systemd_sockets
from support.cli import LineReader, LISTEN_RX, subprocess_env
from support.sockets import echo_roundtrip, parse_addr

# Does what systemd does between fork and exec: the sockets at fd 3 on,
# LISTEN_PID the pid the proxy will run as (exec keeps it).
LAUNCHER = r"""
import os, sys
fd, pid_mode, names = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid() if pid_mode == "self" else 1)
if names:
    os.environ["LISTEN_FDNAMES"] = names
os.execv(sys.executable, [sys.executable, "-m", "fastproxy"] + sys.argv[4:])
"""


class Activated:
    def __init__(self, sock, pid_mode, names, args):
        cmd = [sys.executable, "-c", LAUNCHER, str(sock.fileno()), pid_mode, names] + args
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=subprocess_env(), pass_fds=(sock.fileno(),))
        self.stderr = LineReader(self.proc.stderr)
        self.stdout = LineReader(self.proc.stdout)
        m = self.stderr.wait_line(LISTEN_RX, 20)
        if m is None:
            self.kill()
            raise AssertionError("no 'listening on'; stderr:\n%s" % self.stderr.text())
        self.address = parse_addr(m.group(1))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr.join(2)
        self.stdout.join(2)


@pytest.fixture
def listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s
    s.close()


@pytest.fixture
def activated():
    made = []

    def start(*a, **kw):
        p = Activated(*a, **kw)
        made.append(p)
        return p

    yield start
    for p in made:
        p.kill()


HOOKS = """
import os
def on_connect(conn):
    with open({out!r}, "w") as f:
        f.write(repr([os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")]))
"""


def test_serves_the_inherited_socket_without_binding(any_engine, echo_server, listening, activated, tmp_path):
    out = tmp_path / "env.txt"
    hooks = tmp_path / "hooks.py"
    hooks.write_text(HOOKS.format(out=str(out)))
    port = listening.getsockname()[1]
    # Binding this address would fail (the socket listens there): serving
    # proves it took the inherited one. Its name ("web") is no listener's
    # (a listener is named by its listen text, and systemd names cannot
    # hold ':'), so the address matched.
    p = activated(listening, "self", "web",
                  ["--listen", "127.0.0.1:%d" % port, "--upstream", echo_server.addr, "--engine", any_engine,
                   "--hooks", str(hooks)])
    assert p.address == ("127.0.0.1", port)
    assert p.stderr.wait_line(r"systemd passed 1 listening socket: web=127\.0\.0\.1:%d" % port, 1)
    assert echo_roundtrip(("127.0.0.1", port), b"activated") == b"activated"
    # Read once, then removed: a child of the proxy would not take the fds.
    assert out.read_text() == "[None, None, None]"
    p.proc.send_signal(15)
    assert p.proc.wait(15) == 0
    # The proxy closed only its own descriptor: ours still listens.
    assert listening.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_unnamed_socket_matches_by_address(any_engine, echo_server, listening, activated):
    port = listening.getsockname()[1]
    p = activated(listening, "self", "",
                  ["--listen", "127.0.0.1:%d" % port, "--upstream", echo_server.addr, "--engine", any_engine])
    assert p.address == ("127.0.0.1", port)
    assert p.stderr.wait_line(r"systemd passed 1 listening socket: unknown=", 1)
    assert echo_roundtrip(("127.0.0.1", port), b"by address") == b"by address"


def test_sockets_for_another_pid_are_left_alone(any_engine, echo_server, listening, activated):
    p = activated(listening, "other", "web",
                  ["--listen", "127.0.0.1:0", "--upstream", echo_server.addr, "--engine", any_engine])
    assert p.address != listening.getsockname()
    assert echo_roundtrip(p.address, b"own") == b"own"


@pytest.mark.parametrize("env,field", [
    ({"LISTEN_PID": "self", "LISTEN_FDS": "two"}, "LISTEN_FDS"),
    ({"LISTEN_PID": "x1", "LISTEN_FDS": "1"}, "LISTEN_PID"),
    ({"LISTEN_PID": "self", "LISTEN_FDS": "0", "LISTEN_FDNAMES": "a:b"}, "LISTEN_FDNAMES"),
])
def test_malformed_variables_are_config_errors_and_are_removed(env, field):
    environ = {k: (str(os.getpid()) if v == "self" else v) for k, v in env.items()}
    environ["OTHER"] = "kept"
    with pytest.raises(ConfigError) as info:
        systemd_sockets(environ)
    assert info.value.field == field
    assert environ == {"OTHER": "kept"}


def test_no_variables_no_sockets():
    environ = {}
    assert len(systemd_sockets(environ)) == 0
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert len(systemd_sockets(environ)) == 0 and environ == {}


def test_pool_gives_by_name_then_by_address_once(listening):
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(1)
    a, b = listening.dup(), other.dup()
    pool = ListenerSockets("test", [("web", a), ("unknown", b)])
    assert pool.take("web", ("127.0.0.1", 1)) is a
    assert pool.take("web", ("127.0.0.1", 1)) is None
    assert pool.take("api", ("127.0.0.1", 0)) is None   # port 0 asks for a new port
    assert pool.take("api", ("localhost", other.getsockname()[1])) is b
    assert pool.close_rest() == []
    a.close()
    b.close()
    other.close()
