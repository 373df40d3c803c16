"""benchmarks/: the interleaved reps also move each contender's place in
the order, so that an effect of the place (seen: 4-14 % between two
identical configurations) does not fall on the same contender every rep."""
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
    from bench import measure
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
