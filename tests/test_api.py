"""The Python API: compiled core, engines, configuration errors, properties."""
import socket
import subprocess
import sys

import pytest

import fastproxy
from fastproxy import ConfigError, Proxy
from support.cli import subprocess_env
from support.sockets import echo_roundtrip
from support.waits import stop_bounded


def test_compiled_core_loaded():
    core = fastproxy._core
    assert core.__file__.endswith(".so"), "fastproxy._core is not the compiled extension: %s" % core.__file__
    if sys.platform.startswith("linux") and not core.PORTABLE:
        assert "epoll" in core.ENGINES and "poll" in core.ENGINES, core.ENGINES


def test_configerror_is_valueerror():
    assert issubclass(ConfigError, ValueError)


def _build_and_start(**kw):
    p = Proxy(**kw)
    try:
        p.start()
    finally:
        try:
            stop_bounded(p, timeout=1, limit=10)
        except Exception:
            pass


def _names(msg, field, value):
    assert field in msg or field.replace("_", "-") in msg or field.replace("_", " ") in msg, \
        "error does not name the field %r: %r" % (field, msg)
    assert value in msg, "error does not name the value %r: %r" % (value, msg)


BAD = [
    ({"listen": "nocolon"}, "listen", "nocolon"),
    ({"listen": "127.0.0.1:99999"}, "listen", "99999"),
    ({"listen": "127.0.0.1:abc"}, "listen", "abc"),
    ({"upstream": "127.0.0.1:65536"}, "upstream", "65536"),
    ({"upstream": "nonexistent.invalid:80"}, "upstream", "nonexistent.invalid"),
    ({"upstreams": ["127.0.0.1:9", "bad"]}, "upstream", "bad"),
    ({"connect_timeout": "5x"}, "connect_timeout", "5x"),
    ({"drain_timeout": "soon"}, "drain_timeout", "soon"),
    ({"half_close_timeout": "1.5.2s"}, "half_close_timeout", "1.5.2s"),
    ({"engine": "turbo"}, "engine", "turbo"),
    ({"workers": -1}, "workers", "-1"),
    ({"busy_poll": "spin"}, "busy_poll", "spin"),
    ({"busy_poll": -1}, "busy_poll", "-1"),
    ({"notsent_lowat": "lots"}, "notsent_lowat", "lots"),
    ({"notsent_lowat": "16q"}, "notsent_lowat", "16q"),
    ({"notsent_lowat": -1}, "notsent_lowat", "-1"),
    ({"notsent_lowat": "2048m"}, "notsent_lowat", "2048m"),
    ({"notsent_lowat": True}, "notsent_lowat", "True"),
    ({"max_hold": 0}, "max_hold", "0"),
    ({"max_hold": "lots"}, "max_hold", "lots"),
    ({"max_hold": 1.5}, "max_hold", "1.5"),
]


@pytest.mark.parametrize("kw,field,value", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_config_raises_configerror(any_engine, kw, field, value):
    args = {"listen": "127.0.0.1:0", "upstream": "127.0.0.1:9", "engine": any_engine}
    if "upstreams" in kw:
        del args["upstream"]
    args.update(kw)
    with pytest.raises(ConfigError) as exc:
        _build_and_start(**args)
    _names(str(exc.value), field, value)


def test_upstream_and_upstreams_together(any_engine):
    with pytest.raises(ConfigError) as exc:
        _build_and_start(listen="127.0.0.1:0", upstream="127.0.0.1:9",
                         upstreams=["127.0.0.1:10"], engine=any_engine)
    assert "upstream" in str(exc.value)


def test_port_in_use_raises_configerror(any_engine):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as exc:
            _build_and_start(listen="127.0.0.1:%d" % port, upstream="127.0.0.1:9", engine=any_engine)
    assert str(port) in str(exc.value)


@pytest.mark.parametrize("value", [5, 0.5, "5", "5s", "500ms", "2m", "1h"])
def test_durations_accepted(engine, echo_server, value):
    p = Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, engine=engine,
              connect_timeout=value, drain_timeout=value, half_close_timeout=value)
    p.start()
    try:
        assert echo_roundtrip(p.address, b"d") == b"d"
    finally:
        stop_bounded(p, timeout=1, limit=10)


def test_address_port_zero_gives_real_port(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    host, port = p.address
    assert host == "127.0.0.1" and isinstance(port, int) and 0 < port < 65536
    with socket.create_connection((host, port), timeout=5):
        pass


def test_explicit_workers(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, workers=3)
    assert p.workers == 3
    for i in range(6):
        assert echo_roundtrip(p.address, b"w%d" % i) == b"w%d" % i


@pytest.mark.linux_only
def test_default_workers_follow_cpu_affinity(any_engine):
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]});"
            "from fastproxy import Proxy;"
            "p = Proxy(listen='127.0.0.1:0', upstream='127.0.0.1:9', engine=%r);"
            "p.start(); print(p.workers); p.stop(1)" % any_engine)
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30,
                        env=subprocess_env())
    assert cp.returncode == 0, cp.stderr.decode()
    assert cp.stdout.split()[-1] == b"1", "workers default must be len(os.sched_getaffinity(0))"


def test_engine_auto_and_env_override(engine, monkeypatch, echo_server):
    monkeypatch.setenv("FASTPROXY_ENGINE", engine)
    p = Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, engine="auto")
    p.start()
    try:
        assert p.engine == engine
        assert echo_roundtrip(p.address, b"auto") == b"auto"
    finally:
        stop_bounded(p, timeout=1, limit=10)


@pytest.mark.linux_only
@pytest.mark.skipif(fastproxy._core.PORTABLE, reason="a portable build has no epoll")
def test_engine_auto_prefers_epoll_on_linux(monkeypatch, echo_server):
    monkeypatch.delenv("FASTPROXY_ENGINE", raising=False)
    p = Proxy(listen="127.0.0.1:0", upstream=echo_server.addr)
    p.start()
    try:
        assert p.engine == "epoll"
    finally:
        stop_bounded(p, timeout=1, limit=10)


def test_start_stop_twice_is_safe(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    assert echo_roundtrip(p.address, b"1") == b"1"
    stop_bounded(p, limit=10)
    stop_bounded(p, limit=10)
