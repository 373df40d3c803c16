"""The live view of `fastproxy top` and `fastproxy demo`: a stats dict (what
`Proxy.stats()` returns and the endpoint's /stats serves), with the snapshot
before it, becomes per-listener tables of upstreams with rates.

Pure functions: `build_view` computes the figures, `render_text` writes
them as plain text (no dependency), `render_rich` as rich tables (rich is
the `top` extra, imported only there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Tuple

from .reasons import count, losses, refusals

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import RenderableType

__all__ = ["UpstreamRow", "ListenerView", "View", "build_view", "render_text", "render_rich",
           "format_bytes", "format_rate", "PROCESS_ERRORS", "upstream_groups", "routed_figures"]

# Trouble with the process's hooks and records, not with traffic.
PROCESS_ERRORS = ("hook_errors", "hook_timeouts", "stale_answers", "dropped_records")
ROUTED = "(routed)"


@dataclass(frozen=True)
class UpstreamRow:
    name: str
    state: str
    active: int
    total: int                      # bridges sent to it ("accepted")
    rate: Optional[float]           # new bridges per second; None on the first snapshot
    up: Optional[float]             # bytes per second client -> upstream
    down: Optional[float]
    connect_failures: int


@dataclass(frozen=True)
class ListenerView:
    name: str
    upstreams: Tuple[UpstreamRow, ...]
    active: int
    peak_active: int
    queued: int
    accepted: int
    rate: Optional[float]
    up: Optional[float]
    down: Optional[float]
    connect_failures: int
    refusals: Tuple[Tuple[str, int], ...]     # reasons.refusals: by a policy or limit
    losses: Tuple[Tuple[str, int], ...]       # reasons.losses: with no policy behind them


@dataclass(frozen=True)
class View:
    listeners: Tuple[ListenerView, ...]
    errors: Tuple[Tuple[str, int], ...]
    elapsed: Optional[float]        # seconds since the previous snapshot


def _per_second(now: Mapping[str, Any], before: Optional[Mapping[str, Any]], key: str,
                elapsed: Optional[float]) -> Optional[float]:
    if before is None or not elapsed or elapsed <= 0 or key not in before:
        return None
    delta = count(now, key) - count(before, key)
    # A counter that went back belongs to a restarted process: no rate.
    return delta / elapsed if delta >= 0 else None


def _mapping(d: Optional[Mapping[str, Any]], key: str) -> Optional[Mapping[str, Any]]:
    if d is None:
        return None
    value = d.get(key)
    return value if isinstance(value, Mapping) else None


def _upstream_row(name: str, now: Mapping[str, Any], before: Optional[Mapping[str, Any]],
                  elapsed: Optional[float]) -> UpstreamRow:
    return UpstreamRow(name=name, state=str(now.get("state", "?")), active=count(now, "active"),
                       total=count(now, "accepted"), rate=_per_second(now, before, "accepted", elapsed),
                       up=_per_second(now, before, "bytes_upstream", elapsed),
                       down=_per_second(now, before, "bytes_downstream", elapsed),
                       connect_failures=count(now, "connect_failures"))


def upstream_groups(fig: Mapping[str, Any]) -> Iterator[Tuple[Optional[str], str, Mapping[str, Any]]]:
    """(route, upstream, its figures) for each upstream of a listener's
    stats: its own group first (route None), then each route's (route =
    "sni"), shown as ROUTE/UPSTREAM by `top` and the status page."""
    for up_name, figures in (_mapping(fig, "upstreams") or {}).items():
        if isinstance(figures, Mapping):
            yield None, str(up_name), figures
    for route_name, route in (_mapping(fig, "routes") or {}).items():
        route_ups = _mapping(route, "upstreams") if isinstance(route, Mapping) else None
        for up_name, figures in (route_ups or {}).items():
            if isinstance(figures, Mapping):
                yield str(route_name), str(up_name), figures


def routed_figures(fig: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """The figures of the bridges on_connect routed, shown as ROUTED; None
    when it routed none (otherwise a row of zeros)."""
    routed = _mapping(fig, "routed")
    return routed if routed is not None and (count(routed, "accepted") or count(routed, "active")) else None


def _listener(name: str, now: Mapping[str, Any], before: Optional[Mapping[str, Any]],
              elapsed: Optional[float]) -> ListenerView:
    rows: List[UpstreamRow] = []
    for route, up_name, figures in upstream_groups(now):
        group = before if route is None else _mapping(_mapping(before, "routes"), route)
        shown = up_name if route is None else f"{route}/{up_name}"
        rows.append(_upstream_row(shown, figures, _mapping(_mapping(group, "upstreams"), up_name), elapsed))
    routed = routed_figures(now)
    if routed is not None:
        rows.append(_upstream_row(ROUTED, routed, _mapping(before, "routed"), elapsed))
    return ListenerView(name=name, upstreams=tuple(rows), active=count(now, "active"),
                        peak_active=count(now, "peak_active"), queued=count(now, "queued"),
                        accepted=count(now, "accepted"), rate=_per_second(now, before, "accepted", elapsed),
                        up=_per_second(now, before, "bytes_upstream", elapsed),
                        down=_per_second(now, before, "bytes_downstream", elapsed),
                        connect_failures=count(now, "connect_failures"),
                        refusals=refusals(now), losses=losses(now))


def build_view(stats: Mapping[str, Any], previous: Optional[Mapping[str, Any]] = None,
               elapsed: Optional[float] = None) -> View:
    """The figures of one snapshot; rates against `previous`, taken
    `elapsed` seconds earlier (none without it)."""
    if previous is None:
        elapsed = None
    listeners = _mapping(stats, "listeners")
    before_all = _mapping(previous, "listeners")
    views: List[ListenerView] = []
    if listeners:
        for name, figures in listeners.items():
            if isinstance(figures, Mapping):
                views.append(_listener(str(name), figures, _mapping(before_all, str(name)), elapsed))
    else:
        # A stats dict from before listeners had names: the top level is the one listener.
        views.append(_listener("", stats, previous, elapsed))
    return View(listeners=tuple(views), errors=tuple((k, count(stats, k)) for k in PROCESS_ERRORS),
                elapsed=elapsed)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop returns


def format_rate(value: Optional[float], *, per_bytes: bool = False) -> str:
    if value is None:
        return "-"
    return format_bytes(value) + "/s" if per_bytes else f"{value:.1f}/s"


HEADERS = ("upstream", "state", "active", "total", "new/s", "up/s", "down/s", "connect failures")


def upstream_cells(row: UpstreamRow) -> Tuple[str, ...]:
    return (row.name, row.state, str(row.active), str(row.total), format_rate(row.rate),
            format_rate(row.up, per_bytes=True), format_rate(row.down, per_bytes=True),
            str(row.connect_failures))


def listener_line(lv: ListenerView) -> str:
    return (f"active {lv.active} (peak {lv.peak_active})  queued {lv.queued}  accepted {lv.accepted} "
            f"({format_rate(lv.rate)})  up {format_rate(lv.up, per_bytes=True)}  "
            f"down {format_rate(lv.down, per_bytes=True)}  connect failed {lv.connect_failures}")


def _pairs(pairs: Tuple[Tuple[str, int], ...]) -> str:
    return "  ".join(f"{k} {v}" for k, v in pairs)


def render_text(view: View) -> str:
    """The snapshot as aligned plain text, ending in a newline."""
    out: List[str] = []
    for lv in view.listeners:
        out.append(f"listener {lv.name}  {listener_line(lv)}" if lv.name else f"listener  {listener_line(lv)}")
        table = [HEADERS] + [upstream_cells(r) for r in lv.upstreams]
        widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
        for line in table:
            cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
            out.append("  " + "  ".join(cells).rstrip())
        out.append("  refused: " + _pairs(lv.refusals))
        out.append("  lost: " + _pairs(lv.losses))
    out.append("process errors: " + _pairs(view.errors))
    return "\n".join(out) + "\n"


_STATE_STYLE: Dict[str, str] = {"up": "green", "down": "bold red", "drained": "yellow"}


def render_rich(view: View, title: str = "fastproxy") -> "RenderableType":
    """The snapshot as rich tables (one per listener), for a terminal."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: List[RenderableType] = []
    every = f"  (rates over {view.elapsed:.1f} s)" if view.elapsed else "  (rates from the next refresh)"
    parts.append(Text(title + every, style="bold"))
    for lv in view.listeners:
        # Heading and refusals outside the table: a table's title and
        # caption wrap at the table's width.
        parts.append(Text(f"listener {lv.name}  " + listener_line(lv), style="bold"))
        table = Table(expand=False)
        for i, header in enumerate(HEADERS):
            table.add_column(header, justify="left" if i < 2 else "right", no_wrap=i == 0)
        for row in lv.upstreams:
            cells = list(upstream_cells(row))
            state = Text(cells[1], style=_STATE_STYLE.get(row.state, ""))
            failures = Text(cells[7], style="red" if row.connect_failures else "")
            table.add_row(cells[0], state, *cells[2:7], failures)
        parts.append(table)
        parts.append(Text("refused: " + _pairs(lv.refusals)))
        parts.append(Text("lost: " + _pairs(lv.losses), style="red" if any(v for _, v in lv.losses) else ""))
    bad = any(v for _, v in view.errors)
    parts.append(Text("process errors: " + _pairs(view.errors), style="red" if bad else "dim"))
    return Group(*parts)
