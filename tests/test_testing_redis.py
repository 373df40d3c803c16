"""docs/testing.md's worked example, run as it is written: its code block
becomes a user's test module, run by pytest in a subprocess with the
plugin, against a redis-server started here on a free loopback port."""
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

import fastproxy

from support.sockets import connect

pytest_plugins = ["pytester"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fastproxy this test imported (src/ here, site-packages when installed).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastproxy.__file__)))
DOC = os.path.join(ROOT, "docs", "testing.md")


def example_code():
    with open(DOC) as f:
        text = f.read()
    m = re.search(r"<!-- example: redis[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert m, "docs/testing.md lost its redis example block"
    return m.group(1)


@pytest.fixture
def redis_server(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; CI installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path), "--protected-mode", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                connect(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("redis-server did not start listening within 10 s")
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_docs_redis_example_passes(pytester, redis_server):
    pytest.importorskip("redis", reason="the redis client is in the test extra")
    pytester.makepyfile(test_redis_example=example_code())
    pytester._monkeypatch.setenv("REDIS_ADDRESS", redis_server)
    pytester._monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")]))
    import importlib.metadata
    installed = any(ep.value == "fastproxy.pytest_plugin"
                    for ep in importlib.metadata.entry_points(group="pytest11"))
    args = [] if installed else ["-p", "fastproxy.pytest_plugin"]
    result = pytester.runpytest_subprocess(*args, "-p", "no:cacheprovider", "-v", timeout=120)
    result.assert_outcomes(passed=2)
