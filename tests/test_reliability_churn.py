"""Churn without leaks: 100,000 short connections through one proxy
process, mixing clean closes, client resets, upstream resets, refused
upstreams and connect timeouts, some through an on_connect hook. Afterwards
the proxy's fds, threads and bridges are back to their baseline, its RSS
within a stated margin, and no socket of its ports is left in CLOSE_WAIT or
FIN_WAIT2, and no hook call is left queued (stats' hook_queue)."""
import os
import textwrap
import time

import pytest

from support.churn import Churn, ResetServer
from support.cli import CliProxy
from support.procfs import proc_fd_count, tcp_sockets
from support.servers import EchoServer
from support.sockets import blackhole_listener, echo_roundtrip, reserve_refusing_port, stats_over_unix
from support.waits import wait_for

TOTAL = int(os.environ.get("FASTPROXY_CHURN_TOTAL", "100000"))
DEADLINE_S = 150.0
RSS_MARGIN_KIB = 16 * 1024
CLOSE_WAIT, FIN_WAIT2 = 8, 5


def _threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def _rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _lingering(ports):
    """Sockets on the proxy's listening ports (its client side) or towards
    its upstreams, in CLOSE_WAIT or FIN_WAIT2."""
    return [s for s in tcp_sockets() if s["state"] in (CLOSE_WAIT, FIN_WAIT2)
            and (s["local_port"] in ports["listen"] or s["remote_port"] in ports["upstream"])]


def _config(tmp_path, engine, echo, resetter, refused, hole):
    hooks = tmp_path / "connect_hook.py"
    hooks.write_text("def on_connect(conn):\n    return None\n")
    path = tmp_path / "churn.toml"
    path.write_text(textwrap.dedent("""\
        workers = 2
        engine = "{engine}"
        stats = "unix:{stats}"
        [defaults]
        connect_timeout = "200ms"
        max_fails = 0
        [[listeners]]
        name = "echo"
        listen = "127.0.0.1:0"
        upstreams = ["{echo}"]
        [[listeners]]
        name = "hooked"
        listen = "127.0.0.1:0"
        upstreams = ["{echo}"]
        hooks = "{hooks}"
        [[listeners]]
        name = "reset"
        listen = "127.0.0.1:0"
        upstreams = ["{resetter}"]
        [[listeners]]
        name = "refused"
        listen = "127.0.0.1:0"
        upstreams = ["{refused}"]
        [[listeners]]
        name = "timeout"
        listen = "127.0.0.1:0"
        upstreams = ["{hole}"]
        """).format(engine=engine, stats=tmp_path / "stats.sock", echo=echo, hooks=hooks, resetter=resetter, refused=refused, hole=hole))
    return str(path)


@pytest.mark.slow
@pytest.mark.linux_only
def test_100000_short_connections_leave_nothing_behind(engine, tmp_path):
    refusing = reserve_refusing_port()
    hole, fillers = blackhole_listener()
    with EchoServer() as echo, ResetServer() as resetter:
        refused = "127.0.0.1:%d" % refusing.getsockname()[1]
        hole_addr = "127.0.0.1:%d" % hole.getsockname()[1]
        cp = CliProxy(["--config", _config(tmp_path, engine, echo.addr, resetter.addr, refused, hole_addr)],
                      ready_timeout=20)
        try:
            found = {}
            # One 'listening on' line per listener, named.
            for name in ("echo", "hooked", "reset", "refused", "timeout"):
                m = cp.stderr.wait_line(r"listening on 127\.0\.0\.1:(\d+) \(listener %s\)" % name, 5)
                assert m, cp.stderr.text()
                found[name] = ("127.0.0.1", int(m.group(1)))
            ports = {"listen": {a[1] for a in found.values()},
                     "upstream": {echo.port, int(refused.rsplit(":", 1)[1]), int(hole_addr.rsplit(":", 1)[1]),
                                  int(resetter.addr.rsplit(":", 1)[1])}}
            # Warm up (pools, allocator arenas, hook threads), then the baseline.
            warm = Churn({"echo": (found["echo"], "echo", 1), "hooked": (found["hooked"], "echo", 1)}, 2000)
            warm.run(30)
            assert not warm.failures, warm.failures[:5]
            time.sleep(0.5)
            # The stats endpoint's first request starts its thread: before the baseline.
            stats_path = str(tmp_path / "stats.sock")
            assert stats_over_unix(stats_path)["hook_queue"] == 0
            time.sleep(0.2)
            base = {"fds": proc_fd_count(cp.pid), "threads": _threads(cp.pid), "rss": _rss_kib(cp.pid)}
            churn = Churn({
                "clean": (found["echo"], "echo", 45),
                "hooked": (found["hooked"], "echo", 15),
                "client_rst": (found["echo"], "client_rst", 15),
                "upstream_rst": (found["reset"], "expect_end", 12),
                "refused": (found["refused"], "expect_end", 10),
                "timeout": (found["timeout"], "expect_end", 3),
            }, TOTAL, concurrency=256, seed=7)
            took = churn.run(DEADLINE_S)
            print("churn: %d connections in %.1fs: %s" % (churn.started, took, dict(churn.outcomes)))
            assert churn.started == TOTAL, "only %d of %d started by the deadline" % (churn.started, TOTAL)
            assert not churn.failures, "%d failures, first: %s" % (len(churn.failures), churn.failures[:5])
            assert wait_for(lambda: proc_fd_count(cp.pid) <= base["fds"], 10), (proc_fd_count(cp.pid), base)
            assert _threads(cp.pid) == base["threads"]
            assert wait_for(lambda: stats_over_unix(stats_path)["hook_queue"] == 0, 10), stats_over_unix(stats_path)["hook_queue"]
            assert wait_for(lambda: not _lingering(ports), 10), _lingering(ports)[:5]
            rss = _rss_kib(cp.pid)
            print("churn: fds %d -> %d, threads %d, RSS %d -> %d KiB" % (
                base["fds"], proc_fd_count(cp.pid), base["threads"], base["rss"], rss))
            assert rss - base["rss"] < RSS_MARGIN_KIB, (base, rss)
            # Still serving, every listener's bridges gone.
            for name in ("echo", "hooked"):
                assert echo_roundtrip(found[name], b"after") == b"after"
            assert cp.alive()
        finally:
            cp.kill()
            refusing.close()
            hole.close()
            for f in fillers:
                f.close()
