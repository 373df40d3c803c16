#!/usr/bin/env python3
"""What a bridge costs a fastproxy process, for sizing an instance
(docs/deploy.md, Sizing): memory and fds per idle bridge, and fds per
bridge with bytes waiting in both directions.

    PYTHONPATH=src python benchmarks/bridge_cost.py --bridges 4000 --stuck 200

It starts a backend and `fastproxy` (the command, default settings but
the flags given after --) as processes of their own, then:

1. idle: opens --bridges connections through the proxy, each sending 64 B
   that the echo backend returns, and reads the proxy's VmRSS and open fds
   (/proc/PID) and the kernel's slab caches (/proc/slabinfo, when
   readable) before and after;
2. stuck: opens --stuck connections to a backend that sends whenever it
   can and never reads, and itself sends until the socket refuses more and never
   reads, so both of each bridge's flows hold bytes in the proxy; then
   counts the proxy's fds again.

Slab figures are machine-wide: they include the client's and the
backend's sockets (on loopback four TCP sockets per bridge, two of them
the proxy's), and whatever else the machine did meanwhile. Stdlib only,
Linux only."""
from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

BACKEND = r"""
import os, selectors, socket, sys
mode, port_file = sys.argv[1], sys.argv[2]
lsock = socket.socket()
lsock.bind(("127.0.0.1", 0))
lsock.listen(4096)
lsock.setblocking(False)
with open(port_file + ".tmp", "w") as f:
    f.write(str(lsock.getsockname()[1]))
os.rename(port_file + ".tmp", port_file)
sel = selectors.DefaultSelector()
sel.register(lsock, selectors.EVENT_READ)
held = []
blob = b"x" * (8 << 20)
while True:
    for key, _ in sel.select():
        if key.fileobj is lsock:
            while True:
                try:
                    conn, _ = lsock.accept()
                except BlockingIOError:
                    break
                conn.setblocking(False)
                held.append(conn)
                sel.register(conn, selectors.EVENT_READ if mode == "echo" else selectors.EVENT_WRITE)
        elif mode == "blast":
            try:
                key.fileobj.send(blob)   # as much as fits, whenever it fits; never read
            except BlockingIOError:
                pass
            except ConnectionError:
                sel.unregister(key.fileobj)
        else:
            try:
                data = key.fileobj.recv(65536)
            except (BlockingIOError, ConnectionError):
                continue
            if data:
                key.fileobj.send(data)   # 64 B: always fits
            else:
                sel.unregister(key.fileobj)
"""

SLABS = ("TCP", "TCPv6", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "kmalloc-256", "kmalloc-512")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pipes(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                count += 1
        except OSError:
            pass
    return count


def slabs() -> Dict[str, int]:
    """Bytes in use per slab cache (active objects x object size)."""
    out: Dict[str, int] = {}
    try:
        lines = Path("/proc/slabinfo").read_text().splitlines()[2:]
    except OSError:
        return out
    for line in lines:
        f = line.split()
        if f[0] in SLABS:
            out[f[0]] = int(f[1]) * int(f[3])
    return out


def start_backend(mode: str, tmp: Path) -> "tuple[subprocess.Popen[bytes], int]":
    port_file = tmp / f"{mode}.port"
    proc = subprocess.Popen([sys.executable, "-c", BACKEND, mode, str(port_file)])
    deadline = time.monotonic() + 10
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mode} backend did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def start_proxy(upstream_port: int, extra: List[str]) -> "tuple[subprocess.Popen[bytes], int]":
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastproxy", "--listen", f"127.0.0.1:{port}",
                             "--upstream", f"127.0.0.1:{upstream_port}", "--log-level", "warning", *extra])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy did not start")
            time.sleep(0.05)


def settle(pid: int) -> None:
    # The probe connection and its bridge close; give the workers a moment.
    time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bridges", type=int, default=4000, help="idle bridges to hold (default 4000)")
    ap.add_argument("--stuck", type=int, default=200, help="bridges with bytes stuck both ways (default 200)")
    ap.add_argument("proxy_args", nargs="*", help="more fastproxy flags, after --")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # children inherit it
    if hard < 2 * args.bridges + 256:
        sys.exit(f"the hard open-file limit {hard} is too low for {args.bridges} bridges")
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bridge-cost-{os.getpid()}"
    tmp.mkdir()
    procs: List["subprocess.Popen[bytes]"] = []
    try:
        echo, echo_port = start_backend("echo", tmp)
        procs.append(echo)
        proxy, port = start_proxy(echo_port, args.proxy_args)
        procs.append(proxy)
        settle(proxy.pid)
        rss0, fd0, slab0 = rss_kib(proxy.pid), fds(proxy.pid), slabs()
        held: List[socket.socket] = []
        for i in range(args.bridges):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            msg = b"%063d\n" % i
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(64)
                if not chunk:
                    raise RuntimeError(f"bridge {i} closed")
                got += chunk
            held.append(s)
        time.sleep(0.5)
        rss1, fd1, slab1 = rss_kib(proxy.pid), fds(proxy.pid), slabs()
        n = args.bridges
        print(f"idle bridges: {n}")
        print(f"  proxy VmRSS: {rss0} -> {rss1} KiB: {(rss1 - rss0) / n:.2f} KiB per idle bridge")
        print(f"  proxy fds: {fd0} -> {fd1}: {(fd1 - fd0) / n:.2f} per idle bridge "
              f"({pipes(proxy.pid)} pipe fds open)")
        if slab0:
            total = sum(slab1.values()) - sum(slab0.values())
            print(f"  kernel slab growth (machine-wide, 4 TCP sockets per bridge on loopback): "
                  f"{total / n / 1024:.2f} KiB per bridge, {total / n / 4 / 1024:.2f} KiB per socket")
            for name in SLABS:
                if name in slab0 or name in slab1:
                    delta = slab1.get(name, 0) - slab0.get(name, 0)
                    print(f"    {name}: {delta / n:+.0f} B per bridge")
        for s in held:
            s.close()
        proxy.terminate()
        proxy.wait(30)
        procs.remove(proxy)

        if args.stuck:
            blaster, blaster_port = start_backend("blast", tmp)
            procs.append(blaster)
            proxy, port = start_proxy(blaster_port, args.proxy_args)
            procs.append(proxy)
            settle(proxy.pid)
            fd0 = fds(proxy.pid)
            stuck: List[socket.socket] = []
            for _ in range(args.stuck):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.setblocking(False)
                try:
                    while True:
                        s.send(b"y" * 65536)   # until it refuses more; never read
                except BlockingIOError:
                    pass
                stuck.append(s)
            time.sleep(1.0)
            fd1 = fds(proxy.pid)
            m = args.stuck
            print(f"bridges with bytes waiting both ways: {m}")
            print(f"  proxy fds: {fd0} -> {fd1}: {(fd1 - fd0) / m:.2f} per bridge "
                  f"({pipes(proxy.pid)} pipe fds open)")
            print(f"  proxy VmRSS: {rss_kib(proxy.pid)} KiB")
            for s in stuck:
                s.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
