"""`kelix_pipeline`: data -> tokenizer -> LLM -> DiT -> evaluation -> register, gate, promote, in one flow run.

Every phase is a subflow (flows/data.py, train.py, evaluate.py, promote.py) and every stage a task with its own
MLflow run under the pipeline's run. Stages whose outputs exist for their key are skipped, so a rerun with
nothing changed takes seconds, a changed DiT setting reruns only the DiT stages and what follows, and a
stage killed mid-way resumes from its last checkpoint. With no services configured it runs on Prefect's
ephemeral API, MLflow in <repo>/mlflow.db and artifacts in ./artifacts.

    kelix pipeline run --preset tiny
    python -m flows.pipeline --preset tiny --set dit.train1.num_steps=50
"""
from __future__ import annotations

import sys
import time
from typing import Any

import flows  # noqa: F401  - environment defaults before Prefect is imported
from prefect import flow, get_run_logger

from flows.common import PIPELINE_RUN, Context, RunSettings, run_started
from flows.data import validate_data
from flows.evaluate import evaluate
from flows.promote import promote
from flows.report import prefect_location, publish_stages, publish_summary, summary_text
from flows.train import train_dit, train_llm, train_tokenizer
from kelix.rerun import up_to_date
from kelix.stages.catalogue import STAGES


@flow(name="kelix-pipeline")
def kelix_pipeline(
    preset: str | None = None,
    params: str | None = None,
    overrides: list[str] | None = None,
    runner: str = "local",
    data: str | None = None,
    artifacts: str | None = None,
    force: list[str] | None = None,
    release: bool = True,
    retries: int = 2,
    retry_delay: float = 10.0,
    mlflow_uri: str | None = None,
    runner_options: dict[str, Any] | None = None,
    progress: bool = True,
    force_before: float | None = None,
) -> dict[str, Any]:
    """Train, evaluate and release a Kelix model; returns the run summary (also printed and published).

    `force_before`: what `force` redoes, as a Unix time (default: when this flow run first started, so a
    retry of it keeps the forced stages its earlier tries finished)."""
    t0 = time.perf_counter()
    log = get_run_logger()
    force_before = (force_before or run_started()) if force else None
    settings = RunSettings(preset=preset, params=params, overrides=overrides or [], runner=runner, data=data,
                           artifacts=artifacts, force=force or [], force_before=force_before, retries=retries,
                           retry_delay=retry_delay, mlflow_uri=mlflow_uri, runner_options=runner_options or {},
                           progress=progress)
    ctx = Context(settings)  # a bad config fails here, before anything runs
    log.info("preset %s, runner %s, data %s, artifacts %s", ctx.cfg.preset, ctx.runner.kind, ctx.data_dir, ctx.artifacts)
    checked = validate_data(settings)  # stops the pipeline if the dataset fails validation
    log.info("data version %s", checked["data_version"])

    stages: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {"preset": ctx.cfg.preset, "runner": ctx.runner.kind, "data": str(ctx.data_dir),
                               "data_version": ctx.data_version, "artifacts": ctx.artifacts, "stages": stages}
    with ctx.parent_run(PIPELINE_RUN) as parent_run_id:
        child = settings.model_copy(update={"parent_run_id": parent_run_id})
        summary["mlflow_run_id"] = parent_run_id
        summary["mlflow"] = ctx.tracker.run_url(parent_run_id)
        try:
            for phase in (train_tokenizer, train_llm, train_dit):
                stages.update(phase(child))
            evaluated = evaluate(child)
            stages.update(evaluated["stages"])
            summary["eval_metrics"] = evaluated["stages"]["eval"]["metrics"]
            summary["grid"] = evaluated.get("grid")
            if release:
                summary["release"] = promote(child)
        except BaseException as exc:
            stages.update(getattr(exc, "kelix_stages", {}))  # a failed phase's finished stages
            raise
        finally:
            publish_stages(stages)
    summary["seconds"] = time.perf_counter() - t0
    summary["status"] = "finished"
    summary["prefect"] = prefect_location()
    publish_summary(summary)
    log.info("finished in %.1fs; summary in the 'kelix-summary' artifact and on stdout", summary["seconds"])
    print(summary_text(summary), flush=True)
    return summary


def run_from_args(args: Any) -> int:
    """Start the pipeline from parsed `kelix pipeline run` arguments; returns the exit code."""
    from kelix.cli import UserError
    from kelix.config import ConfigError

    try:
        # Resolve once up front so a bad config or runner is one clear line, not a failed flow run.
        ctx = Context(RunSettings(preset=args.preset, params=args.params, overrides=args.overrides,
                                  runner=args.runner, data=args.data, artifacts=args.artifacts))
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    options: dict[str, Any] = {}
    if args.runner == "kubernetes" and args.namespace:
        options["namespace"] = args.namespace
    if args.runner == "kubernetes" and args.schedule_timeout is not None:
        options["schedule_timeout"] = args.schedule_timeout or None
    started = time.time()
    try:
        kelix_pipeline(preset=args.preset, params=args.params, overrides=args.overrides, runner=args.runner,
                       data=args.data, artifacts=args.artifacts, force=args.force, force_before=started,
                       release=not args.no_release, retries=args.retries, retry_delay=args.retry_delay,
                       mlflow_uri=args.mlflow_uri, runner_options=options, progress=not args.no_progress)
    except Exception as exc:  # noqa: BLE001 - Prefect has logged the traceback; say what to do next
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"pipeline failed: {type(exc).__name__}: {first}\nFinished stages and the last checkpoints are kept: "
              f"fix the cause and rerun {_rerun_advice(ctx, args.force, started)} to resume.", file=sys.stderr)
        return 1
    return 0


def _rerun_advice(ctx: Context, force: list[str], started: float) -> str:
    """Which command resumes a failed run. Repeating --force would start over the forced stages this run
    already finished; dropping it would skip the forced stages it had not reached yet (their old outputs still
    count as finished). The stages built on a rerun stage rerun either way (their inputs changed)."""
    if not force:
        return "the same command"
    try:
        named = list(STAGES) if "all" in force else [n for n in force if n in STAGES]
        pending = [n for n in named if not up_to_date(ctx.store, n, ctx.keys[n], started)]
    except Exception:  # noqa: BLE001 - advice only: never hide the failure behind a second one
        return "the same command"
    if not pending:
        return "the same command without --force"
    return f"the same command with --force {' --force '.join(pending)} only"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from flows.cli import add_run_args
    from kelix.cli import UserError

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    add_run_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
