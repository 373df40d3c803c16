"""Soak: a real `fastproxy` process under mixed traffic and faults for a
while, sampled as it goes; a markdown table and a PNG plot at the end.

    python benchmarks/soak.py                      # 10 minutes, writes docs/reliability.md
    python benchmarks/soak.py --duration 60 --check --out /tmp/soak.md --plot /tmp/soak.png

One process, four listeners sharing its workers:

  stream   -> a VerifyingServer (tests/support/traffic.py): rounds of
              StreamLoad bridges streaming random data both ways with random
              chunks, pauses and half-closes, every byte checked both ways
  echo     -> a healthy echo upstream: a ConnectLoop of short connections,
              and clients that reset their connection mid-way (SO_LINGER 0)
  flap     -> a healthy echo upstream and one that stops and starts
              listening every few seconds (refusals while down)
  faults   -> an upstream that resets mid-stream, closes early or answers
              short, and a port that refuses: every client sees an error

and a reload (SIGHUP, with a changed connect_timeout on `faults`) every
--reload-every seconds. Errors are counted by listener and kind. A healthy
proxy gives none on `stream` and `echo`: the other two are faults injected
on purpose, counted to show they stay faults of their own listener.

Every --interval seconds a sample: the proxy's fds by kind
(/proc/PID/fd: sockets, pipes, other), RSS, threads, bytes checked per
second, connections per second, errors so far. At the end traffic stops,
the proxy drains to no bridges, and its idle fds and threads are compared
with those before the traffic: sockets, threads and other fds must be back
exactly; pipes may stay pooled up to the pool's bound (64 idle pipes per
worker). --check exits 1 on an error a healthy proxy should not have, on fd
or thread drift, or if the proxy died.

Needs matplotlib for the plot (a benchmark-only dependency: `pip install
matplotlib`); without it the table is still written. Linux only (/proc).
"""
import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.support.traffic import ConnectLoop, StreamLoad, VerifyingServer  # noqa: E402

KiB = 1024
PIPE_POOL = 64          # idle pipes a worker keeps (docs/architecture.md, Flows)
HEALTHY = ("stream", "echo")
# Where the proxy comes from: this checkout's src/ when it holds an in-place
# build (python setup.py build_ext --inplace), else the installed package.
SRC = os.path.join(ROOT, "src")
IN_PLACE = any(n.startswith("_core") and n.endswith(".so") for n in os.listdir(os.path.join(SRC, "fastproxy")))
if IN_PLACE:
    sys.path.insert(0, SRC)


def markers(engine):
    """The block of --out this run (re)writes: one per engine."""
    return "<!-- soak:%s:begin -->" % engine, "<!-- soak:%s:end -->" % engine


