"""The kernel engine (--engine kernel): bridges forwarded by a BPF sockmap
verdict. Its fallback to epoll where BPF is not permitted; byte-exact
transfers with random half-closes over several bridges at once; a stalled
reader behind a fast writer, where the bytes queued stay bounded."""
import fcntl
import os
import random
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from fastproxy import ENGINES
from conftest import kernel_unavailable
from support.cli import cli_command, subprocess_env
from support.servers import Listener
from support.sockets import MiB, connect, free_port

SIOCINQ, SIOCOUTQ = 0x541B, 0x5411

needs_bpf = pytest.mark.skipif(
    sys.platform != "linux" or bool(kernel_unavailable()),
    reason="BPF sockmap not permitted here (needs CAP_BPF + CAP_NET_ADMIN and a kernel with BTF): %s"
    % (kernel_unavailable() if sys.platform == "linux" else sys.platform))


def _wait_listening(port, seconds=10):
    # Without connecting: a probe connection would reach the upstream as a
    # bridge of its own.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
        finally:
            probe.close()
        time.sleep(0.05)
    return False


def _start(upstream):
    port = free_port()
    cmd = cli_command(["--engine", "kernel", "--workers", "1",
                       "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream}"])
    proc = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    if _wait_listening(port):
        return proc, port
    raise AssertionError("proxy did not start: %s" % _stop(proc))


def _stop(proc):
    proc.terminate()
    try:
        return proc.communicate(timeout=10)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]


@pytest.mark.skipif("kernel" not in ENGINES, reason="engine 'kernel' not compiled in (a portable build)")
@pytest.mark.skipif(shutil.which("capsh") is None or os.geteuid() != 0,
                    reason="needs root and capsh to run the proxy without CAP_BPF/CAP_NET_ADMIN")
def test_falls_back_to_epoll_with_one_line_without_bpf_capabilities():
    with Listener() as srv:
        caps = "cap_bpf,cap_net_admin,cap_sys_admin,cap_perfmon"
        # capsh runs its program through a shell: "-c CMD" with the command line.
        port = free_port()
        # The same fastproxy as this process: an in-place build or the installed one.
        cmd = shlex.join(["exec"] + cli_command(["--engine", "kernel", "--workers", "1", "--listen",
                                                 f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{srv.port}"]))
        proc = subprocess.Popen(["capsh", "--drop=" + caps, "--", "-c", cmd], env=subprocess_env(),
                                stderr=subprocess.PIPE, text=True)
        try:
            assert _wait_listening(port), "proxy did not start"
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            # It still proxies (on epoll).
            s = srv.accept(timeout=5)
            c.sendall(b"ping")
            assert s.recv(4) == b"ping"
            c.close()
            s.close()
        finally:
            err = _stop(proc)
    lines = [line for line in err.splitlines() if "engine kernel cannot run here" in line]
    assert len(lines) == 1, err
    assert "Operation not permitted" in lines[0] and "running epoll" in lines[0]
    assert "engine epoll" in err


def _echo_halfclose_server(lsock, stop):
    # Reads until FIN, then sends back what it read and closes.
    def serve(conn):
        with conn:
            data = bytearray()
            while True:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
            conn.sendall(bytes(data))
            conn.shutdown(socket.SHUT_WR)
    lsock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = lsock.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


@needs_bpf
def test_byte_exact_with_random_half_closes_many_bridges():
    rng = random.Random(18)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    stop = threading.Event()
    threading.Thread(target=_echo_halfclose_server, args=(lsock, stop), daemon=True).start()
    proc, port = _start(lsock.getsockname()[1])
    results, errors = [], []

    def one(size, pause):
        try:
            blob = os.urandom(size)
            c = connect(("127.0.0.1", port), timeout=30)
            if pause:
                time.sleep(pause)   # joins the sockmap before any byte
            sender = threading.Thread(target=lambda: (c.sendall(blob), c.shutdown(socket.SHUT_WR)))
            sender.start()
            got = bytearray()
            while True:
                chunk = c.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
            sender.join(30)
            c.close()
            results.append(bytes(got) == blob)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    try:
        sizes = [rng.choice((1, 100, 70000, rng.randint(1, 12 * MiB))) for _ in range(16)]
        threads = [threading.Thread(target=one, args=(n, rng.choice((0, 0.05)))) for n in sizes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert results == [True] * len(sizes)
    finally:
        stop.set()
        _stop(proc)
        lsock.close()


@needs_bpf
def test_joins_only_once_no_skb_was_read_in_part():
    # The upstream reads nothing for a moment: the worker's send to it
    # blocks with its buffer full, after a read that likely stopped inside
    # an skb. The verdict takes whole skbs (tcp_read_skb): a bridge that
    # joined then would forward that skb's head a second time (without the
    # rule, 3 runs in 4 failed: 169,877 bytes twice, or a hang).
    with Listener() as srv:
        proc, port = _start(srv.port)
        try:
            for _ in range(16):
                blob = os.urandom(4 * MiB)
                c = connect(("127.0.0.1", port), timeout=10)
                sender = threading.Thread(target=lambda: (c.sendall(blob), c.shutdown(socket.SHUT_WR)))
                sender.start()
                s = srv.accept(timeout=10)
                s.settimeout(10)
                time.sleep(0.2)   # the proxy's send to it blocks, its buffer full
                got = bytearray()
                while True:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    got += chunk
                sender.join(10)
                assert len(got) == len(blob), "the upstream got %d bytes of %d" % (len(got), len(blob))
                assert bytes(got) == blob, "the upstream got other bytes than the client sent"
                s.close()
                c.close()
        finally:
            _stop(proc)


def _tcp_mem_pages():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    return 0


def _ioctl(sock, req):
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), req, b"\0" * 4))[0]


@needs_bpf
@pytest.mark.slow
def test_stalled_reader_fast_writer_30s_stays_bounded():
    # 16 MiB: the bound for what a stalled bridge may take in,
    # counting the client's own send buffer and every kernel queue.
    with Listener() as srv:
        proc, port = _start(srv.port)
        try:
            c = connect(("127.0.0.1", port), timeout=10)
            server = srv.accept(timeout=10)   # never reads
            c.setblocking(False)
            mem0 = _tcp_mem_pages()
            blob = b"x" * MiB
            sent, peak_pages = 0, 0
            end = time.monotonic() + 30
            while time.monotonic() < end:
                try:
                    sent += c.send(blob)
                except BlockingIOError:
                    time.sleep(0.01)
                peak_pages = max(peak_pages, _tcp_mem_pages() - mem0)
                assert sent <= 16 * MiB, "the client got %d bytes out into a stalled reader" % sent
            assert proc.poll() is None
            # Queued on the path: the client's send queue, what the server
            # holds unread; the rest is in the proxy (its sockets' queues).
            in_proxy = sent - _ioctl(c, SIOCOUTQ) - _ioctl(server, SIOCINQ)
            assert in_proxy <= 12 * MiB, in_proxy
            # /proc/net/sockstat's TCP mem is machine-wide (every netns, every
            # other process's traffic): reported, not asserted.
            print("TCP mem grew by at most %d pages; %d bytes sent; %d in the proxy" % (peak_pages, sent, in_proxy))
            c.close()
            server.close()
        finally:
            _stop(proc)
