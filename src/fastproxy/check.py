"""`fastproxy check`: what a validated ProxyConfig would run, as text for
a person (nothing is bound, resolved or connected)."""

from __future__ import annotations

from typing import Any, List

from .config import Config
from .configfile import ProxyConfig
from .options import OPTIONS, SECTIONS, Option, format_duration, format_value
from .upstreams import Upstream
from .values import Keepalive, format_address

__all__ = ["describe"]

# Shown in a listener's first line, or as its upstream list.
_OWN_LINES = ("listen", "name", "upstreams", "routes")


def describe(pc: ProxyConfig) -> str:
    """Every listener with its options by section, then the process's."""
    count = len(pc.listeners)
    origin = pc.source if pc.source is not None else "the command line"
    out = [f"{origin}: OK, {count} listener{'s' if count != 1 else ''}"]
    first = pc.listeners[0]
    process = [o for o in OPTIONS if o.scope == "process"]
    out.append("process: " + ", ".join(_show(o, _value(first, o)) for o in process))
    out.append(f"log_level: {pc.log_level or 'info'}")
    for config in pc.listeners:
        out += _listener(config)
    return "\n".join(out) + "\n"


def _listener(config: Config) -> List[str]:
    out = [f"listener {config.name}: listen {format_address(*config.listener.listen)}"]
    group = config.upstream_group.upstreams or ()
    if group or config.routing.route != "sni":
        out.append(f"  upstream group: {len(group)} upstream{'s' if len(group) != 1 else ''}")
    else:
        out.append("  upstream group: none (names no route has are refused)")
    out += [f"    {_upstream(u)}" for u in group]
    for route in config.routing.routes:
        own = "".join(f", {name} {value}" for name, value in route.balancing)
        out.append(f"  route {route.name}: {', '.join(route.server_names)}: "
                   f"{len(route.upstreams)} upstream{'s' if len(route.upstreams) != 1 else ''}{own}")
        out += [f"    {_upstream(u)}" for u in route.upstreams]
    for section, title in SECTIONS.items():
        rows = [o for o in OPTIONS if o.section == section and o.scope == "listener" and o.name not in _OWN_LINES]
        if section == "timeouts":
            # Timeouts are many and rarely changed: only the changed ones.
            rows = [o for o in rows if _value(config, o) != o.default]
            if not rows:
                out.append(f"  {title.lower()}: the defaults")
                continue
        if rows:
            shown = {"proxy_protocol": title, "routing": "routing by TLS server name"}.get(section, title.lower())
            out.append(f"  {shown}: "
                       + ", ".join(_show(o, _value(config, o)) for o in rows))
    return out


def _upstream(u: Upstream) -> str:
    parts = [u.address, f"weight {u.weight}"]
    if u.max_connections is not None:
        parts.append(f"max_connections {u.max_connections}")
    if u.backup:
        parts.append("backup")
    return " ".join(parts)


def _value(config: Config, o: Option) -> Any:
    return getattr(getattr(config, o.section), o.name)


def _show(o: Option, value: Any) -> str:
    if value is None:
        text = o.shown_default or "none"
    elif o.name == "rate_limit_per_ip":
        count, seconds = value
        text = f"{count}/{format_duration(seconds)}"
    elif o.name == "unix_mode":
        text = f"{value:04o}"   # as chmod and ls show it
    elif o.name == "worker_cpus":
        text = ",".join(str(cpu) for cpu in value)
    elif o.metavar == "ADDR" and isinstance(value, tuple):
        text = format_address(*value)   # stats, resolver: as written, not a pair
    elif o.name == "resolve_interval":
        text = "-".join(format_duration(v) for v in value) if value[0] != value[1] else format_duration(value[0])
    elif o.metavar == "D" and isinstance(value, (int, float)) and not isinstance(value, bool):
        text = format_duration(value)   # optional durations too, which format_value cannot tell
    elif isinstance(value, Keepalive):
        text = str(value)   # as written: 60s:10s:6
    elif isinstance(value, tuple):
        text = ", ".join(str(item) for item in value) or "none"
    else:
        text = format_value(value, o.parse)
    return f"{o.name} {text}"
