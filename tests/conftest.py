import faulthandler
import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import netns as _netns  # noqa: E402
from support import serial as _serial  # noqa: E402
from support.cli import CliProxy  # noqa: E402
from support.servers import EchoServer  # noqa: E402
from support.waits import stop_bounded  # noqa: E402

ALL_ENGINES = ("epoll", "kernel", "poll")
# Hard ceiling per test when pytest-timeout is not installed: a hang dumps every
# thread's traceback and ends the run instead of blocking CI forever. Individual
# tests use much shorter deadlines.
TEST_WATCHDOG_S = float(os.environ.get("FASTPROXY_TEST_WATCHDOG", "300"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: heavy test (runs by default; deselect with -m 'not slow')")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """With pytest-xdist installed (the test extra has it) the suite runs in
    parallel unless `-n` says otherwise (`-n 0`: one test at a time). Set
    here rather than in pyproject's addopts so that a pytest without xdist
    still runs it, and `pytest benchmarks/` (pytest-benchmark measures
    nothing under xdist) stays serial."""
    if getattr(config.option, "numprocesses", 0) is None and not hasattr(config, "workerinput"):
        config.option.numprocesses = "auto"
        if config.option.dist == "no":
            # A few tests take half a minute or more (packaging builds
            # wheels): an idle worker takes tests queued for a busy one.
            config.option.dist = "worksteal"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """Three workers per two CPUs. Run one at a time, the suite keeps about
    a fifth of two CPUs busy: most of its time is spent waiting (timeouts,
    peers, processes starting). Four workers on two CPUs kept them 89 %
    busy, where timed tests (a deadline, a CPU-time share) ran late."""
    from fastproxy.values import default_workers   # the CPUs this process may run on

    cpus = default_workers()
    return max(2, min(8, cpus + cpus // 2))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "netns" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.serial)  # the veth pair's addresses are fixed
    if sys.platform.startswith("linux"):
        return
    skip = pytest.mark.skip(reason="linux_only: /proc or sched_*affinity, which %s lacks" % sys.platform)
    for item in items:
        if item.get_closest_marker("linux_only"):
            item.add_marker(skip)


def compiled_engines():
    core = importlib.import_module("fastproxy._core")
    return tuple(core.ENGINES)


@pytest.fixture(autouse=True)
def _watchdog(request):
    if request.config.pluginmanager.hasplugin("timeout"):
        yield  # pytest-timeout bounds each test and keeps the run going
        return
    faulthandler.dump_traceback_later(TEST_WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _serial_turn(request, tmp_path_factory):
    """Under pytest-xdist, a `serial` test runs with no other test running
    (support.serial); one at a time, this does nothing."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    shared = tmp_path_factory.getbasetemp().parent  # the workers' common root
    with _serial.turn(shared, exclusive=request.node.get_closest_marker("serial") is not None):
        yield


@pytest.fixture(params=ALL_ENGINES)
def engine(request, monkeypatch):
    """The engine under test; the whole suite runs once per engine."""
    if request.param not in compiled_engines():
        pytest.skip("engine %r not compiled in" % request.param)
    if request.param == "kernel":
        why = kernel_unavailable()
        if why:
            pytest.skip("engine 'kernel' falls back to epoll here: BPF sockmap not permitted (%s)" % why)
    monkeypatch.delenv("FASTPROXY_ENGINE", raising=False)
    return request.param


_KERNEL_WHY = []


def kernel_unavailable():
    """None where the kernel engine runs (CAP_BPF + CAP_NET_ADMIN, a kernel
    with sockmap and BTF), else why not. Asked once per run."""
    if not _KERNEL_WHY:
        _KERNEL_WHY.append(importlib.import_module("fastproxy._core").kernel_engine_check())
    return _KERNEL_WHY[0]


@pytest.fixture
def any_engine(monkeypatch):
    """One compiled engine, for tests that must name an engine but check what no
    engine takes part in (configuration and argument errors): they run once,
    not once per engine."""
    monkeypatch.delenv("FASTPROXY_ENGINE", raising=False)
    return compiled_engines()[0]


def _proxies(engine):
    from fastproxy import Proxy

    made = []

    def make(upstream=None, listen="127.0.0.1:0", start=True, **kw):
        if upstream is not None:
            kw["upstream"] = upstream
        p = Proxy(listen=listen, engine=engine, **kw)
        made.append(p)
        if start:
            p.start()
            assert p.engine == engine
        return p

    yield make
    for p in made:
        try:
            stop_bounded(p, timeout=2.0, limit=20.0)
        except Exception as e:  # a stop failure is a test failure, but stop them all first
            print("teardown: stop() failed: %r" % (e,))


@pytest.fixture
def make_proxy(engine):
    """Factory: an in-process Proxy on the engine under test, started, stopped at teardown."""
    yield from _proxies(engine)


@pytest.fixture
def make_proxy_any(any_engine):
    """make_proxy on one engine, for tests the engine takes no part in."""
    yield from _proxies(any_engine)


@pytest.fixture
def echo_server():
    with EchoServer("127.0.0.1") as srv:
        yield srv


@pytest.fixture
def cli_proxy(engine):
    """Factory: the CLI in a subprocess on the engine under test; killed at teardown."""
    procs = []

    def start(*args, **kw):
        cp = CliProxy(list(args) + ["--engine", engine], **kw)
        procs.append(cp)
        assert engine in cp.ready_line, cp.ready_line
        return cp

    yield start
    for cp in procs:
        cp.kill()


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair (support.netns):
    yields its name; a peer that is not loopback without leaving the host."""
    why = _netns.unavailable()
    if why:
        pytest.skip(why)
    try:
        cm = _netns.veth_namespace()
        name = cm.__enter__()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        yield name
    finally:
        cm.__exit__(None, None, None)
