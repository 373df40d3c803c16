"""benchmarks/run.py --congestion-control and --tcp-stats' parsing: the
switch is checked before anything runs, and the host's algorithm comes
back whatever ends the run. The sysctl is a file of the test's own
(FASTPROXY_BENCH_SYSCTL), so the host's setting is never touched."""
import importlib
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
RUN = os.path.join(BENCH, "run.py")

pytestmark = [pytest.mark.skipif(not os.path.isfile(RUN), reason="no benchmarks/ in this tree"),
              pytest.mark.linux_only]


@pytest.fixture
def sysctl(tmp_path, monkeypatch):
    d = tmp_path / "ipv4"
    d.mkdir()
    (d / "tcp_congestion_control").write_text("bbr\n")
    (d / "tcp_available_congestion_control").write_text("reno bbr cubic\n")
    monkeypatch.setenv("FASTPROXY_BENCH_SYSCTL", str(d))
    return d


@pytest.fixture
def congestion(sysctl, monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    sys.modules.pop("bench.congestion", None)
    # Not "from bench import congestion": that returns the package's attribute,
    # the module an earlier test imported, read from the environment then.
    congestion = importlib.import_module("bench.congestion")
    yield congestion
    sys.modules.pop("bench.congestion", None)


def test_switched_restores_after_an_interrupt(congestion, sysctl):
    active = sysctl / "tcp_congestion_control"
    with pytest.raises(KeyboardInterrupt):
        with congestion.switched("cubic"):
            assert active.read_text().strip() == "cubic"
            raise KeyboardInterrupt
    assert active.read_text().strip() == "bbr"


@pytest.mark.parametrize("value, words", [
    ("vegas", ["vegas not available here", "reno bbr cubic", "modprobe tcp_vegas"]),
    ("bbr,bbr", ["bbr named twice"]),
    (",", ["no algorithm named"]),
])
def test_parse_list_refuses_in_one_line(congestion, value, words):
    with pytest.raises(congestion.CongestionError) as e:
        congestion.parse_list(value)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_unknown_algorithm_exits_2_before_running(sysctl, tmp_path):
    done = subprocess.run([sys.executable, RUN, "--congestion-control", "bbr,vegas", "--tests", "ping",
                           "--only", "direct", "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "--congestion-control: vegas not available here (tcp_available_congestion_control: "
        "reno bbr cubic); try modprobe tcp_vegas"]
    assert not (tmp_path / "r-bbr.json").exists()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--pin split needs 2 CPUs")
def test_every_part_of_a_split_pinned_run_gets_the_proxy_cpu(sysctl, tmp_path):
    """The first part narrows run.py to the load CPUs; the second must
    still pin its proxy to the proxy CPU (it exited 1 there before)."""
    done = subprocess.run([sys.executable, RUN, "--congestion-control", "bbr,cubic", "--tests", "ping",
                           "--only", "direct", "--reps", "1", "--pings", "200", "--wait-idle", "0",
                           "--noise-retries", "0", "--pin", "split", "--no-plot",
                           "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "r-bbr.json").exists() and (tmp_path / "r-cubic.json").exists()


def test_sigterm_mid_run_puts_the_old_algorithm_back(sysctl, tmp_path):
    # A ping test far longer than the test waits: SIGTERM arrives while it
    # runs under cubic, and run.py must restore bbr on its way out.
    active = sysctl / "tcp_congestion_control"
    run = subprocess.Popen([sys.executable, RUN, "--congestion-control", "cubic", "--tests", "ping",
                            "--only", "direct", "--reps", "1", "--pings", "10000000", "--wait-idle", "0",
                            "--noise-retries", "0", "--no-plot", "--out", str(tmp_path / "r.json")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while active.read_text().strip() != "cubic":
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-2000:]
            time.sleep(0.05)
        time.sleep(2)   # into the test itself
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130, err[-2000:]
    assert active.read_text().strip() == "bbr"
    assert "congestion control back to bbr" in err


def test_parse_ss_sums_each_leg(congestion):
    from bench import tcpstats
    text = (
        "ESTAB 0 0 127.0.0.1:40000 127.0.0.1:5000 \n"
        "\t cubic wscale:7,7 rto:204 mss:65483 bytes_sent:1000000 bytes_retrans:10000 data_segs_out:20 "
        "retrans:0/3 reordering:9\n"
        "ESTAB 0 0 127.0.0.1:5000 127.0.0.1:40000 \n"
        "\t cubic wscale:7,7 rto:204 bytes_received:1000000 rcv_ooopack:42\n"
        "ESTAB 0 0 127.0.0.1:40001 127.0.0.1:5000 \n"
        "\t bbr bbr:(bw:1bps,mrtt:0.003) bytes_sent:1000000 data_segs_out:30 retrans:0/1\n"
        "ESTAB 0 0 127.0.0.1:40002 127.0.0.1:6000 \n"
        "\t cubic bytes_sent:5\n")
    leg = tcpstats.leg(tcpstats.parse_ss(text), 5000)
    assert leg["sockets"] == 2 and leg["cc"] == ["bbr", "cubic"]
    assert leg["bytes_sent"] == 2000000 and leg["retrans_pct"] == 0.5 and leg["retrans_segs"] == 4
    assert leg["data_seg_kib"] == round(2000000 / 50 / 1024, 1)
    assert leg["reordering"] == 9 and leg["rcv_ooopack"] == 42
