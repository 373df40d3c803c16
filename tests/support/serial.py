"""Tests marked `serial` run alone when the suite runs in parallel
(pytest-xdist): they read machine-wide state that other tests' traffic
would move (/proc/net/sockstat's TCP memory), or take a machine-wide name
(the veth pair's fixed addresses), or count what a loaded CPU changes.

Every other test holds a shared lock while it runs, a serial test an
exclusive one. A second lock, the turnstile, keeps the exclusive one from
starving: every test takes the turnstile on its way to the main lock, and
a serial test keeps it while it waits, so no new test starts while it
waits for the running ones to end. Both are flock(2) locks on files in the
run's shared temporary directory, which the kernel releases if a worker
dies."""
import contextlib
import fcntl
import os

_files = {}


def _fd(directory, name):
    key = (str(directory), name)
    if key not in _files:
        _files[key] = os.open(os.path.join(directory, "serial." + name), os.O_RDWR | os.O_CREAT, 0o600)
    return _files[key]


@contextlib.contextmanager
def turn(directory, exclusive):
    """Hold the run's lock, shared or exclusive, for the body."""
    gate, main = _fd(directory, "turnstile"), _fd(directory, "main")
    # Whoever waits for the main lock waits holding the turnstile: a serial
    # test waiting for the running ones keeps new ones from starting.
    fcntl.flock(gate, fcntl.LOCK_EX)
    try:
        fcntl.flock(main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    finally:
        fcntl.flock(gate, fcntl.LOCK_UN)
    try:
        yield
    finally:
        fcntl.flock(main, fcntl.LOCK_UN)
