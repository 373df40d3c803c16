"""The frozen configuration of a listener, in sections, built from the
option table (options.py).

`Config.build(**options)` parses every option with its row's parser and
files it under its section: `config.limits.queue_size`,
`config.access.allow`. The data plane receives the Config as it is and reads
the same names. `resolve()` fills in what is only known at start (the
engine, the connection limit from the fd budget, notsent_lowat's default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type

from .options import OPTIONS, SECTIONS
from .values import ConfigError, default_notsent_lowat, default_workers, format_address, unix_path

__all__ = ["Config", "ConfigError", "SECTION_TYPES"]

# The socket file's options, for a unix:PATH listener only.
UNIX_FILE_OPTIONS = ("unix_mode", "unix_user", "unix_group")
# Options that act on the client's IP, which a Unix listener's clients lack.
IP_ONLY_OPTIONS = (
    ("limits", "max_connections_per_ip"),
    ("access", "allow"),
    ("access", "deny"),
    ("access", "allow_file"),
    ("access", "deny_file"),
    ("access", "rate_limit_per_ip"),
    ("proxy_protocol", "accept_proxy_from"),
)


def _section_type(section: str) -> Type[Any]:
    fields = [(o.name, Any, dataclasses.field(default=o.default)) for o in OPTIONS if o.section == section]
    cls = dataclasses.make_dataclass(section.title().replace("_", "") + "Section", fields, frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = f"The {SECTIONS[section].lower()} options of a listener (see docs/reference.md)."
    return cls


# One frozen dataclass per section, its fields the section's rows.
SECTION_TYPES: Dict[str, Type[Any]] = {section: _section_type(section) for section in SECTIONS}


@dataclass(frozen=True)
class Config:
    """One listener's validated configuration (immutable), in sections."""

    listener: Any
    upstream_group: Any
    routing: Any
    balancing: Any
    limits: Any
    access: Any
    timeouts: Any
    proxy_protocol: Any
    hooks: Any
    process: Any

    @classmethod
    def build(cls, upstream: Any = None, **options: Any) -> "Config":
        """Every keyword is an option of the table, by its name; `upstream`
        is one upstream, the same as `upstreams=[upstream]`."""
        unknown = sorted(set(options) - {o.name for o in OPTIONS})
        if unknown:
            raise ConfigError(unknown[0], options[unknown[0]], "is not an option (see docs/reference.md)")
        if upstream is not None:
            if options.get("upstreams") is not None:
                raise ConfigError("upstreams", options["upstreams"], "give either upstream or upstreams, not both")
            options["upstreams"] = [upstream]
        values: Dict[str, Dict[str, Any]] = {section: {} for section in SECTIONS}
        for o in OPTIONS:
            value = options.get(o.name, o.default)
            if value is None and o.required and not (o.name == "upstreams" and options.get("route") == "sni"):
                field = "upstream" if o.name == "upstreams" else o.name
                raise ConfigError(field, None, "is required")
            field = "upstream" if o.name == "upstreams" and upstream is not None else o.name
            values[o.section][o.name] = value if value is None or value is o.default else o.parse(value, field)
        cls._check_listener_kind(values, options)
        cls._check_routing(values, options)
        # Options that imply or complete others.
        if values["proxy_protocol"]["accept_proxy_from"]:
            values["proxy_protocol"]["accept_proxy"] = True
        if values["process"]["workers"] is None:
            values["process"]["workers"] = default_workers()
        return cls(**{section: SECTION_TYPES[section](**fields) for section, fields in values.items()})

    @staticmethod
    def _check_listener_kind(values: Dict[str, Dict[str, Any]], given: Dict[str, Any]) -> None:
        # Options that only one kind of listener can act on: a mistake, not
        # something to ignore quietly.
        path = unix_path(values["listener"]["listen"][0])
        for name in UNIX_FILE_OPTIONS:
            if values["listener"][name] is None:
                continue
            if path is None:
                raise ConfigError(name, given[name], "needs a Unix socket listener (listen=unix:PATH)")
            if path.startswith("@"):
                raise ConfigError(name, given[name], "does not apply to an abstract socket (unix:@NAME has no file)")
        if path is None:
            return
        for section, name in IP_ONLY_OPTIONS:
            if values[section][name]:
                raise ConfigError(name, given[name],
                                  "needs an IP listener: a client of a Unix socket has no IP address")

    @staticmethod
    def _check_routing(values: Dict[str, Dict[str, Any]], given: Dict[str, Any]) -> None:
        routing = values["routing"]
        if routing["route"] != "sni":
            if routing["routes"]:
                raise ConfigError("routes", given["routes"], 'needs route = "sni" (--route sni): routes '
                                                             "choose by TLS server name")
            return
        if values["upstream_group"]["upstreams"] is None and not routing["routes"]:
            raise ConfigError("upstream", None, 'is required (with route = "sni", routes or upstreams)')

    def resolve(self, *, engine: str, max_connections: int) -> "Config":
        """What start() decided: the concrete engine, and the defaults that
        depend on it or on the fd budget."""
        process = dataclasses.replace(self.process, engine=engine)
        limits = self.limits
        if limits.max_connections is None:
            limits = dataclasses.replace(limits, max_connections=max_connections)
        listener = self.listener
        if listener.notsent_lowat is None:
            listener = dataclasses.replace(listener, notsent_lowat=default_notsent_lowat(engine))
        return dataclasses.replace(self, process=process, limits=limits, listener=listener)

    @property
    def name(self) -> str:
        """The listener's name: its `name` option, else its listen address
        as configured."""
        name: Optional[str] = self.listener.name
        return name if name is not None else format_address(*self.listener.listen)

    @property
    def retry_count(self) -> int:
        # -1: every other upstream of the group the bridge picks from, which
        # DNS answers may grow or shrink after start.
        retries: Optional[int] = self.balancing.retries
        return -1 if retries is None else retries

    def options(self) -> Dict[str, Any]:
        """Every option by name, flat."""
        return {o.name: getattr(getattr(self, o.section), o.name) for o in OPTIONS}
