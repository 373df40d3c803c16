"""Routes by TLS server name as users give them: each route's server names
(exact, or `*.suffix` wildcards), its upstreams and the balancing options
its group sets for itself (the rest are the listener's).

Config file and API form: a list of tables, each with `server_names`,
`upstreams`, an optional `name` and balancing options. Command-line form:
`NAME=SPEC` strings (`--route-sni`), one upstream each; repeating a NAME
adds upstreams to its group. Mistakes are ConfigErrors naming the field
(`routes[1].server_names[2]`) and the value in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .upstreams import Upstream, parse_upstream, parse_upstreams
from .values import ConfigError

__all__ = ["ROUTE_KEYS", "Route", "parse_routes", "parse_server_name"]

# What a route table may hold besides its balancing options.
ROUTE_KEYS = ("name", "server_names", "upstreams")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_FORM = "a server name such as a.example or *.b.example"


@dataclass(frozen=True)
class Route:
    """One route: clients whose ClientHello names one of `server_names`
    (normalized: lower case, no trailing dot; `*.x` matches any name ending
    in `.x`) go to its own group of `upstreams`. `balancing`: the balancing
    options this route sets, as (name, value) pairs; the listener's apply
    for the others."""

    name: str
    server_names: Tuple[str, ...]
    upstreams: Tuple[Upstream, ...]
    balancing: Tuple[Tuple[str, Any], ...] = ()

    def setting(self, name: str, listener_value: Any) -> Any:
        """A balancing option of this route's group."""
        return dict(self.balancing).get(name, listener_value)


def balancing_keys() -> Tuple[str, ...]:
    from .options import OPTIONS
    return tuple(o.name for o in OPTIONS if o.section == "balancing")


def parse_server_name(value: object, field: str) -> str:
    """A server name, normalized: lower case, no trailing dot; ASCII (an
    internationalized name in its IDNA form)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(field, value, f"expected {_FORM}")
    if not value.isascii():
        raise ConfigError(field, value, "must be ASCII: write an internationalized name in its IDNA form (xn--...)")
    name = value.lower()
    if name.endswith("."):
        name = name[:-1]
    wild = name.startswith("*.")
    body = name[2:] if wild else name
    labels = body.split(".")
    if not body or len(body) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(field, value, f"is not {_FORM} (letters, digits, '-' and '_' in dot-separated "
                                        f"labels of 1-63; '*.' only as the whole first label)")
    return name


def parse_routes(value: object, field: str = "routes") -> Tuple[Route, ...]:
    """Tables (config file, API), Routes, or NAME=SPEC strings (the command
    line) -> Routes; a server name may belong to one route only."""
    if isinstance(value, (str, Mapping)) or not isinstance(value, (list, tuple)):
        raise ConfigError(field, value, "expected a list of routes: tables with server_names and upstreams, "
                                        "or NAME=SPEC")
    items = list(value)
    if items and all(isinstance(item, str) for item in items):
        routes = _from_flags(items, field)
    else:
        routes = [_route(item, f"{field}[{i}]") for i, item in enumerate(items)]
    owner: Dict[str, int] = {}
    names: Dict[str, int] = {}
    for i, route in enumerate(routes):
        for j, server_name in enumerate(route.server_names):
            if server_name in owner:
                raise ConfigError(f"{field}[{i}].server_names[{j}]", server_name,
                                  f"is also a server name of {field}[{owner[server_name]}]")
            owner[server_name] = i
    for i, route in enumerate(routes):
        if route.name in names:
            raise ConfigError(f"{field}[{i}].name", route.name,
                              f"is also the name of {field}[{names[route.name]}] (names must be unique)")
        names[route.name] = i
    return tuple(routes)


def _from_flags(items: List[str], field: str) -> List[Route]:
    # NAME=SPEC, NAME=SPEC2: a NAME given again adds to its group.
    groups: Dict[str, List[Upstream]] = {}
    for item in items:
        name, eq, spec = item.partition("=")
        if not eq or not name.strip() or not spec.strip():
            raise ConfigError(field, item, "expected NAME=SPEC, e.g. a.example=127.0.0.1:9001")
        server_name = parse_server_name(name.strip(), field)
        try:
            upstream = parse_upstream(spec.strip(), field)
        except ConfigError as exc:
            raise ConfigError(field, item, exc.problem) from None
        group = groups.setdefault(server_name, [])
        if any(u.address == upstream.address for u in group):
            raise ConfigError(field, item, f"{upstream.address} is listed twice for {server_name}")
        group.append(upstream)
    return [Route(name, (name,), tuple(group)) for name, group in groups.items()]


def _route(item: object, here: str) -> Route:
    if isinstance(item, Route):
        return item
    if not isinstance(item, Mapping):
        raise ConfigError(here, item, "expected a table with server_names and upstreams")
    allowed = ROUTE_KEYS + balancing_keys()
    for key in item:
        if key not in allowed:
            raise ConfigError(f"{here}.{key}", item[key],
                              f"is not a route key (a route has {', '.join(allowed)})")
    if "server_names" not in item:
        raise ConfigError(here, dict(item), "has no server_names (required)")
    if "upstreams" not in item:
        raise ConfigError(here, dict(item), "has no upstreams (required)")
    given = item["server_names"]
    if isinstance(given, str) or not isinstance(given, (list, tuple)) or not given:
        raise ConfigError(f"{here}.server_names", given, "expected a non-empty list of server names")
    server_names = tuple(parse_server_name(n, f"{here}.server_names[{j}]") for j, n in enumerate(given))
    for j, server_name in enumerate(server_names):
        if server_name in server_names[:j]:
            raise ConfigError(f"{here}.server_names[{j}]", given[j], "is listed twice")
    upstreams = parse_upstreams(_list(item["upstreams"], f"{here}.upstreams"), f"{here}.upstreams")
    name: Optional[object] = item.get("name")
    if name is None:
        name = server_names[0]
    elif not isinstance(name, str) or not name.strip() or not name.isprintable():
        raise ConfigError(f"{here}.name", name, "must be printable, non-empty text")
    return Route(str(name), server_names, upstreams, _balancing(item, here))


def _list(value: object, field: str) -> List[Any]:
    if isinstance(value, (str, Upstream)) or not isinstance(value, (list, tuple)):
        raise ConfigError(field, value, "expected a list of upstreams")
    return list(value)


def _balancing(item: Mapping[str, Any], here: str) -> Tuple[Tuple[str, Any], ...]:
    from .options import option
    out = []
    for key in balancing_keys():
        if key in item and item[key] is not None:
            out.append((key, option(key).parse(item[key], f"{here}.{key}")))
    return tuple(out)
