"""The option table: every option fastproxy has, declared once.

Each row gives the name (the `Proxy` keyword, the config key, the field of
the frozen Config, the name the data plane reads; the flag is the name with
dashes), its parser, default, help, section and scope. From the table come
the command line (cli.py), the validation of `Proxy(**options)` (config.py),
`fastproxy -h` and docs/reference.md (`python -m fastproxy.reference`). A new
option is one row here, one keyword in `Proxy.__init__`'s signature (which
a test holds to this table) and the code that acts on it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from ._core import BALANCE_ALGORITHMS
from .acl import parse_cidrs, parse_rule_files
from .hooks import ACCESS_LOG_FIELDS, parse_access_log_format
from .ratelimit import parse_rate
from .routes import parse_routes
from .takeover import check_path
from .timewindows import parse_time_windows, parse_time_zone
from .upstreams import parse_upstreams
from .values import (
    MAX_CONNECTIONS,
    MAX_COUNT,
    ConfigError,
    format_address,
    is_digits,
    parse_address,
    parse_choice,
    parse_congestion_control,
    parse_count,
    parse_cpus,
    parse_duration,
    parse_notsent_lowat,
    parse_socket_buffer,
    parse_tcp_keepalive,
    parse_tcp_user_timeout,
    parse_size,
    refuse_nul,
)

__all__ = ["Option", "OPTIONS", "SECTIONS", "COMMAND_FLAGS", "format_duration", "format_value", "option"]

Parser = Callable[[Any, str], Any]

# Sections of the frozen Config, in the order docs and -h show them.
SECTIONS: Dict[str, str] = {
    "listener": "Listener",
    "upstream_group": "Upstream group",
    "routing": "Routing by TLS server name",
    "balancing": "Balancing and health",
    "limits": "Limits",
    "access": "Access control",
    "timeouts": "Timeouts",
    "proxy_protocol": "PROXY protocol",
    "hooks": "Hooks",
    "process": "Process",
}
# Per process: shared by every listener of a process (workers, engine, ...).
# Per listener: each listener may have its own.
SCOPES = ("process", "listener")

# Flags of the command itself, not options of a proxy.
COMMAND_FLAGS = ("--config", "--log-level", "--version", "--help")


@dataclass(frozen=True)
class Option:
    name: str
    parse: Parser
    default: Any
    help: str
    section: str
    scope: str = "listener"
    metavar: Optional[str] = None
    flag: Optional[str] = None        # when not --name-with-dashes
    repeat: bool = False              # a list: the flag may be given again
    switch: bool = False              # a flag without a value
    choices: Optional[Tuple[str, ...]] = None
    required: bool = False
    shown_default: Optional[str] = None   # a default decided at start, in words
    # The command line's own default, where it must differ from an embedding
    # program's (None: the same default).
    cli_default: Optional[str] = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        if self.required:
            return "required"
        text = format_value(self.default, self.parse)
        return text if self.cli_default is None else f"{text} (the command: {self.cli_default})"


def format_value(value: Any, parse: Parser) -> str:
    """A value as a user would write it (durations in their largest unit)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if parse in (_duration, _positive_duration) and isinstance(value, (int, float)):
        return format_duration(value)
    if parse is _size and isinstance(value, int):
        for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
            if value and value % size == 0:
                return f"{value // size}{unit}"
    return str(value)


def format_duration(seconds: float) -> str:
    """Seconds in their largest whole unit: 1h, 2m, 30s, 250ms."""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(round(seconds * 1000))}ms" if seconds else "0"


# ---- parsers with the arguments each option needs

def _duration(value: Any, field: str) -> float:
    return parse_duration(value, field)


def _positive_duration(value: Any, field: str) -> float:
    return parse_duration(value, field, allow_zero=False)


def _optional(parse: Parser) -> Parser:
    def parse_or_none(value: Any, field: str) -> Any:
        return None if value is None else parse(value, field)
    return parse_or_none


def _count(low: int = 1, high: int = MAX_COUNT) -> Parser:
    def count(value: Any, field: str) -> int:
        return parse_count(value, field, low=low, high=high)
    return count


def _size(value: Any, field: str) -> int:
    return parse_size(value, field, low=1)


