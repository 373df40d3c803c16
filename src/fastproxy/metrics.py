"""Prometheus metrics of a running proxy, read at scrape time from
`Proxy.stats()` (relaxed loads of the data plane's counters: a scrape takes
no lock a worker takes). docs/observability.md lists every metric."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Tuple, Union

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .reasons import REFUSAL_REASONS

__all__ = ["CONTENT_TYPE_LATEST", "REFUSAL_REASONS", "UPSTREAM_STATES", "ProxyCollector", "histogram_family",
           "make_registry", "render"]

# The states an upstream's entry names; a state not listed here (one a
# newer control plane adds) still gets its series when an upstream is in it.
UPSTREAM_STATES = ("up", "down", "drained", "maint")

# Histograms ListenerHandle.stats()["histograms"] may carry.
HISTOGRAMS = (
    ("connect_seconds", "fastproxy_connect_seconds", "Time from a client's admission to its upstream's connect"),
    ("duration_seconds", "fastproxy_bridge_duration_seconds", "How long bridges lived, from accept to close"),
)

# The per-worker loop counters DataPlane.stats()["workers"] gives.
WORKER_LOOP = (
    ("iterations", "fastproxy_worker_loop_iterations", "Rounds of the worker's event loop (one wait each)"),
    ("events", "fastproxy_worker_events", "Ready events (epoll) or fds (poll) the worker handled"),
    ("wakeups", "fastproxy_worker_wakeups", "Times the worker was woken through its wake pipe"),
    ("accept_calls", "fastproxy_worker_accept_calls", "accept() calls the worker made"),
)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def histogram_family(name: str, doc: str, per_listener: Mapping[str, Mapping[str, Any]]) -> HistogramMetricFamily:
    """A histogram from per-listener {"bounds", "counts" (per bucket, not
    cumulative), "sum", "count"}: Prometheus buckets are cumulative."""
    family = HistogramMetricFamily(name, doc, labels=["listener"])
    for listener, h in per_listener.items():
        buckets: List[Tuple[str, float]] = []
        running = 0
        for bound, count in zip(h["bounds"], h["counts"]):
            running += int(count)
            buckets.append((_le(bound), running))
        if not buckets or buckets[-1][0] != "+Inf":
            buckets.append(("+Inf", int(h["count"])))
        family.add_metric([listener], buckets, float(h["sum"]))
    return family


class ProxyCollector(Collector):
    """Every fastproxy_* metric, from one stats() call per scrape."""

    def __init__(self, stats: Callable[[], Dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self._stats()
        except RuntimeError:
            return []   # not started, or stopped before its first figures
        return list(self._families(stats))

    def _families(self, stats: Dict[str, Any]) -> Iterator[Metric]:
        listeners: Dict[str, Dict[str, Any]] = stats.get("listeners", {})

        def per_listener(kind: Any, name: str, doc: str, key: str) -> Metric:
            family: Union[GaugeMetricFamily, CounterMetricFamily] = kind(name, doc, labels=["listener"])
            for lname, fig in listeners.items():
                family.add_metric([lname], fig.get(key, 0))
            return family

        yield per_listener(GaugeMetricFamily, "fastproxy_bridges_active", "Bridges open now", "active")
        yield per_listener(GaugeMetricFamily, "fastproxy_bridges_peak", "Most bridges open at once", "peak_active")
        yield per_listener(CounterMetricFamily, "fastproxy_bridges", "Clients accepted", "accepted")
        yield per_listener(GaugeMetricFamily, "fastproxy_queued", "Clients in the wait queue", "queued")
        yield per_listener(CounterMetricFamily, "fastproxy_connect_failures",
                           "Clients no upstream took: every connect try failed (each try counts per upstream)",
                           "connect_failures")
        yield per_listener(CounterMetricFamily, "fastproxy_fd_exhausted",
                           "Clients closed for want of file descriptors", "fd_exhausted")
        yield per_listener(CounterMetricFamily, "fastproxy_no_memory",
                           "Bridges ended (or clients refused) for want of memory", "no_memory")
        yield per_listener(CounterMetricFamily, "fastproxy_dropped_records",
                           "Close records dropped (on_close and access log behind)", "dropped_records")
        yield per_listener(CounterMetricFamily, "fastproxy_hook_calls", "Hook calls made", "hook_calls")
        yield per_listener(CounterMetricFamily, "fastproxy_hook_timeouts",
                           "Hook calls not answered within hook_timeout", "hook_timeouts")
        yield per_listener(CounterMetricFamily, "fastproxy_route_aborted",
                           "Clients that ended before their TLS ClientHello was whole (route = sni)",
                           "route_aborted")

        byte_family = CounterMetricFamily("fastproxy_bytes", "Bytes forwarded (up: client to upstream)",
                                          labels=["listener", "direction"])
        refused = CounterMetricFamily("fastproxy_refused", "Clients refused, by reason",
                                      labels=["listener", "reason"])
        for lname, fig in listeners.items():
            byte_family.add_metric([lname, "up"], fig.get("bytes_upstream", 0))
            byte_family.add_metric([lname, "down"], fig.get("bytes_downstream", 0))
            for reason, key in REFUSAL_REASONS:
                refused.add_metric([lname, reason], fig.get(key, 0))
        yield byte_family
        yield refused
        yield from self._upstream_families(listeners)
        yield from self._resolution_families(listeners)
        yield from self._histograms(listeners)

        yield CounterMetricFamily("fastproxy_stale_answers", "Hook answers that came after their bridge moved on",
                                  value=stats.get("stale_answers", 0))
        yield CounterMetricFamily("fastproxy_hook_errors", "Hook calls that raised or answered wrongly",
                                  value=stats.get("hook_errors", 0))
        yield GaugeMetricFamily("fastproxy_hook_queue", "Hook calls waiting for a hook thread",
                                value=stats.get("hook_queue", 0))
        yield GaugeMetricFamily("fastproxy_listeners", "Listeners configured", value=len(listeners))
        workers = stats.get("workers", [])
        yield GaugeMetricFamily("fastproxy_workers", "Worker threads", value=len(workers))
        for key, name, doc in WORKER_LOOP:
            family = CounterMetricFamily(name, doc, labels=["worker"])
            for i, w in enumerate(workers):
                family.add_metric([str(i)], w.get(key, 0))
            yield family

    def _upstream_families(self, listeners: Dict[str, Dict[str, Any]]) -> Iterator[Metric]:
        # A route's group is told apart by its route's name; the listener's
        # default group's by route="".
        labels = ["listener", "route", "upstream"]
        active = GaugeMetricFamily("fastproxy_upstream_bridges_active", "Bridges open to the upstream", labels=labels)
        total = CounterMetricFamily("fastproxy_upstream_bridges", "Bridges made to the upstream", labels=labels)
        failures = CounterMetricFamily("fastproxy_upstream_connect_failures", "Failed connects to the upstream",
                                       labels=labels)
        fails_now = GaugeMetricFamily("fastproxy_upstream_consecutive_failures",
                                      "Connect failures in a row (passive health)", labels=labels)
        byte_family = CounterMetricFamily("fastproxy_upstream_bytes", "Bytes forwarded through the upstream",
                                          labels=labels + ["direction"])
        state = GaugeMetricFamily("fastproxy_upstream_state", "1 for the upstream's state, 0 for the others",
                                  labels=labels + ["state"])
        health = GaugeMetricFamily("fastproxy_upstream_health_up",
                                   "Health check verdict: 1 up (or no checks), 0 down", labels=labels)
        routed = CounterMetricFamily("fastproxy_routed_bridges",
                                     "Bridges on_connect sent to an address outside the group", labels=["listener"])
        for lname, fig in listeners.items():
            groups = [("", fig.get("upstreams", {}))]
            groups += [(rname, route.get("upstreams", {})) for rname, route in fig.get("routes", {}).items()]
            for rname, uname, up in ((r, u, up) for r, ups in groups for u, up in ups.items()):
                key = [lname, rname, uname]
                active.add_metric(key, up.get("active", 0))
                total.add_metric(key, up.get("accepted", 0))
                failures.add_metric(key, up.get("connect_failures", 0))
                fails_now.add_metric(key, up.get("consecutive_failures", 0))
                byte_family.add_metric(key + ["up"], up.get("bytes_upstream", 0))
                byte_family.add_metric(key + ["down"], up.get("bytes_downstream", 0))
                now = up.get("state", "up")
                for s in UPSTREAM_STATES + ((now,) if now not in UPSTREAM_STATES else ()):
                    state.add_metric(key + [s], 1 if s == now else 0)
                health.add_metric(key, 1 if up.get("health", "up") == "up" else 0)
            routed.add_metric([lname], fig.get("routed", {}).get("accepted", 0))
        yield from (active, total, failures, fails_now, byte_family, state, health, routed)

    def _resolution_families(self, listeners: Dict[str, Dict[str, Any]]) -> Iterator[Metric]:
        # Upstream names resolved with DNS (stats()["listeners"][L]["resolution"],
        # and a route's under its "routes" entry): route="" for the listener's own group.
        labels = ["listener", "route", "name"]
        age = GaugeMetricFamily("fastproxy_resolution_age_seconds",
                                "Age of the DNS answer an upstream name's upstreams come from", labels=labels)
        count = GaugeMetricFamily("fastproxy_resolution_upstreams",
                                  "Upstreams the name's answer gives the group", labels=labels)
        failing = GaugeMetricFamily("fastproxy_resolution_failing",
                                    "Failed queries since the name's last good answer (0: fresh)", labels=labels)
        failures = CounterMetricFamily("fastproxy_resolution_failures", "Failed DNS queries for the name",
                                       labels=labels)
        changes = CounterMetricFamily("fastproxy_resolution_changes",
                                      "DNS answers that changed the name's upstreams", labels=labels)
        for lname, fig in listeners.items():
            per_route = [("", fig.get("resolution", {}))]
            per_route += [(rname, route.get("resolution", {})) for rname, route in fig.get("routes", {}).items()]
            for rname, name, r in ((rn, n, r) for rn, group in per_route for n, r in group.items()):
                key = [lname, rname, name]
                age.add_metric(key, r["age"])
                count.add_metric(key, len(r["upstreams"]))
                failing.add_metric(key, r["failing"])
                failures.add_metric(key, r["failures"])
                changes.add_metric(key, r["changes"])
        yield from (age, count, failing, failures, changes)

    def _histograms(self, listeners: Dict[str, Dict[str, Any]]) -> Iterator[Metric]:
        for key, name, doc in HISTOGRAMS:
            have = {lname: fig["histograms"][key] for lname, fig in listeners.items()
                    if key in fig.get("histograms", {})}
            if have:
                yield histogram_family(name, doc, have)


def make_registry(stats: Callable[[], Dict[str, Any]], *, process: bool = True) -> CollectorRegistry:
    """A registry of its own (not the global one: an application's metrics
    are its own) with the proxy's collector and the process's figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(stats))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
