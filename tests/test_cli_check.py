"""`fastproxy --config FILE` and `fastproxy check`, in real subprocesses:
what check prints, its exit codes, and which of file and flags wins."""
import os
import re
import subprocess
import sys

import pytest

from fastproxy import _core
from support.cli import assert_one_line_error, run_cli, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "fastproxy.toml")

ONE = """
[[listeners]]
listen = "127.0.0.1:7101"
upstreams = ["127.0.0.1:9"]
"""
TWO = ONE + """
[[listeners]]
name = "second"
listen = "127.0.0.1:7102"
upstreams = ["127.0.0.1:10"]
"""


def write(tmp_path, text, name="fastproxy.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def check(*args):
    """`fastproxy check ARGS`: its output, which must be a success."""
    rc, out, err = run_cli(["check"] + list(args))
    assert rc == 0, f"exit {rc}; stderr:\n{err}"
    assert err == ""
    return out


def line_of(out, prefix):
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(prefix)]
    assert lines, f"no line starting with {prefix!r} in:\n{out}"
    return lines[0]


def test_the_example_file_passes_check():
    out = check("--config", EXAMPLE)
    assert out.splitlines()[0] == f"{EXAMPLE}: OK, 2 listeners"
    assert "listener web: listen :8080" in out
    assert "listener postgres: listen 127.0.0.1:6432" in out
    assert "    10.0.0.12:8000 weight 2 max_connections 500" in out
    assert "    10.0.0.13:8000 weight 1 backup" in out
    assert "    10.0.0.22:5432 weight 1 backup" in out
    assert "workers 4" in line_of(out, "process:") and "drain_timeout 15s" in line_of(out, "process:")


def test_check_prints_each_listener_and_the_process(tmp_path):
    path = write(tmp_path, """
workers = 2
engine = "poll"
log_level = "warning"

[defaults]
max_connections = 50
deny = ["192.0.2.0/24"]

[[listeners]]
name = "web"
listen = "127.0.0.1:7201"
upstreams = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3, max_connections = 9, backup = true }]
balance = "leastconn"
allow = ["10.0.0.0/8"]
allow_time = ["Mon-Fri 08:00-18:00"]
rate_limit_per_ip = "20/1s"
idle_timeout = "5m"
send_proxy = "v2"
hook_timeout = "2s"

[[listeners]]
listen = "127.0.0.1:7202"
upstreams = ["127.0.0.1:9003"]
""")
    out = check("--config", path)
    lines = out.splitlines()
    assert lines[0] == f"{path}: OK, 2 listeners"
    assert lines[1].startswith("process: ") and "workers 2" in lines[1] and "engine poll" in lines[1]
    assert lines[2] == "log_level: warning"
    assert "listener web: listen 127.0.0.1:7201" in lines
    assert "listener 127.0.0.1:7202: listen 127.0.0.1:7202" in lines
    web = out[out.index("listener web"):out.index("listener 127.0.0.1:7202")]
    assert "  upstream group: 2 upstreams" in web
    assert "    127.0.0.1:9001 weight 1" in web
    assert "    127.0.0.1:9002 weight 3 max_connections 9 backup" in web
    assert "balance leastconn" in line_of(web, "balancing")
    assert "max_connections 50" in line_of(web, "limits:")
    access = line_of(web, "access control:")
    for part in ("allow 10.0.0.0/8", "deny 192.0.2.0/24", "allow_time Mon-Fri 08:00-18:00", "rate_limit_per_ip 20/1s"):
        assert part in access, access
    # Timeouts: only those that differ from the defaults.
    assert line_of(web, "timeouts:") == "  timeouts: idle_timeout 5m"
    assert "send_proxy v2" in line_of(web, "PROXY protocol:")
    assert "hook_timeout 2s" in line_of(web, "hooks:")
    second = out[out.index("listener 127.0.0.1:7202"):]
    assert line_of(second, "timeouts:") == "  timeouts: the defaults"
    assert "allow none" in line_of(second, "access control:")