def _choice(*choices: str) -> Parser:
    def choice(value: Any, field: str) -> str:
        return parse_choice(value, field, choices)
    return choice


def _switch(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, value, "must be True or False")
    return value


def _listen(value: Any, field: str) -> Tuple[str, int]:
    return parse_address(value, field, listen=True)


def _endpoint(value: Any, field: str) -> Tuple[str, int]:
    # An address parsed already (a Config's options fed back, or a (host,
    # port) pair from the API) is checked as its text would be: a port out
    # of range or a host with a NUL is the same mistake either way.
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
            and isinstance(value[1], int) and not isinstance(value[1], bool):
        try:
            return _listen(format_address(*value), field)
        except ConfigError as exc:
            raise ConfigError(field, value, exc.problem) from None
    return _listen(value, field)


def _send_proxy(value: Any, field: str) -> Optional[str]:
    if value is None:
        return None
    text = str(value).lower()
    if text in ("v1", "1", "v2", "2"):
        return "v" + text[-1]
    raise ConfigError(field, value, "must be v1 or v2")


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field, value, "expected a non-empty string")
    return value


def _path(value: Any, field: str) -> str:
    # A file (or a module) the proxy opens: the system takes it as a C string.
    text = _text(value, field)
    refuse_nul(text, field)
    return text


def _name(value: Any, field: str) -> str:
    # A name appears in logs, labels and the status page: printable text.
    text = _text(value, field)
    if not text.isprintable():
        raise ConfigError(field, value, "must be printable text (no control characters)")
    return text


def _token(value: Any, field: str) -> str:
    # Sent in an HTTP header: visible ASCII, no spaces. Anything else could
    # never be matched (a NUL, a space inside), or reads differently once a
    # client encodes it (non-ASCII).
    text = _text(value, field).strip()
    if not all("!" <= c <= "~" for c in text):
        raise ConfigError(field, value, "must be visible ASCII without spaces (it is sent in an Authorization header)")
    return text


def _unix_mode(value: Any, field: str) -> int:
    # Octal text as chmod takes it ("660", "0660"); an int is taken as is (0o660).
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}|[0-7]{4}", value.strip()):
        mode = int(value.strip(), 8)
    else:
        raise ConfigError(field, value, "must be an octal mode like 660 or 0660")
    if not 0 <= mode <= 0o7777:
        raise ConfigError(field, value, "must be an octal mode like 660 or 0660")
    return mode


def _id_of(value: Any, field: str, lookup: Callable[[str], Any], what: str) -> int:
    # A name is looked up now, so a missing user or group is a configuration
    # error (and `--help`'s reference shows the number it became).
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID:
        return value
    text = value.strip() if isinstance(value, str) else None
    if not text:
        raise ConfigError(field, value, f"must be a {what} name or a numeric id")
    refuse_nul(value, field, "name")
    if is_digits(text):
        if len(text) > 10 or int(text) > MAX_ID:
            raise ConfigError(field, value, f"is out of range (0-{MAX_ID})")
        return int(text)
    try:
        return int(getattr(lookup(text), "pw_uid" if what == "user" else "gr_gid"))
    except KeyError:
        raise ConfigError(field, value, f"no such {what}") from None


def _unix_user(value: Any, field: str) -> int:
    import pwd
    return _id_of(value, field, pwd.getpwnam, "user")


def _unix_group(value: Any, field: str) -> int:
    import grp
    return _id_of(value, field, grp.getgrnam, "group")


def _resolver(value: Any, field: str) -> Tuple[str, int]:
    # A DNS server is asked by address: naming it would need a resolver.
    host, port = _endpoint(value, field)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(field, value, "must be an IP address and port (HOST:PORT, [IPV6]:PORT)") from None
    if port == 0:
        raise ConfigError(field, value, "needs a port (53 for DNS)")
    return host, port


