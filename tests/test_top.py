"""`fastproxy top` and the view it draws: the pure renderers from stats dicts,
the command against a real proxy's stats served over real sockets (a
test-only server now; the proxy's own endpoint once merged), one plain
snapshot or --count of them, its errors, and the terminal path in a
pseudo-terminal (draws, q quits, the terminal restored)."""
import io
import os
import re
import signal
import subprocess
import termios
import threading
import time

import pytest

from fastproxy import Proxy
from fastproxy.view import build_view, render_rich, render_text
from support.cli import assert_one_line_error, cli_command, run_cli, subprocess_env
from support.servers import EchoServer
from support.sockets import echo_roundtrip, free_port
from support.statsserver import StatsServer
from support.terminal import Pty, env_path_first, no_rich
from support.waits import stop_bounded


def _stats(a_accepted=1, b_accepted=2, a_up=100, state_b="up"):
    """A stats dict shaped as Proxy.stats() gives it, for the renderers."""
    def up(state, accepted, nbytes, failures=0, active=1):
        return {"state": state, "health": state, "active": active, "peak_active": 1, "accepted": accepted,
                "consecutive_failures": 0, "bytes_upstream": nbytes, "bytes_downstream": 2 * nbytes,
                "connect_failures": failures}
    listener = {"accepted": a_accepted + b_accepted, "bytes_upstream": a_up + 50, "bytes_downstream": 2 * a_up + 100,
                "connect_failures": 3, "rejected": 4, "denied": 5, "rate_limited": 0, "outside_window": 0,
                "queue_timeouts": 0, "proxy_header_errors": 0, "fd_exhausted": 0, "active": 2, "peak_active": 7,
                "queued": 0, "hook_timeouts": 0, "dropped_records": 0,
                "upstreams": {"10.0.0.1:80": up("up", a_accepted, a_up),
                              "10.0.0.2:80": up(state_b, b_accepted, 50, failures=3)},
                "routed": up("up", 0, 0, active=0)}
    stats = {k: v for k, v in listener.items() if k not in ("upstreams", "routed")}
    stats.update(stale_answers=0, hook_errors=6, listeners={"web": listener})
    return stats


# ---- the view, pure


def test_view_rates_come_from_the_previous_snapshot():
    first = build_view(_stats())
    lv = first.listeners[0]
    assert lv.name == "web" and [r.name for r in lv.upstreams] == ["10.0.0.1:80", "10.0.0.2:80"]
    assert lv.upstreams[0].rate is None and lv.rate is None
    later = build_view(_stats(a_accepted=11, a_up=2148), _stats(), 2.0)
    a, b = later.listeners[0].upstreams
    assert a.rate == 5.0 and a.up == 1024.0 and a.down == 2048.0 and a.total == 11
    assert b.rate == 0.0 and b.connect_failures == 3
    assert later.listeners[0].rate == 5.0
    assert dict(later.errors)["hook_errors"] == 6
    assert dict(later.listeners[0].refusals) == {"rejected": 4, "denied": 5, "rate_limited": 0,
                                                 "outside_window": 0, "queue_timeouts": 0,
                                                 "proxy_header_errors": 0, "hook_refused": 0}
    # Not a routing listener: no route counters; fd_exhausted is a loss, not a refusal.
    assert dict(later.listeners[0].losses) == {"fd_exhausted": 0, "no_memory": 0}
    # A counter that went back (another process): no rate rather than a negative one.
    assert build_view(_stats(), _stats(a_accepted=50), 1.0).listeners[0].upstreams[0].rate is None


def test_plain_text_has_every_figure():
    text = render_text(build_view(_stats(a_accepted=11, a_up=2148, state_b="down"), _stats(), 2.0))
    lines = text.splitlines()
    assert lines[0].startswith("listener web  active 2 (peak 7)  queued 0  accepted 13 (5.0/s)")
    assert "connect failed 3" in lines[0]   # clients, not tries: CONNECT_FAILED
    header = lines[1].split()
    assert header[:7] == ["upstream", "state", "active", "total", "new/s", "up/s", "down/s"]
    assert re.search(r"10\.0\.0\.1:80\s+up\s+1\s+11\s+5\.0/s\s+1\.0 KiB/s\s+2\.0 KiB/s\s+0$", lines[2]), lines[2]
    assert re.search(r"10\.0\.0\.2:80\s+down\s+1\s+2\s+0\.0/s\s+0 B/s\s+0 B/s\s+3$", lines[3]), lines[3]
    assert lines[4] == "  refused: rejected 4  queue_timeouts 0  denied 5  rate_limited 0  outside_window 0  " \
                       "proxy_header_errors 0  hook_refused 0"
    assert lines[5] == "  lost: fd_exhausted 0  no_memory 0"
    assert lines[-1].startswith("process errors: hook_errors 6")
    # No routed row unless on_connect routed a bridge.
    assert "(routed)" not in text
    assert "-" in render_text(build_view(_stats())).splitlines()[2].split()


