"""The `peftu` command: one module per subcommand, each with `add_parser(subparsers)` and `run(args)`.

Building the parser imports only light modules (argparse, pydantic, `peftu.config`,
the task names), so `peftu --help` and every subcommand's `--help` start at once;
torch, Ray and the rest are imported inside the `run` functions. Errors meant for
the user (`PeftuError`) are printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from peftu.cli import base, bench, data, evaluate, fit, pplug, serve, store, tune
from peftu.errors import PeftuError

COMMANDS = (data, base, fit, store, evaluate, tune, bench, serve, pplug)
"""The subcommands, in the order `peftu --help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftu", description="One personal adapter per user, "
                                     "trained and served on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except PeftuError as e:
        print(f"peftu: error: {e}", file=sys.stderr)
        sys.exit(2)
