"""benchmarks/loadgen.c's mpingpong mode (issue 18's many-connection
ping-pong) counts what it claims: against loadgen's own echo server every
connection completes round trips and none fails; against a server whose
echo is wrong every connection is counted as an error, not as a request."""
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from support.sockets import free_port, recv_exact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN_SRC = os.path.join(ROOT, "benchmarks", "loadgen.c")

pytestmark = [pytest.mark.skipif(not os.path.isfile(LOADGEN_SRC), reason="no benchmarks/ in this tree"),
              pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler (cc) to build loadgen"),
              pytest.mark.linux_only]

FIELDS = {"test", "seconds", "conns", "alive", "round_trips", "req_per_s", "errors", "errors_connect",
          "errors_io", "errors_eof", "errors_mismatch", "errors_timeout", "samples", "p50_us", "p99_us"}


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory):
    # Built apart from benchmarks/build so a benchmark run is not disturbed.
    binary = str(tmp_path_factory.mktemp("loadgen") / "loadgen")
    subprocess.run(["cc", "-O2", "-Wall", "-o", binary, LOADGEN_SRC], check=True, timeout=120)
    return binary


def mpingpong(loadgen, port, conns, seconds):
    done = subprocess.run([loadgen, "mpingpong", "127.0.0.1", str(port), str(conns), str(seconds)],
                          capture_output=True, text=True, timeout=seconds + 30)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert FIELDS <= set(result), FIELDS - set(result)
    return result


def wait_listening(port, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "echo server exited with %s" % proc.returncode
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError("echo server not listening on %d" % port)


def test_mpingpong_against_the_echo_server(loadgen):
    port = free_port()
    server = subprocess.Popen([loadgen, "echo-server", str(port)], stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, server)
        r = mpingpong(loadgen, port, 20, 1)
    finally:
        server.terminate()
        server.wait(10)
    assert r["test"] == "mpingpong" and r["conns"] == 20
    assert r["errors"] == 0 and r["alive"] == 20, r
    # One request outstanding per connection: far more round trips than
    # connections means each was reused, not one per connection.
    assert r["round_trips"] >= 20 * 10, r
    assert r["samples"] == r["round_trips"]
    assert 0.9 <= r["seconds"] <= 5
    assert r["req_per_s"] == pytest.approx(r["round_trips"] / r["seconds"], rel=0.01)
    assert 0 < r["p50_us"] <= r["p99_us"]


def corrupting_echo(listener, stop):
    """Answers each 64-byte request with the same bytes, one flipped."""
    conns = []
    listener.settimeout(0.1)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        conns.append(conn)
        threading.Thread(target=corrupt_one, args=(conn,), daemon=True).start()
    for conn in conns:
        conn.close()


def corrupt_one(conn):
    try:
        msg = bytearray(recv_exact(conn, 64))
        msg[-1] ^= 1
        conn.sendall(bytes(msg))
        recv_exact(conn, 1)  # until the client gives up on us
    except (OSError, EOFError, AssertionError):
        pass


def test_mpingpong_counts_a_wrong_echo_as_an_error(loadgen):
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        t = threading.Thread(target=corrupting_echo, args=(listener, stop), daemon=True)
        t.start()
        try:
            r = mpingpong(loadgen, listener.getsockname()[1], 5, 1)
        finally:
            stop.set()
            t.join(5)
    assert r["round_trips"] == 0 and r["req_per_s"] == 0, r
    assert r["errors_mismatch"] == 5 and r["errors"] == 5 and r["alive"] == 0, r