def test_check_without_a_file_describes_the_flags():
    out = check("--listen", "127.0.0.1:7301", "--upstream", "127.0.0.1:9@2", "--name", "api", "--workers", "3")
    assert out.splitlines()[0] == "the command line: OK, 1 listener"
    assert "listener api: listen 127.0.0.1:7301" in out
    assert "    127.0.0.1:9 weight 2" in out
    assert "workers 3" in line_of(out, "process:")


def test_config_does_not_need_listen_or_upstream_but_flags_alone_do(tmp_path):
    check("--config", write(tmp_path, ONE))
    rc, out, err = run_cli(["check", "--workers", "2"])
    assert_one_line_error(rc, out, err, "--listen", "--upstream")


# ---- precedence: defaults < listener < flags (one listener); process flags over the top level

def test_listener_flags_override_the_one_listener(tmp_path):
    path = write(tmp_path, """
[defaults]
connect_timeout = "2s"
queue_size = 7
[[listeners]]
listen = "127.0.0.1:7401"
upstreams = ["127.0.0.1:9"]
connect_timeout = "3s"
""")
    out = check("--config", path)
    assert "connect_timeout 3s" in line_of(out, "timeouts:")     # the listener over [defaults]
    assert "queue_size 7" in line_of(out, "limits:")             # [defaults] where it says nothing
    out = check("--config", path, "--connect-timeout", "4s", "--listen", "127.0.0.1:7402",
                "--upstream", "127.0.0.1:11", "--upstream", "127.0.0.1:12,backup", "--name", "flags")
    assert "connect_timeout 4s" in line_of(out, "timeouts:")
    assert "listener flags: listen 127.0.0.1:7402" in out
    assert "    127.0.0.1:11 weight 1\n    127.0.0.1:12 weight 1 backup\n" in out
    assert "127.0.0.1:9 " not in out


def test_listener_flags_are_refused_with_two_listeners(tmp_path):
    rc, out, err = run_cli(["check", "--config", write(tmp_path, TWO), "--connect-timeout", "4s"])
    assert_one_line_error(rc, out, err)
    assert err.strip() == ("fastproxy: error: --connect-timeout: '4s': is a listener option: it can only override "
                           "a config file of one listener, and this one has 2")


def test_process_flags_override_the_top_level(tmp_path):
    path = write(tmp_path, 'workers = 2\nengine = "poll"\nbusy_poll = "1ms"\n' + TWO)
    process = line_of(check("--config", path), "process:")
    assert "workers 2" in process and "engine poll" in process and "busy_poll 1ms" in process
    process = line_of(check("--config", path, "--workers", "5", "--busy-poll", "0"), "process:")
    assert "workers 5" in process and "engine poll" in process and "busy_poll 0" in process


def test_log_level_flag_overrides_the_file(tmp_path):
    path = write(tmp_path, 'log_level = "debug"\n' + ONE)
    assert "log_level: debug" in check("--config", path)
    assert "log_level: error" in check("--config", path, "--log-level", "error")
    assert "log_level: info" in check("--config", write(tmp_path, ONE, "plain.toml"))


def test_the_command_raises_the_fd_limit_unless_file_or_flag_say_keep(tmp_path):
    assert "fd_limit raise" in line_of(check("--config", write(tmp_path, ONE)), "process:")
    keep = write(tmp_path, 'fd_limit = "keep"\n' + ONE, "keep.toml")
    assert "fd_limit keep" in line_of(check("--config", keep), "process:")
    assert "fd_limit raise" in line_of(check("--config", keep, "--fd-limit", "raise"), "process:")


# ---- errors: one line, exit 2, naming the file and key, or the flag

