"""The deployment examples (examples/deploy, docs/deploy.md) stay runnable:
every fastproxy config and command line in them passes `fastproxy check`,
the systemd units verify and hand their sockets to the listeners they name,
the Kubernetes manifests and the Dockerfile run the configs they ship, the
balancer's config matches the instances', and the guide's sizing figures
are the code's."""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from fastproxy.configfile import load_config
from fastproxy.proxy import default_max_connections, pipe_pool_size
from support.cli import LISTEN_RX, LineReader, run_cli, subprocess_env
from support.dns import DnsServer
from support.servers import EchoServer
from support.sockets import connect_from, echo_roundtrip, free_port, read_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "examples", "deploy")
GUIDE = os.path.join(ROOT, "docs", "deploy.md")

# Lines that use DNS upstreams (srv:, resolve_interval, resolver): the
# guide and the examples mark them.
DNS_TEXT = re.compile(r"\bsrv:|^\s*(resolve_interval|resolver)\s*=|--resolve-interval|--resolver", re.M)

TOMLS = sorted(f for f in os.listdir(DEPLOY) if f.endswith(".toml"))


def read(name):
    with open(os.path.join(DEPLOY, name), encoding="utf-8") as f:
        return f.read()


def check(args):
    """`fastproxy check ARGS` in a subprocess: its output, once it said OK."""
    rc, out, err = run_cli(["check"] + list(args))
    assert rc == 0, "fastproxy check %s: exit %r\n%s" % (" ".join(args), rc, err)
    assert ": OK, " in out.splitlines()[0], out
    return out


def local_paths(args, files):
    """A command line with the paths of files it names in the image or on
    the host (/etc/fastproxy/fastproxy.toml) replaced by their examples."""
    return [files.get(a, a) for a in args]


# ---- every config file

def test_the_examples_are_there():
    for name in ("fastproxy.service", "fastproxy.socket", "fastproxy.toml", "Dockerfile", "container.toml",
                 "kubernetes.yaml", "kubernetes.toml", "haproxy.cfg", "balancer.toml"):
        assert os.path.isfile(os.path.join(DEPLOY, name)), name


@pytest.mark.parametrize("name", TOMLS)
def test_every_config_passes_fastproxy_check(name):
    text = read(name)
    out = check(["--config", os.path.join(DEPLOY, name)])
    listeners = len(re.findall(r"^\[\[listeners\]\]", text, re.M))
    assert "OK, %d listener" % listeners in out


def test_check_refuses_a_broken_copy(tmp_path):
    # What the test above relies on: a config that rotted does not pass.
    broken = tmp_path / "balancer.toml"
    broken.write_text(read("balancer.toml").replace("max_connections_per_ip", "max_conections_per_ip"))
    rc, _, err = run_cli(["check", "--config", str(broken)])
    assert rc == 2 and "max_conections_per_ip" in err, err


def test_dns_uses_are_marked_in_the_configs():
    # A config that needs the DNS interface says so where it uses it.
    for name in TOMLS:
        text = read(name)
        for line_no, line in enumerate(text.splitlines(), 1):
            if DNS_TEXT.search(line) and not line.lstrip().startswith("#"):
                before = text.splitlines()[max(0, line_no - 6):line_no]
                assert any("[DNS upstreams]" in b for b in before), (name, line_no, line)


# ---- systemd

def unit(name):
    """A unit file as {section: [(key, value), ...]}, continuation lines joined."""
    sections, current = {}, None
    logical = re.sub(r"\\\n", " ", read(name))
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(section, key):
    return [v for k, v in section if k == key]


def exec_start():
    argv = shlex.split(values(unit("fastproxy.service")["Service"], "ExecStart")[0])
    assert argv[0].endswith("/fastproxy"), argv
    return argv[1:]


def host_files():
    # The service's config is installed as /etc/fastproxy/fastproxy.toml.
    return {"/etc/fastproxy/fastproxy.toml": os.path.join(DEPLOY, "fastproxy.toml")}