def test_rich_renderer_draws_the_cells():
    rich = pytest.importorskip("rich.console")
    console = rich.Console(file=io.StringIO(), width=200, record=True, color_system=None)
    console.print(render_rich(build_view(_stats(a_accepted=11, a_up=2148, state_b="down"), _stats(), 2.0)))
    text = console.export_text()
    assert "listener web" in text and "accepted 13 (5.0/s)" in text
    row_a = next(line for line in text.splitlines() if "10.0.0.1:80" in line)
    cells = [c.strip() for c in re.split(r"[│┃|]", row_a) if c.strip()]
    assert cells == ["10.0.0.1:80", "up", "1", "11", "5.0/s", "1.0 KiB/s", "2.0 KiB/s", "0"], cells
    row_b = next(line for line in text.splitlines() if "10.0.0.2:80" in line)
    assert [c.strip() for c in re.split(r"[│┃|]", row_b) if c.strip()][1] == "down"
    assert "refused: rejected 4  queue_timeouts 0  denied 5" in text
    assert "lost: fd_exhausted 0  no_memory 0" in text
    assert "process errors: hook_errors 6" in text


# ---- the command against a live proxy


@pytest.fixture
def live(engine):
    """A real proxy (one worker: round robin 1:2 is then exact) over two echo
    upstreams, and its stats served at /stats over TCP."""
    with EchoServer() as a, EchoServer() as b:
        proxy = Proxy(listen="127.0.0.1:0", upstreams=[a.addr + "@1", b.addr + "@2"], balance="roundrobin",
                      workers=1, engine=engine, name="front").start()
        try:
            with StatsServer(proxy) as stats:
                yield proxy, stats, a.addr, b.addr
        finally:
            stop_bounded(proxy, timeout=2.0, limit=20.0)


def _row(text, name):
    line = next(line for line in text.splitlines() if line.strip().startswith(name))
    return line.split()


def test_one_snapshot_shows_the_counts_after_known_traffic(live):
    proxy, stats, a, b = live
    for i in range(6):
        assert echo_roundtrip(proxy.address, b"ping %d" % i) == b"ping %d" % i
    rc, out, err = run_cli(["top", stats.addr], timeout=30)
    assert rc == 0, err
    assert err == ""
    assert out.startswith("listener front  active 0")
    assert "accepted 6 (-)" in out
    assert _row(out, a)[:5] == [a, "up", "0", "2", "-"]
    assert _row(out, b)[:5] == [b, "up", "0", "4", "-"]
    assert len(re.findall(r"^listener ", out, re.M)) == 1


def test_each_listener_has_its_own_table(engine):
    with EchoServer() as a, EchoServer() as b:
        proxy = Proxy.from_config({"engine": engine, "workers": 1, "listeners": [
            {"name": "web", "listen": "127.0.0.1:0", "upstreams": [a.addr]},
            {"name": "db", "listen": "127.0.0.1:0", "upstreams": [b.addr]}]}).start()
        try:
            echo_roundtrip(proxy.addresses["web"], b"w")
            for _ in range(3):
                echo_roundtrip(proxy.addresses["db"], b"d")
            with StatsServer(proxy) as stats:
                rc, out, err = run_cli(["top", stats.addr], timeout=30)
        finally:
            stop_bounded(proxy, timeout=2.0, limit=20.0)
    assert rc == 0, err
    web, db = out.split("\nlistener ")
    assert web.startswith("listener web ") and "accepted 1 " in web
    assert db.startswith("db ") and "accepted 3 " in db
    assert _row(web, a.addr)[:4] == [a.addr, "up", "0", "1"] and b.addr not in web
    assert _row(db, b.addr)[:4] == [b.addr, "up", "0", "3"] and a.addr not in db


