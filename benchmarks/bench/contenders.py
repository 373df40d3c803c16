"""The contenders: how to start each proxy (fastproxy, haproxy, nginx, the
asyncio/uvloop peers, templates from the command line)."""
from __future__ import annotations

import argparse
import importlib.util
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .common import BENCH_DIR, HOST, PEERS_DIR, log


ProxyCommand = Callable[[int, int, Path], List[str]]


@dataclass
class Contender:
    name: str
    command: Optional[ProxyCommand]  # None: clients talk to the backend itself
    desc: str                        # for the JSON, so a result says what ran
    missing: str = ""                # why it cannot run here, if it cannot
    clean_exits: tuple = (0,)        # exit codes that count as a clean stop
    scrape: bool = False             # serves /metrics on {workdir}/stats.sock: scraped during bulk and connrate


# fastproxy-16listeners: how many listeners share the workers.
LISTENERS = 16


def placeholders(listen: int, upstream: int, workdir: Path) -> Dict[str, str]:
    """What a command template may use (see --contender), shell-quoted."""
    values = {"listen_host": HOST, "listen_port": str(listen), "upstream_host": HOST,
              "upstream_port": str(upstream), "workdir": str(workdir),
              "python": sys.executable, "bench": str(BENCH_DIR)}
    return {k: shlex.quote(v) for k, v in values.items()}


def template_command(template: str) -> ProxyCommand:
    """Any shell command template; it must stay in the foreground."""
    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        return ["sh", "-c", "exec " + template.format(**placeholders(listen, upstream, workdir))]
    return command


# fastproxy-busypoll's window: longer than the load CPU's scheduler slices,
# so that a worker spins through the gaps while the load side takes turns.
BUSY_POLL = "100ms"

HAPROXY_CFG = """\
global
    nbthread {threads}
{busy}defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
{splice}
frontend bench
    bind {host}:{listen}
    default_backend upstream
backend upstream
    server s1 {host}:{upstream}
"""


def haproxy_command(threads: int, splice: bool, busy: bool = False) -> ProxyCommand:
    options = "    option splice-request\n    option splice-response\n" if splice else ""
    busy_polling = "    busy-polling\n" if busy else ""

    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(threads=threads, splice=options, busy=busy_polling, host=HOST,
                                          listen=listen, upstream=upstream))
        return ["haproxy", "-db", "-f", str(cfg)]  # -db: stay in the foreground
    return command


# Debian's nginx defaults otherwise (no reuseport, accept_mutex off). Without
# proxy_half_close (off by default in 1.22) a client's shutdown(SHUT_WR)
# ends the session and the reply is lost. Every connection counts twice
# against worker_connections (client + upstream), and one worker may end up
# with most of the idle bridges, so both limits are the whole fd budget.
NGINX_CFG = """\
{load_module}
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections {nofile};
}}
stream {{
    server {{
        listen {host}:{listen} backlog=4096;
        proxy_pass {host}:{upstream};
        proxy_half_close on;
        proxy_connect_timeout 5s;
        proxy_timeout 1h;
    }}
}}
"""
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def nginx_stream() -> Tuple[str, str]:
    """(load_module line or "", why nginx cannot run here or "")."""
    if not shutil.which("nginx"):
        return "", "nginx not on PATH (apt-get install nginx libnginx-mod-stream)"
    try:
        p = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "", f"nginx -V failed: {e}"
    flags = (p.stdout + p.stderr).split()
    if "--with-stream" in flags:
        return "", ""
    if "--with-stream=dynamic" in flags and NGINX_STREAM_MODULE.exists():
        return f"load_module {NGINX_STREAM_MODULE};", ""
    return "", "nginx has no stream module (apt-get install libnginx-mod-stream)"


