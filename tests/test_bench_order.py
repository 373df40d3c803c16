"""benchmarks/: the interleaved reps also move each contender's place in
the order, so that an effect of the place (seen: 4-14 % between two
identical configurations) does not fall on the same contender every rep."""
import importlib
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")

pytestmark = [pytest.mark.skipif(not os.path.isdir(os.path.join(BENCH, "bench")), reason="no benchmarks/ in this tree"),
              pytest.mark.linux_only]


@pytest.fixture
def measure(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    sys.modules.pop("bench.measure", None)
    # Not "from bench import measure": that returns the package's attribute,
    # the module an earlier test imported, read from the environment then.
    measure = importlib.import_module("bench.measure")
    yield measure
    sys.modules.pop("bench.measure", None)


def test_each_rep_starts_elsewhere_and_every_result_keeps_its_rep(measure, monkeypatch):
    order = []

    def attempt_rep(env, c, rep, reps, attempt, idle=True):
        order.append((rep, c.name))
        return {"rep": rep, "notes": {}, "metrics": {}}

    monkeypatch.setattr(measure, "attempt_rep", attempt_rep)
    monkeypatch.setattr(measure, "noisy", lambda r: False)
    names = ["direct", "nginx", "haproxy", "haproxy-splice", "fastproxy", "fp-sb0", "fp-256k"]
    contenders = [types.SimpleNamespace(name=n) for n in names]
    env = types.SimpleNamespace(args=types.SimpleNamespace(reps=3, noise_retries=0))
    runs = measure.run_all(env, contenders)
    for rep in (1, 2, 3):
        in_rep = [n for r, n in order if r == rep]
        assert sorted(in_rep) == sorted(names), in_rep   # everyone, once
    places = {n: [[m for r, m in order if r == rep].index(n) for rep in (1, 2, 3)] for n in names}
    assert all(len(set(p)) == 3 for p in places.values()), places
    assert all([r["rep"] for r in runs[n]] == [1, 2, 3] for n in names), runs


@pytest.mark.parametrize("n,reps", [(1, 3), (2, 3), (7, 1), (7, 3), (4, 8)])
def test_rotated_is_a_permutation(measure, n, reps):
    items = list(range(n))
    for rep in range(1, reps + 1):
        assert sorted(measure.rotated(items, rep, reps)) == items


def test_a_rep_waits_out_the_settle_time_after_the_previous_one_stopped(measure, monkeypatch):
    # A splicing proxy run right after haproxy moved about 30 % less for
    # some 20 s (docs/benchmarks.md, Position effect): every rep but the
    # first waits --settle seconds after the previous contender stopped.
    clock = [100.0]
    slept = []

    def sleep(s):
        slept.append(round(s, 3))
        clock[0] += s

    def run_contender(env, c, rep, idle):
        clock[0] += 7.0   # the rep itself
        return {"notes": {}, "metrics": {}}

    # measure's own name for the module, not the time module itself.
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep))
    monkeypatch.setattr(measure, "wait_quiet", lambda max_wait: (0.0, {0: 0.0}))
    monkeypatch.setattr(measure, "run_contender", run_contender)
    monkeypatch.setattr(measure, "_last_stop", [0.0])
    env = types.SimpleNamespace(args=types.SimpleNamespace(settle=25.0, wait_idle=0))
    c = types.SimpleNamespace(name="fastproxy")
    measure.attempt_rep(env, c, 1, 3, 1)
    assert slept == []                       # nothing ran before the first
    clock[0] += 5.0                          # the runner's own work in between
    measure.attempt_rep(env, c, 2, 3, 1)
    assert slept == [20.0]                   # 25 s after the stop, not after the start
    env.args.settle = 0
    measure.attempt_rep(env, c, 3, 3, 1)
    assert slept == [20.0]                   # --settle 0: no wait
