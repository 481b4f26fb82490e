"""`kelix pipeline ...`: run the end-to-end pipeline, create the work pools.

    kelix pipeline run [--preset tiny] [--params params.yaml] [--set k=v ...] [--runner local|subprocess|kubernetes]
                       [--data DIR] [--artifacts URI]
    kelix pipeline pools      create the kelix-process and kelix-k8s work pools on the Prefect server
"""
from __future__ import annotations

import argparse

from kelix.config_cli import add_config_args


def add_run_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--runner", choices=("local", "subprocess", "kubernetes"), default="local",
                        help="where stages run: this process, a child process each, or a Kubernetes Job each")
    parser.add_argument("--data", default=None, help="dataset folder (default: data.root of the config)")
    parser.add_argument("--artifacts", default=None,
                        help="artifact store: a folder or s3://bucket/prefix (default: $KELIX_ARTIFACTS or runtime.artifacts)")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="start this stage over and rerun the stages built on it, even if finished "
                             "(repeatable; 'all' for every stage)")
    parser.add_argument("--no-release", action="store_true", help="stop after evaluation: no register, gate, promote")
    parser.add_argument("--retries", type=int, default=2, help="retries of a stage after a transient failure")
    parser.add_argument("--retry-delay", type=float, default=10.0, help="first retry delay (s), doubling")
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db)")
    parser.add_argument("--namespace", default=None, help="Kubernetes namespace (default: runtime.namespace)")
    parser.add_argument("--schedule-timeout", type=float, default=None, metavar="SECONDS",
                        help="kubernetes runner: fail a stage whose pods have not started after this long "
                             "(default 1800; 0 waits forever, e.g. for a GPU pool that scales up from zero)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (in-process runner)")


def _run(args: argparse.Namespace) -> int:
    from flows.pipeline import run_from_args

    return run_from_args(args)


def _pools(args: argparse.Namespace) -> int:
    from flows.pools import ensure_pools

    for line in ensure_pools(k8s_template=args.k8s_template):
        print(line)
    return 0


def register(sub) -> None:
    pipeline = sub.add_parser("pipeline", help="run the end-to-end Prefect pipeline")
    pipeline_sub = pipeline.add_subparsers(dest="pipeline_command", metavar="ACTION")
    pipeline_sub.required = True
    run = pipeline_sub.add_parser("run", help="data -> tokenizer -> LLM -> DiT -> eval -> register/gate/promote")
    add_run_args(run)
    run.set_defaults(func=_run)
    pools = pipeline_sub.add_parser("pools", help="create the kelix-process and kelix-k8s work pools (idempotent)")
    pools.add_argument("--k8s-template", default=None, help="base job template (default: infra/k8s/job-template.json)")
    pools.set_defaults(func=_pools)
