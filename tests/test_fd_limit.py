"""fd_limit: the command raises the soft open-file limit to the hard one at
start (its fd budget); an embedding program keeps its own unless it asks."""
import json
import subprocess
import sys

import pytest

from support.cli import CliProxy, subprocess_env

resource = pytest.importorskip("resource")

SOFT = 512   # the hard limit stays what this process has


def _hard():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _embedded(fd_limit):
    """Start a Proxy in a fresh process whose soft limit is SOFT; report the
    limit after start and the connection limit the fd budget gave."""
    kw = "" if fd_limit is None else ", fd_limit=%r" % fd_limit
    code = (
        "import json, resource\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (%d, hard))\n"
        "from fastproxy import Proxy\n"
        "p = Proxy('127.0.0.1:0', '127.0.0.1:9', workers=1%s).start()\n"
        "soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "print(json.dumps([soft, p.config.limits.max_connections]))\n"
        "p.stop()\n" % (SOFT, kw))
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                        env=subprocess_env())
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


@pytest.mark.skipif(_hard() <= SOFT, reason="the hard open-file limit is too low to tell raising from keeping")
def test_embedded_proxy_keeps_the_limit_unless_asked():
    soft, max_connections = _embedded(None)
    assert soft == SOFT
    assert max_connections < SOFT // 2
    soft, max_connections = _embedded("raise")
    assert soft == _hard()
    assert max_connections > SOFT


@pytest.mark.skipif(_hard() <= SOFT, reason="the hard open-file limit is too low to tell raising from keeping")
@pytest.mark.parametrize("flags,budget", [([], "hard"), (["--fd-limit", "keep"], "soft")])
def test_the_command_raises_the_limit_by_default(flags, budget):
    hard = _hard()
    cp = CliProxy(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--workers", "1"] + flags,
                  rlimit_nofile=(SOFT, hard))
    try:
        want = hard if budget == "hard" else SOFT
        assert "fd budget %d," % want in cp.ready_line, cp.ready_line
    finally:
        cp.kill()
