"""`fastproxy demo`: three weighted echo upstreams behind a proxy, traffic,
the view and a summary whose spread follows the weights; --forever serves
until SIGTERM; the terminal path draws live (and without rich, plainly)."""
import re
import signal
import subprocess
import time

import pytest

from fastproxy import Proxy
from support.cli import LineReader, assert_one_line_error, cli_command, run_cli, subprocess_env
from support.sockets import echo_roundtrip
from support.terminal import Pty, env_path_first, no_rich

SHARE_RX = (r"upstream (127\.0\.0\.1:\d+)  weight (\d)  connections (\d+)  share ([\d.]+)% "
            r"\(weight share ([\d.]+)%\)")


def _shares(out):
    rows = re.findall(SHARE_RX, out)
    assert len(rows) == 3, out
    return [(int(w), int(n), float(share)) for _, w, n, share, _ in rows]


def test_demo_runs_and_spreads_by_weight():
    t0 = time.monotonic()
    rc, out, err = run_cli(["demo", "--duration", "2"], timeout=60)
    took = time.monotonic() - t0
    assert rc == 0, err
    assert took < 30, took
    assert "Traceback" not in err
    m = re.search(r"fastproxy demo: (\d+) connections through 127\.0\.0\.1:\d+ in ([\d.]+) s", out)
    assert m, out
    total = int(m.group(1))
    assert total >= 30, out
    rows = _shares(out)
    assert [w for w, _, _ in rows] == [1, 2, 3]
    assert sum(n for _, n, _ in rows) == total
    for weight, _, share in rows:
        # Round robin is exact per worker; across workers each keeps its cursor.
        assert abs(share - 100 * weight / 6) <= 5, out
    assert re.search(r"bytes moved: [\d.]+ \w+ up, [\d.]+ \w+ down; throughput [\d.]+ \w+/s", out), out
    assert "client errors: 0" in out, out
    # Not a terminal: a few plain snapshots while the clients ran.
    assert len(re.findall(r"^listener demo ", out, re.M)) >= 2, out


def test_demo_bad_duration_is_one_line_exit_2():
    rc, out, err = run_cli(["demo", "--duration", "soon"], timeout=30)
    assert_one_line_error(rc, out, err, "--duration", "soon")


def test_demo_forever_serves_until_sigterm():
    proc = subprocess.Popen(cli_command(["demo", "--duration", "0.5", "--forever"]), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    out, err = LineReader(proc.stdout), LineReader(proc.stderr)
    try:
        m = out.wait_line(r"curl --http0.9 -s http://(127\.0\.0\.1):(\d+)/", 30)
        assert m, out.text() + err.text()
        assert out.wait_line(r"serving until Ctrl-C or SIGTERM", 1)
        # Still serving after the traffic: the proxy and its upstreams answer.
        time.sleep(0.5)
        assert echo_roundtrip((m.group(1), int(m.group(2))), b"after the demo") == b"after the demo"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, err.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out.join(5)
    err.join(5)
    assert "Traceback" not in err.text()


def test_demo_sigterm_during_traffic_exits_0():
    proc = subprocess.Popen(cli_command(["demo", "--duration", "30"]), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    out, err = LineReader(proc.stdout), LineReader(proc.stderr)
    try:
        assert out.wait_line(r"fastproxy demo: proxy on", 30), out.text() + err.text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, err.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err.join(5)
    assert "Traceback" not in err.text()


def test_demo_on_a_terminal_draws_live():
    pytest.importorskip("rich")
    term = Pty(["demo", "--duration", "1.5"])
    try:
        assert term.wait(60) == 0, term.out[-3000:]
        text = term.out.decode(errors="replace")
        assert "fastproxy demo" in text and "new/s" in text
        assert "\x1b[" in text   # drawn in place by rich
        assert len(re.findall(SHARE_RX, text)) == 3, text[-3000:]
    finally:
        term.close()


def test_demo_on_a_terminal_without_rich_is_plain(tmp_path):
    term = Pty(["demo", "--duration", "1.5"], env=env_path_first(no_rich(tmp_path)))
    try:
        assert term.wait(60) == 0, term.out[-3000:]
        text = term.out.decode(errors="replace")
        assert "pip install 'fastproxy-tcp[top]'" in text
        assert re.search(r"upstream +state +active", text)
        assert len(re.findall(SHARE_RX, text)) == 3, text[-3000:]
    finally:
        term.close()


@pytest.mark.skipif(not hasattr(Proxy, "stats_address"), reason="stats endpoint not merged yet")
def test_demo_prints_the_stats_urls():
    rc, out, err = run_cli(["demo", "--duration", "1"], timeout=60)
    assert rc == 0, err
    assert re.search(r"stats: http://127\.0\.0\.1:\d+/stats  status page: http://127\.0\.0\.1:\d+/", out), out
