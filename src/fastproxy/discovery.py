"""Upstreams from DNS: which upstreams are names, what they resolve to, and
the upstream group a listener builds from the answers.

A host that is a name is asked of DNS (dnspython) for its A and AAAA
records, and every address becomes an upstream of the group with the
spec's weight and limits; `srv:NAME` becomes the SRV records' targets, with
their ports, weights and priorities. Both are asked again when their answer
expires (its TTL, clamped by `resolve_interval`) by the resolver thread
(Proxy), never by a worker; a changed answer swaps the listener's group.
A name the hosts file knows (localhost, a container's own names) is the
system's: resolved once, by getaddrinfo, its addresses tried in turn as one
upstream, as a name was before DNS. So is a name DNS does not know at
start but the system does (other name services).

A failed query keeps the last good answer (said in the log and in stats
with its age) and is retried sooner, backing off to the interval's longest.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

try:
    import dns.exception
    import dns.name
    import dns.rdatatype
    import dns.resolver
    HAVE_DNSPYTHON = True
except ImportError:   # a wheel installed without its dependencies: names are the system's
    HAVE_DNSPYTHON = False

from . import _core
from .sockets import resolve_upstream
from .upstreams import MAX_WEIGHT, Upstream
from .values import SRV_PREFIX, Address, ConfigError, format_address, unix_path

__all__ = ["DnsClient", "Resolution", "ResolveError", "Target", "build_group", "first_resolution"]

log = logging.getLogger(__name__)

HOSTS_FILE = "/etc/hosts"
# One query (A, AAAA, SRV or a target's) may take this long in all,
# retries over the nameservers included: a dead resolver costs the resolver
# thread this much per name, and start() this much per name at most.
QUERY_LIFETIME = 2.0
QUERY_TIMEOUT = 1.0

STATIC, SYSTEM, DNS, SRV = "static", "system", "dns", "srv"


class ResolveError(Exception):
    """A name got no usable answer (the message says why, in one line);
    `unanswered` when the resolver said nothing at all."""

    def __init__(self, why: str, unanswered: bool = False) -> None:
        super().__init__(why)
        self.unanswered = unanswered


@dataclass(frozen=True)
class Target:
    """One upstream of the group: its spec (named by its address) and the
    socket addresses connect() tries in turn."""

    upstream: Upstream
    addresses: Tuple[Tuple[int, tuple], ...]


def hosts_names(path: str = HOSTS_FILE) -> FrozenSet[str]:
    """The names the hosts file gives addresses to (lower case). The
    system's resolver looks there before DNS, so these stay the system's."""
    names: Set[str] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                names.update(n.lower().rstrip(".") for n in fields[1:])
    except OSError:
        pass
    return frozenset(names)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _why(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "no such name (NXDOMAIN)"
    if isinstance(exc, dns.resolver.NoAnswer):
        return "no records of that type"
    if isinstance(exc, dns.exception.Timeout):
        return f"no answer from the resolver within {QUERY_LIFETIME:g}s"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "every resolver failed (SERVFAIL or refused)"
    if isinstance(exc, dns.resolver.NoResolverConfiguration):
        return "no resolver configured (no nameserver in /etc/resolv.conf: use resolver=HOST:PORT)"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DnsClient:
    """Asks one DNS server (`server`, an IP and port), or the system's
    (/etc/resolv.conf: its nameservers, search list and ndots). Thread-safe
    for the resolver thread and a reload's prepare(): each query is its
    own; nothing is cached here (answers are kept by Resolution)."""

    def __init__(self, server: Optional[Address] = None) -> None:
        self.server = server
        self._resolver: Optional["dns.resolver.Resolver"] = None
        self._config_error: Optional[str] = None
        if not HAVE_DNSPYTHON:
            self._config_error = "dnspython is not installed (pip install dnspython; a dependency of fastproxy-tcp)"
            return
        try:
            if server is not None:
                r = dns.resolver.Resolver(configure=False)
                r.nameservers = [server[0]]
                r.port = server[1]
            else:
                r = dns.resolver.Resolver()
        except (dns.resolver.NoResolverConfiguration, OSError) as exc:
            self._config_error = _why(exc)
            return
        r.lifetime = QUERY_LIFETIME
        r.timeout = QUERY_TIMEOUT
        self._resolver = r

    def describe(self) -> str:
        return format_address(*self.server) if self.server is not None else "the system's resolver"

    def _query(self, name: str, rdtype: "dns.rdatatype.RdataType") -> "dns.resolver.Answer":
        if self._resolver is None:
            raise ResolveError(self._config_error or "no resolver")
        try:
            # The search list applies as for the system's resolver (a
            # Kubernetes `db` is db.NAMESPACE.svc.cluster.local); a given
            # server has none.
            return self._resolver.resolve(name, rdtype, search=self.server is None)
        except (dns.exception.DNSException, OSError) as exc:
            raise ResolveError(_why(exc), isinstance(exc, dns.exception.Timeout)) from None

    def addresses(self, name: str) -> Tuple[List[str], float]:
        """The name's IPv6 and IPv4 addresses (AAAA first, as getaddrinfo
        orders them) and the seconds their answer is good for."""
        found: List[str] = []
        ttls: List[float] = []
        errors: List[str] = []
        for rdtype in (dns.rdatatype.AAAA, dns.rdatatype.A):
            try:
                answer = self._query(name, rdtype)
            except ResolveError as exc:
                if exc.unanswered:
                    raise   # asking the same dead resolver again only doubles the wait
                errors.append(str(exc))
                continue
            found.extend(rd.address for rd in answer)
            ttls.append(max(0.0, answer.expiration - time.time()))
        if not found:
            # The IPv4 query's reason is the telling one (AAAA is often absent).
            raise ResolveError(errors[-1] if errors else "no A or AAAA records")
        return found, min(ttls)

    def srv(self, name: str) -> Tuple[List[Tuple[int, int, int, str, List[str]]], float]:
        """The SRV records of `name` as (priority, weight, port, target,
        target's addresses), and the seconds the whole answer is good for
        (the least of the SRV records' and their targets')."""
        answer = self._query(name, dns.rdatatype.SRV)
        ttl = max(0.0, answer.expiration - time.time())
        # Servers (Consul, CoreDNS) put the targets' addresses in the
        # additional section: use them, ask only for what is missing.
        extra: Dict["dns.name.Name", List[str]] = {}
        response = answer.response
        for rrset in response.additional if response is not None else ():
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                extra.setdefault(rrset.name, []).extend(rd.address for rd in rrset)
                ttl = min(ttl, float(rrset.ttl))
        records = []
        for rd in answer:
            if rd.target == dns.name.root:
                continue   # "." : the service is decidedly not available there
            addrs = extra.get(rd.target)
            if not addrs:
                try:
                    addrs, target_ttl = self.addresses(rd.target.to_text())
                except ResolveError as exc:
                    log.debug("SRV target %s of %s: %s", rd.target, name, exc)
                    continue
                ttl = min(ttl, target_ttl)
            records.append((rd.priority, rd.weight, rd.port, rd.target.to_text(omit_final_dot=True), addrs))
        if not records:
            raise ResolveError("no SRV target with an address")
        return records, ttl


def _sockaddr(ip: str, port: int) -> Tuple[int, tuple]:
    if ":" in ip:
        return socket.AF_INET6, (ip, port, 0, 0)
    return socket.AF_INET, (ip, port)


def _order(targets: Iterable[Target]) -> Tuple[Target, ...]:
    # Servers rotate the records of an answer (round-robin DNS): in a fixed
    # order, only a different set is a change (a swap), and the group's
    # order (which round robin and stats follow) stays put.
    def key(t: Target) -> Tuple[bool, int, bytes, int]:
        family, sockaddr = t.addresses[0]
        return (t.upstream.backup, -family, socket.inet_pton(family, sockaddr[0]), sockaddr[1])
    return tuple(sorted(targets, key=key))


def _srv_weights(weights: Sequence[int]) -> List[int]:
    # SRV weights are 0-65535 and relative; ours are 1-256 (0 would drain).
    # Scaled down only when they do not fit, so small ones stay exact;
    # 0 ("rarely") becomes the smallest.
    top = max(weights) if weights else 0
    if top <= MAX_WEIGHT:
        return [max(1, w) for w in weights]
    return [max(1, round(w * MAX_WEIGHT / top)) for w in weights]


class Resolution:
    """One upstream spec and what it currently resolves to: the targets it
    adds to its group, the last good answer's age and TTL, and failures."""

    def __init__(self, spec: Upstream, kind: str, targets: Tuple[Target, ...], ttl: float = 0.0) -> None:
        self.spec = spec
        self.kind = kind
        self.targets = targets
        self.ttl = ttl
        self.resolved_at = time.monotonic()
        self.due = float("inf")
        self.error: Optional[str] = None
        self.failures = 0          # all failed queries
        self.failing = 0           # failed queries since the last good answer
        self.changes = 0           # answers that changed the targets

    @property
    def dynamic(self) -> bool:
        return self.kind in (DNS, SRV)

    def schedule(self, interval: Tuple[float, float], now: float) -> None:
        low, high = interval
        if self.failing:
            # Sooner than the TTL: the answer kept may be stale already.
            wait = min(high, low * (2.0 ** min(self.failing - 1, 16)))
        else:
            wait = min(high, max(low, self.ttl))
        self.due = now + wait

    def ask(self, client: DnsClient) -> Tuple[Tuple[Target, ...], float]:
        """Resolve now; raises ResolveError."""
        spec = self.spec
        if self.kind == SRV:
            records, ttl = client.srv(spec.host[len(SRV_PREFIX):])
            best = min(p for p, _, _, _, _ in records)
            weights = _srv_weights([w for _, w, _, _, _ in records])
            targets = []
            for (priority, _, port, _, addrs), weight in zip(records, weights):
                for ip in addrs:
                    targets.append(_target(ip, port, weight, spec, spec.backup or priority != best))
            return _order(targets), ttl
        ips, ttl = client.addresses(spec.host)
        return _order(_target(ip, spec.port, spec.weight, spec, spec.backup) for ip in ips), ttl

    def refresh(self, client: DnsClient, interval: Tuple[float, float]) -> bool:
        """Ask again; True when the targets changed. A failure keeps the
        last good answer, logs once per streak, and comes back sooner."""
        shown = self.spec.address
        try:
            targets, ttl = self.ask(client)
        except ResolveError as exc:
            self.failures += 1
            self.failing += 1
            self.error = str(exc)
            if self.failing == 1:
                log.warning("resolving upstream %s failed (%s): keeping its last answer (%s)", shown, exc,
                            ", ".join(t.upstream.address for t in self.targets))
            self.schedule(interval, time.monotonic())
            return False
        if self.failing:
            log.info("upstream %s resolves again after %d failed %s", shown, self.failing,
                     "query" if self.failing == 1 else "queries")
        self.failing = 0
        self.error = None
        self.ttl = ttl
        self.resolved_at = time.monotonic()
        self.schedule(interval, self.resolved_at)
        if targets == self.targets:
            return False
        log.info("upstream %s now resolves to %s (was %s)", shown,
                 ", ".join(t.upstream.address for t in targets) or "nothing",
                 ", ".join(t.upstream.address for t in self.targets))
        self.targets = targets
        self.changes += 1
        return True

    def stats(self, now: Optional[float] = None) -> Dict[str, object]:
        now = time.monotonic() if now is None else now
        return {
            "kind": self.kind,
            "upstreams": [t.upstream.address for t in self.targets],
            "ttl": round(self.ttl, 3),
            "age": round(max(0.0, now - self.resolved_at), 3),
            "next": round(max(0.0, self.due - now), 3),
            "failures": self.failures,
            "failing": self.failing,
            "error": self.error,
            "changes": self.changes,
        }


def _target(ip: str, port: int, weight: int, spec: Upstream, backup: bool) -> Target:
    upstream = Upstream(format_address(ip, port), weight, spec.max_connections, backup)
    return Target(upstream, (_sockaddr(ip, port),))


def first_resolution(spec: Upstream, client: DnsClient, interval: Tuple[float, float],
                     local_names: FrozenSet[str], fld: str = "upstreams") -> Resolution:
    """What `spec` resolves to at prepare(); ConfigError when nothing does."""
    host = spec.host
    if unix_path(host) is not None or _is_ip(host):
        return Resolution(spec, STATIC, (Target(spec, tuple(resolve_upstream((host, spec.port), fld))),))
    name = host.lower().rstrip(".")
    if not host.startswith(SRV_PREFIX) and (
            name in local_names or name == "localhost" or name.endswith(".localhost")):
        return Resolution(spec, SYSTEM, (Target(spec, tuple(resolve_upstream((host, spec.port), fld))),))
    resolution = Resolution(spec, SRV if host.startswith(SRV_PREFIX) else DNS, ())
    try:
        resolution.targets, resolution.ttl = resolution.ask(client)
    except ResolveError as exc:
        if resolution.kind == SRV:
            raise ConfigError(fld, spec.address, f"does not resolve ({exc}, asking {client.describe()})") from None
        # DNS does not know it; the system may (another name service).
        try:
            addresses = resolve_upstream((host, spec.port), fld)
        except ConfigError as system:
            raise ConfigError(fld, spec.address, f"does not resolve (DNS: {exc}; the system: "
                                                 f"{system.problem})") from None
        log.debug("upstream %s: DNS gave no answer (%s); the system's resolver did", spec.address, exc)
        return Resolution(spec, SYSTEM, (Target(spec, tuple(addresses)),))
    resolution.schedule(interval, resolution.resolved_at)
    return resolution


def group_targets(resolutions: Iterable[Resolution]) -> List[Target]:
    """Every resolution's targets in order; an address two specs share is
    one upstream (the first spec's), as stats and control name it."""
    seen = set()
    targets = []
    for r in resolutions:
        for t in r.targets:
            if t.upstream.address not in seen:
                seen.add(t.upstream.address)
                targets.append(t)
    return targets


def build_group(resolutions: Iterable[Resolution], *, balance: str, max_fails: int,
                fail_timeout: float) -> "_core.UpstreamGroup":
    targets = group_targets(resolutions)
    return _core.UpstreamGroup([t.upstream for t in targets], [list(t.addresses) for t in targets],
                               balance=balance, max_fails=max_fails, fail_timeout=fail_timeout)
