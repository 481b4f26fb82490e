"""Register, gate, promote and roll back Kelix model versions with MLflow 3 aliases (never stages).

    register_bundle -> new version, alias `challenger`
    gate            -> every thresholded metric passes cfg.eval.thresholds and none falls more than
                       cfg.eval.regression_tolerance (or its metric_tolerances) below the current `champion`
    promote         -> `champion` moves to the version, the old champion keeps `previous-champion`
    rollback        -> `champion` moves back to `previous-champion`

A failed gate changes no alias and says which metric failed and by how much. The registry keeps no alias
history, so every alias change is recorded twice: as an event tag on each model version it touches
(`kelix.event.<utc time>.<action>`, plus `kelix.promoted_*` / `kelix.rolled_back_*` summaries) and as a run
in the `kelix-registry` experiment (params: action, model, from, to, actor, reason, forced). All alias
changes happen under `registry_lock` with a re-read afterwards (kelix/registry/store.py explains why).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from kelix.config import KelixConfig
from kelix.env import user_at_host
from kelix.registry.lineage import complete_lineage, read_lineage, read_metrics, version_tags
from kelix.registry.store import (
    MODEL_EXPERIMENT, NOT_FOUND_CODES, REGISTRY_EXPERIMENT, RegistryConflict, RegistryError, configure, ensure_experiment,
    lock_path, registry_lock, tracking_uri,
)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
ALIASES = (CHAMPION, CHALLENGER, PREVIOUS)
EVENT = "kelix.event."


@dataclass
class GateDecision:
    version: str
    passed: bool
    failures: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    champion: str | None = None
    champion_metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        if self.passed:
            against = f" and does not regress against champion v{self.champion}" if self.champion else ""
            return f"version {self.version} passes every threshold{against}"
        return f"version {self.version} fails the gate: " + "; ".join(self.failures)


@dataclass
class PromotionResult:
    promoted: bool
    version: str
    previous: str | None
    message: str
    decision: GateDecision | None = None
    record_run_id: str | None = None


def check_gate(metrics: dict[str, float], thresholds: dict[str, float], tolerance: Callable[[str], float],
               champion_metrics: dict[str, float] | None = None, champion: str | None = None) -> list[str]:
    """Why a model with `metrics` may not become champion (empty: it may). Higher is better for every
    gated metric; the gated metrics are the thresholded ones, checked against the threshold and against
    the champion's value minus the metric's tolerance (`EvalConfig.tolerance`)."""
    failures = []
    for name, threshold in sorted(thresholds.items()):
        allowed = tolerance(name)
        if name not in metrics:
            failures.append(f"{name} is missing from the evaluation metrics (threshold {threshold:.4f})")
            continue
        value = metrics[name]
        if value < threshold:
            failures.append(f"{name} = {value:.4f} is below its threshold {threshold:.4f} by {threshold - value:.4f}")
        if champion_metrics and name in champion_metrics and value < champion_metrics[name] - allowed:
            drop = champion_metrics[name] - value
            failures.append(f"{name} = {value:.4f} regresses {drop:.4f} below champion v{champion} "
                            f"({champion_metrics[name]:.4f}), more than the tolerance {allowed:.4f}")
    return failures


# ---------------------------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    return os.environ.get("KELIX_ACTOR") or user_at_host()


def _alias(client, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when nobody holds it (or the model has no versions yet).

    Only those two answers mean "no holder": any other failure (a locked SQLite file, a 503 from the tracking
    server) is raised, or a gate would skip the regression check against a champion it failed to read."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND_CODES:
            return None
        raise RegistryError(f"could not read alias {alias!r} of model {name!r} from the registry ({exc}): check the "
                            "tracking server, then `kelix registry status` before retrying") from exc


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"model {name!r} has no version {version} in {tracking_uri()}: "
                            f"see `kelix registry status`") from exc


def _record(client, name: str, action: str, from_v: str | None, to_v: str | None, actor: str, reason: str,
            **extra: str) -> str:
    """Write one alias-change record: a run in `kelix-registry` and an event tag on each touched version."""
    from mlflow.entities import Param, RunTag

    when = _now()
    event = {"action": action, "model": name, "from": from_v or "", "to": to_v or "", "actor": actor,
             "reason": reason, "time": when, **extra}
    exp = ensure_experiment(client, REGISTRY_EXPERIMENT)
    run = client.create_run(exp, run_name=f"{action} {name} v{from_v or '-'} -> v{to_v or '-'}",
                            tags={"kelix.registry.action": action, "kelix.registry.model": name})
    client.log_batch(run.info.run_id,
                     params=[Param(k, str(v)[:6000]) for k, v in event.items()],
                     tags=[RunTag("mlflow.note.content", f"{action} by {actor}: {reason}")])
    client.set_terminated(run.info.run_id)
    event["run_id"] = run.info.run_id
    stamp = when.replace("-", "").replace(":", "").replace("+0000", "Z")
    for v in {from_v, to_v} - {None}:
        client.set_model_version_tag(name, v, f"{EVENT}{stamp}.{action}", json.dumps(event)[:5000])
    return run.info.run_id


def _check_aliases(client, name: str, expected: dict[str, str | None]) -> None:
    """The compare-and-set re-read: every alias we just wrote must still say what we wrote."""
    actual = {alias: _alias(client, name, alias) for alias in expected}
    if actual != expected:
        raise RegistryConflict(f"aliases of {name!r} changed while the registry lock was held (expected {expected}, "
                               f"found {actual}): another writer does not share the lock {lock_path()}; "
                               f"check `kelix registry status` and re-run the promotion")


# ---------------------------------------------------------------------------------------------- public API


def register_bundle(bundle_dir: str | Path, cfg: KelixConfig, metrics: dict[str, float],
                    lineage: dict[str, str] | None = None) -> str:
    """Log the bundle as one pyfunc model, register it as a new version of cfg.eval.model_name with lineage
    and metric tags, point `challenger` at it, and return the version number."""
    import mlflow

    from kelix.bundle import check_bundle
    from kelix.registry import model_code
    from kelix.registry.pyfunc import SIGNATURE, input_example, pip_requirements

    bundle_dir = Path(bundle_dir)
    check_bundle(bundle_dir)  # never upload a bundle that would fail to load
    client = configure()
    name = cfg.eval.model_name
    full = complete_lineage(cfg, lineage)
    tags = version_tags(full, metrics)
    exp = ensure_experiment(client, MODEL_EXPERIMENT)
    parent = mlflow.active_run()  # inside the pipeline's run: log as its child, in its experiment
    with mlflow.start_run(experiment_id=parent.info.experiment_id if parent else exp, run_name=f"register {name}",
                          nested=parent is not None) as run:
        mlflow.set_tags({k: v for k, v in tags.items() if k.startswith("lineage.")})
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_dict(cfg.to_dict(), "config.json")
        info = mlflow.pyfunc.log_model(
            # Models from code: the model is this file plus the installed package, nothing is pickled.
            name="model", python_model=model_code.__file__, artifacts={"bundle": str(bundle_dir)},
            signature=SIGNATURE, input_example=input_example(), pip_requirements=pip_requirements(),
        )
        mv = mlflow.register_model(info.model_uri, name, tags={**tags, "kelix.run_id": run.info.run_id})
    version = str(mv.version)
    with registry_lock():
        before = _alias(client, name, CHALLENGER)
        client.set_registered_model_alias(name, CHALLENGER, version)
        _check_aliases(client, name, {CHALLENGER: version})
        _record(client, name, "register", before, version, _actor(None), "new evaluated bundle",
                logged_run_id=run.info.run_id)
    return version


def complete_registration(version: str, cfg: KelixConfig) -> str:
    """For a rerun that reuses `version`: a registration killed after `register_model`, before the challenger
    alias, left a version with no alias-change record at all; point `challenger` at it now. Returns what was
    done ("" when its registration had finished)."""
    client = configure()
    name, version = cfg.eval.model_name, str(version)
    with registry_lock():
        if any(k.startswith(EVENT) for k in _version(client, name, version).tags):
            return ""
        before = _alias(client, name, CHALLENGER)
        client.set_registered_model_alias(name, CHALLENGER, version)
        _check_aliases(client, name, {CHALLENGER: version})
        _record(client, name, "register", before, version, _actor(None),
                "new evaluated bundle (completing an interrupted registration)")
    return "; its interrupted registration was completed (alias challenger)"


def gate(version: str, cfg: KelixConfig, client=None) -> GateDecision:
    """Check a version's metric tags against the thresholds and the current champion; tag the verdict."""
    client = client or configure()
    name = cfg.eval.model_name
    mv = _version(client, name, version)
    metrics = read_metrics(mv.tags)
    champion = _alias(client, name, CHAMPION)
    champ_metrics = read_metrics(_version(client, name, champion).tags) if champion and champion != str(version) else {}
    failures = check_gate(metrics, dict(cfg.eval.thresholds), cfg.eval.tolerance, champ_metrics,
                          champion if champ_metrics else None)
    trained = mv.tags.get("lineage.preset")
    if trained and trained != cfg.preset:
        # The thresholds are the config's: a small-preset version gated by the tiny defaults (a bare
        # `kelix registry promote 3`) would pass far lower bars than the pipeline that made it.
        failures.append(f"version {version} was trained with the {trained} preset but the gate has the {cfg.preset} "
                        f"preset's thresholds: pass --preset {trained} (and the run's --params/--set)")
    if _rolled_back_since_promotion(mv.tags):
        failures.append(f"version {version} was rolled back at {mv.tags['kelix.rolled_back_at']} "
                        f"({mv.tags.get('kelix.rollback_reason', '')}); promote it with --force if that is intended")
    decision = GateDecision(str(version), not failures, failures, metrics, champion if champ_metrics else None, champ_metrics)
    client.set_model_version_tag(name, str(version), "kelix.gate", "passed" if decision.passed else "failed")
    client.set_model_version_tag(name, str(version), "kelix.gate_failures", "; ".join(failures)[:5000])
    client.set_model_version_tag(name, str(version), "kelix.gate_at", _now())
    return decision


