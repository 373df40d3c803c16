"""worker_cpus / --worker-cpus: worker i runs on the i-th CPU of the list
(round robin when there are more workers), read back from each worker
thread's Cpus_allowed_list; a CPU this process may not use, or a list that
does not parse, is one clear error."""
import os

import pytest

from fastproxy import ConfigError, Proxy
from support.cli import assert_one_line_error, run_cli
from support.sockets import echo_roundtrip

pytestmark = pytest.mark.linux_only
# Collected everywhere (the marker skips elsewhere), so no sched_getaffinity
# at import where os lacks it.
USABLE = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]


def _allowed(tid):
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for thread {tid}")


def _worker_cpus(proxy):
    return [_allowed(t.native_id) for t in proxy._threads if t.name.startswith("fastproxy-worker-")]


def test_each_worker_runs_on_its_cpu_round_robin(make_proxy, echo_server):
    cpus = USABLE[:2]
    p = make_proxy(echo_server.addr, workers=3, worker_cpus=",".join(map(str, cpus)))
    assert p.config.process.worker_cpus == tuple(cpus)
    want = [str(cpus[i % len(cpus)]) for i in range(3)]
    assert _worker_cpus(p) == want
    assert echo_roundtrip(p.address, b"pinned") == b"pinned"


def test_unpinned_by_default(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, workers=2)
    assert p.config.process.worker_cpus is None
    everything = _allowed(os.getpid())
    assert _worker_cpus(p) == [everything, everything]


@pytest.mark.parametrize("value, needle", [
    ("x", "CPU numbers"),
    ("3-1", "CPU numbers"),
    ("", "CPU numbers"),
    ([], "at least one"),
    ([True], "CPU numbers"),
    (str(max(USABLE) + 1), "not one this process may use"),
])
def test_bad_worker_cpus_is_one_clear_error(value, needle):
    with pytest.raises(ConfigError) as info:
        Proxy("127.0.0.1:0", "127.0.0.1:9", worker_cpus=value)
    assert isinstance(info.value, ValueError)
    assert "worker_cpus" in str(info.value) and needle in str(info.value)


def test_cli_bad_worker_cpus_exits_2():
    bad = str(max(USABLE) + 1)
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--worker-cpus", bad])
    assert_one_line_error(rc, out, err, "--worker-cpus", bad)


def test_a_cpu_gone_at_start_is_named(make_proxy_any, echo_server, monkeypatch, caplog):
    # The CPU passed the configuration check, then could not be used when the
    # worker started (taken offline, or the process's mask shrank meanwhile).
    def refuse(pid, cpus):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    p = make_proxy_any(echo_server.addr, workers=1, worker_cpus=str(USABLE[0]), start=False)
    with pytest.raises(RuntimeError, match="did not start"):
        p.start()
    assert f"worker 0 cannot run on CPU {USABLE[0]} (worker_cpus): Invalid argument" in caplog.text