def nginx_command(workers: int) -> ProxyCommand:
    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        cfg = workdir / "nginx.conf"
        cfg.write_text(NGINX_CFG.format(
            load_module=nginx_stream()[0], workers=workers, workdir=workdir, host=HOST,
            listen=listen, upstream=upstream,
            nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        # -e: start-up errors to our log rather than /var/log/nginx
        return ["nginx", "-e", "stderr", "-p", str(workdir), "-c", str(cfg)]
    return command


def peer_command(loop: str) -> ProxyCommand:
    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        return [sys.executable, str(PEERS_DIR / "asyncio_proxy.py"), "--loop", loop,
                "--listen", f"{HOST}:{listen}", "--upstream", f"{HOST}:{upstream}"]
    return command


def fastproxy_command(template: str, workers: int, engine: str,
                      extra: str = "") -> ProxyCommand:
    base = shlex.split(template.format(python=sys.executable))

    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        flags = shlex.split(extra.format(**placeholders(listen, upstream, workdir)))
        return base + ["--listen", f"{HOST}:{listen}", "--upstream", f"{HOST}:{upstream}",
                       "--workers", str(workers), "--engine", engine] + flags
    return command


def fastproxy_listeners_command(template: str, workers: int, engine: str, count: int) -> ProxyCommand:
    """fastproxy from a config file of `count` listeners sharing the
    workers: the measured one first, the others idle on ports of their own
    (each with its own group, a backend that is never asked)."""
    base = shlex.split(template.format(python=sys.executable))

    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        cfg = workdir / "listeners.toml"
        lines = [f'[[listeners]]\nlisten = "{HOST}:{listen}"\nupstreams = ["{HOST}:{upstream}"]\n']
        for i in range(1, count):
            lines.append(f'[[listeners]]\nname = "idle{i}"\nlisten = "{HOST}:0"\n'
                         f'upstreams = ["{HOST}:{upstream}"]\n')
        cfg.write_text("\n".join(lines))
        return base + ["--config", str(cfg), "--workers", str(workers), "--engine", engine]
    return command


def fastproxy_missing(template: str) -> str:
    argv = shlex.split(template.format(python=sys.executable))
    if not argv or not shutil.which(argv[0]):
        return f"'{argv[0] if argv else template}' not found"
    if argv[:3] == [sys.executable, "-m", "fastproxy"] and not importlib.util.find_spec("fastproxy"):
        return "module fastproxy is not importable (not installed yet?)"
    return ""


def name_value(text: str, option: str) -> Tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        sys.exit(f"{option} wants NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def all_contenders(args: argparse.Namespace) -> List[Contender]:
    """Every known contender, in table order. To compare a new variant add a
    row here, or from the command line: --contender NAME=TEMPLATE for any
    command, --fastproxy-variant NAME=FLAGS for fastproxy with extra flags."""
    no_haproxy = "" if shutil.which("haproxy") else "haproxy not on PATH"
    fp_missing = fastproxy_missing(args.fastproxy_cmd)
    no_uvloop = "" if importlib.util.find_spec("uvloop") else "uvloop is not importable (pip install uvloop)"
    w = args.workers

    def fp(name: str, engine: str, extra: str = "", scrape: bool = False) -> Contender:
        desc = (f"{args.fastproxy_cmd} --listen ... --upstream ... "
                f"--workers {w} --engine {engine} {extra}").strip()
        if scrape:
            desc += f"; GET /metrics every {args.scrape_interval} s during bulk and connrate"
        return Contender(name, fastproxy_command(args.fastproxy_cmd, w, engine, extra),
                         desc, fp_missing, scrape=scrape)

    contenders = [
        Contender("direct", None, "clients connect to the backend itself"),
        fp("fastproxy", "epoll"),
        fp("fastproxy-poll", "poll"),
        # Established bridges forwarded in the kernel (BPF sockmap; issue 18).
        fp("fastproxy-kernel", "kernel"),
        fp("fastproxy-busypoll", "epoll", f"--busy-poll {BUSY_POLL}"),
        fp("fastproxy-nolowat", "epoll", "--notsent-lowat 0"),
        # The stats endpoint's cost: the same proxy, scraped while it works.
        fp("fastproxy-scraped", "epoll", "--stats unix:{workdir}/stats.sock", scrape=True),
        Contender("fastproxy-16listeners",
                  fastproxy_listeners_command(args.fastproxy_cmd, w, "epoll", LISTENERS),
                  f"{args.fastproxy_cmd} --config FILE (the measured listener and {LISTENERS - 1} idle ones) "
                  f"--workers {w} --engine epoll", fp_missing),
    ]
    # Variants take their flags after the defaults, so they may override
    # them (argparse keeps the last --engine, for instance).
    for spec in args.fastproxy_variant:
        name, flags = name_value(spec, "--fastproxy-variant")
        contenders.append(fp(name, "epoll", flags))
    contenders += [
        # haproxy -db dies by the SIGTERM itself; that is its normal stop.
        Contender("haproxy", haproxy_command(w, splice=False),
                  f"haproxy -db, mode tcp, nbthread {w}, no splice", no_haproxy,
                  (0, -signal.SIGTERM)),
        Contender("haproxy-splice", haproxy_command(w, splice=True),
                  f"haproxy -db, mode tcp, nbthread {w}, option splice-request "
                  "+ splice-response", no_haproxy, (0, -signal.SIGTERM)),
        Contender("haproxy-busypoll", haproxy_command(w, splice=True, busy=True),
                  "haproxy-splice plus global busy-polling", no_haproxy, (0, -signal.SIGTERM)),
        Contender("nginx", nginx_command(w),
                  f"nginx stream module, worker_processes {w}, proxy_half_close on",
                  nginx_stream()[1]),
        Contender("uvloop", peer_command("uvloop"),
                  "peers/asyncio_proxy.py --loop uvloop (streams API, 64 KiB reads)",
                  no_uvloop),
        Contender("asyncio", peer_command("asyncio"),
                  "peers/asyncio_proxy.py --loop asyncio (streams API, 64 KiB reads)"),
    ]
    for spec in args.contender:
        name, template = name_value(spec, "--contender")
        argv0 = shlex.split(template)[0] if shlex.split(template) else ""
        contenders.append(Contender(
            name, template_command(template), template,
            "" if "{" in argv0 or shutil.which(argv0) else f"'{argv0}' not found"))
    names = [c.name for c in contenders]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        sys.exit(f"contender names must be unique: {', '.join(sorted(dup))}")
    return contenders


def pick_contenders(args: argparse.Namespace) -> List[Contender]:
    known = {c.name: c for c in all_contenders(args)}
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(known)
    skip = {n.strip() for n in (args.skip or "").split(",") if n.strip()}
    unknown = [n for n in wanted + sorted(skip) if n not in known]
    if unknown:
        sys.exit(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(known)}")
    wanted = [n for n in wanted if n not in skip or n == "direct"]
    if "direct" not in wanted:
        wanted.insert(0, "direct")  # every ratio is taken against it
    chosen = []
    for name in wanted:
        if known[name].missing:
            log(f"skipping {name}: {known[name].missing}")
        else:
            chosen.append(known[name])
    return chosen