def promote(version: str, cfg: KelixConfig, reason: str, force: bool = False, actor: str | None = None) -> PromotionResult:
    """Make `version` the champion if it passes the gate (or `force`); the old champion becomes
    previous-champion. The gate is evaluated inside the lock, against the champion of that moment."""
    client = configure()
    name, version, who = cfg.eval.model_name, str(version), _actor(actor)
    _version(client, name, version)
    with registry_lock():
        current = _alias(client, name, CHAMPION)
        if current == version:
            repaired = _complete_interrupted_promotion(client, name, version, who, reason, force)
            return PromotionResult(False, version, current, f"version {version} is already the champion" + repaired)
        decision = gate(version, cfg, client)
        if not decision.passed and not force:
            return PromotionResult(False, version, current, decision.summary() + "; aliases unchanged", decision)
        if current:
            client.set_registered_model_alias(name, PREVIOUS, current)
        client.set_registered_model_alias(name, CHAMPION, version)
        if _alias(client, name, CHALLENGER) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
        _check_aliases(client, name, {CHAMPION: version, **({PREVIOUS: current} if current else {})})
        run_id = _write_promotion(client, name, version, current, who, reason, force, decision.failures)
    forced = " (forced past the gate)" if force and not decision.passed else ""
    return PromotionResult(True, version, current, f"version {version} is now champion{forced}"
                           + (f"; v{current} is previous-champion" if current else ""), decision, run_id)


