"""benchmarks/soak.py stays runnable: a few seconds of it against a real
fastproxy process, with a reload and upstream flaps, pass its --check and
write its table block (CI runs 60 s of it from .ci/run)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOAK = os.path.join(ROOT, "benchmarks", "soak.py")

pytestmark = [pytest.mark.skipif(not os.path.isfile(SOAK), reason="no benchmarks/ in this tree"),
              pytest.mark.linux_only]


@pytest.mark.slow
def test_short_soak(tmp_path, engine):
    out, raw = tmp_path / "soak.md", tmp_path / "soak.json"
    out.write_text("# Kept\n\nprose before\n")
    done = subprocess.run([sys.executable, SOAK, "--duration", "6", "--interval", "1", "--reload-every", "3",
                           "--flap-every", "1", "--bridges", "10", "--rate", "50", "--reset-rate", "10",
                           "--engine", engine, "--check", "--out", str(out), "--plot", "", "--json", str(raw)],
                          capture_output=True, text=True, timeout=90, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# Kept\n\nprose before\n")
    assert "<!-- soak:%s:begin -->" % engine in text and "Verdict: no problem" in text
    result = json.loads(raw.read_text())
    assert result["faults"]["reload"] >= 1 and result["faults"]["upstream flap"] >= 3
    assert result["bytes_checked"] > 0 and len(result["samples"]) >= 4
    assert result["end"]["sockets"] == result["baseline"]["sockets"]


@pytest.mark.slow
def test_check_fails_naming_the_failed_check(tmp_path, any_engine):
    # --inject-leak holds connections to the proxy while the end figures
    # are taken: --check must exit non-zero and say which check failed.
    out = tmp_path / "soak.md"
    done = subprocess.run([sys.executable, SOAK, "--duration", "3", "--interval", "1", "--reload-every", "60",
                           "--flap-every", "1", "--bridges", "4", "--rate", "20", "--reset-rate", "5",
                           "--engine", any_engine, "--check", "--inject-leak", "3", "--out", str(out), "--plot", ""],
                          capture_output=True, text=True, timeout=90, cwd=str(tmp_path))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PROBLEMS: " in done.stdout and "sockets drift: " in done.stdout, done.stdout[-2000:]
    assert "sockets drift: " in out.read_text()
