"""The option table is the one declaration of every option: the CLI flags,
the `Proxy` keywords, the Config sections and docs/reference.md come from
it, with the same names and defaults."""
import argparse
import inspect
import os
import socket
import threading
import time

import pytest

from fastproxy import ConfigError, Proxy, _core
from fastproxy.cli import build_parser
from fastproxy.config import SECTION_TYPES, Config
from fastproxy.options import COMMAND_FLAGS, OPTIONS, SECTIONS, option
from fastproxy.reference import reference_markdown
from support.cli import CliProxy, assert_one_line_error, run_cli
from support.servers import EchoServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "docs", "reference.md")
# Proxy keywords that are not options: `upstream` is one upstream (the
# same as upstreams=[...]), the rest are objects and callables, which have
# no flag.
PYTHON_ONLY = {"upstream", "sock", "health_check", "clock", "on_connect", "on_data", "on_close"}


def cli_flags():
    flags = set()
    for action in build_parser()._actions:
        flags.update(s for s in action.option_strings if s.startswith("--"))
    return flags


def test_names_are_unique_and_sections_known():
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names))
    assert len({o.cli_flag for o in OPTIONS}) == len(OPTIONS)
    assert {o.section for o in OPTIONS} == set(SECTIONS)
    assert all(o.scope in ("process", "listener") for o in OPTIONS)


def test_cli_flags_are_the_table():
    assert cli_flags() == {o.cli_flag for o in OPTIONS} | set(COMMAND_FLAGS)


def test_proxy_keywords_are_the_table_with_its_defaults():
    params = inspect.signature(Proxy.__init__).parameters
    keywords = set(params) - {"self"}
    assert keywords == {o.name for o in OPTIONS} | PYTHON_ONLY
    for o in OPTIONS:
        if o.required:
            continue
        assert params[o.name].default == o.default, (o.name, params[o.name].default, o.default)
        assert params[o.name].kind is inspect.Parameter.KEYWORD_ONLY, o.name


def test_config_sections_are_the_table():
    for section, cls in SECTION_TYPES.items():
        fields = {f.name: f.default for f in cls.__dataclass_fields__.values()}
        rows = {o.name: o.default for o in OPTIONS if o.section == section}
        assert fields == rows, section
    assert set(Config.__dataclass_fields__) == set(SECTIONS)


def test_cli_defaults_come_from_the_table():
    """A flag not given passes nothing: Proxy takes the table's default, so a
    default is written once (the help shows it from the table too)."""
    args = vars(build_parser().parse_args(["--listen", ":0", "--upstream", "127.0.0.1:9"]))
    own = {o.name: o.cli_default for o in OPTIONS if o.cli_default is not None}
    assert set(args) == {"listen", "upstreams", "log_level"} | set(own)
    assert {name: args[name] for name in own} == own
    help_text = build_parser().format_help()
    for o in OPTIONS:
        assert o.cli_flag in help_text, o.name


def test_reference_page_is_generated_from_the_table():
    with open(REFERENCE, encoding="utf-8") as f:
        page = f.read()
    assert page == reference_markdown(), "docs/reference.md is stale: python -m fastproxy.reference > docs/reference.md"
    for o in OPTIONS:
        row = [line for line in page.splitlines() if line.startswith(f"| `{o.name}` |")]
        assert len(row) == 1, o.name
        cells = [c.strip() for c in row[0].strip("|").split(" | ")]
        assert cells[1].startswith(f"`{o.cli_flag}"), (o.name, cells)
        assert cells[2] == o.default_text(), (o.name, cells)
        assert cells[3] == o.scope


def test_readme_names_every_flag():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    missing = [o.cli_flag for o in OPTIONS if o.cli_flag not in readme]
    assert not missing, missing


