"""The config file: TOML on disk -> ProxyConfig, and every mistake as one
line naming the file, the key path and the value."""
import dataclasses
import os
import subprocess
import sys

import pytest

import fastproxy
from fastproxy import ConfigError, ConfigFileError, ProxyConfig, Upstream
from fastproxy.config import SECTION_TYPES, Config
from fastproxy.configfile import config_from_mapping, load_config
from support.cli import subprocess_env

ONE = """
[[listeners]]
listen = "127.0.0.1:0"
upstreams = ["127.0.0.1:9"]
"""


def write(tmp_path, text, name="fastproxy.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(tmp_path, text, **kw):
    path = write(tmp_path, text)
    with pytest.raises(ConfigFileError) as info:
        load_config(path, **kw)
    return path, str(info.value)


# ---- valid files

def test_one_listener_is_the_same_config_as_the_keywords(tmp_path):
    pc = load_config(write(tmp_path, ONE))
    assert isinstance(pc, ProxyConfig)
    assert pc.source == str(tmp_path / "fastproxy.toml")
    assert pc.log_level is None
    assert isinstance(pc.process, SECTION_TYPES["process"])
    assert len(pc.listeners) == 1 and isinstance(pc.listeners[0], Config)
    same = ProxyConfig.from_options(listen="127.0.0.1:0", upstreams=["127.0.0.1:9"])
    assert pc.listeners == same.listeners
    assert pc.process == same.process == pc.listeners[0].process
    assert same.source is None and same.log_level is None


def test_from_options_takes_one_upstream_too():
    pc = ProxyConfig.from_options("127.0.0.1:9", listen=":0", name="web")
    assert pc.listeners[0].upstream_group.upstreams == (Upstream("127.0.0.1:9"),)
    assert pc.listeners[0].name == "web"


def test_two_listeners_with_defaults_and_process_options(tmp_path):
    pc = load_config(write(tmp_path, """
workers = 3
engine = "poll"
busy_poll = "1ms"
fd_limit = "raise"
drain_timeout = "2s"
hook_threads = 4
log_level = "warning"

[defaults]
connect_timeout = "2s"
max_connections = 100
balance = "leastconn"

[[listeners]]
name = "web"
listen = "127.0.0.1:8080"
upstreams = ["127.0.0.1:9001", "127.0.0.1:9002@3,max-connections=50,backup"]

[[listeners]]
listen = "[::1]:5432"
upstreams = ["127.0.0.1:9003"]
connect_timeout = "500ms"
max_connections = 7
"""))
    web, db = pc.listeners
    assert pc.log_level == "warning"
    assert (pc.process.workers, pc.process.engine, pc.process.busy_poll, pc.process.fd_limit) == (3, "poll", 0.001, "raise")
    for c in pc.listeners:
        assert c.process == pc.process
        assert c.timeouts.drain_timeout == 2.0 and c.hooks.hook_threads == 4
        assert c.balancing.balance == "leastconn"
    assert web.listener.name == "web" and web.listener.listen == ("127.0.0.1", 8080)
    assert web.timeouts.connect_timeout == 2.0 and web.limits.max_connections == 100
    assert web.upstream_group.upstreams == (Upstream("127.0.0.1:9001"),
                                            Upstream("127.0.0.1:9002", 3, 50, True))
    assert db.listener.name is None and db.name == "[::1]:5432"
    assert db.timeouts.connect_timeout == 0.5 and db.limits.max_connections == 7


def test_upstream_tables_and_strings_mix(tmp_path):
    pc = load_config(write(tmp_path, """
[[listeners]]
listen = ":0"
upstreams = [
  "127.0.0.1:9001@2",
  { address = "127.0.0.1:9002" },
  { address = "127.0.0.1:9003", weight = 0, max_connections = 5, backup = true },
]
"""))
    assert pc.listeners[0].upstream_group.upstreams == (
        Upstream("127.0.0.1:9001", 2), Upstream("127.0.0.1:9002"), Upstream("127.0.0.1:9003", 0, 5, True))


def test_an_upstream_table_takes_srv_as_the_string_form_does(tmp_path):
    pc = load_config(write(tmp_path, """
[[listeners]]
listen = ":0"
upstreams = [
  "srv:_a._tcp.example,max-connections=5",
  { address = "srv:_B._tcp.example.", max_connections = 5, backup = true },
  { address = "unix:/run/app.sock" },
]
"""))
    assert pc.listeners[0].upstream_group.upstreams == (
        Upstream("srv:_a._tcp.example", 1, 5), Upstream("srv:_b._tcp.example", 1, 5, True),
        Upstream("unix:/run/app.sock"))
    assert [(u.host, u.port) for u in pc.listeners[0].upstream_group.upstreams[:2]] == [
        ("srv:_a._tcp.example", 0), ("srv:_b._tcp.example", 0)]


def test_upstreams_may_come_from_defaults(tmp_path):
    pc = load_config(write(tmp_path, """
[defaults]
upstreams = ["127.0.0.1:9"]
[[listeners]]
listen = "127.0.0.1:1"
[[listeners]]
listen = "127.0.0.1:2"
upstreams = ["127.0.0.1:10"]
"""))
    assert [c.upstream_group.upstreams[0].port for c in pc.listeners] == [9, 10]


def test_listen_port_zero_may_repeat_with_names(tmp_path):
    """The kernel picks a port for each; their names tell them apart."""
    named = ONE.replace("[[listeners]]", '[[listeners]]\nname = "a"') + ONE.replace("[[listeners]]", '[[listeners]]\nname = "b"')
    pc = load_config(write(tmp_path, named))
    assert [c.name for c in pc.listeners] == ["a", "b"]
    path, got = error_of(tmp_path, ONE + ONE)
    assert got == (f"{path}: listeners[1].listen: '127.0.0.1:0': is also the name of listeners[0] (names must be "
                   "unique); a listener without a name is named by its listen address: give it a name")


def test_a_mapping_has_no_source():
    pc = config_from_mapping({"listeners": [{"listen": ":0", "upstreams": ["127.0.0.1:9"]}]})
    assert pc.source is None
    with pytest.raises(ConfigFileError) as info:
        config_from_mapping({"listeners": [{"listen": ":0", "upstreams": ["127.0.0.1:9"], "queue_size": 0}]})
    assert str(info.value) == "listeners[0].queue_size: 0: is out of range (1-16777216)"
    assert info.value.field == "listeners[0].queue_size" and info.value.value == 0


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, 'workers = 2\nlog_level = "debug"\n' + ONE.replace("[[listeners]]", "[[listeners]]\nqueue_size = 5"))
    pc = load_config(path, overrides={"workers": 4, "queue_size": "9", "log_level": "error"})
    assert pc.process.workers == 4 and pc.listeners[0].limits.queue_size == 9 and pc.log_level == "error"


