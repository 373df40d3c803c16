"""docs/reference.md, rendered from the option table:
`python -m fastproxy.reference > docs/reference.md` (a test compares)."""

from __future__ import annotations

import sys

from .options import OPTIONS, SECTIONS

__all__ = ["reference_markdown"]


def reference_markdown() -> str:
    """docs/reference.md: every option, by section, from this table."""
    out = [
        "# Option reference",
        "",
        "Generated from `src/fastproxy/options.py` by `python -m fastproxy.reference > docs/reference.md`;",
        "a test fails when this page and the table differ. Each option has one name: the `Proxy`",
        "keyword and config key as written here, the flag with dashes. Durations (D) accept `5`, `5s`,",
        "`500ms`, `2m`, `1h`; sizes accept `65536`, `256k`, `1m`. Repeatable flags are lists in Python;",
        "any other flag is given at most once (several listeners take a config file, docs/configuration.md).",
        "Scope `process`: one value for the whole process; `listener`: per listener.",
        "",
    ]
    for section, title in SECTIONS.items():
        rows = [o for o in OPTIONS if o.section == section]
        out += [f"## {title}", "", "| option | flag | default | scope | meaning |", "|---|---|---|---|---|"]
        for o in rows:
            value = o.metavar or ("{" + ",".join(o.choices) + "}" if o.choices else "")
            flag = f"`{o.cli_flag}{' ' + value if value and not o.switch else ''}`"
            meaning = o.help.replace("|", "\\|")
            out.append(f"| `{o.name}` | {flag} | {o.default_text()} | {o.scope} | {meaning} |")
        out.append("")
    out += [
        "## Python only",
        "",
        "`Proxy` also takes `upstream` (one upstream, the same as `upstreams=[...]` of one),",
        "`sock` (a bound, listening TCP socket of the application's, instead of `listen`; the proxy",
        "serves a duplicate and closes only that), `on_connect`, `on_data`, `on_close` (hooks),",
        "`health_check` (a callable `(host, port) -> bool` used by active health checks) and `clock`",
        "(what time windows read): objects and callables have no flag.",
        "",
        "## Command only",
        "",
        "`--config FILE` (run the listeners of a TOML config file: docs/configuration.md),",
        "`--log-level {debug,info,warning,error}` (default info), `--version`, `--help`;",
        "`fastproxy check ...` validates the same arguments and prints what would run.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(reference_markdown())
