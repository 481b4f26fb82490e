"""The evaluation phase: the `eval` stage over the trained parts, or a registered model (the nightly check).

`evaluate(settings)` runs the catalogue's eval stage (skipped when its outputs for this key exist) and
publishes its report, metrics and sample grid as artifacts. `evaluate(settings, model="models:/kelix@champion")`
scores a registered version on the current dataset instead, logs it as an MLflow run and compares it with
the metrics it was promoted on: a drop beyond the release tolerance fails the run, so a dataset change that
hurts the champion is noticed the next morning.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import flows  # noqa: F401  - environment defaults before Prefect is imported
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import Context, RunSettings, run_stages, section_stages
from flows.report import publish_eval

CHAMPION_EVAL = "_model-eval"  # artifact store folder for evaluations of registered versions


class ChampionRegressed(RuntimeError):
    """A registered model scores worse on the current dataset than when it was promoted."""


@flow(name="evaluate")
def evaluate(settings: RunSettings = RunSettings(), model: str | None = None,
             fail_on_regression: bool = True) -> dict[str, Any]:
    """Evaluate the pipeline's trained parts, or the registered `model` (a models:/ URI) when given."""
    if model:
        return evaluate_model(settings, model, fail_on_regression)
    ctx = Context(settings)
    with ctx.parent_run("evaluate") as parent:
        records = run_stages(ctx, section_stages("eval"), parent)
    where = publish_eval(ctx.store, records["eval"], dict(ctx.cfg.eval.thresholds))
    return {"stages": records, **where}


@task(name="evaluate-model", cache_policy=NO_CACHE)
def _score_model(ctx: Context, model: str) -> dict[str, Any]:
    from kelix.eval.run import evaluate_bundle
    from kelix.registry import load_bundle
    from kelix.registry.lineage import read_metrics
    from kelix.registry.resolve import resolve_version
    from kelix.registry.store import configure
    from kelix.stages.keys import data_fingerprint
    from kelix.tracking import TAG_KEY, TAG_STAGE

    log = get_run_logger()
    name, version = resolve_version(model)
    key = f"{name}-v{version}-{data_fingerprint(ctx.data_dir)}"
    registered = read_metrics(configure().get_model_version(name, version).tags)
    if ctx.store.is_done(CHAMPION_EVAL, key):
        metrics = dict((ctx.store.status(CHAMPION_EVAL, key) or {}).get("metrics") or {})
        log.info("%s v%s already evaluated on this dataset (%s)", name, version, key)
        return {"name": name, "version": version, "key": key, "metrics": metrics, "registered": registered}
    out_dir = ctx.store.local_dir(CHAMPION_EVAL, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = ctx.tracker.client.create_run(ctx.tracker.experiment_id, run_name=f"evaluate {name} v{version}",
                                        tags={TAG_STAGE: CHAMPION_EVAL, TAG_KEY: key, "kelix.model": name,
                                              "kelix.model_version": version, **ctx.lineage_tags()})
    import mlflow

    status = "FAILED"
    try:
        with mlflow.start_run(run_id=run.info.run_id):
            # The version resolved above, not the alias again: a promotion in between would score one version
            # and file it under another's key.
            bundle = load_bundle(f"models:/{name}/{version}",
                                 device=None if ctx.cfg.runtime.device == "auto" else ctx.cfg.runtime.device)
            metrics = evaluate_bundle(bundle, ctx.data_dir, out_dir, model_name=f"{name} v{version}",
                                      log=log.info)
            mlflow.log_metrics(metrics)
        status = "FINISHED"
    finally:
        ctx.tracker.end_run(run.info.run_id, status)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    ctx.store.push(CHAMPION_EVAL, key)
    ctx.store.mark(CHAMPION_EVAL, key, "SUCCESS", metrics=metrics, model=name, version=version)
    return {"name": name, "version": version, "key": key, "metrics": metrics, "registered": registered,
            "mlflow_run_id": run.info.run_id}


def regressions(now: dict[str, float], then: dict[str, float], gated, tolerance: Callable[[str], float]) -> list[str]:
    """The gated metrics that dropped by more than their tolerance (`EvalConfig.tolerance`) since registration.
    One the model had when registered but that cannot be measured now (missing or NaN: e.g. today's data has no
    questions) counts as dropped, as the gate counts a missing metric as a failure."""
    out = []
    for k in sorted(set(gated) & set(then)):
        value = now.get(k, float("nan"))
        if not value >= then[k] - tolerance(k):  # also true for NaN
            shown = f"{value:.4f} now" if value == value else "not measured now"
            out.append(f"{k}: {then[k]:.4f} when registered -> {shown}")
    return out


def evaluate_model(settings: RunSettings, model: str, fail_on_regression: bool = True) -> dict[str, Any]:
    log = get_run_logger()
    ctx = Context(settings)
    scored = _score_model(ctx, model)
    ecfg = ctx.cfg.eval
    drops = regressions(scored["metrics"], scored["registered"], ecfg.thresholds, ecfg.tolerance)
    allowed = [str(ecfg.regression_tolerance)] + [f"{k} {v}" for k, v in sorted(ecfg.metric_tolerances.items())]
    tolerance = ", ".join(allowed)
    publish_eval(ctx.store, {"key": scored["key"], "metrics": scored["metrics"]}, dict(ctx.cfg.eval.thresholds),
                 stage=CHAMPION_EVAL)
    verdict = "no gated metric dropped" if not drops else "REGRESSED: " + "; ".join(drops)
    create_markdown_artifact(
        f"# {model} (v{scored['version']}) on {ctx.data_dir}\n\n{verdict} (tolerance {tolerance})\n",
        key="kelix-model-check", description=f"Scheduled evaluation of {model}")
    log.info("%s v%s: %s", scored["name"], scored["version"], verdict)
    if drops and fail_on_regression:
        raise ChampionRegressed(f"{model} (v{scored['version']}) regressed on {ctx.data_dir}: {'; '.join(drops)}")
    return {**scored, "regressions": drops}
