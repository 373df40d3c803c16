"""The distribution: an sdist and a wheel built from a clean copy, checked
(twine, auditwheel), the wheel installed into a fresh venv and run."""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import fastproxy
from support.cli import LISTEN_RX, LineReader
from support.servers import EchoServer
from support.sockets import echo_roundtrip, parse_addr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = fastproxy.__version__

pytestmark = pytest.mark.slow


def _run(cmd, timeout, **kw):
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert cp.returncode == 0, "%s failed (%d):\n%s\n%s" % (cmd, cp.returncode, cp.stdout[-3000:], cp.stderr[-3000:])
    return cp.stdout + cp.stderr


def _clean_copy(dest):
    """The project as a fresh clone (or, from an unpacked sdist, as shipped)
    has it: no build output, no compiled extension."""
    if os.path.isdir(os.path.join(ROOT, ".git")) and shutil.which("git"):
        # Tracked files and new ones not ignored: a clone once they are committed.
        files = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], 60).split("\0")
    else:
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs]
    for rel in filter(None, files):
        if rel.endswith((".so", ".c", ".html")) or "__pycache__" in rel or rel.startswith(("build/", "dist/")):
            continue
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    pytest.importorskip("build", reason="python -m build needs the build package (the test extra has it)")
    work = tmp_path_factory.mktemp("dist")
    src = work / "src"
    _clean_copy(str(src))
    # The sdist first, then the wheel built from it: what a user of the sdist gets.
    _run([sys.executable, "-m", "build", "--outdir", str(work / "out"), str(src)], 900)
    out = sorted(os.listdir(work / "out"))
    sdists = [f for f in out if f.endswith(".tar.gz")]
    wheels = [f for f in out if f.endswith(".whl")]
    assert len(sdists) == 1 and len(wheels) == 1, out
    return work, work / "out" / sdists[0], work / "out" / wheels[0]


def test_names_are_the_distribution_name(dists):
    _, sdist, wheel = dists
    assert sdist.name == "fastproxy_tcp-%s.tar.gz" % VERSION
    assert wheel.name.startswith("fastproxy_tcp-%s-cp%d%d-" % ((VERSION,) + sys.version_info[:2]))


def test_wheel_holds_the_package_and_nothing_source_only(dists):
    _, _, wheel = dists
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("fastproxy/_core.") and n.endswith((".so", ".pyd"))], names
    for needed in ("fastproxy/__init__.py", "fastproxy/py.typed", "fastproxy/_core.pyi", "fastproxy/options.py",
                   "fastproxy/static/status.js", "fastproxy/static/status.css",
                   "fastproxy_tcp-%s.dist-info/licenses/LICENSE" % VERSION):
        assert needed in names, needed
    source_only = [n for n in names if n.endswith((".c", ".pyx", ".pxi", ".pxd", ".h", ".html"))]
    assert not source_only, source_only
    if sys.platform.startswith("linux"):
        extension = [n for n in names if n.startswith("fastproxy/_core.") and n.endswith(".so")][0]
        # Linked with --strip-debug: no DWARF sections (their names would be
        # in the section-name table).
        assert b".debug_info" not in zipfile.ZipFile(wheel).read(extension), "the extension carries debug info"
    metadata = zipfile.ZipFile(wheel).read("fastproxy_tcp-%s.dist-info/METADATA" % VERSION).decode()
    assert "Name: fastproxy-tcp" in metadata
    assert "License-Expression: MIT" in metadata
    assert "Requires-Python: >=3.11" in metadata
    assert "Requires-Dist: prometheus_client" in metadata


def test_sdist_holds_what_building_and_testing_need(dists):
    _, sdist, _ = dists
    top = "fastproxy_tcp-%s/" % VERSION
    names = {n[len(top):] for n in tarfile.open(sdist).getnames()}
    for needed in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "src/fastproxy/_core.pyx",
                   "src/fastproxy/bridge.pxi", "src/fastproxy/_core.pxd", "src/fastproxy/includes/compat.h",
                   "src/fastproxy/includes/system.pxd", "src/fastproxy/py.typed", "tests/conftest.py",
                   "tests/support/cli.py", "tests/support/stubtest-allowlist.txt", "tests/test_options.py",
                   "examples/router.py", "examples/deploy/fastproxy.service", "docs/reference.md",
                   "src/fastproxy/static/status.js", "src/fastproxy/static/status.css"):
        assert needed in names, needed
    built = [n for n in names if n.endswith((".so", ".html")) or n == "src/fastproxy/_core.c"]
    assert not built, built


def test_twine_check_passes(dists):
    pytest.importorskip("twine", reason="twine check needs twine (the test extra has it)")
    _, sdist, wheel = dists
    out = _run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)], 120)
    assert out.count("PASSED") == 2, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="auditwheel reads Linux ELF wheels")
def test_auditwheel_sees_a_manylinux_wheel(dists):
    pytest.importorskip("auditwheel", reason="auditwheel needs auditwheel (the test extra has it)")
    _, _, wheel = dists
    out = _run([sys.executable, "-m", "auditwheel", "show", str(wheel)], 120)
    # A wheel built here links only against the C library: consistent with
    # a manylinux tag (which glibc it needs is the building machine's).
    assert "is consistent with" in out and "manylinux_" in out, out


@pytest.fixture(scope="module")
def wheel_venv(dists):
    """A fresh venv with the wheel alone installed (no extra): (work, bin dir, env)."""
    work, _, wheel = dists
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 300)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    # Nothing of the source tree on the path: pip must install, and the
    # interpreter import, the wheel's copy.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTPROXY_ENGINE")}
    _run([str(bindir / "python"), "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", str(wheel)], 300,
         env=env, cwd=str(work))
    return work, bindir, env


def test_wheel_installs_into_a_fresh_venv_and_forwards(wheel_venv):
    work, bindir, env = wheel_venv
    where = _run([str(bindir / "python"), "-c", "import fastproxy; print(fastproxy.__file__)"], 60,
                 env=env, cwd=str(work))
    assert str(work / "venv") in where, where
    assert VERSION in _run([str(bindir / "fastproxy"), "--version"], 60, env=env, cwd=str(work))
    with EchoServer("127.0.0.1") as srv:
        proc = subprocess.Popen([str(bindir / "fastproxy"), "--listen", "127.0.0.1:0", "--upstream", srv.addr],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env, cwd=str(work))
        stderr = LineReader(proc.stderr)
        try:
            m = stderr.wait_line(LISTEN_RX, 20)
            assert m is not None, stderr.text()
            assert echo_roundtrip(parse_addr(m.group(1)), b"from the wheel") == b"from the wheel"
        finally:
            proc.terminate()
            assert proc.wait(20) == 0, stderr.text()


def test_demo_runs_from_the_wheel_without_the_top_extra(wheel_venv):
    """The README's first command, `pip install . && fastproxy demo`: no rich
    in the venv, so the plain view."""
    work, bindir, env = wheel_venv
    cp = subprocess.run([str(bindir / "python"), "-c", "import rich"], capture_output=True, env=env, cwd=str(work))
    assert cp.returncode != 0, "rich is in the fresh venv: the test would not show the demo runs without it"
    out = _run([str(bindir / "fastproxy"), "demo", "--duration", "1"], 60, env=env, cwd=str(work),
               stdin=subprocess.DEVNULL)
    assert out.count("weight share") == 3 and "bytes moved" in out, out