def test_check_reports_a_file_mistake_in_one_line(tmp_path):
    path = write(tmp_path, ONE + 'upstreams = ["127.0.0.1:9", { address = "127.0.0.1:10", weight = 300 }]\n')
    # upstreams written twice in one table: a TOML error first.
    rc, out, err = run_cli(["check", "--config", path])
    assert_one_line_error(rc, out, err)
    assert re.fullmatch(rf"fastproxy: error: {re.escape(path)}:5:\d+: invalid TOML: Cannot overwrite a value\n", err)
    path = write(tmp_path, ONE.replace('["127.0.0.1:9"]', '["127.0.0.1:9", { address = "127.0.0.1:10", weight = 300 }]'))
    rc, out, err = run_cli(["check", "--config", path])
    assert_one_line_error(rc, out, err)
    assert err == f"fastproxy: error: {path}: listeners[0].upstreams[1].weight: 300: is out of range (0-256)\n"
    assert out == ""


@pytest.mark.parametrize("command", [["check"], []])
def test_a_missing_file_is_one_line_with_or_without_check(tmp_path, command):
    path = str(tmp_path / "missing.toml")
    rc, out, err = run_cli(command + ["--config", path])
    assert_one_line_error(rc, out, err)
    assert err == f"fastproxy: error: {path}: no such file\n"


def test_a_bad_flag_value_with_a_file_names_the_flag(tmp_path):
    rc, out, err = run_cli(["check", "--config", write(tmp_path, ONE), "--workers", "0"])
    assert_one_line_error(rc, out, err)
    assert err == "fastproxy: error: --workers: '0': is out of range (1-1024)\n"
    rc, out, err = run_cli(["check", "--config", write(tmp_path, ONE), "--connect-timeout", "5x"])
    assert_one_line_error(rc, out, err, "--connect-timeout", "5x")


def test_a_bad_value_in_the_file_stops_the_run_too(tmp_path):
    """Without check, the same validation comes first: nothing runs."""
    path = write(tmp_path, "workers = 0\n" + ONE)
    rc, out, err = run_cli(["--config", path])
    assert_one_line_error(rc, out, err)
    assert err == f"fastproxy: error: {path}: workers: 0: is out of range (1-1024)\n"


@pytest.mark.parametrize("command", [["check"], []])
@pytest.mark.parametrize("key", ["access_log", "allow_file", "unix_user"])
def test_a_nul_in_a_path_is_one_line_in_check_and_at_run(tmp_path, command, key):
    text = ONE + f'{key} = "{tmp_path}/a\\u0000b"\n'
    if key == "unix_user":
        text = text.replace("127.0.0.1:7101", f"unix:{tmp_path}/s.sock")
    path = write(tmp_path, text)
    rc, out, err = run_cli(command + ["--config", path])
    assert_one_line_error(rc, out, err, f"listeners[0].{key}", "cannot hold a NUL byte")


@pytest.mark.parametrize("encoding,flag,value,shown", [
    ("utf-8", "--hooks", os.fsdecode(b"\xff.py"), "hooks \\udcff.py"),   # bytes that are not UTF-8
    ("ascii", "--name", "caf\u00e9", "listener caf\\xe9:"),
])
def test_check_prints_values_its_output_cannot_encode_escaped(encoding, flag, value, shown):
    rc, out, err = run_cli(["check", "--listen", "127.0.0.1:7101", "--upstream", "127.0.0.1:9", flag, value],
                           env={"PYTHONIOENCODING": encoding})
    assert rc == 0 and err == "", err
    assert shown in out


def test_an_error_line_with_bytes_that_are_not_utf8_is_one_line():
    rc, out, err = run_cli(["check", "--listen", "127.0.0.1:7101", "--upstream", "127.0.0.1:9",
                            "--workers", os.fsdecode(b"\xff")], env={"PYTHONIOENCODING": "utf-8"})
    assert_one_line_error(rc, out, err, "--workers", "'\\udcff'", "is not a whole number")


@pytest.mark.parametrize("command", [["check"], []])
def test_a_bad_fastproxy_engine_is_refused_by_check_as_by_the_run(command):
    rc, out, err = run_cli(command + ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"],
                           env={"FASTPROXY_ENGINE": "bogus"})
    assert_one_line_error(rc, out, err)
    assert err == "fastproxy: error: FASTPROXY_ENGINE: 'bogus': must be one of auto, epoll, kernel, poll\n"


