"""The `fastproxy` command: argv -> Proxy(**options).serve_forever(), or
with --config FILE the file's listeners; `fastproxy check ...` validates the
same arguments and prints what would run; `fastproxy top` (top.py) shows a
running proxy's stats endpoint live and `fastproxy demo` (demo.py) runs one
on loopback with traffic. The flags come from the option table (options.py).

A user mistake prints one line naming the flag (or the file's key) and the
value, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, NoReturn, Optional, Sequence

from . import __version__
from .check import describe
from .configfile import LOG_LEVELS, ConfigFileError, ProxyConfig, config_from_mapping, read_config
from .flags import Once, OnceParser
from .options import OPTIONS, SECTIONS
from .proxy import Proxy, choose_engine
from .values import ConfigError, quote

EXIT_USAGE = 2
USAGE = ("fastproxy [check] --listen ADDR --upstream SPEC [--upstream SPEC ...] [options]\n"
         "       fastproxy [check] --config FILE [options]\n"
         "       fastproxy top [ADDR] [--interval D] [--count N]\n"
         "       fastproxy demo [--duration D] [--forever]\n"
         "       fastproxy toxiproxy [--host H] [--port P] [--engine E] [--config FILE]")


class _Parser(OnceParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the value is in the message.
        self.exit(EXIT_USAGE, f"fastproxy: error: {message} (see fastproxy -h)\n")


class _OnceListen(Once):
    why = "a command line has one listener; several need a config file (--config)"


def build_parser(*, command_defaults: bool = True) -> argparse.ArgumentParser:
    """One flag per row of the option table, grouped by section.
    command_defaults=False leaves out the command's own defaults, so that
    only the flags given are in the result."""
    p = _Parser(
        prog="fastproxy",
        usage=USAGE,
        description="A TCP proxy that forwards at native speed (epoll + splice, no GIL). "
                    "`fastproxy check ...` validates the same arguments, binds nothing, prints what "
                    "would run and exits; `fastproxy top ADDR` shows a running proxy's stats endpoint "
                    "live; `fastproxy demo` runs one on loopback with traffic; `fastproxy toxiproxy` serves "
                    "toxiproxy's HTTP API (each has -h).",
        epilog="Durations (D) accept 5, 5s, 500ms, 2m, 1h; sizes 65536, 256k, 1m. "
               "Every option: docs/reference.md; the config file: docs/configuration.md.",
    )
    groups = {section: p.add_argument_group(title.lower()) for section, title in SECTIONS.items()}
    for o in OPTIONS:
        default = argparse.SUPPRESS if o.cli_default is None or not command_defaults else o.cli_default
        kw: Dict[str, Any] = {"dest": o.name, "default": default,
                              "help": f"{o.help} (default: {o.default_text()})"}
        if o.switch:
            kw["action"] = "store_true"
        else:
            kw["metavar"] = o.metavar
            kw["choices"] = o.choices
            kw["action"] = "append" if o.repeat else _OnceListen if o.name == "listen" else Once
        # Required ones are checked in main(): a config file may give them.
        groups[o.section].add_argument(o.cli_flag, **kw)
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, action=Once,
                   help="run the listeners of a TOML config file (docs/configuration.md); process flags "
                        "override its top level, listener flags its one listener")
    p.add_argument("--log-level", default=None, choices=LOG_LEVELS, action=Once, help="(default: info)")
    p.add_argument("--version", action="version", version=f"fastproxy {__version__}")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "top":
        from . import top
        return top.main(argv[1:])
    if argv and argv[0] == "demo":
        from . import demo
        return demo.main(argv[1:])
    if argv and argv[0] == "toxiproxy":
        from . import toxiproxy
        return toxiproxy.main(argv[1:])
    check = bool(argv) and argv[0] == "check"
    if check:
        argv = argv[1:]
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    path = args.pop("config", None)
    if path is not None:
        # Only the flags given: the file's values stand where none overrides them.
        args = vars(build_parser(command_defaults=False).parse_args(argv))
        del args["config"]
    else:
        missing = [o.cli_flag for o in OPTIONS if o.required and o.name not in args
                   and not (o.name == "upstreams" and args.get("route") == "sni")]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    log_level: Optional[str] = args.pop("log_level")
    names: List[str] = []   # the file's listeners, for an error that names one
    try:
        if path is None and not check:
            _log_to_stderr(log_level or "info", args.get("log_format", "text"))
            Proxy(**args).serve_forever()
            return 0
        if path is None:
            one = ProxyConfig.from_options(**args)
            pc = ProxyConfig(one.process, one.listeners, log_level=log_level)
        else:
            pc = config_from_file(path, args, log_level)
            names = [c.name for c in pc.listeners]
        if check:
            # The engine is chosen at start, FASTPROXY_ENGINE included:
            # check refuses what the run would.
            choose_engine(pc.process.engine)
            _write_out(describe(pc))
            return 0
        _log_to_stderr(pc.log_level or "info", pc.process.log_format)
        if path is None:
            Proxy.from_config(pc).serve_forever()
            return 0
        file_path = path
        first = iter([pc])

        def source() -> ProxyConfig:
            # The file as read above; then, at each reload (SIGHUP), read
            # again under the same flags. Its log_level applies once the
            # file is read and checked, and is taken back if the reload is
            # refused (log_format stays: the handler is the process's).
            pc = next(first, None)
            if pc is None:
                pc = config_from_file(file_path, args, log_level)
                logging.getLogger().setLevel((pc.log_level or "info").upper())
            return pc

        _CommandProxy.from_config(source).serve_forever()
    except ConfigError as exc:
        print(f"fastproxy: error: {error_line(exc, from_file=path, flags=args, names=names)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


class _CommandProxy(Proxy):
    """The command's Proxy: the log level is the command's, and a refused
    reload changes nothing, that included."""

    def reload(self, source: Any = None) -> None:
        root = logging.getLogger()
        level = root.level
        try:
            super().reload(source)
        except BaseException:
            root.setLevel(level)
            raise


def _write_out(text: str) -> None:
    # What the user typed may not encode on standard output (a file name's
    # bytes that are not UTF-8 are surrogates, 'é' in ASCII): it is then
    # escaped, as Python writes standard error, rather than a traceback.
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        encoding = sys.stdout.encoding or "utf-8"
        sys.stdout.write(text.encode(encoding, "backslashreplace").decode(encoding))


def _log_to_stderr(level: str, log_format: str = "text") -> None:
    # The command's logging; an embedding application configures its own
    # (Proxy ignores log_format).
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s fastproxy %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger,
    message, and exception (the traceback's text) when there is one, for
    log shippers that parse lines."""

    def format(self, record: logging.LogRecord) -> str:
        entry: Dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def config_from_file(path: str, flags: Dict[str, Any], log_level: Optional[str]) -> ProxyConfig:
    """The file's ProxyConfig with the flags given over it."""
    mapping = read_config(path)
    # The command's own defaults (it raises the fd limit) sit under the
    # file's values, as under the flags.
    for o in OPTIONS:
        if o.cli_default is not None:
            table = mapping if o.scope == "process" else mapping.setdefault("defaults", {})
            if isinstance(table, dict):
                table.setdefault(o.name, o.cli_default)
    overrides = dict(flags)
    if log_level is not None:
        overrides["log_level"] = log_level
    return config_from_mapping(mapping, path, overrides=overrides)


