"""The coverage-guided harnesses in fuzz/ stay runnable: each replays its
seed corpus and its regressions (inputs that once broke a contract) as
plain Python, and, where atheris is installed, fuzzes for a few hundred
runs. FASTPROXY_FUZZ_CORPUS=DIR replays DIR/TARGET/ as well (the corpus a
long run left, e.g. under .ci/sanitize's ASan build)."""
import importlib.util
import os
import subprocess
import sys

import pytest

from support.cli import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")
HARNESS = os.path.join(FUZZ, "harness.py")
TARGETS = ("proxy_header", "specs", "config", "client_hello")

pytestmark = pytest.mark.skipif(not os.path.isfile(HARNESS), reason="no fuzz/ in this tree")


def harness_env():
    # The harness imports the fastproxy this test imported: the checkout's
    # in-place build, or the installed package (CI installs it and builds
    # nothing in src/).
    return subprocess_env({"FASTPROXY_FUZZ_INSTALLED": "1"})


def run(*args, timeout=120):
    env = harness_env()
    return subprocess.run([sys.executable, HARNESS, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def corpora(target):
    dirs = [os.path.join(FUZZ, "corpus", target), os.path.join(FUZZ, "regressions", target)]
    extra = os.environ.get("FASTPROXY_FUZZ_CORPUS")
    if extra:
        dirs.append(os.path.join(extra, target))
    return [d for d in dirs if os.path.isdir(d) and os.listdir(d)]


@pytest.mark.parametrize("target", TARGETS)
def test_replay(target):
    dirs = corpora(target)
    assert dirs, "fuzz/corpus/%s is empty: python fuzz/seeds.py" % target
    done = run(target, "--replay", *dirs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no failure" in done.stdout


def test_replay_reports_a_broken_contract(tmp_path):
    # The replay is a test only if a failing input fails it: a port in
    # full-width digits once raised ValueError instead of ConfigError
    # (fuzz/regressions/specs holds it); here a target that breaks its
    # contract on purpose stands in for a regression.
    bad = tmp_path / "input"
    bad.write_bytes(b"\x00:80")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys; sys.path.insert(0, %r)\n"
        "import harness, targets\n"
        "def broken(data):\n"
        "    raise ValueError('not a ConfigError')\n"
        "targets.TARGETS['specs'] = broken\n"
        "harness.main(['harness.py', 'specs', '--replay', %r])\n" % (FUZZ, str(bad)))
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=60,
                          env=harness_env())
    assert done.returncode != 0
    assert "failed on" in done.stderr and "not a ConfigError" in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
# libFuzzer next to a preloaded ASan runtime (.ci/sanitize) runs blind.
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""), reason="under .ci/sanitize's ASan runtime")
@pytest.mark.parametrize("target", TARGETS)
def test_atheris_runs(target, tmp_path):
    if target == "client_hello":
        from fastproxy import _core
        if not hasattr(_core, "parse_client_hello"):
            pytest.skip("no _core.parse_client_hello before the SNI routing branch")
    # New inputs go to the first directory: a scratch one, not the seeds.
    done = run(target, str(tmp_path), *corpora(target), "-runs=300", "-max_total_time=30",
               "-artifact_prefix=%s/" % tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 300 runs" in done.stderr or "DONE" in done.stderr, done.stderr[-2000:]