def test_errors_are_config_errors_and_value_errors():
    assert issubclass(ConfigFileError, ConfigError) and issubclass(ConfigFileError, ValueError)
    assert "ProxyConfig" in fastproxy.__all__ and "ConfigFileError" in fastproxy.__all__


def test_proxy_config_holds_its_invariants():
    one = ProxyConfig.from_options(listen=":0", upstreams=["127.0.0.1:9"])
    with pytest.raises(ConfigError, match="needs at least one listener"):
        ProxyConfig(one.process, ())
    other = dataclasses.replace(one.process, workers=one.process.workers + 1)
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.process"):
        ProxyConfig(other, one.listeners)


# ---- the file itself

def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigFileError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such file"


def test_a_directory(tmp_path):
    with pytest.raises(ConfigFileError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: is a directory, not a config file"


# Drops root's privileges after the imports, so that root too meets a file
# it may not read (root reads any file whatever its mode).
UNREADABLE = """
import os, sys
from fastproxy.configfile import ConfigFileError, load_config
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
try:
    load_config(sys.argv[1])
except ConfigFileError as exc:
    print(exc)
"""


def test_unreadable_file(tmp_path):
    path = write(tmp_path, ONE)
    os.chmod(path, 0)
    cp = subprocess.run([sys.executable, "-c", UNREADABLE, path], capture_output=True, text=True,
                        timeout=30, env=subprocess_env())
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == f"{path}: cannot be read: permission denied"


def test_invalid_utf8_names_line_and_offset(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'workers = 2\nlog_level = "d\xffbug"\n')
    with pytest.raises(ConfigFileError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}:2: is not UTF-8: byte 0xff at offset 26"
    assert info.value.line == 2


@pytest.mark.parametrize("text,where,problem", [
    ("workers = \n", ":1:11", "invalid TOML: Invalid value"),
    ("[[listeners]]\nlisten = \":0\"\nlisten = \":1\"\n", ":3:14", "invalid TOML: Cannot overwrite a value"),
    ('[[listeners]]\nupstreams = ["a:1"\n', ":2", "invalid TOML: Unclosed array at the end of the file"),
])
def test_toml_syntax_error_names_line(tmp_path, text, where, problem):
    path, message = error_of(tmp_path, text)
    assert message == f"{path}{where}: {problem}"


@pytest.mark.parametrize("text", ["a = " + "[" * 100000 + "]" * 100000 + "\n",
                                  ONE + "allow = " + "[" * 500 + "]" * 500 + "\n",
                                  ONE + "allow = " + "{a = " * 500 + "1" + "}" * 500 + "\n"])
def test_toml_nested_too_deeply_is_one_error_naming_the_file(tmp_path, text):
    path, message = error_of(tmp_path, text)
    assert message == f"{path}: invalid TOML: arrays or tables nested too deeply"


# ---- the document's shape

@pytest.mark.parametrize("text,message", [
    ("", "has no listeners: add a [[listeners]] table with listen and upstreams"),
    ("workers = 2\n", "has no listeners: add a [[listeners]] table with listen and upstreams"),
    ("listeners = []\n", "has no listeners: add a [[listeners]] table with listen and upstreams"),
    ('[listeners]\nlisten = ":0"\n',
     "listeners: {'listen': ':0'}: expected an array of tables: [[listeners]], not [listeners]"),
    ('listeners = "web"\n', "listeners: 'web': expected an array of tables: [[listeners]]"),
    ("listeners = [1]\n", "listeners[0]: 1: expected a table: [[listeners]]"),
    ("defaults = 3\n" + ONE, "defaults: 3: expected a table: [defaults]"),
    ("[[listeners]]\nupstreams = [\"127.0.0.1:9\"]\n", "listeners[0]: has no listen (required)"),
    ('[[listeners]]\nlisten = ":0"\n', "listeners[0]: has no upstreams (required; here or in [defaults])"),
])
def test_shape_errors(tmp_path, text, message):
    path, got = error_of(tmp_path, text)
    assert got == f"{path}: {message}"


@pytest.mark.parametrize("text,message", [
    ("wrokers = 2\n" + ONE, "wrokers: 2: is not a top-level key (did you mean workers?)"),
    ("hook-threads = 2\n" + ONE, "hook-threads: 2: keys are written with underscores: hook_threads"),
    ("connect_timeout = 2\n" + ONE,
     "connect_timeout: 2: is a listener option: set it in [defaults] or in a [[listeners]] table"),
    ("[defaults]\nmax_conections = 2\n" + ONE,
     "defaults.max_conections: 2: is not a listener option (did you mean max_connections?)"),
    ("[defaults]\nworkers = 2\n" + ONE,
     "defaults.workers: 2: is a process option: set it at the top of the file, before the first [table]"),
    ("[defaults]\nlog_level = \"info\"\n" + ONE,
     "defaults.log_level: 'info': is a process option: set it at the top of the file, before the first [table]"),
    ('listen = ":1"\n' + ONE, "listen: ':1': is each listener's own: set it in the [[listeners]] tables"),
    ('name = "x"\n' + ONE, "name: 'x': is each listener's own: set it in the [[listeners]] tables"),
    ('[defaults]\nlisten = ":1"\n' + ONE,
     "defaults.listen: ':1': is each listener's own: set it in the [[listeners]] tables"),
    ('[defaults]\nname = "x"\n' + ONE, "defaults.name: 'x': is each listener's own: set it in the [[listeners]] tables"),
    (ONE + "engine = \"poll\"\n",
     "listeners[0].engine: 'poll': is a process option: set it at the top of the file, before the first [table]"),
    (ONE + "max-connections = 3\n", "listeners[0].max-connections: 3: keys are written with underscores: max_connections"),
    (ONE + "upstream = \"127.0.0.1:10\"\n",
     "listeners[0].upstream: '127.0.0.1:10': is not a listener option (did you mean upstreams?)"),
    (ONE + "colour = \"blue\"\n", "listeners[0].colour: 'blue': is not a listener option"),
])
def test_unknown_and_misplaced_keys(tmp_path, text, message):
    path, got = error_of(tmp_path, text)
    assert got == f"{path}: {message}"


def test_a_long_or_unprintable_key_is_capped_and_escaped(tmp_path):
    path, got = error_of(tmp_path, f"{'k' * 5000} = 1\n" + ONE)
    assert got == f"{path}: {'k' * 100}... (5000 characters): 1: is not a top-level key"
    path, got = error_of(tmp_path, ONE + f'"a\\n{"b" * 5000}" = 1\n')
    assert got.startswith(f"{path}: 'listeners[0].a\\nbbb") and "... (5015 characters): 1: is not a listener" in got
    assert len(got) < 300


def _listener(lines):
    return '[[listeners]]\nlisten = "127.0.0.1:0"\n' + lines


@pytest.mark.parametrize("text,message", [
    (_listener('upstreams = "127.0.0.1:9"\n'),
     "listeners[0].upstreams: '127.0.0.1:9': expected a list of upstreams, e.g. "
     '["HOST:PORT", { address = "HOST:PORT", weight = 2 }]'),
    (_listener("upstreams = []\n"), "listeners[0].upstreams: []: needs at least one upstream"),
    (_listener('upstreams = ["127.0.0.1:9", "127.0.0.1:70000"]\n'),
     "listeners[0].upstreams[1]: '127.0.0.1:70000': port 70000 is out of range (1-65535)"),
    (_listener('upstreams = ["127.0.0.1:9@x"]\n'),
     "listeners[0].upstreams[0]: '127.0.0.1:9@x': weight 'x' is not a whole number"),
    (_listener('upstreams = ["127.0.0.1:9", "127.0.0.1:9"]\n'),
     "listeners[0].upstreams: '127.0.0.1:9': is listed twice"),
    (_listener("upstreams = [9]\n"),
     "listeners[0].upstreams[0]: 9: expected HOST:PORT[@WEIGHT][,max-connections=N][,backup] or "
     "srv:NAME[,max-connections=N][,backup] or a table "
     "with an address"),
    (_listener("upstreams = [{ weight = 2 }]\n"), "listeners[0].upstreams[0]: has no address (required)"),
    (_listener('upstreams = [{ address = "127.0.0.1" }]\n'),
     "listeners[0].upstreams[0].address: '127.0.0.1': expected HOST:PORT"),
    (_listener("upstreams = [{ address = 9 }]\n"),
     "listeners[0].upstreams[0].address: 9: expected a string like HOST:PORT"),
    (_listener('upstreams = [{ address = "srv:" }]\n'),
     "listeners[0].upstreams[0].address: 'srv:': needs a DNS name after srv: (srv:_service._proto.name)"),
    (_listener('upstreams = [{ address = "srv:_x._tcp.example", weight = 2 }]\n'),
     "listeners[0].upstreams[0]: 'srv:_x._tcp.example': an SRV upstream takes its weights from the records "
     "(no weight)"),
    (_listener('upstreams = [{ address = "127.0.0.1:9", weight = 300 }]\n'),
     "listeners[0].upstreams[0].weight: 300: is out of range (0-256)"),
    (_listener('upstreams = [{ address = "127.0.0.1:9", weight = true }]\n'),
     "listeners[0].upstreams[0].weight: True: is not a whole number"),
    (_listener('upstreams = [{ address = "127.0.0.1:9", max_connections = 0 }]\n'),
     "listeners[0].upstreams[0].max_connections: 0: is out of range (1-16777216)"),
    (_listener('upstreams = [{ address = "127.0.0.1:9", backup = "yes" }]\n'),
     "listeners[0].upstreams[0].backup: 'yes': must be true or false"),
    (_listener('upstreams = [{ address = "127.0.0.1:9", port = 9 }]\n'),
     "listeners[0].upstreams[0].port: 9: is not an upstream key; an upstream has address, weight, "
     "max_connections, backup"),
    (_listener('upstreams = [{ address = "127.0.0.1:9", max-connections = 9 }]\n'),
     "listeners[0].upstreams[0].max-connections: 9: keys are written with underscores: max_connections"),
    ('[defaults]\nupstreams = ["127.0.0.1:0"]\n' + _listener(""),
     "defaults.upstreams[0]: '127.0.0.1:0': port 0 is out of range (1-65535)"),
])
def test_upstream_errors(tmp_path, text, message):
    path, got = error_of(tmp_path, text)
    assert got == f"{path}: {message}"


@pytest.mark.parametrize("text,message", [
    ('workers = 0\n' + ONE, "workers: 0: is out of range (1-1024)"),
    ('engine = "turbo"\n' + ONE, "engine: 'turbo': must be one of auto, epoll, kernel, poll"),
    ('drain_timeout = "soon"\n' + ONE, "drain_timeout: 'soon': is not a duration (use 5, 5s, 500ms, 2m, 1h)"),
    ('log_level = "loud"\n' + ONE, "log_level: 'loud': must be one of debug, info, warning, error"),
    ('[defaults]\nconnect_timeout = "5x"\n' + ONE,
     "defaults.connect_timeout: '5x': is not a duration (use 5, 5s, 500ms, 2m, 1h)"),
    (ONE + ONE.replace('"127.0.0.1:0"', '":1"') + "max_connections = 0\n",
     "listeners[1].max_connections: 0: is out of range (1-16777216)"),
    (_listener('upstreams = ["127.0.0.1:9"]\nallow = ["10.1.2.3/8"]\n'),
     "listeners[0].allow: '10.1.2.3/8': has bits set after the /8 prefix; did you mean 10.0.0.0/8?"),
    (_listener('upstreams = ["127.0.0.1:9"]\naccept_proxy = "yes"\n'),
     "listeners[0].accept_proxy: 'yes': must be True or False"),
    ('[[listeners]]\nlisten = 8080\nupstreams = ["127.0.0.1:9"]\n',
     "listeners[0].listen: 8080: expected a string like HOST:PORT"),
    ('[[listeners]]\nlisten = ":0"\nname = ""\nupstreams = ["127.0.0.1:9"]\n',
     "listeners[0].name: '': expected a non-empty string"),
])
def test_option_values_are_named_by_key_path(tmp_path, text, message):
    path, got = error_of(tmp_path, text)
    assert got == f"{path}: {message}"


def test_a_bad_value_from_defaults_is_named_where_it_is_written(tmp_path):
    """A listener that sets the option itself hides the bad default; the
    error is reported for the first listener that takes the default."""
    path, got = error_of(tmp_path, '[defaults]\nqueue_size = 0\n'
                         + _listener('upstreams = ["127.0.0.1:9"]\nqueue_size = 4\n') + ONE)
    assert got == f"{path}: defaults.queue_size: 0: is out of range (1-16777216)"


@pytest.mark.parametrize("key", ["allow_file", "deny_file"])
@pytest.mark.parametrize("entry,shown", [("5", "5"), ("true", "True"), ("[]", "[]"), ("{}", "{}")])
def test_a_rule_file_entry_that_is_no_string_is_named(tmp_path, key, entry, shown):
    path, got = error_of(tmp_path, f"[defaults]\n{key} = [{entry}]\n" + ONE)
    assert got == f"{path}: defaults.{key}: {shown}: expected a file path"


@pytest.mark.parametrize("key,value,what", [
    ("allow_file", '["a\\u0000b"]', "path"),
    ("deny_file", '["a\\u0000b"]', "path"),
    ("access_log", '"a\\u0000b"', "path"),
    ("hooks", '"a\\u0000b"', "path"),
    ("unix_user", '"a\\u0000b"', "name"),
    ("unix_group", '"a\\u0000b"', "name"),
])
def test_a_nul_in_a_path_or_name_is_named(tmp_path, key, value, what):
    listen = "unix:" + str(tmp_path / "s.sock") if key.startswith("unix_") else "127.0.0.1:0"
    path, got = error_of(tmp_path, f'[[listeners]]\nlisten = "{listen}"\nupstreams = ["127.0.0.1:9"]\n'
                                   f"{key} = {value}\n")
    assert got == f"{path}: listeners[0].{key}: 'a\\x00b': a {what} cannot hold a NUL byte"


def test_a_config_path_with_a_nul_is_a_config_file_error():
    with pytest.raises(ConfigFileError) as info:
        load_config("a\0b.toml")
    assert str(info.value) == "'a\\x00b.toml': a path cannot hold a NUL byte"


def test_rule_file_errors_name_the_key(tmp_path):
    rules = tmp_path / "allow.txt"
    rules.write_text("10.0.0.0/8\nnonsense\n")
    path, got = error_of(tmp_path, _listener(f'upstreams = ["127.0.0.1:9"]\nallow_file = ["{rules}"]\n'))
    assert got.startswith(f"{path}: listeners[0].allow_file: '{rules}:2': 'nonsense' is not an IP address")


# ---- listen addresses and names are unique

@pytest.mark.parametrize("second,message", [
    ('listen = "127.0.0.1:7001"', "listeners[1].listen: '127.0.0.1:7001': is also the listen address of listeners[0]"),
    ('listen = ":7001"', "listeners[1].listen: ':7001': overlaps listeners[0].listen '127.0.0.1:7001': "
                         ":PORT is that port on every address"),
    ('listen = "127.0.0.1:7002"\nname = "127.0.0.1:7001"',
     "listeners[1].name: '127.0.0.1:7001': is also the name of listeners[0] (names must be unique)"),
])
def test_two_listeners_may_not_share(tmp_path, second, message):
    text = (_listener('upstreams = ["127.0.0.1:9"]\n').replace("127.0.0.1:0", "127.0.0.1:7001")
            + f'[[listeners]]\n{second}\nupstreams = ["127.0.0.1:9"]\n')
    path, got = error_of(tmp_path, text)
    assert got == f"{path}: {message}"


@pytest.mark.parametrize("first,second,clash", [
    ("[::1]:{P}", "[0:0::1]:{P}", "is also the listen address of listeners[0]"),
    ("127.0.0.1:{P}", "[::ffff:127.0.0.1]:{P}", "is also the listen address of listeners[0]"),
    ("0.0.0.0:{P}", "127.0.0.1:{P}", "overlaps listeners[0].listen '0.0.0.0:{P}': 0.0.0.0 is that port on every IPv4 address"),
    ("127.0.0.1:{P}", "[::]:{P}", "overlaps listeners[0].listen '127.0.0.1:{P}': :: is that port on every address"),
    ("[::]:{P}", "0.0.0.0:{P}", "overlaps listeners[0].listen '[::]:{P}': :: is that port on every address"),
    ("unix:{SOCK}", "unix:{SOCK}", "is also the listen address of listeners[0]"),
    ("unix:@fp-dup-{ABSTRACT}", "unix:@fp-dup-{ABSTRACT}", "is also the listen address of listeners[0]"),
    ("0.0.0.0:{P}", "[::1]:{P}", None),
    ("127.0.0.1:{P}", "127.0.0.2:{P}", None),
    ("unix:{SOCK}", "unix:{SOCK2}", None),
])
def test_check_refuses_what_cannot_bind_together_and_passes_what_can(tmp_path, first, second, clash):
    # `check` must agree with the run: a pair it passes binds, a pair it
    # refuses would fail against itself. Real sockets decide.
    from support.sockets import free_port

    port = str(free_port())
    sock = str(tmp_path / "s.sock")
    fill = {"P": port, "SOCK2": sock + "2", "SOCK": sock, "ABSTRACT": port}

    def spelled(text):
        return text.format(**fill)

    text = "".join(f'[[listeners]]\nname = "l{i}"\nlisten = "{spelled(a)}"\nupstreams = ["127.0.0.1:9"]\n'
                   for i, a in enumerate((first, second)))
    path = write(tmp_path, text)
    if clash is not None:
        with pytest.raises(ConfigFileError) as info:
            load_config(path)
        assert str(info.value) == f"{path}: listeners[1].listen: {spelled(second)!r}: {spelled(clash)}"
        # The run would fail on its own second bind: the refusal is real.
        p = fastproxy.Proxy(listen=spelled(first), upstream="127.0.0.1:9", workers=1).start()
        try:
            with pytest.raises(ConfigError, match="address already in use"):
                fastproxy.Proxy(listen=spelled(second), upstream="127.0.0.1:9", workers=1).start().stop()
        finally:
            p.stop()
    else:
        fastproxy.Proxy.from_config(path).start().stop()


def test_two_listeners_may_not_share_a_name(tmp_path):
    text = ('[[listeners]]\nname = "web"\nlisten = "127.0.0.1:7001"\nupstreams = ["127.0.0.1:9"]\n'
            '[[listeners]]\nname = "web"\nlisten = "127.0.0.1:7002"\nupstreams = ["127.0.0.1:9"]\n')
    path, got = error_of(tmp_path, text)
    assert got == f"{path}: listeners[1].name: 'web': is also the name of listeners[0] (names must be unique)"


# ---- overrides (the command's flags) are named as options, not keys

def test_override_mistakes_name_the_option(tmp_path):
    path = write(tmp_path, ONE + ONE)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides={"connect_timeout": "1s"})
    assert not isinstance(info.value, ConfigFileError)
    assert info.value.field == "connect_timeout"
    assert str(info.value) == ("connect_timeout: '1s': is a listener option: it can only override a config "
                               "file of one listener, and this one has 2")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides={"workers": "0"})
    assert not isinstance(info.value, ConfigFileError) and info.value.field == "workers"