def test_fastproxy_engine_does_not_matter_to_check_when_the_engine_is_given():
    out = check("--listen", "127.0.0.1:7101", "--upstream", "127.0.0.1:9", "--engine", "poll")
    assert "engine poll" in out
    rc, out, err = run_cli(["check", "--listen", "127.0.0.1:7101", "--upstream", "127.0.0.1:9", "--engine", "poll"],
                           env={"FASTPROXY_ENGINE": "bogus"})
    assert rc == 0, err


# The CLI's main() with root's privileges dropped after the imports: root
# reads any file whatever its mode, nobody does not.
AS_NOBODY = """
import os, sys
from fastproxy.cli import build_parser, main
# What main() imports lazily (argparse's formatter imports shutil), while the
# interpreter's files are still readable: under /root they are not to nobody.
build_parser().format_help()
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
sys.exit(main(sys.argv[1:]))
"""


def test_an_unreadable_file_is_one_line(tmp_path):
    path = write(tmp_path, ONE)
    os.chmod(path, 0)
    cp = subprocess.run([sys.executable, "-c", AS_NOBODY, "check", "--config", path], capture_output=True,
                        text=True, timeout=30, env=subprocess_env(), stdin=subprocess.DEVNULL)
    assert_one_line_error(cp.returncode, cp.stdout, cp.stderr)
    assert cp.stderr == f"fastproxy: error: {path}: cannot be read: permission denied\n"


def test_help_names_config_and_check():
    rc, out, err = run_cli(["-h"])
    assert rc == 0, err
    assert "--config FILE" in out and "fastproxy [check]" in out


def test_configuration_page_names_every_option():
    from fastproxy.options import OPTIONS
    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as f:
        page = f.read()
    missing = [o.name for o in OPTIONS if f"`{o.name}`" not in page]
    assert not missing, missing


def test_check_shows_addresses_and_intervals_as_written(tmp_path):
    path = write(tmp_path, """
stats = "unix:/run/fastproxy/stats.sock"
resolver = "[::1]:5353"
resolve_interval = "2s-1m"
[[listeners]]
listen = "127.0.0.1:0"
upstreams = ["127.0.0.1:9"]
""")
    rc, out, err = run_cli(["check", "--config", str(path)])
    assert rc == 0, err
    process = next(line for line in out.splitlines() if line.startswith("process: "))
    assert "stats unix:/run/fastproxy/stats.sock," in process
    assert "resolver [::1]:5353," in process
    assert "resolve_interval 2s-1m," in process


@pytest.mark.skipif(not _core.HAVE_KEEPALIVE_TIMERS, reason="this build has no keepalive timers")
def test_check_shows_tcp_keepalive_as_written(tmp_path):
    path = write(tmp_path, """
[[listeners]]
listen = "127.0.0.1:0"
upstreams = ["127.0.0.1:9"]
tcp_keepalive = "1m:10s:6"
[[listeners]]
listen = "127.0.0.1:0"
name = "b"
upstreams = ["127.0.0.1:9"]
tcp_keepalive = "30s::3"
""")
    rc, out, err = run_cli(["check", "--config", str(path)])
    assert rc == 0, err
    assert "tcp_keepalive 60s:10s:6" in out and "tcp_keepalive 30s::3" in out, out
    rc, out, err = run_cli(["check", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"])
    assert rc == 0 and "tcp_keepalive off" in out, out


def test_a_bad_tcp_keepalive_in_the_file_is_one_line(tmp_path):
    path = write(tmp_path, """
[[listeners]]
listen = "127.0.0.1:0"
upstreams = ["127.0.0.1:9"]
tcp_keepalive = 20000000
""")
    rc, out, err = run_cli(["check", "--config", str(path)])
    assert_one_line_error(rc, out, err, "listeners[0].tcp_keepalive", "20000000", "IDLE")
