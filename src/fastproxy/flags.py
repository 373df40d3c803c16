"""Command-line parsing shared by `fastproxy` and its subcommands: a parser
whose flags of one value refuse to be given twice."""
from __future__ import annotations

import argparse
from typing import Any, Optional, Set

from .values import quote


class OnceParser(argparse.ArgumentParser):
    """An ArgumentParser that knows, per parse, which `Once` flags it has seen."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.given: Set[str] = set()
        return super().parse_known_args(args, namespace)


class Once(argparse.Action):
    """A flag of one value. argparse keeps the last of a flag given twice,
    which silently drops the first (a second --listen is no second
    listener): a mistake, said as one. Needs an OnceParser."""

    why = "give it once"

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        given: Set[str] = parser.given  # type: ignore[attr-defined]
        if self.dest in given:
            parser.error(f"{option_string}: {quote(values)}: is given twice: {self.why}")
        given.add(self.dest)
        setattr(namespace, self.dest, values)
