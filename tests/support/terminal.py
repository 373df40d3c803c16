"""A command on a pseudo-terminal, as a user at a terminal runs it: its
output collected, keys written to it, the terminal's modes readable."""
import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time

from .cli import cli_command, subprocess_env


class Pty:
    """`python -m fastproxy ARGS` on a pseudo-terminal (stdin, stdout and
    stderr), its output collected; the parent keeps the slave side to read
    the terminal's modes."""

    def __init__(self, args, env=None):
        self.master, self.slave = os.openpty()
        # Wide enough that a table row is one line.
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.modes = termios.tcgetattr(self.slave)
        env = subprocess_env(dict(env or {}, TERM="xterm-256color"))
        # rich takes COLUMNS and LINES over the window size; pytest-xdist's
        # workers have them (80 x 24), and so may a user's shell.
        env.pop("COLUMNS", None)
        env.pop("LINES", None)
        self.proc = subprocess.Popen(cli_command(args), stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     env=env, start_new_session=True)
        self.out = b""

    def read_until(self, pattern, timeout):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not rx.search(self.out):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:
                    return bool(rx.search(self.out))
        return True

    def drain(self):
        while select.select([self.master], [], [], 0.1)[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.out += data

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.drain()
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)
        os.close(self.slave)


def no_rich(tmp_path):
    """A path entry on which `import rich` fails, as without the extra."""
    fake = tmp_path / "norich" / "rich"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('rich is not installed (test)')\n")
    return str(tmp_path / "norich")


def env_path_first(entry):
    env = subprocess_env()
    return {"PYTHONPATH": entry + os.pathsep + env["PYTHONPATH"]}
