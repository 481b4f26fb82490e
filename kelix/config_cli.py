"""`kelix config show`: print the resolved config and its hash."""
from __future__ import annotations

import argparse

import yaml

from kelix.config import PRESETS, ConfigError, config_hash, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The config flags every command that resolves a config shares."""
    parser.add_argument("--preset", choices=PRESETS, default=None, help="model/data size preset (default: tiny, or params file's)")
    parser.add_argument("--params", default=None, help="params.yaml overriding preset fields")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set tokenizer.num_codebooks=8 (repeatable)")


def config_from_args(args: argparse.Namespace):
    from kelix.cli import UserError

    try:
        return load_config(args.preset, args.params, args.overrides)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc


def _show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    print(f"# config hash: {config_hash(cfg)}")
    return 0


def register(sub) -> None:
    config = sub.add_parser("config", help="inspect the resolved configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    config_sub.required = True
    show = config_sub.add_parser("show", help="print the resolved config (preset + params + --set) and its hash")
    add_config_args(show)
    show.set_defaults(func=_show)
