"""The status page the stats endpoint serves at /: one table per listener,
one row per upstream of each of its upstream groups. Rendered here only,
so that it shows without JavaScript; static/status.js refreshes it by
fetching it again and swapping the listeners in."""

from __future__ import annotations

import html
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .reasons import losses, refusals
from .view import ROUTED, format_bytes, routed_figures, upstream_groups

__all__ = ["status_page"]

# An upstream row's failures are its failed tries; the total row's are the
# clients whose every try failed, so a retry another upstream served is in
# the first and not the second.
_CLIENTS_FAILED = "clients no upstream took (every try failed); the rows above count each failed try"

_HEADERS = ("upstream", "state", "health", "weight", "active", "total", "bytes up", "bytes down", "failures")


def _num(cls: str, value: Any) -> str:
    return f'<td class="num {cls}">{html.escape(str(value))}</td>'


def _figures(fig: Mapping[str, Any]) -> str:
    return (_num("active", fig.get("active", 0)) + _num("total", fig.get("accepted", 0))
            + _num("up", format_bytes(fig.get("bytes_upstream", 0)))
            + _num("down", format_bytes(fig.get("bytes_downstream", 0)))
            + _num("failures", fig.get("connect_failures", 0)))


def _upstream_row(name: str, up: Mapping[str, Any], route: Optional[str]) -> str:
    esc = html.escape
    weight = up.get("weight")   # the run-time one: drain and set_weight show at once
    weight_text = "" if weight is None else esc(str(weight))
    state = esc(str(up.get("state", "?")))
    shown = name if route is None else f"{route}/{name}"
    route_attr = "" if route is None else f' data-route="{esc(route)}"'
    return (f'<tr class="upstream"{route_attr} data-upstream="{esc(name)}" data-weight="{weight_text}">'
            f'<td class="name">{esc(shown)}</td><td class="state state-{state}">{state}</td>'
            f'<td class="health">{esc(str(up.get("health", "?")))}</td><td class="weight">{weight_text}</td>'
            f'{_figures(up)}</tr>')


def _rows(fig: Mapping[str, Any]) -> List[str]:
    rows = [_upstream_row(name, up, route) for route, name, up in upstream_groups(fig)]
    routed = routed_figures(fig)
    if routed is not None:
        rows.append(f'<tr class="routed"><td class="name">{ROUTED}</td><td></td><td></td><td></td>'
                    f'{_figures(routed)}</tr>')
    total = _figures(fig).replace('<td class="num failures">', f'<td class="num failures" title="{_CLIENTS_FAILED}">')
    rows.append(f'<tr class="total"><td class="name">listener total</td><td></td><td></td><td></td>{total}</tr>')
    return rows


def _tally(cls: str, pairs: Tuple[Tuple[str, int], ...]) -> str:
    # The sum, with its parts in the title (a tooltip) and as data attributes.
    parts = ", ".join(f"{k} {v}" for k, v in pairs if v)
    attrs = "".join(f' data-{k.replace("_", "-")}="{v}"' for k, v in pairs)
    return (f'{cls} <span class="{cls}" title="{html.escape(parts)}"{attrs}>'
            f'{sum(v for _, v in pairs)}</span>')


def _section(name: str, fig: Mapping[str, Any]) -> str:
    esc = html.escape
    head = "".join(f"<th>{h}</th>" for h in _HEADERS)
    return (f'<section class="listener" data-listener="{esc(name)}"><h2>{esc(name)}</h2>'
            f'<p class="summary">queued <span class="queued">{fig.get("queued", 0)}</span> &middot; '
            f'peak <span class="peak">{fig.get("peak_active", 0)}</span> &middot; '
            f'{_tally("refused", refusals(fig))} &middot; {_tally("lost", losses(fig))}</p>'
            f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(_rows(fig))}</tbody></table></section>')


def status_page(stats: Dict[str, Any]) -> bytes:
    """The whole page for a stats dict (what Proxy.stats() returns)."""
    sections = "".join(_section(str(n), fig) for n, fig in stats.get("listeners", {}).items())
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>fastproxy status</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="/static/status.css"></head><body>'
        '<header><h1>fastproxy</h1><span id="updated">as served</span></header>'
        f'<main id="listeners">{sections}</main>'
        '<footer><a href="/stats">/stats</a> &middot; <a href="/metrics">/metrics</a></footer>'
        '<script src="/static/status.js"></script></body></html>\n')
    return page.encode()