def _write_promotion(client, name: str, version: str, current: str | None, who: str, reason: str, force: bool,
                     failures: list[str]) -> str:
    """The record and version tags of a promotion of `version` over `current` (after the aliases moved)."""
    run_id = _record(client, name, "promote", current, version, who, reason, forced=str(bool(force)).lower(),
                     gate_failures="; ".join(failures))
    stamp = _now()
    for key, value in {"kelix.promoted_at": stamp, "kelix.promoted_by": who, "kelix.promotion_reason": reason,
                       "kelix.promoted_from": current or "", "kelix.promotion_run_id": run_id,
                       "kelix.forced": str(bool(force)).lower()}.items():
        client.set_model_version_tag(name, version, key, value[:5000])
    if current:
        client.set_model_version_tag(name, current, "kelix.demoted_at", stamp)
        client.set_model_version_tag(name, current, "kelix.demoted_for", version)
    return run_id


def _complete_interrupted_promotion(client, name: str, version: str, who: str, reason: str, force: bool) -> str:
    """A promotion killed after moving the aliases, before its tags: the champion has no `promoted_at`, and
    rollback's walk back reads those tags. Write them now (the previous champion is the alias's)."""
    tags = _version(client, name, version).tags
    if tags.get("kelix.promoted_at"):
        return ""
    previous = _alias(client, name, PREVIOUS)
    failures = [f for f in tags.get("kelix.gate_failures", "").split("; ") if f]
    _write_promotion(client, name, version, previous, who, f"{reason} (completing an interrupted promotion)",
                     force, failures)
    return "; the record of its interrupted promotion was completed"


def complete_promotion(version: str, cfg: KelixConfig, reason: str, actor: str | None = None) -> str:
    """For a rerun that finds `version` already champion: complete its promotion's record if it was cut short.
    Returns what was done ("" if nothing was missing)."""
    client = configure()
    with registry_lock():
        if _alias(client, cfg.eval.model_name, CHAMPION) != str(version):
            return ""
        return _complete_interrupted_promotion(client, cfg.eval.model_name, str(version), _actor(actor), reason, False)


