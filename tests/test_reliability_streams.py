"""Nothing lost: 200 bridges stream seeded random data both ways, in random
chunks with random pauses, each side half-closing when its stream is sent
(tests/support/traffic.py), and every byte must arrive in order on both
sides. What tests/test_traffic_harness.py (no hook), test_reload.py (20
reloads, no hook) and test_takeover.py (echo bridges, no half-close) leave
out: an identity on_data hook (passing, and replacing each chunk by a copy
of itself), a reload of a hooked listener, and a takeover under this load,
with and without the hook."""
import os
import shutil
import tempfile
import time

import pytest

from fastproxy import Config, Proxy
from support.cli import CliProxy
from support.traffic import StreamLoad, VerifyingServer
from support.waits import stop_bounded, wait_for

KiB = 1024

HOOKS = {
    "pass": "def on_data(conn, direction, data):\n    return None\n",
    "copy": "def on_data(conn, direction, data):\n    return bytes(data)\n",
}


@pytest.fixture
def hooks_file(tmp_path):
    def write(kind):
        path = tmp_path / ("identity_%s.py" % kind)
        path.write_text(HOOKS[kind])
        return str(path)
    return write


def _check(result, *servers):
    result.assert_all_ok()
    wait_for(lambda: all(not s.bad() and not s.active for s in servers), 10)
    for s in servers:
        s.assert_all_ok()


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(HOOKS))
def test_200_bridges_through_an_identity_on_data_hook(make_proxy, hooks_file, kind):
    with VerifyingServer() as srv:
        p = make_proxy(srv.addr, hooks=hooks_file(kind), workers=2)
        with StreamLoad(p.address, n=200, server=srv, seed=21) as load:
            result = load.wait(90)
        _check(result, srv)
        st = p.stats()
        assert st["hook_errors"] == 0 and st["stale_answers"] == 0, st
        assert st["accepted"] == 200


@pytest.mark.slow
def test_reloads_of_a_hooked_listener_under_load_lose_nothing(engine, hooks_file):
    """Each reload replaces the hooked listener's block (its limit changes):
    the old block's bridges go on calling the hook until they end."""
    path = hooks_file("copy")
    with VerifyingServer() as srv:
        def config(i):
            return [Config.build(listen="127.0.0.1:0" if i == 0 else "%s:%d" % p.address,
                                 upstreams=[srv.addr], engine=engine, workers=2, hooks=path,
                                 max_connections=1000 + i)]
        p = None
        p = Proxy.from_config(config(0)).start()
        try:
            load = StreamLoad(p.address, n=200, server=srv, seed=23, max_pause=0.2).start()
            assert load.wait_progress(0.05, 20)
            for i in range(1, 11):
                p.reload(config(i))
                time.sleep(0.1)
            moved_during = load.bytes_moved()
            result = load.wait(120)
            _check(result, srv)
            assert moved_during < load.total_bytes, "the reloads did not overlap the traffic"
            assert p.stats()["hook_errors"] == 0
        finally:
            stop_bounded(p)


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="fp-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [None, "copy"])
def test_a_takeover_under_load_loses_nothing(engine, sock_dir, hooks_file, kind):
    """The old process carries its 200 bridges to their end after the new
    one took the listening socket; bridges that connect after it go to the
    new one. Every byte of both arrives."""
    path = os.path.join(sock_dir, "takeover.sock")
    extra = ["--hooks", hooks_file(kind)] if kind else []
    procs = []

    def start():
        cp = CliProxy(["--listen", "127.0.0.1:0", "--upstream", srv.addr, "--takeover", path,
                       "--engine", engine, "--workers", "2", "--drain-timeout", "60s"] + extra)
        procs.append(cp)
        return cp

    with VerifyingServer() as srv:
        try:
            old = start()
            addr = old.connect_addr()
            before = StreamLoad(addr, n=200, server=srv, seed=29, max_pause=0.3).start()
            assert before.wait_progress(0.05, 20)
            new = start()
            assert new.address == old.address
            assert new.stderr.wait_line(r"took 1 listening socket", 10)
            after = StreamLoad(addr, n=50, server=srv, seed=31, max_pause=0.05).start()
            moved_during = before.bytes_moved()
            _check(before.wait(120), srv)
            _check(after.wait(60), srv)
            assert moved_during < before.total_bytes, "the takeover did not overlap the traffic"
            assert old.wait(30) == 0, old.stderr.text()
            for cp in (old, new):
                assert "Traceback" not in cp.stderr.text(), cp.stderr.text()
        finally:
            for cp in procs:
                cp.kill()
