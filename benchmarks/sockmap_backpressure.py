#!/usr/bin/env python3
"""Phase A of the kernel engine (issue 18): does a sockmap verdict program
keep backpressure? A minimal proxy built on src/fastproxy/includes/sockmap.h
(the engine's own loader, compiled here into a small shim and called with
ctypes), measured two ways:

  stall  a client sends as fast as it can for --seconds into a bridge whose
         server never reads; prints the bytes the client's send() accepted,
         /proc/net/sockstat TCP mem (pages) before/after, the proxy sockets'
         SIOCINQ/SIOCOUTQ and the map counters.
  serve  runs the proxy (listen port -> upstream port) until killed, for
         iperf3 through it.

    python benchmarks/sockmap_backpressure.py stall --mode acked --budget 4M
    python benchmarks/sockmap_backpressure.py stall --fastproxy   # the epoll engine, same client
    python benchmarks/sockmap_backpressure.py serve --listen 5202 --upstream 5201 --budget 4M

Modes: acked (the verdict reads the peer's bytes_acked: held = forwarded -
acked, everything in the kernel), none (always redirect: the prototype).
Linux, root (CAP_BPF + CAP_NET_ADMIN), a C compiler. Stdlib only.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INCLUDES = HERE.parent / "src" / "fastproxy" / "includes"
SIOCINQ, SIOCOUTQ = 0x541B, 0x5411
SO_RCVLOWAT = 18

SHIM = r"""
#include "sockmap.h"
static struct fp_sm SM;
static char LOG[1 << 16];
int sm_open(unsigned n, int mode) { return fp_sm_open(&SM, n, mode, LOG, sizeof(LOG)); }
const char *sm_log(void) { return LOG; }
int sm_prepare(int fd, unsigned slot, unsigned peer, unsigned long long budget, unsigned long long adj)
{ return fp_sm_prepare(&SM, fd, slot, peer, budget, adj); }
int sm_join(int fd, unsigned slot) { return fp_sm_join(&SM, fd, slot); }
int sm_leave(int fd, unsigned slot) { return fp_sm_leave(&SM, fd, slot); }
void *sm_state(unsigned slot) { return &SM.st[slot]; }
"""
MODES = {"acked": 0, "none": 1}


class State(ctypes.Structure):
    _fields_ = [("peer", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("forwarded", ctypes.c_uint64),
                ("passed", ctypes.c_uint64), ("drained", ctypes.c_uint64), ("budget", ctypes.c_uint64),
                ("adj", ctypes.c_uint64)]


def load_shim():
    tmp = Path(tempfile.mkdtemp(prefix="smshim"))
    (tmp / "shim.c").write_text(SHIM)
    subprocess.check_call(["cc", "-O2", "-shared", "-fPIC", "-I", str(INCLUDES), str(tmp / "shim.c"),
                           "-o", str(tmp / "shim.so")])
    lib = ctypes.CDLL(str(tmp / "shim.so"))
    lib.sm_log.restype = ctypes.c_char_p
    lib.sm_state.restype = ctypes.POINTER(State)
    lib.sm_prepare.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_ulonglong]
    return lib


def size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1]] if text[-1] in mult else int(text)


def ioctl_int(sock, req):
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), req, b"\0" * 4))[0]


def bytes_acked(sock) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return struct.unpack_from("Q", info, 120)[0]


def taken(sock) -> int:
    # acked first: an ACK between the two reads makes the sum smaller, never larger.
    a = bytes_acked(sock)
    return a + ioctl_int(sock, SIOCOUTQ)


def tcp_mem_pages() -> int:
    for line in open("/proc/net/sockstat"):
        if line.startswith("TCP:"):
            f = line.split()
            return int(f[f.index("mem") + 1])
    return -1


class Proxy:
    """One thread per bridge; the kernel moves the bytes, the thread moves
    only what the verdict passed (backpressure engaged) and watches EOF."""

    def __init__(self, lib, upstream, budget, rcvbuf):
        self.lib, self.upstream, self.budget, self.rcvbuf = lib, upstream, budget, rcvbuf
        self.next_slot = 0
        self.bridges = []
        self.user_sent = 0

    def bridge(self, a: socket.socket):
        b = socket.create_connection(self.upstream)
        sa, sb = self.next_slot, self.next_slot + 1
        self.next_slot += 2
        socks = (a, b)
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        for s, slot, peer, pslot in ((a, sa, b, sb), (b, sb, a, sa)):
            r = self.lib.sm_prepare(s.fileno(), slot, pslot, self.budget, taken(peer))
            assert r == 0, r
        for s, slot in ((a, sa), (b, sb)):
            r = self.lib.sm_join(s.fileno(), slot)
            assert r == 0, os.strerror(-r)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVLOWAT, 1)
        entry = (a, b, sa, sb)
        self.bridges.append(entry)
        threading.Thread(target=self.run, args=entry, daemon=True).start()

    def run(self, a, b, sa, sb):
        st = {sa: self.lib.sm_state(sa).contents, sb: self.lib.sm_state(sb).contents}
        peer = {a: b, b: a}
        slot = {a: sa, b: sb}
        eof = set()
        poller = select.poll()
        for s in (a, b):
            s.setblocking(False)
            poller.register(s, select.POLLIN | select.POLLRDHUP)
        waiting = set()
        while len(eof) < 2:
            poller.poll(1 if waiting else 200)
            waiting.clear()
            for s in (a, b):
                if s in eof:
                    continue
                me = st[slot[s]]
                p = peer[s]
                # The peer must have taken every byte forwarded to it before
                # user space sends: else these would overtake them.
                while True:
                    if taken(p) - me.adj < me.forwarded:
                        waiting.add(s)
                        break
                    try:
                        data = s.recv(262144)
                    except BlockingIOError:
                        break
                    if not data:
                        eof.add(s)
                        # wait for the peer to send all forwarded bytes, then FIN
                        while taken(p) - me.adj < me.forwarded:
                            time.sleep(0.001)
                        p.shutdown(socket.SHUT_WR)
                        break
                    view = memoryview(data)
                    while view:
                        try:
                            n = p.send(view)
                        except BlockingIOError:
                            select.select([], [p], [], 0.05)
                            continue
                        me.adj += n
                        view = view[n:]
                    me.drained += len(data)
        for s in (a, b):
            s.close()


def serve(args, lib, ready=None):
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", args.listen))
    lsock.listen(128)
    if ready is not None:
        ready.append(lsock.getsockname()[1])
    proxy = Proxy(lib, ("127.0.0.1", args.upstream), size(args.budget), size(args.rcvbuf) if args.rcvbuf else 0)
    if ready is not None:
        ready.append(proxy)
    while True:
        a, _ = lsock.accept()
        proxy.bridge(a)


def stall(args, lib):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True).start()
    proc = None
    proxy = None
    if args.fastproxy:
        lp = socket.socket()
        lp.bind(("127.0.0.1", 0))
        port = lp.getsockname()[1]
        lp.close()
        env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
        proc = subprocess.Popen([sys.executable, "-m", "fastproxy", "--engine", args.engine, "--listen", f"127.0.0.1:{port}",
                                 "--upstream", f"127.0.0.1:{srv.getsockname()[1]}"], env=env)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
    else:
        ready = []
        args.listen, args.upstream = 0, srv.getsockname()[1]
        threading.Thread(target=serve, args=(args, lib, ready), daemon=True).start()
        while len(ready) < 2:
            time.sleep(0.01)
        port, proxy = ready
    time.sleep(0.2)
    mem0 = tcp_mem_pages()
    c = socket.create_connection(("127.0.0.1", port))
    c.setblocking(False)
    blob = b"x" * (1 << 20)
    sent = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        try:
            sent += c.send(blob)
        except BlockingIOError:
            select.select([], [c], [], 0.05)
    mem1 = tcp_mem_pages()
    if proc is not None and args.engine == "kernel":
        # The engine's state array: each offloaded socket's counters.
        dump = subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True).stdout
        arrays = [m["id"] for m in json.loads(dump or "[]") if m["type"] == "array" and m.get("bytes_value") == 48]
        if arrays:
            rows = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "id", str(arrays[-1])],
                                             capture_output=True, text=True).stdout or "[]")
            for row in rows:
                v = bytes(int(x, 16) for x in row["value"])
                fields = struct.unpack("IIQQQQQ", v)
                if any(fields[2:5]):
                    print("slot", row["key"], dict(zip(("peer", "flags", "forwarded", "passed", "drained", "budget", "adj"), fields)))
    out = {"accepted_MiB": round(sent / 2**20, 2), "tcp_mem_pages": [mem0, mem1],
           "client_outq": ioctl_int(c, SIOCOUTQ), "server_inq": ioctl_int(held[0], SIOCINQ) if held else None}
    if proxy is not None and proxy.bridges:
        a, b, sa, sb = proxy.bridges[0]
        sta, stb = lib.sm_state(sa).contents, lib.sm_state(sb).contents
        out.update(proxy_client_side_inq=ioctl_int(a, SIOCINQ), proxy_upstream_outq=ioctl_int(b, SIOCOUTQ),
                   forwarded=sta.forwarded, passed=sta.passed, drained=sta.drained,
                   held_by_peer=sta.forwarded + sta.adj - bytes_acked(b),
                   rmem_alloc_hint="passed-drained=%d" % (sta.passed - sta.drained))
    print(out)
    if proc is not None:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("stall", "serve"))
    ap.add_argument("--mode", choices=sorted(MODES), default="acked")
    ap.add_argument("--budget", default="4M")
    ap.add_argument("--rcvbuf", default="", help="SO_RCVBUF on the proxy's sockets (fixes it: no autotuning)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--listen", type=int, default=5202)
    ap.add_argument("--upstream", type=int, default=5201)
    ap.add_argument("--fastproxy", action="store_true", help="stall: measure fastproxy (--engine) instead")
    ap.add_argument("--engine", default="epoll", help="with --fastproxy: its engine (epoll, kernel)")
    args = ap.parse_args()
    lib = None
    if not args.fastproxy:
        lib = load_shim()
        r = lib.sm_open(4096, MODES[args.mode])
        if r < 0:
            sys.exit("sockmap: %s\n%s" % (os.strerror(-r), lib.sm_log().decode()[-2000:]))
    if args.what == "stall":
        stall(args, lib)
    else:
        serve(args, lib)


if __name__ == "__main__":
    main()
