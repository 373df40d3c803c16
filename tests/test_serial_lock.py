"""support.serial, the lock that runs `serial` tests alone under
pytest-xdist: an exclusive holder waits for the shared ones, and shared
ones that come after it wait for it (no starving)."""
import os
import subprocess
import sys
import time

from support.waits import wait_for

HOLD = """
import sys, time
sys.path.insert(0, {tests!r})
from support import serial
directory, name, exclusive, hold = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
with open(directory + "/log", "a") as f:
    f.write("%s ready %.6f\\n" % (name, time.time()))
with serial.turn(directory, exclusive=exclusive):
    with open(directory + "/log", "a") as f:
        f.write("%s start %.6f\\n" % (name, time.time()))
    time.sleep(hold)
    with open(directory + "/log", "a") as f:
        f.write("%s end %.6f\\n" % (name, time.time()))
"""


def _holder(tmp_path, name, exclusive, hold):
    tests = os.path.dirname(os.path.abspath(__file__))
    return subprocess.Popen([sys.executable, "-c", HOLD.format(tests=tests), str(tmp_path), name,
                             "1" if exclusive else "0", str(hold)])


def _events(tmp_path):
    log = tmp_path / "log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split()[:2] for line in lines if " ready " not in line]


def _ready(tmp_path, name):
    log = tmp_path / "log"
    return log.exists() and (name + " ready ") in log.read_text()


def test_an_exclusive_holder_runs_alone_and_is_not_starved(tmp_path):
    procs = [_holder(tmp_path, "A", False, 1.5)]
    try:
        assert wait_for(lambda: ["A", "start"] in _events(tmp_path), 10)
        procs.append(_holder(tmp_path, "W", True, 0.3))
        assert wait_for(lambda: _ready(tmp_path, "W"), 10)
        time.sleep(0.2)   # W is waiting for A in flock now
        procs.append(_holder(tmp_path, "B", False, 0.0))
        for p in procs:
            assert p.wait(20) == 0
    finally:
        for p in procs:
            p.kill()
    # W waits for the running A, and B, which came while W waited, for W.
    assert _events(tmp_path) == [["A", "start"], ["A", "end"], ["W", "start"], ["W", "end"],
                                 ["B", "start"], ["B", "end"]]


def test_shared_holders_run_together(tmp_path):
    procs = [_holder(tmp_path, "A", False, 3.0)]
    try:
        assert wait_for(lambda: ["A", "start"] in _events(tmp_path), 10)
        procs.append(_holder(tmp_path, "B", False, 0.0))
        assert wait_for(lambda: ["B", "end"] in _events(tmp_path), 10)
        assert ["A", "end"] not in _events(tmp_path)
        for p in procs:
            assert p.wait(20) == 0
    finally:
        for p in procs:
            p.kill()