def resolved_engine(engine):
    if engine != "auto":
        return engine
    from fastproxy.proxy import choose_engine
    return choose_engine("auto")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rst_close(sock):
    """Close with RST: SO_LINGER on with a zero timeout."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


class EchoUpstream:
    """A threaded echo server; flap() closes the listening socket (new
    connections are refused) or opens it again on the same port, leaving the
    connections it has to run to their end."""

    def __init__(self, port=0):
        self.port = port or free_port()
        self._lsock = None
        self._lock = threading.Lock()
        self._closing = False
        self.up = False
        self.start()

    def start(self):
        with self._lock:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen(512)
            s.settimeout(0.2)
            self._lsock, self.up = s, True
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def stop(self):
        with self._lock:
            s, self._lsock, self.up = self._lsock, None, False
        if s is not None:
            s.close()

    def flap(self):
        if self.up:
            self.stop()
        else:
            self.start()

    def _accept(self, s):
        while True:
            try:
                c, _ = s.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c):
        c.settimeout(30)
        try:
            while True:
                data = c.recv(64 * KiB)
                if not data:
                    break
                c.sendall(data)
        except OSError:
            pass
        finally:
            c.close()


class FaultUpstream(EchoUpstream):
    """Reads what comes, then at random: resets, closes without answering,
    or answers short and closes."""

    def _echo(self, c):
        c.settimeout(10)
        try:
            data = c.recv(64 * KiB)
            kind = random.choice(("reset", "close", "short"))
            if kind == "short" and len(data) > 1:
                c.sendall(data[: len(data) // 2])
            if kind == "reset":
                rst_close(c)
                return
        except OSError:
            pass
        c.close()


class ResettingClients:
    """Clients that connect, send, read part of the echo and reset."""

    def __init__(self, target, rate=50.0):
        self.target, self.rate = target, rate
        self.count = 0
        self.errors = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(1.0 / self.rate):
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect(self.target)
                s.sendall(os.urandom(random.randint(1, 32 * KiB)))
                s.recv(1)
            except OSError as e:
                self.errors[type(e).__name__] += 1
            finally:
                rst_close(s)
            self.count += 1

    def stop(self):
        self._stop.set()
        self._thread.join(10)


class StreamRounds:
    """StreamLoad rounds back to back against `target`, each checked."""

    def __init__(self, target, server, n, max_len):
        self.target, self.server, self.n, self.max_len = target, server, n, max_len
        self.bytes_checked = 0
        self.bridges = 0
        self.bad = Counter()
        self.samples = []
        self.current = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def moved(self):
        cur = self.current
        return self.bytes_checked + (cur.bytes_moved() if cur is not None else 0)

    def _run(self):
        seed = 0
        while not self._stop.is_set():
            seed += 1
            load = StreamLoad(self.target, n=self.n, up_len=(0, self.max_len), down_len=(0, self.max_len),
                              seed=seed, max_pause=0.05, server=self.server)
            self.current = load
            load.start()
            result = load.wait(timeout=120)
            self.current = None
            for c in result.conns:
                problems = c.problems()
                if problems:
                    self.bad["stream: " + problems[0].split(":")[0]] += 1
                    if len(self.samples) < 10:
                        self.samples.append("seed %d: %s" % (c.seed, "; ".join(problems)))
            self.bytes_checked += sum(c.up.done + c.down.done for c in result.conns)
            self.bridges += len(result.conns)

    def stop(self):
        self._stop.set()
        self._thread.join(130)


def config_text(ports, upstreams, connect_timeout):
    return f"""# written by benchmarks/soak.py
workers = {ports['workers']}
engine = "{ports['engine']}"
stats = "127.0.0.1:{ports['stats']}"
drain_timeout = "5s"

[[listeners]]
name = "stream"
listen = "127.0.0.1:{ports['stream']}"
upstreams = ["{upstreams['stream']}"]

[[listeners]]
name = "echo"
listen = "127.0.0.1:{ports['echo']}"
upstreams = ["{upstreams['echo']}"]

[[listeners]]
name = "flap"
listen = "127.0.0.1:{ports['flap']}"
upstreams = ["{upstreams['flap'][0]}", "{upstreams['flap'][1]}"]
connect_timeout = "1s"