def test_count_two_prints_two_snapshots_with_rates(live):
    proxy, stats, a, b = live
    done = threading.Event()

    def traffic():
        while not done.is_set():
            echo_roundtrip(proxy.address, b"x")
            time.sleep(0.01)
    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        rc, out, err = run_cli(["top", stats.addr, "--count", "2", "--interval", "0.5"], timeout=30)
        took = time.monotonic() - t0
    finally:
        done.set()
        t.join(5)
    assert rc == 0, err
    snapshots = out.split("\n\n")
    assert len(snapshots) == 2, out
    assert "accepted" in snapshots[0] and "(-)" in snapshots[0]
    assert _row(snapshots[0], a)[4] == "-"
    rate = _row(snapshots[1], b)[4]
    assert re.fullmatch(r"\d+\.\d/s", rate) and float(rate[:-2]) > 0, snapshots[1]
    assert re.search(r"accepted \d+ \(\d+\.\d/s\)", snapshots[1])
    assert took >= 0.5


def test_unix_address(engine, tmp_path):
    with EchoServer() as a:
        proxy = Proxy(listen="127.0.0.1:0", upstream=a.addr, engine=engine, name="u").start()
        try:
            echo_roundtrip(proxy.address, b"hello")
            with StatsServer(proxy, unix_path=str(tmp_path / "stats.sock")) as stats:
                rc, out, err = run_cli(["top", stats.addr], timeout=30)
        finally:
            stop_bounded(proxy, timeout=2.0, limit=20.0)
    assert rc == 0, err
    assert _row(out, a.addr)[:4] == [a.addr, "up", "0", "1"]


def test_unreachable_address_is_one_line_exit_2():
    addr = "127.0.0.1:%d" % free_port()
    rc, out, err = run_cli(["top", addr], timeout=30)
    assert_one_line_error(rc, out, err, addr, "cannot reach", "--stats")
    assert out == ""


@pytest.mark.parametrize("argv,needle", [(["top", "nohost"], "nohost"), (["top", "127.0.0.1:0"], "127.0.0.1:0"),
                                         (["top", "127.0.0.1:1", "--interval", "soon"], "soon"),
                                         (["top", "127.0.0.1:1", "--count", "0"], "--count"),
                                         (["top"], "ADDR")])
def test_bad_arguments_are_one_line_exit_2(argv, needle):
    rc, out, err = run_cli(argv, timeout=30, env={"FASTPROXY_STATS": ""})
    assert_one_line_error(rc, out, err, needle)


def test_not_a_stats_endpoint_is_one_line_exit_2():
    with StatsServer(lambda: ["not", "a", "dict"]) as stats:
        rc, out, err = run_cli(["top", stats.addr], timeout=30)
    assert_one_line_error(rc, out, err, "did not answer a JSON object")


def test_endpoint_gone_mid_run_exits_1(live):
    _, stats, _, _ = live
    proc = subprocess.Popen(cli_command(["top", stats.addr, "--count", "20", "--interval", "0.3"]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env())
    try:
        first = proc.stdout.readline()
        assert first.startswith(b"listener front"), first
        stats.close()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 1, err
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot reach" in lines[0], err


def test_fastproxy_flags_still_run_the_proxy(cli_proxy, echo_server):
    # `top` and `demo` are words before any flag: the proxy command is unchanged.
    cp = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr)
    assert echo_roundtrip(cp.connect_addr(), b"still") == b"still"


# ---- the terminal path, in a pseudo-terminal


def test_terminal_draws_live_and_q_quits(live):
    pytest.importorskip("rich")
    proxy, stats, a, b = live
    echo_roundtrip(proxy.address, b"one")
    term = Pty(["top", stats.addr, "--interval", "0.2"])
    try:
        assert term.read_until(re.escape(a.encode()), 20), term.out
        # It redraws in place: the next refresh shows new traffic.
        echo_roundtrip(proxy.address, b"two")
        assert term.read_until(rb"accepted 2 \(\d+\.\d/s\)", 20), term.out[-3000:]
        # In cbreak mode (no echo, no line buffering) while it runs.
        assert not termios.tcgetattr(term.slave)[3] & termios.ICANON
        os.write(term.master, b"q")
        assert term.wait(20) == 0, term.out[-3000:]
        assert termios.tcgetattr(term.slave) == term.modes
        assert b"Traceback" not in term.out
        assert b"\x1b[" in term.out   # drawn with terminal control sequences, not as plain lines
    finally:
        term.close()


