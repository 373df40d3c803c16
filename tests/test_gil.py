"""The data plane runs without the GIL: an embedding program that holds the GIL in a
pure-Python loop (switch interval 100 s) must not slow the forwarding.

Four processes: the embedding proxy, a sink, a sender, and pytest orchestrating.
The busy loop only reads an mmap'ed flag and time.monotonic() (neither releases the
GIL); the sink sets the flag when it has everything, so the loop ends early when the
data plane works, and runs its full BUSY_S if the data plane waits for the GIL."""
import subprocess
import sys

import pytest

from support.cli import LineReader, subprocess_env
from support.sockets import MiB

SIZE = 64 * MiB
BUSY_S = 12.0

EMBED = r"""
import mmap, sys, time
from fastproxy import Proxy
engine, upstream, flag_path, busy_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
f = open(flag_path, "r+b")
flag = mmap.mmap(f.fileno(), 1)
p = Proxy(listen="127.0.0.1:0", upstream=upstream, engine=engine)
p.start()
print("port", p.address[1], p.engine, flush=True)
sys.stdin.readline()                       # "go"
print("busy", time.monotonic(), flush=True)
sys.setswitchinterval(100)
end = time.monotonic() + busy_s
while flag[0] == 0 and time.monotonic() < end:
    pass
sys.setswitchinterval(0.005)
print("end", time.monotonic(), flag[0], flush=True)
p.stop(5)
"""

SINK = r"""
import hashlib, mmap, socket, sys, time
flag_path = sys.argv[1]
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(8); lst.settimeout(60)
print("port", lst.getsockname()[1], flush=True)
c, _ = lst.accept(); c.settimeout(60)
h, n = hashlib.sha256(), 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    h.update(d); n += len(d)
t = time.monotonic()
with open(flag_path, "r+b") as f:
    m = mmap.mmap(f.fileno(), 1); m[0] = 1; m.flush()
print("done", n, h.hexdigest(), t, flush=True)
c.close()
"""

SENDER = r"""
import hashlib, os, socket, sys
port, size = int(sys.argv[1]), int(sys.argv[2])
data = os.urandom(size)
print("sha", hashlib.sha256(data).hexdigest(), flush=True)
s = socket.create_connection(("127.0.0.1", port), timeout=60)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print("sent", flush=True)
"""


def _spawn(code, *args):
    return subprocess.Popen([sys.executable, "-c", code] + [str(a) for a in args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=subprocess_env())


@pytest.mark.slow
def test_forwarding_while_main_thread_holds_gil(engine, tmp_path):
    flag_path = tmp_path / "flag"
    flag_path.write_bytes(b"\0")
    procs = []
    try:
        sink = _spawn(SINK, flag_path)
        procs.append(sink)
        sink_out = LineReader(sink.stdout)
        m = sink_out.wait_line(r"^port (\d+)", 20)
        assert m, sink_out.text()

        emb = _spawn(EMBED, engine, "127.0.0.1:%s" % m.group(1), flag_path, BUSY_S)
        procs.append(emb)
        emb_out = LineReader(emb.stdout)
        m = emb_out.wait_line(r"^port (\d+) (\w+)", 30)
        assert m, emb_out.text()
        port, running = int(m.group(1)), m.group(2)
        assert running == engine

        emb.stdin.write(b"go\n")
        emb.stdin.flush()
        m = emb_out.wait_line(r"^busy ([\d.]+)", 10)
        assert m, emb_out.text()
        busy_start = float(m.group(1))

        sender = _spawn(SENDER, port, SIZE)
        procs.append(sender)
        send_out = LineReader(sender.stdout)

        done = sink_out.wait_line(r"^done (\d+) (\w+) ([\d.]+)", 40)
        assert done, "sink got nothing within 40 s:\n" + sink_out.text()
        m_end = emb_out.wait_line(r"^end ([\d.]+) (\d)", BUSY_S + 20)
        assert m_end, emb_out.text()
        sha = send_out.wait_line(r"^sha (\w+)", 10)
        assert sha
        assert int(done.group(1)) == SIZE
        assert done.group(2) == sha.group(1), "bytes corrupted"
        arrived = float(done.group(3)) - busy_start
        busy_end = float(m_end.group(1))
        assert float(done.group(3)) < busy_end and m_end.group(2) == "1", \
            "64 MiB arrived only after the GIL-holding loop ended (%.1f s): the data plane needs the GIL" % arrived
        assert arrived < 30
        assert emb.wait(20) == 0, emb_out.text()
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
            pr.wait(10)
            pr.stdin.close()   # stdout is its LineReader's to close