[[listeners]]
name = "faults"
listen = "127.0.0.1:{ports['faults']}"
upstreams = ["{upstreams['faults'][0]}", "{upstreams['faults'][1]}"]
connect_timeout = "{connect_timeout}"
"""


def proc_sample(pid):
    kinds = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds["socket" if target.startswith("socket:") else "pipe" if target.startswith("pipe:") else "other"] += 1
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return {"sockets": kinds["socket"], "pipes": kinds["pipe"], "other_fds": kinds["other"],
            "fds": sum(kinds.values()), "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
            "threads": int(status["Threads"])}


def get_stats(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.load(r)


def wait_stats(port, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get_stats(port)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("soak: the proxy did not start (exit %s)" % proc.poll())
            time.sleep(0.1)


def wait_idle(port, timeout=30):
    """Wait for the proxy to hold no bridge; its stats then."""
    deadline = time.monotonic() + timeout
    while True:
        stats = get_stats(port)
        if stats.get("active", 0) == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def run(args):
    random.seed(args.seed)
    workdir = tempfile.mkdtemp(prefix="soak-")
    verifying = VerifyingServer(timeout=60.0)
    echo, flap_ok, flapping, faulty = EchoUpstream(), EchoUpstream(), EchoUpstream(), FaultUpstream()
    refusing = socket.socket()  # bound, never listening: its port refuses
    refusing.bind(("127.0.0.1", 0))
    ports = {k: free_port() for k in ("stream", "echo", "flap", "faults", "stats")}
    ports.update(workers=args.workers, engine=args.engine)
    vhost, vport = verifying.address
    upstreams = {"stream": f"{vhost}:{vport}", "echo": f"127.0.0.1:{echo.port}",
                 "flap": (f"127.0.0.1:{flap_ok.port}", f"127.0.0.1:{flapping.port}"),
                 "faults": (f"127.0.0.1:{faulty.port}", f"127.0.0.1:{refusing.getsockname()[1]}")}
    config = os.path.join(workdir, "soak.toml")
    with open(config, "w") as f:
        f.write(config_text(ports, upstreams, "2s"))
    env = dict(os.environ)
    if IN_PLACE:
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    log = open(os.path.join(workdir, "proxy.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "fastproxy", "--config", config],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    problems = []
    try:
        wait_stats(ports["stats"], proc)
        time.sleep(0.5)
        baseline = proc_sample(proc.pid)
        print("soak: proxy pid %d, %d workers, %s engine; %.0f s; baseline %s"
              % (proc.pid, args.workers, args.engine, args.duration, baseline), flush=True)

        stream = StreamRounds(("127.0.0.1", ports["stream"]), verifying, args.bridges, args.max_len).start()
        loops = {name: ConnectLoop(("127.0.0.1", ports[name]), max_rate=args.rate, timeout=3.0,
                                   payload=b"x" * 512).start()
                 for name in ("echo", "flap", "faults")}
        resetting = ResettingClients(("127.0.0.1", ports["echo"]), rate=args.reset_rate).start()

        samples, faults = [], Counter()
        t0 = time.monotonic()
        next_sample = t0 + args.interval
        next_reload = t0 + args.reload_every
        next_flap = t0 + args.flap_every
        last_bytes, last_conns, last_t = 0, 0, t0
        timeout_toggle = False
        while True:
            now = time.monotonic()
            if proc.poll() is not None:
                problems.append("the proxy exited (%s)" % proc.returncode)
                break
            if now >= t0 + args.duration:
                break
            if now >= next_flap:
                flapping.flap()
                faults["upstream flap"] += 1
                next_flap += args.flap_every
            if now >= next_reload:
                timeout_toggle = not timeout_toggle
                with open(config, "w") as f:
                    f.write(config_text(ports, upstreams, "3s" if timeout_toggle else "2s"))
                proc.send_signal(signal.SIGHUP)
                faults["reload"] += 1
                next_reload += args.reload_every
            if now >= next_sample:
                s = proc_sample(proc.pid)
                counts = {name: loop.counts() for name, loop in loops.items()}
                conns = sum(c.total for c in counts.values()) + resetting.count + stream.bridges
                moved = stream.moved()
                dt = now - last_t
                s.update(t=now - t0, mb_s=(moved - last_bytes) / dt / 1e6, conn_s=(conns - last_conns) / dt,
                         errors={f"{n}: {k}": getattr(c, k) for n, c in counts.items()
                                 for k in ("refused", "reset", "timeout", "wrong", "other") if getattr(c, k)})
                s["errors"].update(stream.bad)
                s["errors"].update({f"reset clients: {k}": v for k, v in resetting.errors.items()})
                samples.append(s)
                last_bytes, last_conns, last_t = moved, conns, now
                print("  %5.0fs fds %3d (sockets %d, pipes %d) rss %.1f MB threads %d  %.1f MB/s  %.0f conn/s  errors %d"
                      % (s["t"], s["fds"], s["sockets"], s["pipes"], s["rss_mb"], s["threads"], s["mb_s"],
                         s["conn_s"], sum(s["errors"].values())), flush=True)
                next_sample += args.interval
            time.sleep(0.05)

        resetting.stop()
        finals = {name: loop.stop() for name, loop in loops.items()}
        stream.stop()
        if not flapping.up:
            flapping.flap()
        alive = proc.poll() is None
        idle = end = None
        leaked = []
        if alive:
            stats = wait_idle(ports["stats"])
            # --inject-leak: connections the proxy still holds when the
            # end figures are taken, which --check must report (its test).
            leaked = [socket.create_connection(("127.0.0.1", ports["stats"]), timeout=5)
                      for _ in range(args.inject_leak)]
            time.sleep(1.0)
            end = proc_sample(proc.pid)
            idle = stats
        for c in leaked:
            c.close()
        errors = Counter()
        for name, c in finals.items():
            for k in ("refused", "reset", "timeout", "wrong", "other"):
                if getattr(c, k):
                    errors[f"{name}: {k}"] += getattr(c, k)
        errors.update(stream.bad)
        errors.update({f"reset clients: {k}": v for k, v in resetting.errors.items()})
        for key, n in errors.items():
            if key.split(":")[0] in HEALTHY:
                problems.append(f"{n} x {key} (a healthy listener)")
        problems += ["stream: " + s for s in stream.samples[:5]]
        for name in HEALTHY[1:]:
            problems += [f"{name}: {x}" for x in finals[name].samples[:3] if errors[f"{name}: " + x.split(":")[0]]]
        if end is not None:
            for key in ("sockets", "other_fds", "threads"):
                if end[key] != baseline[key]:
                    problems.append(f"{key} drift: {baseline[key]} before the traffic, {end[key]} after it, idle")
            bound = 2 * PIPE_POOL * args.workers
            if end["pipes"] > baseline["pipes"] + bound:
                problems.append(f"pipes: {end['pipes']} idle, over the pools' bound {bound}")
            if idle.get("active", 0):
                problems.append(f"{idle['active']} bridges still active 30 s after the traffic stopped")
        result = {
            "args": vars(args), "baseline": baseline, "end": end, "samples": samples,
            "errors": dict(errors), "faults": dict(faults),
            "connections": {name: c.total for name, c in finals.items()} | {
                "reset clients": resetting.count, "stream bridges": stream.bridges},
            "bytes_checked": stream.bytes_checked, "problems": problems,
            "proxy_stats": {k: v for k, v in (idle or {}).items() if isinstance(v, (int, float))},
            "python": sys.version.split()[0],
        }
        faults["upstream resets/early closes/short answers (faults)"] = finals["faults"].total
        faults["client resets"] = resetting.count
        result["faults"] = dict(faults)
        return result
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.seek(0)
        tail = log.read()[-3000:]
        log.close()
        if proc.returncode not in (0, -signal.SIGTERM) or problems:
            print("soak: the proxy's log (tail):\n" + tail, file=sys.stderr)
        for server in (echo, flap_ok, flapping, faulty):
            server.stop()
        refusing.close()
        verifying.close()


def table(result, rows=20):
    samples = result["samples"]
    step = max(1, len(samples) // rows)
    chosen = samples[step - 1::step]
    if samples and chosen[-1] is not samples[-1]:
        chosen.append(samples[-1])
    out = ["| t (s) | checked MB/s | conn/s | fds | sockets | pipes | RSS MB | threads | errors so far (healthy / injected) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in chosen:
        healthy = sum(v for k, v in s["errors"].items() if k.split(":")[0] in HEALTHY)
        out.append("| %.0f | %.1f | %.0f | %d | %d | %d | %.1f | %d | %d / %d |" % (
            s["t"], s["mb_s"], s["conn_s"], s["fds"], s["sockets"], s["pipes"], s["rss_mb"], s["threads"],
            healthy, sum(s["errors"].values()) - healthy))
    return "\n".join(out)


def markdown(result, plot_name):
    a, b, e = result["args"], result["baseline"], result["end"]
    begin, end = markers(result["engine"])
    lines = [begin, "",
             "Run: `%s` (Python %s, %d workers, the %s engine, %d s, a sample every %g s, a reload every %g s, "
             "the flapping upstream toggled every %g s)." % (
                 result["command"], result["python"], a["workers"], result["engine"], a["duration"], a["interval"],
                 a["reload_every"], a["flap_every"]),
             "",
             "Connections: " + ", ".join("%s %d" % kv for kv in result["connections"].items())
             + "; %.2f GB checked byte for byte both ways on `stream`." % (result["bytes_checked"] / 1e9),
             "",
             "Faults injected: " + ", ".join("%s %d" % kv for kv in result["faults"].items()) + ".",
             "",
             "Errors clients saw, by listener and kind: "
             + (", ".join("%s %d" % kv for kv in sorted(result["errors"].items())) or "none") + ".",
             ""]
    counted = result["proxy_stats"]
    if counted:
        lines += ["The proxy counted (its /stats at the end, all listeners): " + ", ".join(
            "%s %d" % (k, counted[k]) for k in ("accepted", "connect_failures", "bytes_upstream", "bytes_downstream",
                                               "peak_active", "hook_errors") if k in counted) + ".", ""]
    if e is not None:
        lines += ["Idle before the traffic and after it (bridges drained): fds %d -> %d (sockets %d -> %d, "
                  "pipes %d -> %d, other %d -> %d), threads %d -> %d, RSS %.1f -> %.1f MB." % (
                      b["fds"], e["fds"], b["sockets"], e["sockets"], b["pipes"], e["pipes"], b["other_fds"],
                      e["other_fds"], b["threads"], e["threads"], b["rss_mb"], e["rss_mb"]), ""]
    if result["samples"]:
        rss = [s["rss_mb"] for s in result["samples"]]
        first = next((s["rss_mb"] for s in result["samples"] if s["t"] >= 60), rss[0])
        lines += ["RSS under load: %.1f MB at 1 minute, %.1f MB at the end, %.1f MB at most." % (
            first, rss[-1], max(rss)), ""]
    lines += ["Verdict: " + ("no problem" if not result["problems"] else "; ".join(result["problems"])), "",
              table(result), ""]
    if plot_name:
        lines += ["![soak: throughput, fds, RSS and threads over time](%s)" % plot_name, ""]
    lines.append(end)
    return "\n".join(lines)


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("soak: matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
        return False
    samples = result["samples"]
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(t, [s["mb_s"] for s in samples], label="bytes checked (MB/s)")
    axes[0].set_ylabel("MB/s")
    conn_ax = axes[0].twinx()
    conn_ax.plot(t, [s["conn_s"] for s in samples], color="tab:orange", label="connections/s")
    conn_ax.set_ylabel("connections/s")
    conn_ax.set_ylim(bottom=0)
    conn_ax.legend(fontsize="small", loc="upper right")
    axes[0].set_ylim(bottom=0)
    axes[0].set_title("throughput")
    kinds = sorted({k for s in samples for k in s["errors"]})
    for k in kinds:
        axes[1].plot(t, [s["errors"].get(k, 0) for s in samples], label=k)
    axes[1].set_title("errors clients saw, cumulative (healthy listeners: stream, echo)")
    for key in ("fds", "sockets", "pipes"):
        axes[2].plot(t, [s[key] for s in samples], label=key)
    axes[2].set_title("the proxy's fds")
    axes[3].plot(t, [s["rss_mb"] for s in samples], label="RSS (MB)")
    axes[3].plot(t, [s["threads"] for s in samples], label="threads")
    axes[3].set_title("memory and threads")
    axes[3].set_xlabel("seconds")
    for ax in axes:
        if ax.get_lines():
            ax.legend(fontsize="small", loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_markdown(path, block, engine):
    begin, end = markers(engine)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Reliability\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    from fastproxy.options import ENGINE_CHOICES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--reload-every", type=float, default=30.0, help="seconds between reloads (SIGHUP)")
    p.add_argument("--flap-every", type=float, default=3.0, help="seconds between the flapping upstream's toggles")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engine", default="auto", choices=ENGINE_CHOICES)
    p.add_argument("--bridges", type=int, default=50, help="bridges per stream round")
    p.add_argument("--max-len", type=int, default=512 * KiB, help="bytes per direction per bridge, at most")
    p.add_argument("--rate", type=float, default=100.0, help="short connections a second per listener")
    p.add_argument("--reset-rate", type=float, default=30.0, help="resetting clients a second")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "reliability.md"),
                   help="markdown file whose soak block is (re)written")
    p.add_argument("--plot", help="PNG written (default docs/soak-ENGINE.png; '' for none)")
    p.add_argument("--json", help="also write the raw result here")
    p.add_argument("--check", action="store_true", help="exit 1 on a problem (errors on healthy listeners, drift)")
    p.add_argument("--inject-leak", type=int, default=0, metavar="N",
                   help="for tests of --check: hold N connections to the proxy while its end figures are taken "
                        "(a socket drift --check must report)")
    args = p.parse_args(argv)
    engine = resolved_engine(args.engine)
    if args.plot is None:
        args.plot = os.path.join(ROOT, "docs", "soak-%s.png" % engine)
    result = run(args)
    result["engine"] = engine
    result["command"] = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = result["command"].strip()
    plotted = bool(args.plot) and plot(result, args.plot)
    rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.out))) if plotted else None
    write_markdown(args.out, markdown(result, rel), engine)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print("soak: %s; errors %s; faults %s" % (
        "no problem" if not result["problems"] else "PROBLEMS: " + "; ".join(result["problems"]),
        dict(result["errors"]), result["faults"]))
    print("soak: wrote %s%s" % (args.out, " and " + args.plot if plotted else ""))
    return 1 if args.check and result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
