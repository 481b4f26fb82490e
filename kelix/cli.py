"""The `kelix` command line: one entry point, each area registers its own sub-commands.

A module listed in COMMAND_MODULES exposes `register(subparsers)`, adding parsers whose `func(args) -> int`
does the work. Keeping each area's commands beside its code keeps this file short and the owners separate.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from kelix.env import apply_env_defaults

COMMAND_MODULES = (
    "kelix.config_cli",
    "kelix.data.cli",
    "kelix.stages.cli",
    "kelix.eval.cli",
    "kelix.registry.cli",
    "kelix.use_cli",
    "kelix.plan",
    "flows.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kelix", description="Train, evaluate and release Kelix models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # An area whose commands are not written yet; any other missing import is a real error.
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_env_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished stages and the last checkpoints are kept, rerun to resume", file=sys.stderr)
        return 130
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, bad config): printed without a traceback."""


if __name__ == "__main__":
    sys.exit(main())