@pytest.mark.parametrize("rich_present", [True, False], ids=["rich", "plain"])
def test_terminal_keeps_the_last_figures_and_retries_when_the_endpoint_goes(live, tmp_path, rich_present):
    if rich_present:
        pytest.importorskip("rich")
    proxy, stats, a, _ = live
    echo_roundtrip(proxy.address, b"one")
    env = None if rich_present else env_path_first(no_rich(tmp_path))
    term = Pty(["top", stats.addr, "--interval", "0.2"], env=env)
    try:
        assert term.read_until(re.escape(a.encode()), 20), term.out
        stats.close()
        assert term.read_until(rb"cannot reach .*; retrying every 0.2 s", 20), term.out[-3000:]
        # The error heads the frame and the last figures stay under it (not a
        # frame of its own that the next redraw wipes); it redraws, retrying.
        under = rb"retrying every 0\.2 s(?:\x1b\[[0-9;]*m)*\r?\n(?:\x1b\[[0-9;]*m)*(?:fastproxy top|listener front)"
        assert term.read_until(b"(?s)" + under + b".*" + under, 20), term.out[-3000:]
        assert term.proc.poll() is None
        os.write(term.master, b"q")
        assert term.wait(20) == 0, term.out[-3000:]
        assert termios.tcgetattr(term.slave) == term.modes
    finally:
        term.close()


def test_terminal_ctrl_c_restores_the_terminal(live):
    _, stats, a, _ = live
    term = Pty(["top", stats.addr, "--interval", "0.2"])
    try:
        assert term.read_until(re.escape(a.encode()), 20), term.out
        assert not termios.tcgetattr(term.slave)[3] & termios.ICANON
        term.proc.send_signal(signal.SIGINT)
        assert term.wait(20) == 0, term.out[-3000:]
        assert termios.tcgetattr(term.slave) == term.modes
        assert b"Traceback" not in term.out
    finally:
        term.close()


def test_terminal_without_rich_says_how_to_get_it_and_shows_plain(live, tmp_path):
    _, stats, a, _ = live
    term = Pty(["top", stats.addr, "--interval", "0.2"], env=env_path_first(no_rich(tmp_path)))
    try:
        assert term.read_until(re.escape(a.encode()), 20), term.out
        assert b"pip install 'fastproxy-tcp[top]'" in term.out
        assert re.search(rb"upstream +state +active +total", term.out)  # the plain table's header
        os.write(term.master, b"q")
        assert term.wait(20) == 0, term.out[-3000:]
        assert termios.tcgetattr(term.slave) == term.modes
    finally:
        term.close()


# ---- against the proxy's own endpoint (runs once it is merged)

needs_endpoint = pytest.mark.skipif(not hasattr(Proxy, "stats_address"), reason="stats endpoint not merged yet")


def _stats_addr(proxy):
    address = proxy.stats_address
    return "%s:%d" % tuple(address[:2]) if isinstance(address, tuple) else str(address)


@needs_endpoint
def test_against_the_proxy_stats_endpoint(engine):
    with EchoServer() as a, EchoServer() as b:
        proxy = Proxy(listen="127.0.0.1:0", upstreams=[a.addr + "@1", b.addr + "@2"], balance="roundrobin",
                      workers=1, engine=engine, name="front", stats="127.0.0.1:0").start()
        try:
            for i in range(3):
                echo_roundtrip(proxy.address, b"x")
            rc, out, err = run_cli(["top", _stats_addr(proxy), "--count", "2", "--interval", "0.3"], timeout=30)
        finally:
            stop_bounded(proxy, timeout=2.0, limit=20.0)
    assert rc == 0, err
    first, second = out.split("\n\n")
    assert first.startswith("listener front")
    assert _row(first, a.addr)[:4] == [a.addr, "up", "0", "1"]
    assert _row(first, b.addr)[:4] == [b.addr, "up", "0", "2"]
    assert _row(second, b.addr)[4] == "0.0/s"


@needs_endpoint
def test_terminal_against_the_proxy_stats_endpoint(engine):
    pytest.importorskip("rich")
    with EchoServer() as a:
        proxy = Proxy(listen="127.0.0.1:0", upstream=a.addr, engine=engine, stats="127.0.0.1:0").start()
        try:
            term = Pty(["top", _stats_addr(proxy), "--interval", "0.2"])
            try:
                assert term.read_until(re.escape(a.addr.encode()), 20), term.out
                os.write(term.master, b"q")
                assert term.wait(20) == 0
                assert termios.tcgetattr(term.slave) == term.modes
            finally:
                term.close()
        finally:
            stop_bounded(proxy, timeout=2.0, limit=20.0)