# One value per option, as a CLI user and as a Python user would give it:
# both must end in the same Config.
SAMPLES = {
    "listen": ("127.0.0.1:0", "127.0.0.1:0"),
    "name": ("web", "web"),
    # Not the default (None) either way; a build without the option refuses 64k.
    # The socket file's options need a unix:PATH listener, which the IP
    # options below refuse: tests/test_unix.py.
    "unix_mode": None,
    "unix_user": None,
    "unix_group": None,
    "notsent_lowat": ("64k", 65536) if _core.HAVE_NOTSENT_LOWAT else ("0", 0),
    "socket_buffer": ("64k", 65536),
    # reno is always built in; a build without TCP_CONGESTION refuses any name.
    "congestion_control": ("reno", "reno") if _core.HAVE_TCP_CONGESTION else None,
    # A build without the timers takes on (SO_KEEPALIVE alone) only.
    "tcp_keepalive": ("60s:10s:6", "1m:10:6") if _core.HAVE_KEEPALIVE_TIMERS else ("on", True),
    "tcp_user_timeout": ("2500ms", 2.5) if _core.HAVE_TCP_USER_TIMEOUT else None,
    "upstreams": (["127.0.0.1:9@2", "127.0.0.1:10,backup"], ["127.0.0.1:9@2", "127.0.0.1:10,backup"]),
    "route": ("sni", "sni"),
    "routes": (["a.example=127.0.0.1:11", "*.b.example=127.0.0.1:12", "a.example=127.0.0.1:13"],
               [{"server_names": ["a.example"], "upstreams": ["127.0.0.1:11", "127.0.0.1:13"]},
                {"server_names": ["*.b.example"], "upstreams": ["127.0.0.1:12"]}]),
    "route_timeout": ("2s", 2),
    "route_non_tls": ("reject", "reject"),
    "balance": ("leastconn", "leastconn"),
    "retries": ("0", 0),
    "max_fails": ("5", 5),
    "fail_timeout": ("2s", 2),
    "health_interval": ("500ms", 0.5),
    "health_timeout": ("1s", 1.0),
    "health_rise": ("4", 4),
    "health_fall": ("5", 5),
    "max_connections": ("100", 100),
    "max_connections_per_ip": ("3", 3),
    "on_limit": ("reject", "reject"),
    "queue_size": ("7", 7),
    "queue_timeout": ("1m", 60),
    "allow": (["10.0.0.0/8", "::1"], ["10.0.0.0/8", "::1"]),
    "deny": (["192.0.2.7"], ["192.0.2.7"]),
    "allow_file": None,   # files: covered by tests/test_access_*.py
    "deny_file": None,
    "reject_with": ("reset", "reset"),
    "allow_time": (["Mon-Fri 08:00-18:00"], ["Mon-Fri 08:00-18:00"]),
    "time_zone": ("UTC", "UTC"),
    "close_outside_window": (True, True),
    "rate_limit_per_ip": ("20/1s", "20/1s"),
    "rate_limit_table": ("100", 100),
    "connect_timeout": ("250ms", 0.25),
    "idle_timeout": ("1h", 3600),
    "max_lifetime": ("2m", 120),
    "half_close_timeout": ("30s", 30),
    "drain_timeout": ("0", 0),
    "send_proxy": ("v2", "v2"),
    "accept_proxy": (True, True),
    "accept_proxy_from": (["127.0.0.1"], ["127.0.0.1"]),
    "proxy_header_timeout": ("1s", 1),
    "proxy_header_max": ("512", 512),
    "hooks": None,        # loads code: covered by tests/test_hooks_cli.py and below
    "hook_threads": ("3", 3),
    "hook_timeout": ("2s", 2),
    "max_hold": ("256k", 262144),
    "access_log": ("-", "-"),
    "access_log_format": ("id, upstream,total_time", "id,upstream,total_time"),
    "workers": ("2", 2),
    "engine": ("poll", "poll"),
    "busy_poll": ("10ms", 0.01),
    "fd_limit": ("raise", "raise"),
    "worker_cpus": None,  # depends on this machine's CPUs: tests/test_worker_cpus.py
    "takeover": ("/run/fastproxy/takeover.sock", "/run/fastproxy/takeover.sock"),
    "log_format": ("json", "json"),
    "resolver": ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    "resolve_interval": ("2s-1m", (2.0, 60.0)),
    "stats": ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    "stats_admin": (True, True),
    "stats_token": ("s3cret", "s3cret"),
}


