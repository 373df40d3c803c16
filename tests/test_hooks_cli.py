"""`fastproxy --hooks SPEC`: a Python file path or an importable module, optionally
`:object`; a bad spec is a one-line error with exit status 2."""
import os

import pytest

from support.cli import assert_one_line_error, run_cli, subprocess_env
from support.sockets import closed_by_peer, connect_from, echo_roundtrip

FILE_HOOKS = '''
import sys
from fastproxy import Direction

def on_connect(conn):
    return conn.client_address[0] != "127.0.0.3"

def on_data(conn, direction, data):
    return data.upper() if direction == Direction.UPSTREAM else None

def on_close(conn, record):
    print("closed %d %s %d" % (record.id, record.reason.name, record.bytes_upstream), flush=True)

class Shouting:
    """Only on_data: the other hooks are absent and not registered."""
    def on_data(self, conn, direction, data):
        return data + b"!" if direction == Direction.DOWNSTREAM else None

shouting = Shouting()
'''

MODULE_HOOKS = '''
from fastproxy import Direction

def on_data(conn, direction, data):
    return data[::-1] if direction == Direction.UPSTREAM else None

class _Hooks:
    @staticmethod
    def on_data(conn, direction, data):
        return data.replace(b"a", b"4") if direction == Direction.DOWNSTREAM else None

    @staticmethod
    def on_connect(conn):
        return conn.client_address[0] != "127.0.0.2"

hooks = _Hooks()
'''


@pytest.fixture
def hooks_file(tmp_path):
    path = tmp_path / "my_hooks.py"
    path.write_text(FILE_HOOKS)
    return path


@pytest.fixture
def hooks_pkg(tmp_path):
    pkg = tmp_path / "hookpkg_for_tests"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(MODULE_HOOKS)
    env = subprocess_env()
    return {"PYTHONPATH": env["PYTHONPATH"] + os.pathsep + str(tmp_path)}




def test_hooks_file_path(cli_proxy, echo_server, hooks_file):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                      "--hooks", str(hooks_file))
    assert echo_roundtrip(proxy.address, b"shout") == b"SHOUT"
    assert proxy.stdout.wait_line(r"^closed \d+ (CLIENT|UPSTREAM)_CLOSED 5$", 3), proxy.stdout.text()
    with connect_from(proxy.address, "127.0.0.3") as c:
        assert closed_by_peer(c, 3) is not None
    assert proxy.stdout.wait_line(r"^closed \d+ REFUSED 0$", 3), proxy.stdout.text()


def test_hooks_file_path_object(cli_proxy, echo_server, hooks_file):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                      "--hooks", "%s:shouting" % hooks_file)
    assert echo_roundtrip(proxy.address, b"hey") == b"hey!"
    # Only the object's hooks count: the module's on_connect is not used, 127.0.0.3 is served.
    with connect_from(proxy.address, "127.0.0.3") as c:
        c.sendall(b"y")
        assert c.recv(2) == b"y!"


def test_hooks_module(cli_proxy, echo_server, hooks_pkg):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                      "--hooks", "hookpkg_for_tests.mod", env=hooks_pkg)
    assert echo_roundtrip(proxy.address, b"abc") == b"cba"


def test_hooks_module_object(cli_proxy, echo_server, hooks_pkg):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                      "--hooks", "hookpkg_for_tests.mod:hooks", env=hooks_pkg)
    assert echo_roundtrip(proxy.address, b"banana") == b"b4n4n4"
    with connect_from(proxy.address, "127.0.0.2") as c:
        assert closed_by_peer(c, 3) is not None


@pytest.mark.parametrize("spec", [
    "no/such/dir/hooks.py",
    "no_such_module_for_fastproxy_tests",
    "hookpkg_for_tests.mod:missing_object",
    "FILE:missing_object",
])
def test_bad_hooks_spec_one_line_exit_2(any_engine, hooks_pkg, hooks_file, spec):
    spec = spec.replace("FILE", str(hooks_file))
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
                            "--engine", any_engine, "--hooks", spec], timeout=15, env=hooks_pkg)
    assert_one_line_error(rc, out, err, "--hooks")
