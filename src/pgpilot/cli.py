"""The ``pgpilot`` command: one entry point, one subcommand per capability.

Each subcommand lives with the code it drives and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up, importing a
subcommand's module when that subcommand is used so ``pgpilot proxy`` never pays for the
EXPLAIN analyzer's imports and the other way round.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pgpilot import VERSION_LINE

# name -> (module holding add_arguments/run, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "proxy": ("pgpilot.proxy.command", "run the PgBouncer-compatible pooling proxy"),
    "explain": ("pgpilot.explain.command", "analyze a query plan and name what makes it slow"),
    "advise": ("pgpilot.explain.advise_command", "propose indexes and statistics, and prove them"),
    "top": ("pgpilot.proxy.top", "watch a running pooler's queries, most time first"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgpilot",
        description="Make Python applications fast on PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=VERSION_LINE)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported (they can be heavy).
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
