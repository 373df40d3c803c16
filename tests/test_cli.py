"""The ``fastproxy`` command: start-up line, forwarding, user errors, --version, -h."""
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

import fastproxy
from support.cli import assert_one_line_error, run_cli, subprocess_env
from support.sockets import echo_roundtrip, ipv6_available




def test_cli_forwards_and_logs_one_startup_line(cli_proxy, echo_server, engine):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr, "--workers", "3")
    line = proxy.ready_line
    host, port = proxy.address
    assert host == "127.0.0.1" and port > 0
    assert "listening on 127.0.0.1:%d" % port in line
    assert echo_server.addr in line, "start-up line does not name the upstream: %r" % line
    assert engine in line
    assert re.search(r"\b3\b", line) and "worker" in line.lower(), line
    assert "fd" in line.lower(), "start-up line does not give the fd budget: %r" % line
    assert len([ln for ln in proxy.stderr.lines if "listening on" in ln]) == 1
    for i in range(5):
        msg = b"cli %d" % i
        assert echo_roundtrip(proxy.address, msg) == msg


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_cli_signal_exits_zero(cli_proxy, echo_server, sig):
    import signal
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr)
    assert echo_roundtrip(proxy.address, b"x") == b"x"
    proxy.signal(getattr(signal, sig))
    rc = proxy.wait(15)
    assert rc == 0, "exit code %r after %s; stderr:\n%s" % (rc, sig, proxy.stderr.text())
    assert "Traceback" not in proxy.stderr.text()


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 on this host")
def test_cli_listen_ipv6_brackets(cli_proxy, echo_server):
    proxy = cli_proxy("--listen", "[::1]:0", "--upstream", echo_server.addr)
    assert proxy.address[0] == "::1" and proxy.address[1] > 0
    assert "listening on [::1]:%d" % proxy.address[1] in proxy.ready_line
    assert echo_roundtrip(proxy.address, b"six") == b"six"


def test_cli_listen_hostname(cli_proxy, echo_server):
    proxy = cli_proxy("--listen", "localhost:0", "--upstream", echo_server.addr,
                      "--connect-timeout", "500ms", "--drain-timeout", "2s",
                      "--half-close-timeout", "1m", "--log-level", "debug")
    assert proxy.address[1] > 0
    assert echo_roundtrip(("127.0.0.1", proxy.address[1]), b"named") == b"named"