def rollback(cfg: KelixConfig, reason: str, actor: str | None = None) -> PromotionResult:
    """Point `champion` back at `previous-champion`; previous-champion moves one step further back (to the
    version the restored one had replaced), or is removed when there is none."""
    client = configure()
    name, who = cfg.eval.model_name, _actor(actor)
    with registry_lock():
        bad, good = _alias(client, name, CHAMPION), _alias(client, name, PREVIOUS)
        if good is None:
            raise RegistryError(f"model {name!r} has no {PREVIOUS} to roll back to (champion: v{bad or '-'})")
        client.set_registered_model_alias(name, CHAMPION, good)
        older = _restorable_predecessor(client, name, good, {bad, good})
        if older:
            client.set_registered_model_alias(name, PREVIOUS, older)
        else:
            client.delete_registered_model_alias(name, PREVIOUS)
        _check_aliases(client, name, {CHAMPION: good, PREVIOUS: older})
        run_id = _record(client, name, "rollback", bad, good, who, reason)
        stamp = _now()
        if bad:
            for key, value in {"kelix.rolled_back_at": stamp, "kelix.rolled_back_by": who,
                               "kelix.rollback_reason": reason, "kelix.rollback_run_id": run_id}.items():
                client.set_model_version_tag(name, bad, key, value[:5000])
        client.set_model_version_tag(name, good, "kelix.restored_at", stamp)
    return PromotionResult(True, good, bad, f"rolled back: v{good} is champion again"
                           + (f" (v{bad} was champion)" if bad else ""), None, run_id)


def _restorable_predecessor(client, name: str, version: str, skip: set) -> str | None:
    """The version `version` replaced when it was promoted, walking further back past versions that were rolled
    back since their last promotion (a rollback must not restore a release someone already rolled back)."""
    seen = set(skip)
    older = _version(client, name, version).tags.get("kelix.promoted_from") or None
    while older and older not in seen:
        seen.add(older)
        try:
            tags = _version(client, name, older).tags
        except RegistryError:
            return None  # deleted from the registry
        if not _rolled_back_since_promotion(tags):
            return older
        older = tags.get("kelix.promoted_from") or None
    return None


def _rolled_back_since_promotion(tags: dict[str, str]) -> bool:
    rolled = tags.get("kelix.rolled_back_at")
    return bool(rolled) and rolled >= tags.get("kelix.promoted_at", "")  # ISO-8601 UTC stamps sort as text


def history(client, name: str, limit: int = 20) -> list[dict]:
    """Alias-change records of `name`, newest first, from the kelix-registry experiment."""
    exp = client.get_experiment_by_name(REGISTRY_EXPERIMENT)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`kelix.registry.model` = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=limit)
    return [{**r.data.params, "run_id": r.info.run_id} for r in runs]


def status(cfg: KelixConfig) -> dict:
    """Aliases (with metrics and lineage), recent versions and the alias history of cfg.eval.model_name."""
    from mlflow.exceptions import MlflowException

    client = configure()
    name = cfg.eval.model_name
    out: dict = {"model": name, "tracking_uri": tracking_uri(), "thresholds": dict(cfg.eval.thresholds),
                 "regression_tolerance": cfg.eval.regression_tolerance,
                 "metric_tolerances": dict(cfg.eval.metric_tolerances)}
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        # Only "no such model" means not registered yet; a server that is down or failing must not read as that.
        if exc.error_code not in NOT_FOUND_CODES:
            raise RegistryError(f"could not read model {name!r} from {tracking_uri()} ({exc}): check the tracking "
                                "server and retry") from exc
        return {**out, "exists": False, "aliases": {}, "versions": [], "history": []}
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version), reverse=True)
    by_version = {str(mv.version): mv for mv in versions}
    aliases = {}
    for alias in ALIASES:
        v = _alias(client, name, alias)
        if v is not None:
            mv = by_version.get(v) or _version(client, name, v)
            aliases[alias] = {"version": v, "metrics": read_metrics(mv.tags), "lineage": read_lineage(mv.tags)}
    # search_model_versions does not fill in aliases on every store: invert the ones just read.
    held = {meta["version"]: [a for a, m in aliases.items() if m["version"] == meta["version"]] for meta in aliases.values()}
    out.update(exists=True, aliases=aliases, history=history(client, name), versions=[
        {"version": str(mv.version), "aliases": held.get(str(mv.version), []), "created": mv.creation_timestamp,
         "gate": mv.tags.get("kelix.gate", ""), "git_sha": mv.tags.get("lineage.git_sha", ""),
         "data_version": mv.tags.get("lineage.data_version", "")}
        for mv in versions[:20]])
    return out
