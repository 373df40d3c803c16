"""Unix sockets: as the listener (unix:PATH, unix:@NAME), as upstreams, both."""
import fcntl
import hashlib
import os
import shutil
import socket
import stat
import struct
import sys
import tempfile
import termios
import threading
import time

import pytest

from fastproxy import ConfigError, Proxy, cli
from fastproxy.health import tcp_check
from support.sockets import MiB, recv_exact
from support.waits import wait_for

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux only")

BULK = 32 * MiB
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture
def sockdir():
    # pytest's tmp_path can outgrow sun_path (107 bytes): a short one.
    d = tempfile.mkdtemp(prefix="fpu", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def sockaddr_of(address):
    """What socket.connect takes for a proxy's or server's address: a path
    ('@name' abstract) or (host, port)."""
    if isinstance(address, str):
        return "\0" + address[1:] if address.startswith("@") else address
    return address


def connect(address, timeout=10.0):
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sockaddr_of(address))
    except BaseException:
        s.close()
        raise
    return s


class Server:
    """One listening socket: TCP on 127.0.0.1, a Unix path or an abstract name.
    `spec` is what an upstream option takes."""

    def __init__(self, kind, sockdir, name="up"):
        if kind == "tcp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.address = self.sock.getsockname()
            self.spec = "127.0.0.1:%d" % self.address[1]
        else:
            self.address = ("@fp-%d-%s-%d" % (os.getpid(), name, time.monotonic_ns()) if kind == "abstract"
                            else os.path.join(sockdir, name + ".sock"))
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(sockaddr_of(self.address))
            self.spec = "unix:" + self.address
        self.sock.listen(64)
        self.sock.settimeout(10)

    def accept(self):
        s, _ = self.sock.accept()
        s.settimeout(20)
        return s

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def listen_spec(kind, sockdir):
    if kind == "tcp":
        return "127.0.0.1:0"
    if kind == "abstract":
        return "unix:@fp-%d-l-%d" % (os.getpid(), time.monotonic_ns())
    return "unix:" + os.path.join(sockdir, "l.sock")


def recv_all(s):
    """Until EOF: (bytes read, sha256)."""
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            return n, h.digest()
        h.update(chunk)
        n += len(chunk)


def exchange(s, data, out):
    """Send data then FIN on one thread while this one reads to EOF."""
    def send():
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send)
    t.start()
    out.append(recv_all(s))
    t.join(30)
    assert not t.is_alive()


COMBOS = [("unix", "tcp"), ("tcp", "unix"), ("unix", "unix"),
          pytest.param("abstract", "abstract", marks=linux_only),
          pytest.param("unix", "abstract", marks=linux_only)]


@pytest.mark.parametrize("listener,upstream", COMBOS)
def test_bulk_both_ways(make_proxy, sockdir, listener, upstream):
    up_data, down_data = os.urandom(BULK), os.urandom(BULK)
    with Server(upstream, sockdir) as srv:
        p = make_proxy(srv.spec, listen=listen_spec(listener, sockdir))
        got_up, got_down = [], []
        with connect(p.address, timeout=30) as c:
            client = threading.Thread(target=exchange, args=(c, up_data, got_down))
            client.start()
            with srv.accept() as s:
                exchange(s, down_data, got_up)
            client.join(60)
            assert not client.is_alive()
    assert got_up == [(BULK, hashlib.sha256(up_data).digest())]
    assert got_down == [(BULK, hashlib.sha256(down_data).digest())]
    wait_for(lambda: p.stats()["active"] == 0, 5)
    stats = p.stats()
    assert stats["bytes_upstream"] == BULK and stats["bytes_downstream"] == BULK
    assert stats["upstreams"][srv.spec]["bytes_upstream"] == BULK


@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_unix_to_unix(make_proxy, sockdir, first):
    with Server("unix", sockdir) as srv:
        p = make_proxy(srv.spec, listen=listen_spec("unix", sockdir))
        with connect(p.address) as c, srv.accept() as s:
            closer, other = (c, s) if first == "client" else (s, c)
            closer.sendall(b"last words")
            closer.shutdown(socket.SHUT_WR)
            assert recv_all(other)[0] == len(b"last words")
            # The other direction still flows after the FIN went through.
            got = []
            reader = threading.Thread(target=lambda: got.append(recv_all(closer)))
            reader.start()
            other.sendall(b"x" * MiB)
            other.shutdown(socket.SHUT_WR)
            reader.join(20)
            assert got == [(MiB, hashlib.sha256(b"x" * MiB).digest())]