def parse_resolve_interval(value: Any, field: str) -> Tuple[float, float]:
    """'MIN-MAX' (e.g. 1s-5m) or one duration D (MIN = MAX = D: the TTL is
    then ignored) -> (MIN, MAX) in seconds."""
    if isinstance(value, tuple) and len(value) == 2:
        low, high = (parse_duration(v, field, allow_zero=False) for v in value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        low = high = parse_duration(value, field, allow_zero=False)
    else:
        text = str(value).strip()
        first, dash, second = text.partition("-")
        try:
            low = parse_duration(first, field, allow_zero=False)
            high = parse_duration(second, field, allow_zero=False) if dash else low
        except ConfigError as exc:
            raise ConfigError(field, value, f"is not MIN-MAX or D ({exc.problem})") from None
    if low > high:
        raise ConfigError(field, value, "MIN is longer than MAX")
    return low, high


ENGINE_CHOICES = ("auto", "epoll", "kernel", "poll")

# Bounds of counts, named in their errors. Threads: each worker has its own
# poll set and pipes, and a hook call's handle names its worker in 16 bits.
MAX_THREADS = 1024
# Upstreams tried after a failed connect: more than any group has.
MAX_RETRIES = 65535
# Failures or checks in a row.
MAX_IN_A_ROW = 65535
# A user or group id (uid_t; (uid_t)-1 means "unchanged" to chown).
MAX_ID = 2**32 - 2

D = "D"  # metavar of a duration: 5, 5s, 500ms, 2m, 1h

OPTIONS: Tuple[Option, ...] = (
    # ---- listener
    Option("listen", _listen, None, "where to accept clients: :PORT (every interface, IPv4 and IPv6), "
           "HOST:PORT, [IPV6]:PORT, unix:PATH (a Unix socket file), unix:@NAME (an abstract socket, Linux)",
           "listener", metavar="ADDR", required=True),
    Option("name", _optional(_name), None, "the listener's name in stats, logs and metrics; unique among "
           "a process's listeners", "listener", metavar="NAME", shown_default="the listen address"),
    Option("unix_mode", _optional(_unix_mode), None, "the permissions of a unix:PATH listener's socket "
           "file, in octal (660, 0660), set before it listens", "listener", metavar="MODE",
           shown_default="from the umask"),
    Option("unix_user", _optional(_unix_user), None, "the owner of a unix:PATH listener's socket file: a "
           "user name or id (chown: usually needs root)", "listener", metavar="USER",
           shown_default="the process's"),
    Option("unix_group", _optional(_unix_group), None, "the group of a unix:PATH listener's socket file: "
           "a group name or id", "listener", metavar="GROUP", shown_default="the process's"),
    Option("notsent_lowat", parse_notsent_lowat, None,
           "TCP_NOTSENT_LOWAT on both sockets of each bridge: keep at most about SIZE unsent bytes in a "
           "socket, the rest in the proxy, so the proxy's CPU sends them; 0 turns it off",
           "listener", metavar="SIZE", shown_default="1m (off where the build lacks TCP_NOTSENT_LOWAT)"),
    Option("socket_buffer", parse_socket_buffer, "auto",
           "SO_SNDBUF and SO_RCVBUF on both sockets of each bridge: the kernel then holds at most "
           "about 2 x SIZE each way per socket (capped by net.core.wmem_max and rmem_max) instead of "
           "autotuning up to tcp_wmem and tcp_rmem's maxima; bounds the memory a client that never "
           "reads can pin; 0: the kernel's autotuning; auto: 256k on a socket whose peer is a loopback "
           "address (127.0.0.0/8, ::1), the kernel's autotuning on the others", "listener",
           metavar="SIZE"),
    Option("congestion_control", parse_congestion_control, "auto",
           "TCP_CONGESTION on both sockets of each bridge: the algorithm (cubic, bbr, reno...) that paces "
           "what the proxy sends, instead of the host's net.ipv4.tcp_congestion_control; it must be "
           "loaded (tcp_available_congestion_control), and without CAP_NET_ADMIN allowed "
           "(tcp_allowed_congestion_control); auto: cubic on a socket whose peer is a loopback address "
           "(127.0.0.0/8, ::1), where BBR's pacing reorders the proxy's own sending, the host's on the "
           "others; host: the host's on every socket", "listener", metavar="NAME"),
    Option("tcp_keepalive", parse_tcp_keepalive, None,
           "SO_KEEPALIVE on both sockets of each bridge (HAProxy's clitcpka and srvtcpka, nginx's "
           "so_keepalive): after IDLE without a packet the kernel probes the peer every INTERVAL and, "
           "after COUNT unanswered probes, ends the bridge (a client or upstream that vanished without "
           "FIN or RST); whole seconds; a part left out keeps the kernel's (net.ipv4.tcp_keepalive_time, "
           "_intvl, _probes); on: all the kernel's; off or 0: none", "listener",
           metavar="IDLE[:INTERVAL[:COUNT]]", shown_default="off"),
    Option("tcp_user_timeout", parse_tcp_user_timeout, None,
           "TCP_USER_TIMEOUT on both sockets of each bridge (HAProxy's tcp-ut): a bridge whose client or "
           "upstream leaves bytes sent to it unacknowledged for D ends (a peer that vanished "
           "while data was on its way, which keepalive does not probe: without it the kernel retries "
           "for net.ipv4.tcp_retries2, about 15 minutes); with tcp_keepalive it also bounds the probes; "
           "whole milliseconds; off or 0: the kernel's", "listener", metavar=D,
           shown_default="off"),
    # ---- upstream group
    Option("upstreams", parse_upstreams, None,
           "a server to forward to: HOST:PORT[@WEIGHT][,max-connections=N][,backup] (HOST:PORT may "
           "be unix:PATH or unix:@NAME); repeat it for an upstream group; optional with route = sni", "upstream_group",
           metavar="SPEC", flag="--upstream", repeat=True, required=True),
    # ---- routing by TLS server name
    Option("route", _optional(_choice("sni")), None, "sni: read the server name (SNI) of each client's TLS "
           "ClientHello, without consuming or terminating TLS, and pick the group of the route that names "
           "it; names no route has (and, by route_non_tls, clients without one) go to the upstreams, which "
           "become optional (without them such clients are refused)", "routing", choices=("sni",),
           shown_default="off"),
    Option("routes", parse_routes, (), "a route of route = sni: NAME=SPEC sends server name NAME (a.example, "
           "or *.b.example for any name under b.example) to upstream SPEC; repeat a NAME for a group; a config "
           "file's [[listeners.routes]] tables also take name and the balancing options",
           "routing", metavar="NAME=SPEC", flag="--route-sni", repeat=True, shown_default="none"),
    Option("route_timeout", _positive_duration, 5.0, "how long a client of route = sni may take to send its "
           "whole ClientHello (then it is closed and counted in route_timeouts)", "routing", metavar=D),
    Option("route_non_tls", _choice("default", "reject"), "default", "a client of route = sni whose first "
           "bytes are not a TLS ClientHello, or one without a server name: to the upstreams (refused without "
           "them), or refused", "routing", choices=("default", "reject")),
    # ---- balancing and health
    Option("balance", _choice(*BALANCE_ALGORITHMS), "roundrobin",
           "roundrobin (weighted, smooth), leastconn, random (power of two choices), source (consistent "
           "hash of the client IP), first", "balancing", choices=BALANCE_ALGORITHMS),
    Option("retries", _optional(_count(0, MAX_RETRIES)), None, "other upstreams to try after a failed connect",
           "balancing", metavar="N", shown_default="upstreams - 1"),
    Option("max_fails", _count(0, MAX_IN_A_ROW), 3, "connect failures in a row that mark an upstream down (0: never)",
           "balancing", metavar="N"),
    Option("fail_timeout", _positive_duration, 10.0, "how long an upstream marked down is skipped",
           "balancing", metavar=D),
    Option("health_interval", _optional(_positive_duration), None, "active TCP health checks every D",
           "balancing", metavar=D, shown_default="off"),
    Option("health_timeout", _positive_duration, 2.0, "health check timeout", "balancing", metavar=D),
    Option("health_rise", _count(1, MAX_IN_A_ROW), 2, "passed checks in a row that mark an upstream up", "balancing",
           metavar="N"),
    Option("health_fall", _count(1, MAX_IN_A_ROW), 3, "failed checks in a row that mark an upstream down", "balancing",
           metavar="N"),
    # ---- limits
    Option("max_connections", _optional(_count(1, MAX_CONNECTIONS)), None, "live bridges at most", "limits", metavar="N",
           shown_default="from the fd budget"),
    Option("max_connections_per_ip", _optional(_count(1, MAX_CONNECTIONS)), None, "live bridges per client address at most",
           "limits", metavar="N"),
    Option("on_limit", _choice("queue", "reject"), "queue", "past a limit: wait in line, or close at once",
           "limits", choices=("queue", "reject")),
    Option("queue_size", _count(1, MAX_CONNECTIONS), 1024, "clients that may wait in line", "limits", metavar="N"),
    Option("queue_timeout", _positive_duration, 30.0, "how long a client may wait in line", "limits",
           metavar=D),
    # ---- access control
    Option("allow", parse_cidrs, (), "admit only matching clients (IPv4 or IPv6; a bare address is /32 "
           "or /128); repeatable", "access", metavar="CIDR", repeat=True),
    Option("deny", parse_cidrs, (), "refuse matching clients (wins over allow); repeatable", "access",
           metavar="CIDR", repeat=True),
    Option("allow_file", parse_rule_files, (), "allow rules read from a file, one per line, # comments; "
           "repeatable", "access", metavar="FILE", repeat=True),
    Option("deny_file", parse_rule_files, (), "deny rules read from a file, one per line, # comments; "
           "repeatable", "access", metavar="FILE", repeat=True),
    Option("reject_with", _choice("close", "reset"), "close", "how refused clients are closed: FIN or RST",
           "access", choices=("close", "reset")),
    Option("allow_time", parse_time_windows, None, "admit new clients only inside these windows, e.g. "
           "'Mon-Fri 08:00-18:00'; repeatable", "access", metavar="WINDOW", repeat=True,
           shown_default="always"),
    Option("time_zone", parse_time_zone, None, "IANA time zone of allow_time", "access", metavar="NAME",
           shown_default="local time"),
    Option("close_outside_window", _switch, False, "also close live bridges when a time window ends",
           "access", switch=True),
    Option("rate_limit_per_ip", _optional(parse_rate), None, "new clients per address, e.g. 20/1s or 600/1m",
           "access", metavar="N/D"),
    Option("rate_limit_table", _count(1, MAX_CONNECTIONS), 65536, "addresses the rate limiter remembers (the least recently "
           "seen is evicted)", "access", metavar="N"),
    # ---- timeouts
    Option("connect_timeout", _positive_duration, 5.0, "upstream connect timeout", "timeouts", metavar=D),
    Option("idle_timeout", _optional(_positive_duration), None, "close a bridge with no bytes either way "
           "for D", "timeouts", metavar=D, shown_default="never"),
    Option("max_lifetime", _optional(_positive_duration), None, "close a bridge D after it was accepted",
           "timeouts", metavar=D, shown_default="never"),
    Option("half_close_timeout", _positive_duration, 300.0, "how long a half-closed bridge (one side sent FIN) may go without a byte either way",
           "timeouts", metavar=D),
    Option("drain_timeout", _duration, 10.0, "on stop, how long live bridges may finish", "timeouts",
           scope="process", metavar=D),
    # ---- PROXY protocol
    Option("send_proxy", _send_proxy, None, "send a PROXY protocol header (v1 or v2) to the upstream",
           "proxy_protocol", choices=("v1", "v2"), shown_default="off"),
    Option("accept_proxy", _switch, False, "expect a PROXY protocol header (v1 or v2) from clients",
           "proxy_protocol", switch=True),
    Option("accept_proxy_from", parse_cidrs, (), "peers that may send a PROXY header (others are "
           "refused); implies accept_proxy; repeatable", "proxy_protocol", metavar="CIDR", repeat=True),
    Option("proxy_header_timeout", _positive_duration, 3.0, "how long a client may take to send its PROXY "
           "header", "proxy_protocol", metavar=D),
    Option("proxy_header_max", _count(16, 65535), 1024, "longest v2 PROXY header payload accepted, in bytes",
           "proxy_protocol", metavar="N"),
    # ---- hooks
    Option("hooks", _optional(_path), None, "Python hooks: FILE.py[:OBJECT] or MODULE[:OBJECT] defining "
           "on_connect, on_data, on_close", "hooks", metavar="SPEC"),
    Option("hook_threads", _count(1, MAX_THREADS), 16, "threads that run on_connect and on_data hooks (shared by the "
           "process's listeners)", "hooks", scope="process", metavar="N"),
    Option("hook_timeout", _optional(_duration), None, "close a bridge whose hook call is not answered "
           "within D (close reason HOOK_TIMEOUT) and replace the hook thread stuck in it; 0: never",
           "hooks", metavar=D, shown_default="never"),
    Option("max_hold", _size, 1 << 20, "most bytes on_data may hold with WAIT before the bridge is closed",
           "hooks", metavar="SIZE"),
    Option("access_log", _optional(_path), None, "one JSON line per closed bridge, appended to FILE "
           "(- is standard output)", "hooks", metavar="FILE"),
    Option("access_log_format", _optional(parse_access_log_format), None, "the fields an access log line "
           "holds, comma-separated, in that order; any of " + ", ".join(ACCESS_LOG_FIELDS), "hooks",
           metavar="FIELDS", shown_default="every field"),
    # ---- process
    Option("workers", _optional(_count(1, MAX_THREADS)), None, "worker threads", "process", scope="process", metavar="N",
           shown_default="one per CPU this process may use"),
    Option("engine", _choice(*ENGINE_CHOICES), "auto", "data plane event loop: auto takes epoll where the "
           "platform has it (env FASTPROXY_ENGINE overrides auto); kernel (opt-in, Linux) is epoll with "
           "established bridges forwarded inside the kernel by a BPF sockmap program, and runs epoll "
           "(one log line says why) where BPF is not permitted", "process", scope="process",
           choices=ENGINE_CHOICES),
    Option("busy_poll", _duration, 0.0, "workers keep polling without sleeping for D after their last "
           "event: more throughput and less latency for a CPU spent spinning (0: off)", "process",
           scope="process", metavar=D),
    Option("fd_limit", _choice("raise", "keep"), "keep", "at start, raise the soft open-file limit to the hard "
           "one (the fd budget, which sets the default connection limit), or keep the process's as it is",
           "process", scope="process", choices=("raise", "keep"), cli_default="raise"),
    Option("worker_cpus", parse_cpus, None, "pin worker i to the i-th CPU of LIST, e.g. 0,2-3 (round robin "
           "past its end)", "process", scope="process", metavar="LIST", shown_default="not pinned"),
    Option("takeover", _optional(check_path), None, "zero-downtime restarts: at start, take the listening "
           "sockets of the process serving at this Unix socket PATH (it then drains and exits), and serve "
           "them there to the next one (docs/operations.md)", "process", scope="process", metavar="PATH",
           shown_default="off"),
    Option("log_format", _choice("text", "json"), "text", "the command's log lines on stderr: text, or "
           "one JSON object per line (time, level, logger, message, exception); an embedding application "
           "configures logging itself", "process", scope="process", choices=("text", "json")),
    # ---- upstreams from DNS (discovery.py)
    Option("resolver", _optional(_resolver), None, "the DNS server upstream names are asked of (HOST:PORT, an "
           "IP address)", "process", scope="process", metavar="ADDR",
           shown_default="the system's, from /etc/resolv.conf"),
    Option("resolve_interval", parse_resolve_interval, (1.0, 300.0), "upstream names are asked again when "
           "their answer's TTL runs out, but never sooner than MIN nor later than MAX (MIN-MAX, e.g. 1s-5m; "
           "one D asks every D whatever the TTL)", "process", scope="process", metavar="MIN-MAX",
           shown_default="1s-5m"),
    # ---- stats and run-time control
    Option("stats", _endpoint, None, "serve /metrics (Prometheus), /stats (JSON) and a status page over HTTP at "
           "ADDR (HOST:PORT, :PORT or unix:PATH)", "process", scope="process", metavar="ADDR",
           shown_default="off"),
    Option("stats_admin", _switch, False, "allow run-time control on the stats endpoint (drain, maint or "
           "ready an upstream, change its weight, close a bridge): from loopback or a Unix socket only, "
           "unless stats_token is set", "process", scope="process", switch=True),
    Option("stats_token", _optional(_token), None, "a bearer token the admin requests must carry "
           "(Authorization: Bearer TOKEN); with it, admin requests may come from anywhere", "process",
           scope="process", metavar="TOKEN", shown_default="none"),
)

_BY_NAME = {o.name: o for o in OPTIONS}


def option(name: str) -> Option:
    return _BY_NAME[name]
