"""The stage command line: `kelix stage run|list|keys` and `python -m kelix.stages ...` (the subprocess runner's
and the Kubernetes Jobs' entry point)."""
from __future__ import annotations

import argparse
import sys

from kelix.artifacts import SUCCESS, ArtifactStore, store_uri
from kelix.config import KelixConfig
from kelix.data.format import DatasetError
from kelix.rerun import EXIT_BUSY
from kelix.stages import catalogue
from kelix.stages.catalogue import ORDER, get_stage
from kelix.stages.keys import data_fingerprint, stage_keys
from kelix.stages.run import StageBusy, StageInputMissing, run_stage


def _cmd_list(args: argparse.Namespace) -> int:
    for stage in catalogue.STAGES.values():  # read at call time: tests swap the catalogue
        deps = ", ".join(stage.inputs) or "data"
        print(f"{stage.name:12s} <- {deps:32s} {stage.description}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from kelix.cli import UserError
    from kelix.config_cli import config_from_args

    try:
        get_stage(args.name)
    except KeyError as exc:  # only the name: a KeyError from inside a stage is a bug, and keeps its traceback
        raise UserError(str(exc).strip('"')) from exc
    cfg = config_from_args(args)
    data_dir = args.data or cfg.data.root
    _join_torchrun(cfg)
    from kelix.tracking import stage_run_from_env

    try:
        # A child process or pod logs into the MLflow run its orchestrator opened (MLFLOW_RUN_ID).
        with stage_run_from_env():
            force = args.force_before if args.force_before is not None else args.force
            result = run_stage(args.name, cfg, data_dir, args.artifacts, force=force)
    except StageBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except (StageInputMissing, FileNotFoundError, DatasetError) as exc:
        raise UserError(str(exc).strip('"')) from exc
    state = "skipped (already done)" if result.skipped else f"done in {result.seconds:.1f}s"
    print(f"{result.name} [{result.key}] {state} -> {result.out_dir}")
    for k, v in sorted(result.metrics.items()):
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


def _join_torchrun(cfg: KelixConfig) -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group with the configured strategy."""
    import os

    from kelix.train import distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault(distributed.ENV_STRATEGY, cfg.runtime.distributed if cfg.runtime.distributed != "none" else "ddp")
        distributed.init_from_env()


def _cmd_keys(args: argparse.Namespace) -> int:
    from kelix.config_cli import config_from_args

    from kelix.cli import UserError

    cfg = config_from_args(args)
    try:
        keys = stage_keys(cfg, data_fingerprint(args.data or cfg.data.root))
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc
    store = ArtifactStore(store_uri(args.artifacts, cfg.runtime.artifacts))
    for name, key in keys.items():
        status = (store.status(name, key) or {}).get("status", "-")
        stale = store.stale_inputs(name, key) if status == SUCCESS else []
        damaged = store.damaged(name, key) if status == SUCCESS else []
        print(f"{name:12s} {key}  {status}" + (f" (stale: {', '.join(stale)} rerun since)" if stale else "")
              + (f" (damaged: {'; '.join(damaged[:2])})" if damaged else ""))
    return 0


def _add_commands(sub) -> None:
    from kelix.config_cli import add_config_args

    run = sub.add_parser("run", help="run one stage (skipped when its outputs for this key exist)")
    run.add_argument("name", help=f"stage name: {', '.join(ORDER)}")
    add_config_args(run)
    run.add_argument("--data", default=None, help="dataset folder (default: data.root of the config)")
    run.add_argument("--artifacts", default=None, help="artifact store URI (default: $KELIX_ARTIFACTS or runtime.artifacts)")
    run.add_argument("--force", action="store_true",
                     help="start a finished stage over (its outputs and checkpoints are deleted); an unfinished one resumes")
    run.add_argument("--force-before", type=float, default=None, metavar="UNIX_TIME",
                     help="like --force, but only if the stage finished before this time (what the runners pass, so "
                          "a retry keeps a forced stage that finished)")
    run.set_defaults(func=_cmd_run)
    lst = sub.add_parser("list", help="list the stages and what they read")
    lst.set_defaults(func=_cmd_list)
    keys = sub.add_parser("keys", help="print each stage's key and status for a config")
    add_config_args(keys)
    keys.add_argument("--data", default=None)
    keys.add_argument("--artifacts", default=None, help="artifact store URI (default: $KELIX_ARTIFACTS or runtime.artifacts)")
    keys.set_defaults(func=_cmd_keys)


def register(sub) -> None:
    stage = sub.add_parser("stage", help="run or inspect single stages")
    stage_sub = stage.add_subparsers(dest="stage_command", metavar="ACTION")
    stage_sub.required = True
    _add_commands(stage_sub)


def main(argv: list[str] | None = None) -> int:
    from kelix.cli import UserError
    from kelix.env import apply_env_defaults

    apply_env_defaults()
    parser = argparse.ArgumentParser(prog="python -m kelix.stages", description="Run one Kelix stage.")
    sub = parser.add_subparsers(dest="stage_command", metavar="ACTION")
    sub.required = True
    _add_commands(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
