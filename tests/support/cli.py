"""The ``fastproxy`` CLI in a subprocess: started until it listens, or run to
completion, and its one-line user errors checked."""
import os
import re
import subprocess
import sys
import threading
import time

import fastproxy

from .procfs import proc_cpu_seconds, proc_fd_count
from .sockets import parse_addr


def subprocess_env(extra=None):
    """Environment for child Pythons: import the same fastproxy as this process."""
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastproxy.__file__)))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("FASTPROXY_ENGINE", None)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class LineReader:
    """Collects a pipe's lines on a thread; wait_line(regex, timeout) looks for one."""

    def __init__(self, pipe):
        self.lines = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self._thread.start()

    def _run(self, pipe):
        # The pipe is ours once given: closed at EOF, so that nobody has to
        # close it after the thread is done with it.
        with pipe:
            for raw in iter(pipe.readline, b""):
                with self._cond:
                    self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_line(self, pattern, timeout):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return None
                self._cond.wait(left)

    def text(self):
        with self._cond:
            return "\n".join(self.lines)

    def join(self, timeout):
        self._thread.join(timeout)


LISTEN_RX = r"listening on (\[[0-9a-fA-F:.]*\]:\d+|[^\s,;]*:\d+)"


def cli_command(args, rlimit_nofile=None):
    """argv for ``python -m fastproxy ARGS``; with rlimit_nofile, exec'ed through a tiny
    wrapper that lowers RLIMIT_NOFILE soft and hard (so the proxy cannot raise it back;
    this also avoids preexec_fn in a threaded parent)."""
    cmd = [sys.executable, "-m", "fastproxy"] + list(args)
    if rlimit_nofile is None:
        return cmd
    soft, hard = rlimit_nofile if isinstance(rlimit_nofile, tuple) else (rlimit_nofile,) * 2
    wrapper = ("import os, resource, sys\n"
               "resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d))\n"
               "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
               % (soft, hard))
    return [sys.executable, "-c", wrapper] + cmd[1:]


class CliProxy:
    """``python -m fastproxy ARGS`` in a subprocess, ready once it logged 'listening on'."""

    def __init__(self, args, env=None, ready_timeout=20.0, rlimit_nofile=None):
        self.cmd = cmd = cli_command(args, rlimit_nofile)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=subprocess_env(env))
        self.pid = self.proc.pid
        self.stderr = LineReader(self.proc.stderr)
        self.stdout = LineReader(self.proc.stdout)
        m = self.stderr.wait_line(LISTEN_RX, ready_timeout)
        if m is None:
            self.kill()
            raise AssertionError("proxy did not log 'listening on' within %.0fs; rc=%r stderr:\n%s"
                                 % (ready_timeout, self.proc.poll(), self.stderr.text()))
        self.ready_line = m.string
        self.address = parse_addr(m.group(1))
        assert self.address[1] != 0, "listening line shows port 0: %r" % m.string

    def connect_addr(self, host=None):
        h, port = self.address
        return (host or ("127.0.0.1" if h in ("", "0.0.0.0", "::") else h), port)

    def cpu(self):
        return proc_cpu_seconds(self.pid)

    def fd_count(self):
        return proc_fd_count(self.pid)

    def alive(self):
        return self.proc.poll() is None

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr.join(2)
        self.stdout.join(2)


def run_cli(args, timeout=30.0, env=None, rlimit_nofile=None):
    """Run the CLI to completion: (returncode, stdout, stderr)."""
    cp = subprocess.run(cli_command(args, rlimit_nofile),
                        stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                        env=subprocess_env(env))
    return cp.returncode, cp.stdout.decode(errors="replace"), cp.stderr.decode(errors="replace")


def assert_one_line_error(rc, out, err, *needles):
    """A user mistake: exit code 2, exactly one line on stderr naming each needle."""
    assert rc == 2, "exit code %r (want 2); stderr:\n%s" % (rc, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, "want exactly one line on stderr, got:\n%s" % err
    for needle in needles:
        assert needle in lines[0], "error line does not name %r: %r" % (needle, lines[0])