def test_every_option_is_reachable_from_cli_and_python():
    assert set(SAMPLES) == {o.name for o in OPTIONS}
    argv = []
    keywords = {}
    for name, sample in SAMPLES.items():
        if sample is None:
            continue
        o = option(name)
        text, value = sample
        keywords[name] = value
        if o.switch:
            argv.append(o.cli_flag)
        elif o.repeat:
            for item in text:
                argv += [o.cli_flag, item]
        else:
            argv += [o.cli_flag, text]
    args = vars(build_parser().parse_args(argv))
    args.pop("log_level")
    from_cli = Config.build(**args)
    from_python = Config.build(**keywords)
    assert from_cli == from_python
    for name, sample in SAMPLES.items():
        if sample is not None:
            assert from_cli.options()[name] != option(name).default, f"{name}: the sample is the default"


def test_unknown_keyword_is_a_config_error():
    with pytest.raises(ConfigError, match="max_conections"):
        Config.build(listen=":0", upstreams=["127.0.0.1:9"], max_conections=5)
    with pytest.raises(TypeError):
        Proxy(":0", "127.0.0.1:9", max_conections=5)  # an IDE and Python both see the signature


@pytest.mark.parametrize("flag,value", [
    ("--hook-threads", "0"), ("--hook-threads", "many"),
    ("--max-hold", "0"), ("--max-hold", "lots"), ("--max-hold", "2g"),
])
def test_new_flags_reject_bad_values(flag, value):
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", flag, value])
    assert_one_line_error(rc, out, err, flag, value)


HOOKS = """
import threading, time
def on_connect(conn):
    with open({names!r}, "a") as f:
        f.write(threading.current_thread().name + "\\n")
    time.sleep(0.3)
def on_data(conn, direction, data):
    from fastproxy import WAIT
    return WAIT
"""


def _names_of_hook_threads(tmp_path, hook_threads, clients=4):
    names = tmp_path / ("names-%d" % hook_threads)
    hooks = tmp_path / ("hooks%d.py" % hook_threads)
    hooks.write_text(HOOKS.format(names=str(names)))
    with EchoServer("127.0.0.1") as srv:
        cp = CliProxy(["--listen", "127.0.0.1:0", "--upstream", srv.addr,
                       "--hooks", str(hooks), "--hook-threads", str(hook_threads)])
        try:
            socks = [socket.create_connection(("127.0.0.1", cp.address[1]), timeout=10) for _ in range(clients)]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if names.exists() and len(names.read_text().split()) == clients:
                    break
                time.sleep(0.02)
            for s in socks:
                s.close()
        finally:
            cp.kill()
    return names.read_text().split()


def test_hook_threads_flag_sets_the_hook_thread_count(tmp_path):
    one = _names_of_hook_threads(tmp_path, 1)
    three = _names_of_hook_threads(tmp_path, 3)
    assert len(one) == 4 and len(set(one)) == 1, one
    assert len(three) == 4 and len(set(three)) > 1, three


def test_max_hold_flag_bounds_what_a_hook_holds(tmp_path):
    """An on_data that always WAITs: past --max-hold the bridge is closed."""
    hooks = tmp_path / "hold.py"
    hooks.write_text("from fastproxy import WAIT\ndef on_data(conn, direction, data):\n    return WAIT\n")
    with EchoServer("127.0.0.1") as srv:
        cp = CliProxy(["--listen", "127.0.0.1:0", "--upstream", srv.addr,
                       "--hooks", str(hooks), "--max-hold", "64k"])
        try:
            with socket.create_connection(("127.0.0.1", cp.address[1]), timeout=10) as s:
                sent = 0
                closed = threading.Event()
                s.settimeout(10)
                try:
                    while sent < 1 << 20:
                        s.sendall(b"x" * 16384)
                        sent += 16384
                        if sent > 256 * 1024:
                            s.settimeout(0.2)
                            try:
                                if s.recv(1) == b"":
                                    closed.set()
                                    break
                            except socket.timeout:
                                pass
                except (ConnectionResetError, BrokenPipeError):
                    closed.set()
                assert closed.is_set(), "the bridge was not closed past --max-hold 64k"
                # 64 KiB held plus what the socket buffers took; the
                # default (1 MiB) would take all of it.
                assert sent <= 512 * 1024, sent
        finally:
            cp.kill()
