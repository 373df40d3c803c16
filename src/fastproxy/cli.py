"""The `fastproxy` command: argv -> Proxy(**options).serve_forever(); the
flags come from the option table (options.py).

A user mistake prints one line naming the flag and the value, and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Dict, List, NoReturn, Optional

from . import __version__
from .options import OPTIONS, SECTIONS
from .proxy import Proxy
from .values import ConfigError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the value is in the message.
        self.exit(EXIT_USAGE, f"fastproxy: error: {message} (see fastproxy -h)\n")


def build_parser() -> argparse.ArgumentParser:
    """One flag per row of the option table, grouped by section."""
    p = _Parser(
        prog="fastproxy",
        description="A TCP proxy that forwards at native speed (epoll + splice, no GIL).",
        epilog="Durations (D) accept 5, 5s, 500ms, 2m, 1h; sizes 65536, 256k, 1m. "
               "Every option: docs/reference.md.",
    )
    groups = {section: p.add_argument_group(title.lower()) for section, title in SECTIONS.items()}
    for o in OPTIONS:
        default = argparse.SUPPRESS if o.cli_default is None else o.cli_default
        kw: Dict[str, Any] = {"dest": o.name, "default": default,
                              "help": f"{o.help} (default: {o.default_text()})"}
        if o.switch:
            kw["action"] = "store_true"
        else:
            kw["metavar"] = o.metavar
            kw["choices"] = o.choices
            if o.repeat:
                kw["action"] = "append"
        groups[o.section].add_argument(o.cli_flag, required=o.required, **kw)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--version", action="version", version=f"fastproxy {__version__}")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = vars(build_parser().parse_args(argv))
    log_level = args.pop("log_level")
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s fastproxy %(levelname)s %(message)s")
    try:
        Proxy(**args).serve_forever()
    except ConfigError as exc:
        print(f"fastproxy: error: {flag_of(exc.field)}: {exc.value!r}: {exc.problem}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def flag_of(field: str) -> str:
    """The flag a CLI user typed for a field a ConfigError names."""
    if field == "upstream":
        return "--upstream"
    known = {o.name: o.cli_flag for o in OPTIONS}
    return known.get(field, "--" + field.replace("_", "-") if field.islower() else field)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
