"""The release phase: register the evaluated bundle, gate it, promote it to `champion` if it passes.

Registration is idempotent per eval run: a rerun with nothing changed finds the version registered from the
same eval outputs (tags `lineage.eval_key` and `lineage.eval_done_at`, the eval marker's time) and reuses it
instead of piling up identical versions; a forced re-evaluation registers its new bundle.
The gate and the promotion are the registry's (`kelix.registry`); a failed gate leaves the aliases as they
were and says which metric failed by how much, in the flow log and the `kelix-release` artifact.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Any

import flows  # noqa: F401  - environment defaults before Prefect is imported
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import Context, RunSettings
from flows.report import publish_release
from kelix.tracking import git_sha


def registered_version(ctx: Context, eval_key: str, eval_done_at: str) -> str | None:
    """The version already registered from this run of the eval stage (its key and completion time), if any.

    The key alone is not enough: keys hash config and data, not code, so `--force eval` after a code fix
    makes a new bundle with new metrics under the same key, and reusing the old version would gate stale tags."""
    from kelix.registry.store import configure
    from mlflow.exceptions import MlflowException

    client = configure()
    name = ctx.cfg.eval.model_name
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    # A version registered before eval_done_at was recorded matches on the key alone (as it did then).
    found = [mv for mv in versions if mv.tags.get("lineage.eval_key") == eval_key
             and mv.tags.get("lineage.eval_done_at", eval_done_at) == eval_done_at]
    return str(max(int(mv.version) for mv in found)) if found else None


@task(name="register", cache_policy=NO_CACHE)
def register(ctx: Context, parent_run_id: str | None) -> tuple[str, bool]:
    """Register the eval stage's bundle (or reuse the version registered from it); returns (version, new)."""
    import mlflow

    from kelix.registry import register_bundle
    from kelix.registry.release import complete_registration

    log = get_run_logger()
    key = ctx.keys["eval"]
    if not ctx.store.is_current("eval", key):
        stale = ctx.store.stale_inputs("eval", key) if ctx.store.is_done("eval", key) else []
        why = f"was built on {', '.join(stale)} before they were rerun" if stale else "has not finished"
        raise RuntimeError(f"the eval stage {why} for key {key} in {ctx.store.uri}: "
                           "run the evaluate flow (or `kelix pipeline run`) first")
    status = ctx.store.status("eval", key) or {}
    done_at = repr(status.get("time"))
    existing = registered_version(ctx, key, done_at)
    if existing:
        repaired = complete_registration(existing, ctx.cfg)
        log.info("bundle of eval %s is already registered as %s v%s%s", key, ctx.cfg.eval.model_name, existing,
                 repaired)
        return existing, False
    out_dir = ctx.store.pull("eval", key)
    metrics = dict(status.get("metrics") or {})
    lineage = {"pipeline_run_id": parent_run_id or "", "stage_keys": json.dumps(ctx.keys, sort_keys=True),
               "eval_key": key, "eval_done_at": done_at, "data_version": ctx.data_version,
               "data_fingerprint": ctx.lineage_tags()["kelix.data_fingerprint"], "git_sha": git_sha(),
               "runner": ctx.runner.kind, "artifacts": ctx.artifacts, "data_dir": str(ctx.data_dir)}
    # Inside the pipeline's run, the registry logs the model as its child (same experiment, same lineage).
    scope = mlflow.start_run(run_id=parent_run_id) if parent_run_id else nullcontext()
    with scope:
        version = register_bundle(out_dir / "bundle", ctx.cfg, metrics, lineage)
    log.info("registered %s v%s (alias challenger)", ctx.cfg.eval.model_name, version)
    return version, True


@task(name="gate-and-promote", cache_policy=NO_CACHE)
def gate_and_promote(ctx: Context, version: str, reason: str, force: bool) -> dict[str, Any]:
    from kelix.registry import gate, promote as registry_promote, status
    from kelix.registry.release import complete_promotion

    log = get_run_logger()
    current = {alias: meta["version"] for alias, meta in (status(ctx.cfg).get("aliases") or {}).items()}
    if current.get("champion") == version:
        # A rerun that found its version already released (perhaps force-promoted past the gate): re-gating
        # it would tag the serving champion "failed" and report a release that did not happen.
        # The report shows the verdict recorded when it was promoted.
        from kelix.registry.store import configure

        repaired = complete_promotion(version, ctx.cfg, reason)
        tags = configure().get_model_version(ctx.cfg.eval.model_name, version).tags
        failures = [f for f in tags.get("kelix.gate_failures", "").split("; ") if f]
        log.info("promotion: version %s is already the champion%s", version, repaired)
        return {"gate_passed": tags.get("kelix.gate") == "passed", "gate_failures": failures,
                "promotion": f"version {version} is already the champion{repaired}", "aliases": current}
    decision = gate(version, ctx.cfg)
    if decision.passed or force:
        result = registry_promote(version, ctx.cfg, reason=reason, force=force)
        promotion = result.message
    else:
        promotion = "not promoted: " + decision.summary()
    (log.info if decision.passed else log.warning)("gate: %s", decision.summary())
    log.info("promotion: %s", promotion)
    aliases = {alias: meta["version"] for alias, meta in (status(ctx.cfg).get("aliases") or {}).items()}
    return {"gate_passed": decision.passed, "gate_failures": list(decision.failures), "promotion": promotion,
            "aliases": aliases}


@flow(name="promote")
def promote(settings: RunSettings = RunSettings(), version: str | None = None, reason: str = "",
            force: bool = False) -> dict[str, Any]:
    """Register the evaluated bundle (unless `version` names one), gate it and promote it if it passes."""
    ctx = Context(settings)
    registered_now = False
    if version is None:
        version, registered_now = register(ctx, settings.parent_run_id)
    reason = reason or f"pipeline release (data {ctx.data_version}, code {git_sha()[:12]})"
    outcome = gate_and_promote(ctx, str(version), reason, force)
    release = {"model": ctx.cfg.eval.model_name, "version": str(version), "registered_now": registered_now, **outcome}
    publish_release(release)
    return release