def test_the_service_command_line_passes_check():
    args = exec_start()
    assert "/etc/fastproxy/fastproxy.toml" in args
    check(local_paths(args, host_files()))


def test_the_socket_unit_holds_one_socket_per_listener_named_like_it():
    sock = unit("fastproxy.socket")["Socket"]
    streams, names = values(sock, "ListenStream"), values(sock, "FileDescriptorName")
    assert len(streams) == len(names)
    pc = load_config(os.path.join(DEPLOY, "fastproxy.toml"))
    listeners = {c.name: c.listener.listen for c in pc.listeners}
    assert sorted(names) == sorted(listeners)
    for stream, name in zip(streams, names):
        # A bare port is every address, as ":PORT" is.
        assert re.fullmatch(r"\d+", stream), stream
        assert listeners[name] == ("", int(stream)), (name, stream)
    service = unit("fastproxy.service")
    assert "fastproxy.socket" in values(service["Unit"], "Requires")


def test_stop_timeout_outlasts_the_drain():
    pc = load_config(os.path.join(DEPLOY, "fastproxy.toml"))
    timeout = values(unit("fastproxy.service")["Service"], "TimeoutStopSec")[0]
    assert timeout.endswith("s")
    assert float(timeout[:-1]) > pc.listeners[0].timeouts.drain_timeout


# Does what systemd does between fork and exec for fastproxy.socket: the
# sockets at fd 3 on, their names, LISTEN_PID the pid that execs fastproxy.
LAUNCHER = r"""
import os, sys
fds, names = [int(f) for f in sys.argv[1].split(",")], sys.argv[2]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
    os.set_inheritable(3 + i, True)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=names)
os.execv(sys.executable, [sys.executable, "-m", "fastproxy"] + sys.argv[3:])
"""


