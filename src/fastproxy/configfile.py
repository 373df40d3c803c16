"""The config file: a TOML file, or the mapping it holds, -> a validated
ProxyConfig (the process's options and one Config per listener).

The top level holds the process-scope options and log_level; [defaults]
holds listener options every listener takes unless it sets them; each
[[listeners]] table is one listener. Keys are the option table's names
(options.py). A mistake is a ConfigFileError: one line naming the file, the
key path (`listeners[1].upstreams[0]`) and the value. The format is
described in docs/configuration.md.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the package needs 3.11; tomli is the same parser
    import tomli as tomllib

from .config import Config
from .options import OPTIONS
from .upstreams import MAX_WEIGHT, SPEC_FORM, Upstream, parse_upstream, parse_upstream_address, parse_upstreams
from .values import (
    MAX_CONNECTIONS,
    UNIX_PREFIX,
    ConfigError,
    clip,
    format_address,
    parse_choice,
    parse_count,
    plain_ip,
    quote,
    refuse_nul,
)

__all__ = [
    "ConfigFileError",
    "LOG_LEVELS",
    "ProxyConfig",
    "config_from_mapping",
    "load_config",
    "read_config",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
PROCESS_KEYS = tuple(o.name for o in OPTIONS if o.scope == "process")
LISTENER_KEYS = tuple(o.name for o in OPTIONS if o.scope == "listener")
TOP_KEYS = PROCESS_KEYS + ("log_level", "defaults", "listeners")
# Each listener's own: one value in [defaults] would give every listener
# the same name and address.
OWN_KEYS = ("listen", "name")
DEFAULTS_KEYS = tuple(k for k in LISTENER_KEYS if k not in OWN_KEYS)
UPSTREAM_KEYS = ("address", "weight", "max_connections", "backup")
# The origin of a value given by the caller (the command's flags), not by
# the file: its mistakes name the option, which the CLI turns into a flag.
_OVERRIDE = "override"


class ConfigFileError(ConfigError):
    """A mistake in a config file. `field` is the key path (empty for the
    file as a whole); `source` the file (None for a mapping); `line` where
    the TOML parser gives one."""

    def __init__(self, source: Optional[str], key: str, value: object, problem: str, *,
                 line: Optional[int] = None, column: Optional[int] = None, show_value: bool = True) -> None:
        super().__init__(key, value, problem)
        self.source = source
        self.line = line
        parts: List[str] = []
        if source is not None:
            # A file name may hold a line break, a NUL or bytes that are not
            # UTF-8 (surrogates): shown escaped, as a key is.
            where = source if isinstance(source, str) and source.isprintable() else repr(source)
            where = where if line is None else f"{where}:{line}"
            parts.append(where if column is None else f"{where}:{column}")
        if key:
            # A key is any string in TOML ("\n" = 1) or a mapping: one with
            # a line break or a control character is shown escaped, so the
            # error stays one line, and a long one capped, as values are.
            parts.append(clip(key) if key.isprintable() else quote(key))
        if show_value:
            parts.append(quote(value))
        parts.append(problem)
        self.args = (": ".join(parts),)


@dataclass(frozen=True)
class ProxyConfig:
    """What one fastproxy process runs: its process options and its
    listeners, each a full Config whose process section is `process`."""

    process: Any
    listeners: Tuple[Config, ...]
    log_level: Optional[str] = None
    source: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.listeners:
            raise ConfigError("listeners", (), "needs at least one listener")
        for i, config in enumerate(self.listeners):
            if config.process != self.process:
                raise ConfigError(f"listeners[{i}].process", config.process,
                                  "differs from the process options: listeners share one process")

    @classmethod
    def from_options(cls, upstream: Any = None, **options: Any) -> "ProxyConfig":
        """One listener from `Proxy`'s keywords (the command line without
        --config): the same structure a config file gives."""
        config = Config.build(upstream=upstream, **options)
        return cls(process=config.process, listeners=(config,))


def load_config(path: Union[str, "os.PathLike[str]"],
                overrides: Optional[Mapping[str, Any]] = None) -> ProxyConfig:
    """Read and validate a TOML config file (see config_from_mapping for
    `overrides`)."""
    source = os.fspath(path)
    return config_from_mapping(read_config(source), source, overrides=overrides)


# Far more than any configuration (a thousand listeners fit in a few
# hundred KiB): past it the file is not one (/dev/zero, a log), and is not
# read into memory.
MAX_CONFIG_FILE = 4 << 20


def read_config(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """The TOML document of a file, as a dict; not validated yet."""
    source = os.fspath(path)

    def fail(problem: str, line: Optional[int] = None, column: Optional[int] = None) -> ConfigFileError:
        return ConfigFileError(source, "", None, problem, line=line, column=column, show_value=False)

    try:
        refuse_nul(source, "config")
    except ConfigError as exc:
        raise fail(exc.problem) from None
    try:
        with open(source, "rb") as f:
            # A pipe (--config <(...)) is read as a file is, up to the bound.
            data = f.read(MAX_CONFIG_FILE + 1)
    except FileNotFoundError:
        raise fail("no such file") from None
    except IsADirectoryError:
        raise fail("is a directory, not a config file") from None
    except PermissionError:
        raise fail("cannot be read: permission denied") from None
    except OSError as exc:
        raise fail(f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_FILE:
        raise fail(f"is larger than {MAX_CONFIG_FILE} bytes: not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise fail(f"is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}", line) from None
    try:
        return tomllib.loads(text)
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively: a few
        # hundred levels exhaust Python's stack. No configuration nests so.
        raise fail("invalid TOML: arrays or tables nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib ends its message with the place: "(at line 3, column 9)"
        # or "(at end of document)"; the place goes first, as FILE:LINE:COL.
        message = str(exc)
        at = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
        if at is not None:
            raise fail(f"invalid TOML: {at.group(1)}", int(at.group(2)), int(at.group(3))) from None
        end = re.fullmatch(r"(.*) \(at end of document\)", message, re.DOTALL)
        if end is not None:
            last_line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
            raise fail(f"invalid TOML: {end.group(1)} at the end of the file", last_line) from None
        raise fail(f"invalid TOML: {message}") from None


def config_from_mapping(mapping: Mapping[str, Any], source: Optional[str] = None, *,
                        overrides: Optional[Mapping[str, Any]] = None) -> ProxyConfig:
    """A config file's document (a dict as tomllib gives it) -> ProxyConfig.

    `overrides`: option values that win over the file's (the command's
    flags), by option name, and log_level. Process options replace the top
    level's; listener options are only allowed when the file has one
    listener, and replace its values. Their mistakes are plain ConfigErrors
    naming the option, not the file."""
    return _Reader(source).proxy_config(mapping, dict(overrides or {}))


def _clash(a: Tuple[str, int], b: Tuple[str, int]) -> str:
    """Why two listen addresses cannot both be bound: "same" (one address,
    however spelled), the overlap (a wildcard takes the other's port), or
    "" when both can."""
    (host, port), (other, other_port) = a, b
    if host.startswith(UNIX_PREFIX) or other.startswith(UNIX_PREFIX):
        return "same" if host == other else ""   # a path or an abstract name
    # Port 0: the kernel picks a free port for each.
    if port == 0 or port != other_port:
        return ""
    if "" in (host, other):
        return ":PORT is that port on every address"
    one, two = plain_ip(host), plain_ip(other)
    if one is None or two is None:
        return "same" if host == other else ""   # names: as written
    ips = (one, two)
    if one == two and host.partition("%")[2] == other.partition("%")[2]:
        return "same"
    for ip, spelled in zip(ips, (host, other)):
        # "::" takes IPv4 too (dual stack, the kernel's default); 0.0.0.0 every IPv4 address.
        if ip.is_unspecified and (ip.version == 6 or ips[0].version == ips[1].version):
            return f"{spelled} is that port on every {'address' if ip.version == 6 else 'IPv4 address'}"
    return ""

class _Reader:
    """Validation of one document; every error names `source`."""

    def __init__(self, source: Optional[str]) -> None:
        self.source = source

    def error(self, key: str, value: object, problem: str) -> ConfigFileError:
        return ConfigFileError(self.source, key, value, problem)

    def missing(self, key: str, problem: str) -> ConfigFileError:
        return ConfigFileError(self.source, key, None, problem, show_value=False)

    # ---- the document

    def proxy_config(self, mapping: Mapping[str, Any], overrides: Dict[str, Any]) -> ProxyConfig:
        if not isinstance(mapping, Mapping):
            raise self.error("", mapping, "expected a table of keys (a TOML document)")
        known = set(TOP_KEYS) - {"defaults", "listeners"}
        for name in overrides:
            if name not in known and name not in LISTENER_KEYS:
                raise ConfigError(name, overrides[name], "is not an option (see docs/reference.md)")
        self.check_keys(mapping, "", TOP_KEYS, "top")
        log_level = overrides.get("log_level", mapping.get("log_level"))
        if log_level is not None:
            try:
                parse_choice(log_level, "log_level", LOG_LEVELS)
            except ConfigError as exc:
                if "log_level" in overrides:
                    raise
                raise self.error("log_level", log_level, exc.problem) from None
        process: Dict[str, Any] = {k: mapping[k] for k in PROCESS_KEYS if k in mapping}
        origin = {k: "" for k in process}
        for k in PROCESS_KEYS:
            if k in overrides:
                process[k] = overrides[k]
                origin[k] = _OVERRIDE
        defaults = mapping.get("defaults", {})
        if not isinstance(defaults, Mapping):
            raise self.error("defaults", defaults, "expected a table: [defaults]")
        self.check_keys(defaults, "defaults", DEFAULTS_KEYS, "defaults")
        tables = self.listener_tables(mapping)
        per_listener = {k: v for k, v in overrides.items() if k in LISTENER_KEYS}
        if per_listener and len(tables) != 1:
            name = next(k for k in LISTENER_KEYS if k in per_listener)
            raise ConfigError(name, per_listener[name], f"is a listener option: it can only override a config "
                                                        f"file of one listener, and this one has {len(tables)}")
        configs = []
        for i, table in enumerate(tables):
            configs.append(self.listener(i, table, defaults, per_listener, process, origin))
        self.check_unique(configs, tables, per_listener)
        return ProxyConfig(process=configs[0].process, listeners=tuple(configs),
                           log_level=log_level, source=self.source)

    def listener_tables(self, mapping: Mapping[str, Any]) -> List[Mapping[str, Any]]:
        tables = mapping.get("listeners")
        if tables is None or (isinstance(tables, list) and not tables):
            raise self.missing("", "has no listeners: add a [[listeners]] table with listen and upstreams")
        if isinstance(tables, Mapping):
            raise self.error("listeners", tables, "expected an array of tables: [[listeners]], not [listeners]")
        if not isinstance(tables, list):
            raise self.error("listeners", tables, "expected an array of tables: [[listeners]]")
        for i, table in enumerate(tables):
            if not isinstance(table, Mapping):
                raise self.error(f"listeners[{i}]", table, "expected a table: [[listeners]]")
            self.check_keys(table, f"listeners[{i}]", LISTENER_KEYS, "listener")
        return tables

    def listener(self, i: int, table: Mapping[str, Any], defaults: Mapping[str, Any],
                 overrides: Mapping[str, Any], process: Mapping[str, Any], process_origin: Mapping[str, str],
                 ) -> Config:
        here = f"listeners[{i}]"
        values: Dict[str, Any] = {}
        origin = dict(process_origin)
        for layer, where in ((defaults, "defaults"), (table, here), (overrides, _OVERRIDE)):
            for key, value in layer.items():
                values[key] = value
                origin[key] = where
        if "listen" not in values:
            raise self.missing(here, "has no listen (required)")
        if "upstreams" not in values:
            if values.get("route") != "sni":
                raise self.missing(here, "has no upstreams (required; here or in [defaults])")
        elif origin["upstreams"] == _OVERRIDE:
            values["upstreams"] = parse_upstreams(values["upstreams"])
        else:
            values["upstreams"] = self.upstreams(values["upstreams"], origin["upstreams"] + ".upstreams")
        mode = values.get("unix_mode")
        if isinstance(mode, int) and not isinstance(mode, bool) and origin["unix_mode"] != _OVERRIDE:
            # TOML reads 660 as decimal (0o1224, sticky and no read), and
            # cannot write 0660: a mode is octal text here, as for chmod.
            raise self.error(f"{origin['unix_mode']}.unix_mode", mode,
                             'a TOML number is decimal: write the octal mode as text, "660" or "0660"')
        if isinstance(values.get("routes"), list) and origin["routes"] != _OVERRIDE:
            values["routes"] = self.route_tables(values["routes"], origin["routes"] + ".routes")
        try:
            return Config.build(**process, **values)
        except ConfigError as exc:
            where = origin.get(exc.field, here)
            if where == _OVERRIDE:
                raise
            raise self.error(f"{where}.{exc.field}" if where else exc.field, exc.value, exc.problem) from None

    # ---- upstreams: strings in the command line's form, or tables

    def upstreams(self, value: object, path: str) -> Tuple[Upstream, ...]:
        if not isinstance(value, list):
            raise self.error(path, value, f'expected a list of upstreams, e.g. ["HOST:PORT", '
                                          f'{{ address = "HOST:PORT", weight = 2 }}]')
        group = []
        for j, item in enumerate(value):
            here = f"{path}[{j}]"
            if isinstance(item, Mapping):
                group.append(self.upstream_table(item, here))
            elif isinstance(item, str):
                try:
                    group.append(parse_upstream(item, here))
                except ConfigError as exc:
                    raise self.error(here, item, exc.problem) from None
            else:
                raise self.error(here, item, f"expected {SPEC_FORM} or a table with an address")
        try:
            return parse_upstreams(group, path)
        except ConfigError as exc:
            raise self.error(path, exc.value, exc.problem) from None

    def route_tables(self, value: List[Any], path: str) -> List[Any]:
        # A route's upstreams take the same forms as a listener's (strings
        # or tables); the rest is checked by Config.build (parse_routes).
        out: List[Any] = []
        for j, item in enumerate(value):
            if isinstance(item, Mapping) and "upstreams" in item:
                item = dict(item, upstreams=list(self.upstreams(item["upstreams"], f"{path}[{j}].upstreams")))
            out.append(item)
        return out

    def upstream_table(self, table: Mapping[str, Any], path: str) -> Upstream:
        self.check_keys(table, path, UPSTREAM_KEYS, "upstream")
        if "address" not in table:
            raise self.missing(path, "has no address (required)")
        address = table["address"]
        try:
            parse_upstream_address(address, "address")
        except ConfigError as exc:
            raise self.error(f"{path}.address", address, exc.problem) from None
        counts: Dict[str, Optional[int]] = {"weight": 1, "max_connections": None}
        for key, low, high in (("weight", 0, MAX_WEIGHT), ("max_connections", 1, MAX_CONNECTIONS)):
            if key in table:
                try:
                    counts[key] = parse_count(table[key], key, low=low, high=high)
                except ConfigError as exc:
                    raise self.error(f"{path}.{key}", table[key], exc.problem) from None
        backup = table.get("backup", False)
        if not isinstance(backup, bool):
            raise self.error(f"{path}.backup", backup, "must be true or false")
        try:
            return Upstream(address, counts["weight"] or 0, counts["max_connections"], backup)
        except ConfigError as exc:   # what only the whole upstream decides (srv: with a weight)
            raise self.error(path, exc.value, exc.problem) from None

    # ---- keys and uniqueness

    def check_keys(self, table: Mapping[str, Any], path: str, allowed: Sequence[str], where: str) -> None:
        for key, value in table.items():
            if key in allowed:
                continue
            here = f"{path}.{key}" if path else str(key)
            raise self.error(here, value, self.misplaced(str(key), allowed, where))

    @staticmethod
    def misplaced(key: str, allowed: Sequence[str], where: str) -> str:
        """Why `key` may not be here, and what the user may have meant."""
        spelled = key.replace("-", "_")
        if spelled != key and spelled in allowed:
            return f"keys are written with underscores: {spelled}"
        if where != "upstream":
            if where != "top" and (spelled in PROCESS_KEYS or spelled == "log_level"):
                return "is a process option: set it at the top of the file, before the first [table]"
            if where == "top" and spelled in OWN_KEYS:
                # Not [defaults]: that refuses it too.
                return "is each listener's own: set it in the [[listeners]] tables"
            if where == "top" and spelled in LISTENER_KEYS:
                return "is a listener option: set it in [defaults] or in a [[listeners]] table"
            if where == "defaults" and spelled in OWN_KEYS:
                return "is each listener's own: set it in the [[listeners]] tables"
        what = {"top": "a top-level key", "defaults": "a listener option",
                "listener": "a listener option", "upstream": "an upstream key"}[where]
        close = difflib.get_close_matches(spelled, allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        if where == "upstream":
            hint += f"; an upstream has {', '.join(UPSTREAM_KEYS)}"
        return f"is not {what}{hint}"

    def check_unique(self, configs: List[Config], tables: List[Mapping[str, Any]],
                     overrides: Mapping[str, Any]) -> None:
        """No two listeners on one address, nor with one name (stats and
        logs tell listeners apart by name)."""
        def written(i: int, key: str) -> object:
            value = overrides.get(key, tables[i].get(key))
            return value if value is not None else configs[i].name

        for i, config in enumerate(configs):
            for j in range(i):
                clash = _clash(config.listener.listen, configs[j].listener.listen)
                if clash == "same":
                    raise self.error(f"listeners[{i}].listen", written(i, "listen"),
                                     f"is also the listen address of listeners[{j}]")
                if clash:
                    raise self.error(f"listeners[{i}].listen", written(i, "listen"),
                                     f"overlaps listeners[{j}].listen {written(j, 'listen')!r}: {clash}")
        names: Dict[str, int] = {}
        for i, config in enumerate(configs):
            name = config.name
            if name in names:
                problem = f"is also the name of listeners[{names[name]}] (names must be unique)"
                if config.listener.name is not None:
                    raise self.error(f"listeners[{i}].name", name, problem)
                raise self.error(f"listeners[{i}].listen", name,
                                 f"{problem}; a listener without a name is named by its listen address: give it a name")
            names[name] = i
