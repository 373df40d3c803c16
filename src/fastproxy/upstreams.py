"""Upstream groups as users give them: each upstream's address, weight,
connection limit and backup flag, and the balancing algorithm's name.

CLI form: HOST:PORT[@WEIGHT][,max-connections=N][,backup], where HOST:PORT
may be unix:PATH or unix:@NAME (a Unix socket; its path cannot hold ','), or
srv:NAME[,max-connections=N][,backup]: the targets of NAME's DNS SRV records,
with their ports, weights and priorities (discovery.py). Mistakes are
ConfigErrors naming the field and the value in one line, as in config.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Tuple, Union

from ._core import BALANCE_ALGORITHMS
from .values import (
    MAX_CONNECTIONS,
    SRV_PREFIX,
    UNIX_PREFIX,
    ConfigError,
    format_address,
    is_digits,
    parse_address,
    parse_count,
    parse_srv,
)

__all__ = [
    "ALGORITHMS",
    "MAX_WEIGHT",
    "Upstream",
    "parse_balance",
    "parse_upstream",
    "parse_upstream_address",
    "parse_upstreams",
]

ALGORITHMS: Tuple[str, ...] = BALANCE_ALGORITHMS
MAX_WEIGHT = 256
SPEC_FORM = "HOST:PORT[@WEIGHT][,max-connections=N][,backup] or srv:NAME[,max-connections=N][,backup]"


def _whole(value: object, low: int, high: int, what: str, fld: str, shown: object) -> int:
    # One number inside a spec: the error names the whole spec. Text is
    # digits only here, as a sign cannot be part of a spec's number.
    text = value.strip() if isinstance(value, str) else None
    if text is not None and not is_digits(text):
        raise ConfigError(fld, shown, f"{what} {value!r} is not a whole number")
    try:
        # Huge text stays text: parse_count bounds it without converting.
        number = value if text is None else int(text) if len(text) <= 40 else text
        return parse_count(number, fld, low=low, high=high)
    except ConfigError as exc:
        raise ConfigError(fld, shown, f"{what} {exc.value!r} {exc.problem}") from None


@dataclass(frozen=True)
class Upstream:
    """One upstream server of a group.

    address: "HOST:PORT", "[IPV6]:PORT", "unix:PATH" or "unix:@NAME" (host is
    then the address and port 0), or "srv:NAME" (host is then the address
    and port 0; the SRV records give ports and weights, so weight stays 1).
    A HOST that is a name is resolved with DNS and every address it has
    becomes an upstream of the group (discovery.py). weight: 0-256, 0 drains it (no
    new clients; live bridges go on). max_connections: None for no limit.
    backup: receives clients only when no regular upstream is available.
    """

    address: str
    weight: int = 1
    max_connections: Optional[int] = None
    backup: bool = False
    host: str = field(init=False, repr=False, compare=False)
    port: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shown = self.address
        host, port = parse_upstream_address(self.address, "upstream")
        if host.startswith(SRV_PREFIX) and self.weight != 1:
            raise ConfigError("upstream", shown, "an SRV upstream takes its weights from the records "
                              "(no weight)")
        fix = object.__setattr__  # frozen: normalise once, here
        fix(self, "host", host)
        fix(self, "port", port)
        fix(self, "address", format_address(host, port))
        fix(self, "weight", _whole(self.weight, 0, MAX_WEIGHT, "weight", "upstream", shown))
        if self.max_connections is not None:
            fix(self, "max_connections",
                _whole(self.max_connections, 1, MAX_CONNECTIONS, "max-connections", "upstream", shown))
        if not isinstance(self.backup, bool):
            raise ConfigError("upstream", shown, f"backup must be True or False, not {self.backup!r}")


def parse_upstream_address(value: str, fld: str) -> Tuple[str, int]:
    """An upstream's address: what parse_address takes, or srv:NAME
    (('srv:NAME', 0), as a Unix address is carried)."""
    if isinstance(value, str) and value.strip().startswith(SRV_PREFIX):
        return parse_srv(value, fld), 0
    return parse_address(value, fld)


def parse_upstream(spec: Union[str, Upstream], fld: str = "upstream") -> Upstream:
    """An Upstream, or its CLI form HOST:PORT[@WEIGHT][,max-connections=N][,backup]."""
    if isinstance(spec, Upstream):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(fld, spec, f"expected {SPEC_FORM} or a fastproxy.Upstream")
    head, *options = [part.strip() for part in spec.split(",")]
    # '@' is in no host name or IPv6 address: it can only start the weight.
    address, at, weight = head.partition("@")
    if head.startswith(UNIX_PREFIX):
        # A socket path may hold '@' (and 'unix:@' starts an abstract
        # name): only a last '@' followed by digits is a weight.
        address, at, weight = head.rpartition("@")
        if not at or address == UNIX_PREFIX or not is_digits(weight):
            address, at, weight = head, "", ""
    if at and not weight:
        raise ConfigError(fld, spec, "'@' needs a weight after it (0-256)")
    if at and head.startswith(SRV_PREFIX):
        raise ConfigError(fld, spec, "an SRV upstream takes its weights from the records (no @WEIGHT)")
    max_connections: Optional[str] = None
    backup = False
    seen = set()
    for option in options:
        name, eq, value = option.partition("=")
        if name in seen:
            raise ConfigError(fld, spec, f"{name} is given twice")
        seen.add(name)
        if name == "backup" and not eq:
            backup = True
        elif name == "max-connections" and eq:
            max_connections = value
        else:
            raise ConfigError(fld, spec, f"unknown option {option!r} (expected max-connections=N or backup)")
    try:
        return Upstream(address, weight if at else 1, max_connections, backup)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(fld, spec, exc.problem) from None


def parse_upstreams(specs: Iterable[Union[str, Upstream]], fld: str = "upstreams") -> Tuple[Upstream, ...]:
    """A non-empty group; an address may appear once (stats are keyed by it)."""
    if isinstance(specs, (str, Upstream)) or not isinstance(specs, Iterable):
        raise ConfigError(fld, specs, "expected a list of upstreams")
    group = tuple(parse_upstream(s, fld) for s in specs)
    if not group:
        raise ConfigError(fld, list(group), "needs at least one upstream")
    seen = set()
    for u in group:
        if u.address in seen:
            raise ConfigError(fld, u.address, "is listed twice")
        seen.add(u.address)
    return group


def parse_balance(value: str, fld: str = "balance") -> str:
    if value not in ALGORITHMS:
        raise ConfigError(fld, value, f"must be one of {', '.join(ALGORITHMS)}")
    return value