def test_socket_activation_hands_each_listener_its_named_socket(tmp_path):
    # The service's own command line and config, on loopback sockets bound
    # like fastproxy.socket's (other ports, the same names): each listener
    # must serve the socket of its name, not bind its own port.
    names = values(unit("fastproxy.socket")["Socket"], "FileDescriptorName")
    socks = []
    for _ in names:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        socks.append(s)
    # fds 3.. are overwritten by the launcher: keep the originals above them.
    high = [os.dup2(s.fileno(), 100 + i) for i, s in enumerate(socks)]
    args = local_paths(exec_start(), host_files()) + ["--stats", "unix:" + str(tmp_path / "stats.sock")]
    cmd = [sys.executable, "-c", LAUNCHER, ",".join(map(str, high)), ":".join(names)] + args
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env(), pass_fds=high)
    stderr = LineReader(proc.stderr)
    stdout = LineReader(proc.stdout)
    try:
        for name, s in zip(names, socks):
            port = s.getsockname()[1]
            m = stderr.wait_line(r"listening on 127\.0\.0\.1:%d \(listener %s\)" % (port, re.escape(name)), 20)
            assert m, "listener %s did not take its socket:\n%s" % (name, stderr.text())
        # JSON lines: --log-format json in ExecStart.
        first = next(line for line in stderr.lines if "listening on" in line)
        assert json.loads(first)["level"] == "INFO"
    finally:
        for fd in high:
            os.close(fd)
        for s in socks:
            s.close()
        proc.terminate()
        try:
            assert proc.wait(20) == 0, stderr.text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            stderr.join(2)
            stdout.join(2)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path):
    # verify wants ExecStart='s program to exist: a stand-in at the same name.
    stand_in = tmp_path / "bin" / "fastproxy"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    for name in ("fastproxy.socket", "fastproxy.service"):
        (tmp_path / name).write_text(read(name).replace("/usr/local/bin/fastproxy", str(stand_in)))
    cp = subprocess.run(["systemd-analyze", "verify", "fastproxy.socket", "fastproxy.service"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = cp.stdout + cp.stderr
    assert cp.returncode == 0, output
    # Unknown keys and bad values are warnings only: none may name our units.
    assert "fastproxy." not in output, output


# ---- container image

def dockerfile():
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", read("Dockerfile"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_installs_fastproxy_tcp_and_runs_the_command():
    steps = dockerfile()
    installs = [a for i, a in steps if i == "RUN" and "pip install" in a]
    assert any(re.search(r"fastproxy[-_]tcp", a) for a in installs), installs
    bases = [a.split()[0] for i, a in steps if i == "FROM"]
    # The runtime stage's Python satisfies requires-python (>= 3.11).
    version = re.match(r"python:(\d+)\.(\d+)", bases[-1])
    assert version and (int(version.group(1)), int(version.group(2))) >= (3, 11), bases
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["fastproxy"]


def test_the_image_command_passes_check():
    steps = dockerfile()
    cmd = json.loads([a for i, a in steps if i == "CMD"][-1])
    # What the image holds: COPY SRC DEST from the build context (the repository).
    files = {}
    for i, a in steps:
        if i == "COPY" and not a.startswith("--"):
            src, dest = a.split()
            if os.path.isfile(os.path.join(ROOT, src)):
                files[dest] = os.path.join(ROOT, src)
    assert "/etc/fastproxy/fastproxy.toml" in files and "/etc/fastproxy/fastproxy.toml" in cmd
    check(local_paths(cmd, files))


# ---- Kubernetes

@pytest.fixture(scope="module")
def manifests():
    yaml = pytest.importorskip("yaml", reason="reading kubernetes.yaml needs PyYAML")
    with open(os.path.join(DEPLOY, "kubernetes.yaml"), encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def deployment_container(manifests):
    dep = manifests[("Deployment", "fastproxy")]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, container


def test_the_configmap_is_kubernetes_toml(manifests):
    cm = manifests[("ConfigMap", "fastproxy")]
    assert cm["data"]["fastproxy.toml"] == read("kubernetes.toml")


def pod_files(manifests, tmp_path):
    # Each ConfigMap volume's keys, at its mount path, written out here.
    dep, container = deployment_container(manifests)
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        cm = manifests[("ConfigMap", volumes[mount["name"]]["configMap"]["name"])]
        for key, text in cm["data"].items():
            local = tmp_path / key
            local.write_text(text)
            files[mount["mountPath"].rstrip("/") + "/" + key] = str(local)
    return files


def test_the_container_args_read_the_mounted_config(manifests, tmp_path):
    _, container = deployment_container(manifests)
    args = container["args"]
    files = pod_files(manifests, tmp_path)
    assert any(a in files for a in args), (args, files)


def test_the_container_args_pass_check(manifests, tmp_path):
    _, container = deployment_container(manifests)
    check(local_paths(container["args"], pod_files(manifests, tmp_path)))


def test_the_srv_name_is_the_headless_services(manifests):
    # _PORTNAME._tcp.SERVICE.NAMESPACE.svc.cluster.local, from the headless Service.
    svc = manifests[("Service", "postgres")]
    assert svc["spec"]["clusterIP"] == "None"
    port_names = [p["name"] for p in svc["spec"]["ports"]]
    srv = re.findall(r"srv:(_[\w-]+)\._tcp\.([\w-]+)\.([\w-]+)\.svc\.cluster\.local", read("kubernetes.toml"))
    assert srv, "kubernetes.toml names no srv: upstream"
    for port, service, namespace in srv:
        assert port[1:] in port_names and service == "postgres" and namespace == svc["metadata"]["namespace"]


def test_probes_ports_and_termination_fit_the_config(manifests):
    dep, container = deployment_container(manifests)
    pod = dep["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    text = read("kubernetes.toml")
    assert ports["stats"] == int(re.search(r'^stats = ":(\d+)"', text, re.M).group(1))
    assert ports["postgres"] == int(re.search(r'^listen = ":(\d+)"', text, re.M).group(1))
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/stats" and get["port"] == "stats"
    # preStop only waits: a signal from it would make the kubelet's SIGTERM
    # a second one, which closes every bridge at once.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and not any("kill" in c for c in command)
    drain = float(re.search(r'^drain_timeout = "(\d+)s"', text, re.M).group(1))
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + drain
    # A liveness probe that fails while the instance drains would kill it early.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain
    strategy = dep["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
    # The clients' Service targets the listener's port, by name.
    proxy_svc = manifests[("Service", "postgres-proxy")]
    assert proxy_svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in proxy_svc["spec"]["ports"]} <= set(ports)


def test_the_kubernetes_config_serves_through_its_srv_records(tmp_path):
    srv_name = re.search(r"srv:([\w.-]+)", read("kubernetes.toml")).group(1)
    with EchoServer() as echo, DnsServer() as dns_double:
        # The headless Service's answer: one ready pod, on loopback.
        dns_double.set(srv_name, "SRV", ["0 10 %d db-0.test." % echo.port], ttl=5)
        dns_double.set("db-0.test", "A", ["127.0.0.1"], ttl=5)
        port = free_port()
        cmd = [sys.executable, "-m", "fastproxy", "--config", os.path.join(DEPLOY, "kubernetes.toml"),
               "--listen", "127.0.0.1:%d" % port, "--stats", "127.0.0.1:0", "--resolver", dns_double.addr]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=subprocess_env())
        stderr = LineReader(proc.stderr)
        stdout = LineReader(proc.stdout)
        try:
            assert stderr.wait_line(LISTEN_RX, 20), stderr.text()
            assert echo_roundtrip(("127.0.0.1", port), b"through SRV") == b"through SRV"
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
                stderr.join(2)
                stdout.join(2)


# ---- behind an L4 balancer

def haproxy_servers():
    text = read("haproxy.cfg")
    servers = re.findall(r"^\s*server\s+\S+\s+([\d.]+):(\d+)", text, re.M)
    default_server = re.search(r"^\s*default-server\s+(.*)$", text, re.M).group(1).split()
    return servers, default_server


def test_the_balancer_sends_what_the_instances_expect():
    pc = load_config(os.path.join(DEPLOY, "balancer.toml"))
    servers, default_server = haproxy_servers()
    assert len(servers) >= 2
    (listener,) = pc.listeners
    # Every server is an instance's listener...
    assert {int(p) for _, p in servers} == {listener.listener.listen[1]}
    # ...that expects the header the balancer sends, from the balancer only.
    assert "send-proxy-v2" in default_server
    assert listener.proxy_protocol.accept_proxy_from
    # Health checks ask the instance's stats endpoint.
    check_port = default_server[default_server.index("port") + 1]
    assert pc.process.stats == ("", int(check_port))
    assert "option httpchk GET /stats" in read("haproxy.cfg")


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_accepts_the_balancer_config():
    cp = subprocess.run(["haproxy", "-c", "-f", os.path.join(DEPLOY, "haproxy.cfg")],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr


class HeaderServer:
    """An upstream that reads a PROXY protocol v2 header, answers the
    client address it names ("a.b.c.d") and closes; a connection without a
    header (a health check) is just closed."""

    SIG = b"\r\n\r\n\x00\r\nQUIT\n"

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @classmethod
    def _serve(cls, conn):
        with conn:
            conn.settimeout(5)
            head = b""
            try:
                while len(head) < 16:
                    chunk = conn.recv(16 - len(head))
                    if not chunk:
                        return
                    head += chunk
                if head[:12] != cls.SIG or head[13] != 0x11:   # v2, TCP over IPv4
                    conn.sendall(b"no v2 header")
                    return
                body = b""
                while len(body) < int.from_bytes(head[14:16], "big"):
                    body += conn.recv(int.from_bytes(head[14:16], "big") - len(body))
                conn.sendall(socket.inet_ntoa(body[:4]).encode())
            except OSError:
                return

    def close(self):
        self.sock.close()


def local_haproxy_cfg(listen_port, instance_port, stats_port):
    """examples/deploy/haproxy.cfg on loopback: its front on listen_port,
    one instance at instance_port checked on stats_port; all else as written."""
    text = read("haproxy.cfg")
    text = re.sub(r"^(\s*)bind :\d+", r"\g<1>bind 127.0.0.1:%d" % listen_port, text, flags=re.M)
    text = re.sub(r"^\s*maxconn \d+", "    maxconn 1000", text, flags=re.M)
    text = re.sub(r"check port \d+", "check port %d" % stats_port, text)
    servers = re.findall(r"^\s*server .*$", text, re.M)
    for extra in servers[1:]:
        text = text.replace(extra + "\n", "")
    return text.replace(servers[0], "    server fastproxy1 127.0.0.1:%d" % instance_port)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_the_client_address_crosses_the_balancer_and_the_instance(tmp_path):
    # A client at 127.0.0.2 -> haproxy (haproxy.cfg: send-proxy-v2) ->
    # fastproxy (balancer.toml: accept_proxy_from the balancer, send_proxy
    # v2) -> an upstream that answers the address its header names.
    upstream = HeaderServer()
    front, instance, stats = free_port(), free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(local_haproxy_cfg(front, instance, stats))
    cmd = [sys.executable, "-m", "fastproxy", "--config", os.path.join(DEPLOY, "balancer.toml"),
           "--listen", "127.0.0.1:%d" % instance, "--upstream", "127.0.0.1:%d" % upstream.port,
           "--accept-proxy-from", "127.0.0.1", "--stats", "127.0.0.1:%d" % stats]
    proxy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=subprocess_env())
    stderr, stdout = LineReader(proxy.stderr), LineReader(proxy.stdout)
    balancer = None
    try:
        assert stderr.wait_line(r"stats endpoint on", 20), stderr.text()
        balancer = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        haproxy_err = LineReader(balancer.stderr)
        answer = b""
        # Until haproxy listens and its first health check (GET /stats on
        # the instance) has marked the instance up: before, it closes the
        # client with nothing.
        for _ in range(200):
            try:
                with connect_from(("127.0.0.1", front), "127.0.0.2") as c:
                    c.sendall(b"hello")
                    answer, _ = read_all(c, 5)
                if answer:
                    break
            except (ConnectionRefusedError, ConnectionResetError):
                pass
            assert balancer.poll() is None, haproxy_err.text()
            time.sleep(0.05)
        assert answer == b"127.0.0.2", (answer, stderr.text(), haproxy_err.text())
        # Straight to the instance, from an address that is not the
        # balancer's: refused, not served.
        with connect_from(("127.0.0.1", instance), "127.0.0.2") as c:
            c.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n")
            data, how = read_all(c, 5)
            assert data == b"" and how in ("eof", "reset"), (data, how)
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(10)
        proxy.terminate()
        try:
            proxy.wait(20)
        finally:
            if proxy.poll() is None:
                proxy.kill()
                proxy.wait(10)
            stderr.join(2)
            stdout.join(2)
            upstream.close()


# ---- the guide

def guide():
    with open(GUIDE, encoding="utf-8") as f:
        return f.read()


def test_the_guide_names_every_example():
    text = guide()
    for name in sorted(os.listdir(DEPLOY)):
        assert "examples/deploy/" + name in text, name


def test_the_guide_is_linked():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert "docs/deploy.md" in f.read()
    with open(os.path.join(ROOT, "docs", "operations.md"), encoding="utf-8") as f:
        assert "deploy.md" in f.read()


@pytest.mark.parametrize("budget", [1024, 65536, 524288, 1048576])
def test_the_guides_default_limits_are_the_codes(budget):
    # The sizing table: an fd budget, the default max_connections it gives,
    # and the idle pipes each of 4 workers may keep.
    row = re.search(r"^\| %s \| ([\d,]+) \| (\d+) \|" % format(budget, ","), guide(), re.M)
    assert row, "no sizing row for an fd budget of %d" % budget
    assert int(row.group(1).replace(",", "")) == default_max_connections(budget)
    assert int(row.group(2)) == pipe_pool_size(budget, 4)
