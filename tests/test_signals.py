"""The command's signals with live bridges: SIGUSR1 reopens the access log,
SIGQUIT drains like SIGTERM, SIGHUP reloads and kills nothing."""
import json
import os
import signal
import socket
import time

from fastproxy import Proxy
from support.cli import CliProxy
from support.sockets import connect, echo_roundtrip, free_port, recv_exact, recv_until_eof
from support.waits import wait_for


class Bridge:
    """One client connection the test drives exchange by exchange."""

    def __init__(self, addr):
        self.sock = connect(addr)
        self.sock.settimeout(5)
        self.n = 0

    def exchange(self):
        msg = (b"exchange %d " % self.n) * 512
        self.sock.sendall(msg)
        assert recv_exact(self.sock, len(msg)) == msg
        self.n += 1

    def finish(self):
        self.sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(self.sock) == b""
        self.sock.close()


def records(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_sigusr1_reopens_the_access_log(cli_proxy, echo_server, tmp_path):
    log = str(tmp_path / "access.log")
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr, "--access-log", log)
    live = Bridge(proxy.address)
    live.exchange()
    assert echo_roundtrip(proxy.address, b"before") == b"before"
    assert wait_for(lambda: len(records(log)) == 1, 5)
    os.rename(log, log + ".1")   # what logrotate does before it signals
    proxy.signal(signal.SIGUSR1)
    assert proxy.stderr.wait_line(r"SIGUSR1: reopening the access log", 5)
    assert wait_for(lambda: os.path.exists(log), 5), "no new file at the original path"
    live.exchange()
    assert echo_roundtrip(proxy.address, b"after") == b"after"
    live.exchange()
    live.finish()
    assert wait_for(lambda: len(records(log)) == 2, 5), records(log)
    assert len(records(log + ".1")) == 1
    assert sorted(r["bytes_upstream"] for r in records(log)) == [5, 3 * len(b"exchange 0 " * 512)]
    assert proxy.alive()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(15) == 0


def test_sigquit_drains_live_bridges_then_exits_zero(cli_proxy, echo_server):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr, "--drain-timeout", "30s")
    live = Bridge(proxy.address)
    live.exchange()
    proxy.signal(signal.SIGQUIT)
    assert proxy.stderr.wait_line(r"SIGQUIT: draining", 5)
    # Stopped accepting, the live bridge still flows until its client ends it.
    live.exchange()
    live.exchange()
    assert proxy.alive()
    live.finish()
    assert proxy.wait(15) == 0, proxy.stderr.text()
    text = proxy.stderr.text()
    assert "Traceback" not in text and "core dumped" not in text


def test_sighup_keeps_serving_and_live_bridges_flow(cli_proxy, echo_server):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr)
    live = Bridge(proxy.address)
    live.exchange()
    proxy.signal(signal.SIGHUP)
    assert proxy.stderr.wait_line(r"SIGHUP: reloading", 5)
    # The flags again: the same configuration, so nothing changes.
    assert proxy.stderr.wait_line(r"reloaded: 1 listener \(0 new or changed, 0 removed\)", 5)
    live.exchange()
    assert proxy.alive()
    assert echo_roundtrip(proxy.address, b"new client") == b"new client"
    live.exchange()
    live.finish()
    proxy.signal(signal.SIGHUP)
    assert wait_for(lambda: sum("SIGHUP: reloading" in ln for ln in list(proxy.stderr.lines)) == 2, 5)
    assert proxy.alive()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(15) == 0


def test_sighup_reads_the_config_file_again(cli_proxy, echo_server, tmp_path):
    """The file grows a listener and loses nothing: SIGHUP opens the new
    one while a bridge on the first keeps flowing; a broken file is refused
    with an error line and the running configuration stays."""
    port = free_port()
    path = tmp_path / "fp.toml"
    first = f'[[listeners]]\nlisten = "127.0.0.1:{port}"\nupstreams = ["{echo_server.addr}"]\n'
    path.write_text(first)
    proxy = cli_proxy("--config", str(path))
    live = Bridge(("127.0.0.1", port))
    live.exchange()
    second = free_port()
    path.write_text(first + f'[[listeners]]\nlisten = "127.0.0.1:{second}"\nupstreams = ["{echo_server.addr}"]\n')
    proxy.signal(signal.SIGHUP)
    assert proxy.stderr.wait_line(r"reloaded: 2 listeners \(1 new or changed, 0 removed\)", 5)
    assert echo_roundtrip(("127.0.0.1", second), b"new listener") == b"new listener"
    live.exchange()
    path.write_text(first + "[[listeners]]\nlisten = 7\n")
    proxy.signal(signal.SIGHUP)
    assert proxy.stderr.wait_line(r"ERROR reload refused, the running configuration stays: .*listeners\[1\]", 5)
    assert echo_roundtrip(("127.0.0.1", second), b"still") == b"still"
    live.exchange()
    live.finish()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(15) == 0


def test_a_refused_reload_keeps_the_log_level(any_engine, echo_server, tmp_path):
    # The file's new log_level comes with a change that needs a restart:
    # the reload is refused, and the level stays what it was (info).
    port = free_port()
    path = tmp_path / "fp.toml"
    body = f'[[listeners]]\nlisten = "127.0.0.1:{port}"\nupstreams = ["{echo_server.addr}"]\n'
    path.write_text(body)
    proxy = CliProxy(["--config", str(path), "--engine", any_engine])
    try:
        path.write_text('log_level = "error"\nbusy_poll = "1ms"\n' + body)
        proxy.signal(signal.SIGHUP)
        assert proxy.stderr.wait_line(r"ERROR reload refused, the running configuration stays: .*busy_poll", 5)
        proxy.signal(signal.SIGUSR1)   # logged at info
        assert proxy.stderr.wait_line(r"INFO SIGUSR1: reopening the access log", 5), proxy.stderr.text()
        assert echo_roundtrip(("127.0.0.1", port), b"x") == b"x"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0
    finally:
        proxy.kill()


def test_sighup_applies_a_changed_log_level(cli_proxy, echo_server, tmp_path):
    port = free_port()
    path = tmp_path / "fp.toml"
    body = f'[[listeners]]\nlisten = "127.0.0.1:{port}"\nupstreams = ["{echo_server.addr}"]\n'
    path.write_text(body)
    proxy = cli_proxy("--config", str(path))

    def count(text):
        return sum(text in ln for ln in list(proxy.stderr.lines))

    path.write_text('log_level = "error"\n' + body)
    proxy.signal(signal.SIGHUP)   # logged at info; its "reloaded" comes after the file said error
    assert proxy.stderr.wait_line(r"SIGHUP: reloading", 5)
    time.sleep(1.0)
    proxy.signal(signal.SIGHUP)   # neither line at error
    time.sleep(1.0)
    assert echo_roundtrip(("127.0.0.1", port), b"x") == b"x"
    path.write_text('log_level = "info"\n' + body)
    proxy.signal(signal.SIGHUP)
    assert proxy.stderr.wait_line(r"reloaded: 1 listener", 5)
    assert (count("SIGHUP: reloading"), count("reloaded: 1 listener")) == (1, 1), proxy.stderr.text()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(15) == 0