def error_line(exc: ConfigError, *, from_file: Optional[str] = None, flags: Mapping[str, Any] = {},
               names: Sequence[str] = ()) -> str:
    """A flag's mistake names the flag; a file's names the file and key
    (`listeners[i].key` for a listener's, by its name among `names`, the
    file's listeners in order), also when it shows only once the proxy
    starts (a hooks file, a port in use, a name that does not resolve)."""
    if isinstance(exc, ConfigFileError):
        return str(exc)
    if from_file is None or (is_option_field(exc.field) and exc.field in flags):
        if is_option_field(exc.field):
            return f"{flag_of(exc.field)}: {quote(exc.value)}: {exc.problem}"
        return str(exc)
    key = exc.field
    if exc.listener is not None and exc.listener in names:
        key = f"listeners[{list(names).index(exc.listener)}].{exc.field}"
    return f"{from_file}: {key}: {quote(exc.value)}: {exc.problem}"


def is_option_field(field: str) -> bool:
    return field == "upstream" or any(o.name == field for o in OPTIONS)


def flag_of(field: str) -> str:
    """The flag a CLI user typed for a field a ConfigError names."""
    if field == "upstream":
        return "--upstream"
    known = {o.name: o.cli_flag for o in OPTIONS}
    return known.get(field, "--" + field.replace("_", "-") if field.islower() else field)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
