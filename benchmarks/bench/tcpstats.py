"""--tcp-stats: what TCP did during a bulk test, to explain a figure rather
than guess. Machine-wide counter deltas (/proc/net/snmp and netstat, the
loopback device, context switches, IPIs), the proxy's own context
switches, and one `ss -tin` sample of each leg's sockets near the end of
the transfer (cumulative per socket: retransmitted bytes, out-of-order
packets at the receiver, bytes per data segment, the algorithm)."""
from __future__ import annotations

import os
import re
import subprocess
import threading
from typing import Dict, List, Optional

from .congestion import available
from .procfs import group_pids



def _pairs(path: str) -> Dict[str, Dict[str, int]]:
    """/proc/net/snmp and netstat: a header line then a value line per
    protocol."""
    out: Dict[str, Dict[str, int]] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for head, vals in zip(lines[::2], lines[1::2]):
        proto, names = head.split(":", 1)
        out[proto] = {n: int(v) for n, v in zip(names.split(), vals.split(":", 1)[1].split())}
    return out


def _loopback() -> Dict[str, int]:
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    v = rest.split()
                    return {"lo_tx_bytes": int(v[8]), "lo_tx_packets": int(v[9])}
    except OSError:
        pass
    return {}


def _system() -> Dict[str, int]:
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("ctxt "):
                    out["ctxt"] = int(line.split()[1])
        with open("/proc/interrupts") as f:
            for line in f:
                if line.strip().startswith("CAL:"):  # function-call IPIs (cross-CPU wake-ups)
                    out["ipi_cal"] = sum(int(v) for v in line.split()[1:] if v.isdigit())
    except OSError:
        pass
    return out


def _softnet() -> Dict[str, int]:
    """Packets the per-CPU backlog dropped (full) and NET_RX runs that ran
    out of budget: loopback delivers through these queues."""
    drops = squeezed = 0
    try:
        with open("/proc/net/softnet_stat") as f:
            for line in f:
                v = line.split()
                drops += int(v[1], 16)
                squeezed += int(v[2], 16)
    except (OSError, IndexError, ValueError):
        pass
    return {"softnet_dropped": drops, "softnet_time_squeeze": squeezed}


def counters() -> Dict[str, int]:
    """Every Tcp (/proc/net/snmp) and TcpExt (/proc/net/netstat) counter,
    the loopback device's, the backlog queues', the machine's."""
    snmp, netstat = _pairs("/proc/net/snmp"), _pairs("/proc/net/netstat")
    out = dict(snmp.get("Tcp", {}))
    out.update(netstat.get("TcpExt", {}))
    out.update(_loopback())
    out.update(_softnet())
    out.update(_system())
    return out


def group_switches(pgid: int) -> Dict[str, int]:
    """Voluntary (it waited) and involuntary (it was preempted) context
    switches of every thread of a process group."""
    vol = invol = 0
    for pid in group_pids(pgid):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:   # a process's own status counts its main thread only
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            vol += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches:"):
                            invol += int(line.split()[1])
            except OSError:
                pass
    return {"voluntary": vol, "involuntary": invol}


_FIELD = re.compile(r"(\w+):(\S+)")


def parse_ss(text: str) -> List[dict]:
    """`ss -tinH` output: a socket line (state, queues, local, peer), then
    its info on an indented line. Returns one dict per socket."""
    socks: List[dict] = []
    algorithms = set(available())
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            f = line.split()
            if len(f) >= 5:
                socks.append({"local": f[3], "peer": f[4], "recv_q": f[1], "send_q": f[2]})
            continue
        if not socks:
            continue
        info = socks[-1]
        for word in line.split():
            if word in algorithms:
                info.setdefault("cc", word)
                break
        for key, val in _FIELD.findall(line):
            info.setdefault(key, val)
    return socks


def _num(v: Optional[str]) -> int:
    try:
        return int(v) if v is not None else 0
    except ValueError:
        return 0


def _port(addr: str) -> int:
    return _num(addr.rsplit(":", 1)[-1])


def leg(socks: List[dict], port: int) -> dict:
    """The leg to `port`: its senders connect to it, its receivers accepted
    on it. Sums over the streams (and iperf3's control connection, a few
    bytes)."""
    send = [s for s in socks if _port(s["peer"]) == port]
    recv = [s for s in socks if _port(s["local"]) == port]
    sent = sum(_num(s.get("bytes_sent")) for s in send)
    segs = sum(_num(s.get("data_segs_out")) for s in send)
    retrans = sum(_num(s.get("bytes_retrans")) for s in send)
    return {
        "sockets": len(send),
        "cc": sorted({s["cc"] for s in send if "cc" in s}),
        "bytes_sent": sent,
        "retrans_pct": round(100 * retrans / sent, 3) if sent else None,
        "retrans_segs": sum(_num(s.get("retrans", "0/0").split("/")[-1]) for s in send),
        "data_seg_kib": round(sent / segs / 1024, 1) if segs else None,
        "reordering": max((_num(s.get("reordering")) for s in send), default=0),
        "rcv_ooopack": sum(_num(s.get("rcv_ooopack")) for s in recv),
        # Bytes queued at that moment: unread at the receivers, unsent or
        # unacknowledged at the senders (what the leg holds in memory).
        "recv_q": sum(_num(s.get("recv_q")) for s in recv),
        "send_q": sum(_num(s.get("send_q")) for s in send),
    }


def ss_legs(ports: Dict[str, int]) -> Dict[str, dict]:
    """One `ss -tin` sample of each named leg ({name: port})."""
    terms = " or ".join(f"dport = :{p} or sport = :{p}" for p in ports.values())
    try:
        p = subprocess.run(["ss", "-tinH", f"( {terms} )"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    socks = parse_ss(p.stdout)
    return {name: leg(socks, port) for name, port in ports.items()}


class TcpStats:
    """Counters around a block, and one ss sample of its legs `at` seconds
    in (a thread: the transfer runs in the foreground)."""

    def __init__(self, ports: Dict[str, int], at: float, proxy_pgid: Optional[int]):
        self.ports, self.at, self.pgid = ports, at, proxy_pgid
        self.legs: Dict[str, dict] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="ss", daemon=True)

    def _sample(self) -> None:
        if not self._done.wait(self.at):
            self.legs = ss_legs(self.ports)

    def __enter__(self) -> "TcpStats":
        self.c0 = counters()
        self.sw0 = group_switches(self.pgid) if self.pgid else None
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(15)
        c1 = counters()
        # Only what moved: most of the ~150 counters stay at zero.
        self.delta = {k: c1[k] - self.c0.get(k, 0) for k in c1 if c1[k] != self.c0.get(k, 0)}
        self.switches = None
        if self.pgid:
            sw1 = group_switches(self.pgid)
            self.switches = {k: sw1[k] - self.sw0[k] for k in sw1}

    def summary(self, gbytes: float) -> dict:
        """Deltas, and the few figures compared across contenders per GB
        delivered."""
        per = lambda v: round(v / gbytes, 1) if gbytes else None
        d = self.delta
        out = {"counters": d, "legs": self.legs,
               "retrans_per_gb": per(d.get("RetransSegs", 0)),
               "ofo_per_gb": per(d.get("TCPOFOQueue", 0)),
               "ctxt_per_gb": per(d.get("ctxt", 0)),
               "lo_packet_kib": (round(d["lo_tx_bytes"] / d["lo_tx_packets"] / 1024, 1)
                                 if d.get("lo_tx_packets") else None)}
        if self.switches is not None:
            out["proxy_switches"] = self.switches
            out["proxy_switches_per_gb"] = per(sum(self.switches.values()))
        return out