def pipe_bytes():
    """Bytes waiting in the pipes this process holds (the proxy's)."""
    total = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink("/proc/self/fd/" + name).startswith("pipe:"):
                continue
            buf = fcntl.ioctl(int(name), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            continue
        total += struct.unpack("i", buf)[0]
    return total


@pytest.mark.linux_only
@pytest.mark.parametrize("listener,upstream", [("unix", "unix"), ("tcp", "unix"), ("unix", "tcp")])
def test_unix_bridges_splice(make_proxy, sockdir, engine, listener, upstream):
    # The splice path moves bytes through a pipe, the copy path through a
    # buffer. With the reader stalled, bytes pile up where the bridge keeps
    # them: more than a wake-up pipe's few bytes in a pipe means splice ran
    # (a socket that cannot splice turns the bridge to copying for good).
    if engine != "epoll":
        pytest.skip("the poll engine always copies")
    with Server(upstream, sockdir) as srv:
        p = make_proxy(srv.spec, listen=listen_spec(listener, sockdir))
        with connect(p.address) as c, srv.accept() as s:
            before = pipe_bytes()
            # A bridge turns to splice once a read fills its copy buffer:
            # a large send buffer hands the proxy whole buffers at a time
            # even when a loaded machine runs it late (with small partial
            # sends, the path could fill while it still copied).
            c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            c.setblocking(False)
            # Measure only once the path is stalled end to end (the client
            # still cannot send after a pause): while it still moves, a pipe
            # holds bytes for a moment on their way to a socket with room.
            sent, held = 0, 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    sent += c.send(b"\0" * (256 * 1024))
                    continue
                except BlockingIOError:
                    pass
                time.sleep(0.05)
                try:
                    sent += c.send(b"\0")
                except BlockingIOError:
                    held = pipe_bytes() - before
                    if held >= 64 * 1024:
                        break
            assert held >= 64 * 1024, (sent, held)
            # And the bytes are all there once the reader reads.
            c.shutdown(socket.SHUT_WR)
            assert recv_all(s)[0] == sent


def test_stale_socket_file_is_replaced(make_proxy, sockdir):
    path = os.path.join(sockdir, "l.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()   # the file stays, nobody listens: connect() is refused
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with Server("tcp", sockdir) as srv:
        p = make_proxy(srv.spec, listen="unix:" + path)
        assert p.address == path
        with connect(path) as c, srv.accept() as s:
            c.sendall(b"ping")
            assert s.recv(4) == b"ping"


def test_live_socket_is_refused(make_proxy_any, sockdir):
    path = os.path.join(sockdir, "l.sock")
    with Server("unix", sockdir, name="l"):
        with pytest.raises(ConfigError) as e:
            make_proxy_any("127.0.0.1:1", listen="unix:" + path)
        assert str(e.value) == "listen: %r: address already in use (a process is listening on it)" % ("unix:" + path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)   # left alone


def test_path_that_is_not_a_socket_is_refused(make_proxy_any, sockdir):
    path = os.path.join(sockdir, "file")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(ConfigError, match="the path exists and is not a socket"):
        make_proxy_any("127.0.0.1:1", listen="unix:" + path)
    with open(path) as f:
        assert f.read() == "keep me"


def test_missing_directory_is_refused(make_proxy_any, sockdir):
    with pytest.raises(ConfigError, match="its directory does not exist"):
        make_proxy_any("127.0.0.1:1", listen="unix:" + os.path.join(sockdir, "no", "l.sock"))


def test_path_too_long_is_refused(any_engine):
    long_path = "/tmp/" + "x" * 200
    with pytest.raises(ConfigError, match="a Unix socket path has at most 107"):
        Proxy("unix:" + long_path, "127.0.0.1:1", engine=any_engine)
    with pytest.raises(ConfigError, match="a Unix socket path has at most 107"):
        Proxy("127.0.0.1:0", "unix:" + long_path, engine=any_engine)


def test_mode_user_group_applied(make_proxy_any, sockdir):
    path = os.path.join(sockdir, "l.sock")
    # chown to one's own uid and gid is always permitted (root's too).
    user = "root" if os.getuid() == 0 else str(os.getuid())
    p = make_proxy_any("127.0.0.1:1", listen="unix:" + path, unix_mode="0640",
                       unix_user=user, unix_group=str(os.getgid()))
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert p.config.listener.unix_mode == 0o640
    p2 = make_proxy_any("127.0.0.1:1", listen="unix:" + os.path.join(sockdir, "b.sock"), unix_mode="600")
    assert stat.S_IMODE(os.stat(p2.address).st_mode) == 0o600


def test_unknown_user_and_group_are_refused(any_engine):
    with pytest.raises(ConfigError) as e:
        Proxy("unix:/tmp/fpu-x.sock", "127.0.0.1:1", unix_user="no-such-user-fp", engine=any_engine)
    assert str(e.value) == "unix_user: 'no-such-user-fp': no such user"
    with pytest.raises(ConfigError) as e:
        Proxy("unix:/tmp/fpu-x.sock", "127.0.0.1:1", unix_group="no-such-group-fp", engine=any_engine)
    assert str(e.value) == "unix_group: 'no-such-group-fp': no such group"
    with pytest.raises(ConfigError, match="must be an octal mode like 660 or 0660"):
        Proxy("unix:/tmp/fpu-x.sock", "127.0.0.1:1", unix_mode="rw-rw----", engine=any_engine)


def test_a_config_files_mode_is_octal_text_and_check_shows_it_in_octal(sockdir, tmp_path):
    # TOML reads `unix_mode = 660` as decimal 660 (0o1224: sticky, no read
    # for the owner) and has no way to write 0660: a number is refused with
    # the way to write it; text is octal, and `check` shows the mode as ls.
    from support.cli import assert_one_line_error, run_cli

    conf = tmp_path / "u.toml"
    path = os.path.join(sockdir, "m.sock")
    for written in ("660", "0o660"):
        conf.write_text(f'[[listeners]]\nlisten = "unix:{path}"\nunix_mode = {written}\nupstreams = ["127.0.0.1:1"]\n')
        rc, out, err = run_cli(["check", "--config", str(conf)])
        assert_one_line_error(rc, out, err, "listeners[0].unix_mode", "a TOML number is decimal", '"0660"')
    for written in ('"660"', '"0660"'):
        conf.write_text(f'[[listeners]]\nlisten = "unix:{path}"\nunix_mode = {written}\nupstreams = ["127.0.0.1:1"]\n')
        rc, out, err = run_cli(["check", "--config", str(conf)])
        assert rc == 0, err
        assert "unix_mode 0660" in out, out
    rc, out, err = run_cli(["check", "--listen", "unix:" + path, "--upstream", "127.0.0.1:1", "--unix-mode", "640"])
    assert rc == 0 and "unix_mode 0640" in out, (out, err)


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user is refused without root, and tested with it")
def test_chown_not_permitted_is_a_config_error(make_proxy_any, sockdir, monkeypatch):
    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "chown", refuse)
    path = os.path.join(sockdir, "l.sock")
    with pytest.raises(ConfigError) as e:
        make_proxy_any("127.0.0.1:1", listen="unix:" + path, unix_user="0")
    assert str(e.value) == "unix_user: '0': chown not permitted (Operation not permitted)"
    assert not os.path.exists(path)   # nothing left behind


@pytest.mark.parametrize("name,value", [("unix_mode", "660"), ("unix_user", "0"), ("unix_group", "0")])
def test_unix_file_options_need_a_unix_path_listener(any_engine, name, value):
    with pytest.raises(ConfigError) as e:
        Proxy("127.0.0.1:0", "127.0.0.1:1", engine=any_engine, **{name: value})
    assert str(e.value) == "%s: %r: needs a Unix socket listener (listen=unix:PATH)" % (name, value)
    if sys.platform.startswith("linux"):
        with pytest.raises(ConfigError) as e:
            Proxy("unix:@fp-abstract", "127.0.0.1:1", engine=any_engine, **{name: value})
        assert str(e.value) == "%s: %r: does not apply to an abstract socket (unix:@NAME has no file)" % (name, value)


@pytest.mark.parametrize("name,value", [
    ("max_connections_per_ip", 2), ("allow", ["10.0.0.0/8"]), ("deny", ["10.0.0.0/8"]),
    ("allow_file", ["RULES"]), ("deny_file", ["RULES"]), ("rate_limit_per_ip", "10/1s"),
    ("accept_proxy_from", ["127.0.0.1"]),
])
def test_ip_options_refused_on_a_unix_listener(any_engine, sockdir, name, value):
    if value == ["RULES"]:
        value = [os.path.join(sockdir, "rules")]
        with open(value[0], "w") as f:
            f.write("10.0.0.0/8\n")
    with pytest.raises(ConfigError) as e:
        Proxy("unix:" + os.path.join(sockdir, "l.sock"), "127.0.0.1:1", engine=any_engine, **{name: value})
    assert str(e.value) == "%s: %r: needs an IP listener: a client of a Unix socket has no IP address" % (name, value)


def test_cli_reports_an_ip_option_on_a_unix_listener(capsys, sockdir):
    code = cli.main(["--listen", "unix:" + os.path.join(sockdir, "l.sock"), "--upstream", "127.0.0.1:1",
                     "--allow", "10.0.0.0/8"])
    assert code == 2
    assert capsys.readouterr().err == (
        "fastproxy: error: --allow: ['10.0.0.0/8']: needs an IP listener: a client of a Unix socket has no IP address\n")


@pytest.mark.parametrize("version,header", [("v1", b"PROXY UNKNOWN\r\n"), ("v2", V2_SIG + b"\x21\x00\x00\x00")])
def test_send_proxy_from_a_unix_client(make_proxy, sockdir, version, header):
    with Server("tcp", sockdir) as srv:
        p = make_proxy(srv.spec, listen=listen_spec("unix", sockdir), send_proxy=version)
        with connect(p.address) as c, srv.accept() as s:
            c.sendall(b"payload")
            got = b""
            while len(got) < len(header) + 7:
                chunk = s.recv(100)
                assert chunk
                got += chunk
    assert got == header + b"payload"
    from fastproxy import _core
    assert _core.parse_proxy_header(got) == (len(header), True, None, None)


def test_send_proxy_from_a_tcp_client_to_a_unix_upstream(make_proxy, sockdir):
    with Server("unix", sockdir) as srv:
        p = make_proxy(srv.spec, send_proxy="v1")
        with connect(p.address) as c, srv.accept() as s:
            port = c.getsockname()[1]
            c.sendall(b"x")
            got = b""
            while not got.endswith(b"x"):
                got += s.recv(100)
    assert got == b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\nx" % (port, p.address[1])


def test_hooks_see_a_unix_client_and_accept_proxy_names_it(make_proxy, sockdir):
    seen = []
    closed = []
    with Server("tcp", sockdir) as srv:
        p = make_proxy(srv.spec, listen=listen_spec("unix", sockdir), accept_proxy=True,
                       on_connect=lambda conn: seen.append((conn.client_address, conn.listener_address)),
                       on_close=lambda conn, rec: closed.append(rec.client_address))
        path = p.address
        # Through a PROXY header (haproxy in front of a Unix socket): its address counts.
        # (The upstream is connected once the header is in.)
        with connect(path) as c:
            c.sendall(b"PROXY TCP4 192.0.2.7 192.0.2.1 4444 80\r\nhi")
            with srv.accept() as s:
                assert s.recv(2) == b"hi"
        # A LOCAL header keeps the connection's own: a Unix client has none.
        with connect(path) as c:
            c.sendall(V2_SIG + b"\x20\x00\x00\x00hi")
            with srv.accept() as s:
                assert s.recv(2) == b"hi"
        wait_for(lambda: len(closed) == 2, 5)
    assert seen == [(("192.0.2.7", 4444), (path, 0)), (("unix", 0), (path, 0))]
    assert sorted(closed) == [("192.0.2.7", 4444), ("unix", 0)]


def test_socket_file_removed_on_stop_only_if_ours(make_proxy_any, sockdir):
    path = os.path.join(sockdir, "l.sock")
    p = make_proxy_any("127.0.0.1:1", listen="unix:" + path)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    p.stop()
    assert not os.path.exists(path)
    # Another process replaced the file meanwhile: it is left alone.
    p = make_proxy_any("127.0.0.1:1", listen="unix:" + path)
    os.unlink(path)
    with open(path, "w"):
        pass
    p.stop()
    assert os.path.isfile(path)


def test_adopted_unix_socket(make_proxy, sockdir):
    path = os.path.join(sockdir, "app.sock")
    app = socket.socket(socket.AF_UNIX)
    app.bind(path)
    app.listen(16)
    with app, Server("tcp", sockdir) as srv:
        p = make_proxy(srv.spec, listen=None, sock=app)
        assert p.address == path
        with connect(path) as c, srv.accept() as s:
            c.sendall(b"ok")
            assert s.recv(2) == b"ok"
        p.stop()
        assert os.path.exists(path)   # the application's file: it removes it
    with socket.socket(socket.AF_UNIX) as app:
        app.bind(os.path.join(sockdir, "app2.sock"))
        app.listen(1)
        with pytest.raises(ConfigError, match="applies to a socket file the proxy binds, not to sock"):
            Proxy(sock=app, upstream="127.0.0.1:1", unix_mode="600")


def test_upstream_specs(any_engine):
    from fastproxy.upstreams import parse_upstream
    u = parse_upstream("unix:/run/db.sock@2,max-connections=5,backup")
    assert (u.address, u.weight, u.max_connections, u.backup, u.host, u.port) == (
        "unix:/run/db.sock", 2, 5, True, "unix:/run/db.sock", 0)
    assert parse_upstream("unix:@name").address == "unix:@name"
    assert parse_upstream("unix:@name@3").weight == 3
    assert parse_upstream("unix:/a@b.sock").address == "unix:/a@b.sock"
    with pytest.raises(ConfigError, match="needs a path after unix:"):
        parse_upstream("unix:")


def test_health_checks_a_unix_upstream(make_proxy, sockdir):
    path = os.path.join(sockdir, "h.sock")
    assert not tcp_check("unix:" + path, 0, 1.0)
    p = make_proxy("unix:" + path, health_interval="50ms", health_fall=1, health_rise=1, health_timeout="1s")
    wait_for(lambda: p.stats()["upstreams"]["unix:" + path]["health"] == "down", 5)
    with Server("unix", sockdir, name="h"):
        assert tcp_check("unix:" + path, 0, 1.0)
        wait_for(lambda: p.stats()["upstreams"]["unix:" + path]["health"] == "up", 5)


def test_reload_keeps_a_unix_listener_and_its_file(any_engine, sockdir, echo_server):
    """A reload that changes a Unix listener's options keeps its socket
    (clients never see the file missing) and the socket file goes once, at
    stop, by whoever holds the socket then."""
    from fastproxy import Config

    path = os.path.join(sockdir, "reload.sock")

    def cfg(**kw):
        return Config.build(listen=f"unix:{path}", upstreams=[echo_server.addr], engine=any_engine, **kw)

    p = Proxy.from_config([cfg()]).start()
    try:
        inode = os.stat(path).st_ino
        p.reload([cfg(max_connections=10)])
        assert os.stat(path).st_ino == inode
        assert p._listeners[0].config.limits.max_connections == 10
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(5)
            c.connect(path)
            c.sendall(b"after reload")
            assert recv_exact(c, 12) == b"after reload"
    finally:
        p.stop()
    assert not os.path.exists(path)


def test_reload_gives_a_kept_socket_file_its_new_mode_or_puts_it_back(any_engine, sockdir, echo_server):
    # The socket stays (same inode), so the mode a reload asks for is set
    # on it; a reload refused for another listener leaves it as it was; an
    # option left out keeps what the file has.
    from fastproxy import Config

    path = os.path.join(sockdir, "mode.sock")

    def cfg(**kw):
        return Config.build(listen=f"unix:{path}", upstreams=[echo_server.addr], engine=any_engine, **kw)

    p = Proxy.from_config([cfg(unix_mode="660")]).start()
    try:
        inode = os.stat(path).st_ino
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        p.reload([cfg(unix_mode="600")])
        assert (os.stat(path).st_ino, stat.S_IMODE(os.stat(path).st_mode)) == (inode, 0o600)
        with socket.create_server(("127.0.0.1", 0)) as taken:   # a port another listener cannot get
            bad = Config.build(listen=f"127.0.0.1:{taken.getsockname()[1]}", upstreams=[echo_server.addr],
                               engine=any_engine)
            with pytest.raises(ConfigError, match="address already in use"):
                p.reload([cfg(unix_mode="640"), bad])
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600   # the refused reload changed nothing
        p.reload([cfg()])
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(5)
            c.connect(path)
            c.sendall(b"still")
            assert recv_exact(c, 5) == b"still"
    finally:
        p.stop()
