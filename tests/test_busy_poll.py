"""busy_poll: a worker keeps polling without sleeping for that long after its
last event, then sleeps again. Seen from outside as CPU time: the proxy's
process burns CPU right after traffic and none once the window has passed."""
import os
import time

import pytest

from support.procfs import proc_cpu_seconds
from support.sockets import echo_roundtrip

pytestmark = pytest.mark.linux_only   # CPU time read from /proc
WINDOW_S = 0.4


def _cpu_over(seconds):
    before = proc_cpu_seconds(os.getpid())
    time.sleep(seconds)
    return proc_cpu_seconds(os.getpid()) - before


@pytest.mark.serial  # CPU time: on a CPU other tests share, a spinning thread gets only a part
@pytest.mark.parametrize("busy_poll", ["400ms", 0])
def test_busy_poll_spins_only_right_after_traffic(make_proxy, echo_server, busy_poll):
    # In-process proxy: this test's thread sleeps and the echo server waits
    # in accept, so the process's CPU time over a sleep is the workers'.
    p = make_proxy(echo_server.addr, workers=1, busy_poll=busy_poll)
    assert p.config.process.busy_poll == (WINDOW_S if busy_poll else 0.0)
    assert echo_roundtrip(p.address, b"wake up") == b"wake up"
    spinning = _cpu_over(0.15)
    time.sleep(WINDOW_S)          # past the window: the worker sleeps again
    asleep = _cpu_over(0.3)
    assert asleep < 0.05, "the worker kept busy %.3f s of 0.3 s with no traffic" % asleep
    if busy_poll:
        # A spinning thread gets most of a CPU even on a loaded machine.
        assert spinning > 0.04, "the worker slept right after traffic (%.3f s of 0.15 s)" % spinning
    else:
        assert spinning < 0.05, "the worker spun without busy_poll (%.3f s of 0.15 s)" % spinning
    assert echo_roundtrip(p.address, b"still forwarding") == b"still forwarding"
