"""The stub of the compiled core says what the built extension has, and the
package type-checks (mypy settings: pyproject.toml's [tool.mypy])."""
import os
import subprocess
import sys

import pytest

from support.cli import subprocess_env

pytest.importorskip("mypy", reason="mypy is not installed (pip install '.[test]' brings it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWLIST = os.path.join(ROOT, "tests", "support", "stubtest-allowlist.txt")


def _mypy(tmp_path, *args):
    """python -m ARGS in the project root, with mypy's cache kept out of it."""
    env = subprocess_env({"MYPY_CACHE_DIR": str(tmp_path / "mypy-cache")})
    cp = subprocess.run([sys.executable, "-m"] + list(args), cwd=ROOT, env=env,
                        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    return cp.returncode, cp.stdout + cp.stderr


def test_stub_matches_the_built_extension(tmp_path):
    rc, out = _mypy(tmp_path, "mypy.stubtest", "fastproxy._core", "--allowlist", ALLOWLIST)
    assert rc == 0, "stubtest found drift between _core.pyi and the built _core:\n" + out


def test_package_type_checks(tmp_path):
    rc, out = _mypy(tmp_path, "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"))
    assert rc == 0, "mypy src/fastproxy:\n" + out


def test_public_api_example_type_checks(tmp_path):
    """A program using the public API, checked strictly, as a user's would be."""
    rc, out = _mypy(tmp_path, "mypy", "--strict", "--config-file", os.path.join(ROOT, "pyproject.toml"),
                    os.path.join(ROOT, "examples", "embedded.py"))
    assert rc == 0, "mypy --strict examples/embedded.py:\n" + out