@pytest.mark.parametrize("args,needle", [
    (["--listen", "127.0.0.1:99999"], "99999"),
    (["--listen", "127.0.0.1:-1"], "-1"),
    (["--listen", "nocolon"], "nocolon"),
    (["--listen", "127.0.0.1:http"], "http"),
    (["--listen", "[::1:0"], "[::1:0"),
    (["--upstream", "127.0.0.1:70000"], "70000"),
    (["--upstream", "nonexistent.invalid:80"], "nonexistent.invalid"),
    (["--connect-timeout", "5x"], "5x"),
    (["--drain-timeout", "soon"], "soon"),
    (["--half-close-timeout", "1.5.2s"], "1.5.2s"),
    (["--engine", "turbo"], "turbo"),
    (["--workers", "many"], "many"),
    (["--busy-poll", "forever"], "forever"),
    (["--notsent-lowat", "lots"], "lots"),
    (["--socket-buffer", "1k"], "socket-buffer"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_cli_user_errors(any_engine, args, needle):
    base = {"--listen": "127.0.0.1:0", "--upstream": "127.0.0.1:9"}
    argv = []
    for flag, value in base.items():
        if flag not in args:
            argv += [flag, value]
    argv += args
    if "--engine" not in args:
        argv += ["--engine", any_engine]
    rc, out, err = run_cli(argv)
    assert_one_line_error(rc, out, err, needle)


@pytest.mark.parametrize("command", [["check"], []])
@pytest.mark.parametrize("args,needles", [
    (["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:9"],
     ["--listen", "'127.0.0.1:1'", "is given twice", "several need a config file"]),
    (["--config", "a.toml", "--config", "b.toml"], ["--config", "'b.toml'", "is given twice"]),
    (["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--engine", "poll", "--engine=epoll"],
     ["--engine", "'epoll'", "is given twice"]),
    (["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--log-level", "info", "--log-level", "debug"],
     ["--log-level", "'debug'", "is given twice"]),
])
def test_cli_a_flag_of_one_value_given_twice_is_an_error(command, args, needles):
    rc, out, err = run_cli(command + args)
    assert_one_line_error(rc, out, err, *needles)


@pytest.mark.parametrize("args,needles", [
    (["top", ":1", "--interval", "1s", "--interval", "2s"], ["fastproxy top: error: --interval: '2s': is given twice"]),
    (["top", ":1", "--count", "1", "--count=2"], ["fastproxy top: error: --count: 2: is given twice"]),
    (["demo", "--duration", "1s", "--duration", "2s"], ["fastproxy demo: error: --duration: '2s': is given twice"]),
    (["toxiproxy", "--port", "0", "--port", "0"], ["fastproxy toxiproxy: error: --port: 0: is given twice"]),
    (["toxiproxy", "--host", "127.0.0.1", "--host", "::1"], ["--host: '::1': is given twice"]),
    (["toxiproxy", "--config", "a.json", "--config", "b.json"], ["--config: 'b.json': is given twice"]),
    (["toxiproxy", "--engine", "poll", "--engine", "epoll"], ["--engine: 'epoll': is given twice"]),
    (["toxiproxy", "--log-level", "info", "--log-level", "debug"], ["--log-level: 'debug': is given twice"]),
])
def test_cli_subcommands_refuse_a_flag_of_one_value_given_twice(args, needles):
    # Each would otherwise run with the last value (the demo for 2 s, the
    # toxiproxy server on a port): refused before anything starts.
    rc, out, err = run_cli(args, timeout=30)
    assert_one_line_error(rc, out, err, *needles)


def test_cli_repeatable_flags_and_switches_may_repeat():
    rc, out, err = run_cli(["check", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--upstream",
                            "127.0.0.1:10", "--allow", "127.0.0.1", "--allow", "::1", "--accept-proxy",
                            "--accept-proxy"])
    assert rc == 0, err
    assert "2 upstreams" in out


def test_cli_port_in_use(any_engine):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, out, err = run_cli(["--listen", "127.0.0.1:%d" % port, "--upstream", "127.0.0.1:9",
                                "--engine", any_engine])
    assert_one_line_error(rc, out, err, str(port))


def test_cli_more_workers_than_fds(engine):
    """Asking for more workers than the fd limit allows is a user mistake, not a crash."""
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
                            "--workers", "200", "--engine", engine], rlimit_nofile=64)
    assert_one_line_error(rc, out, err)


def test_cli_missing_upstream(any_engine):
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--engine", any_engine])
    assert_one_line_error(rc, out, err, "upstream")


def test_cli_version():
    rc, out, err = run_cli(["--version"])
    assert rc == 0, err
    text = out + err
    assert re.search(r"\d+\.\d+", text), text
    version = getattr(fastproxy, "__version__", None)
    if version:
        assert version in text


def test_cli_help():
    rc, out, err = run_cli(["-h"])
    assert rc == 0, err
    for flag in ("--listen", "--upstream", "--workers", "--connect-timeout", "--drain-timeout",
                 "--half-close-timeout", "--engine", "--log-level", "--version"):
        assert flag in out, "-h does not mention %s" % flag


def test_console_script_installed():
    exe = shutil.which("fastproxy", path=os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("package not installed with its console script (running from a source tree)")
    cp = subprocess.run([exe, "--version"], capture_output=True, timeout=30, env=subprocess_env())
    assert cp.returncode == 0
    assert re.search(rb"\d+\.\d+", cp.stdout + cp.stderr)


@pytest.mark.parametrize("bad,line", [
    ('hooks = "/nonexistent/fp-hooks.py"', "{path}: listeners[1].hooks: '/nonexistent/fp-hooks.py': no such file"),
    ('access_log = "/nonexistent/fp-dir/a.log"', "{path}: listeners[1].access_log: '/nonexistent/fp-dir/a.log': "),
    ('listen_taken = true', "{path}: listeners[1].listen: '127.0.0.1:{taken}': address already in use"),
])
def test_a_files_mistake_found_at_start_names_the_file_and_listener(tmp_path, any_engine, bad, line):
    # Found only once the proxy starts (a hooks file, a log's directory, a
    # port in use), still a file's mistake: the file and the key path, not a
    # flag the user never typed.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        second = f'listen = "127.0.0.1:{port}"' if bad == "listen_taken = true" else f'listen = "127.0.0.1:0"\n{bad}'
        path = tmp_path / "two.toml"
        path.write_text(f'engine = "{any_engine}"\nworkers = 1\n'
                        '[[listeners]]\nname = "a"\nlisten = "127.0.0.1:0"\nupstreams = ["127.0.0.1:9"]\n'
                        f'[[listeners]]\nname = "b"\n{second}\nupstreams = ["127.0.0.1:9"]\n')
        rc, out, err = run_cli(["--config", str(path)])
    want = line.format(path=path, taken=port)
    assert_one_line_error(rc, out, err, want)
    assert "--" not in err.split(want)[0], err   # no flag named


def test_a_flags_mistake_with_a_config_file_still_names_the_flag(tmp_path, any_engine):
    path = tmp_path / "one.toml"
    path.write_text(f'engine = "{any_engine}"\n[[listeners]]\nlisten = "127.0.0.1:0"\nupstreams = ["127.0.0.1:9"]\n')
    rc, out, err = run_cli(["--config", str(path), "--hooks", "/nonexistent/fp-hooks.py"])
    assert_one_line_error(rc, out, err, "--hooks: '/nonexistent/fp-hooks.py': no such file")
