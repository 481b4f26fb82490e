"""What every Kelix flow shares: run settings, the resolved run context and the stage task.

`RunSettings` is the one parameter object of the phase flows (a pydantic model, so deployments and the UI
show it as a form). `Context` resolves it once per flow: the config (preset + params + overrides; a bad one
raises `ConfigError` before anything runs), dataset folder, artifact store, runner, MLflow tracker, and
every stage's key. `stage_task` runs one stage through the runner inside the stage's MLflow run; it is
retried with exponential backoff only when the failure is transient (`kelix.runners.is_transient`): a bad
config, a missing input or an OOM fails at once.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Literal

import flows  # noqa: F401  - environment defaults before Prefect is imported
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, Field

from kelix.artifacts import ArtifactStore, store_uri
from kelix.config import ConfigError, KelixConfig, config_hash, load_config
from kelix.runners import get_runner, is_transient
from kelix.train.metrics import MLFLOW_FAILED_RUNS


# The MLflow run name of a whole pipeline run (phase flows run alone name theirs after the phase).
PIPELINE_RUN = "kelix-pipeline"


def run_started() -> float:
    """When the current flow run first started (Unix time), or now outside a flow run.

    A retried flow run (Prefect's flow `retries`, `prefect flow-run retry`, Retry in the UI) keeps its
    parameters and its first start time, so `force` measured from here names the same moment on every try;
    measured from each try's own start, a retry would start over the forced stages the first try finished."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    started = ctx.flow_run.start_time if ctx is not None and ctx.flow_run is not None else None
    return started.timestamp() if started is not None else time.time()


class RunSettings(BaseModel):
    """How to run: which config, data, artifact store, runner, retries and MLflow store."""

    preset: str | None = Field(None, description="tiny (CPU), small or paper; default: tiny or the params file's")
    params: str | None = Field(None, description="params.yaml overriding preset fields")
    overrides: list[str] = Field(default_factory=list, description="section.field=value overrides")
    runner: Literal["local", "subprocess", "kubernetes"] = "local"
    runner_options: dict[str, Any] = Field(default_factory=dict, description="runner constructor options")
    data: str | None = Field(None, description="dataset folder (default: data.root of the config)")
    artifacts: str | None = Field(None, description="artifact store URI (default: $KELIX_ARTIFACTS or runtime.artifacts)")
    force: list[str] = Field(default_factory=list,
                             description="stages to start over even if finished, with the stages built on them ('all': every one)")
    force_before: float | None = Field(None, description="with force: start over only what finished before this "
                                       "Unix time (fixed when the run starts, so a retry keeps a forced stage that finished)")
    retries: int = Field(2, ge=0, description="retries of a stage after a transient failure")
    retry_delay: float = Field(10.0, ge=0, description="first retry delay in seconds; doubles each retry")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db)")
    parent_run_id: str | None = Field(None, description="MLflow run to nest stage runs under (set by the pipeline)")
    progress: bool = True


class Context:
    """A flow's resolved view of its settings (deliberately not a dataclass: Prefect leaves it opaque)."""

    def __init__(self, settings: RunSettings):
        self.settings = settings
        # The moment `force` means: outputs finished after it (by this run, before a retry) are kept.
        self.force_before = settings.force_before or run_started()
        self.cfg: KelixConfig = load_config(settings.preset, settings.params, settings.overrides)
        self.data_dir = Path(settings.data or self.cfg.data.root).resolve()
        artifacts = store_uri(settings.artifacts, self.cfg.runtime.artifacts)
        # A local store is made absolute so child processes and later reruns agree on it.
        self.artifacts = artifacts if "://" in artifacts else str(Path(artifacts).resolve())
        self.store = ArtifactStore(self.artifacts)
        if settings.runner == "kubernetes" and not self.store.remote:
            raise ConfigError(f"the kubernetes runner needs an artifact store its pods can reach (s3://...), not "
                              f"{self.artifacts!r}: pass --artifacts s3://bucket/prefix or set KELIX_ARTIFACTS")
        options = dict(settings.runner_options)
        if settings.runner == "local":
            options.setdefault("progress", settings.progress)
        self.runner = get_runner(settings.runner, **options)
        if settings.mlflow_uri:
            # The registry (kelix.registry.store.tracking_uri) reads the environment: set it now, not only when
            # the tracker is first used, or a flow that only registers/promotes would write to another store.
            os.environ["MLFLOW_TRACKING_URI"] = settings.mlflow_uri

    @cached_property
    def tracker(self):
        from kelix.tracking import Tracker

        return Tracker(self.settings.mlflow_uri)

    @cached_property
    def keys(self) -> dict[str, str]:
        from kelix.stages.catalogue import STAGES
        from kelix.stages.keys import data_fingerprint, stage_keys

        return stage_keys(self.cfg, data_fingerprint(self.data_dir), list(STAGES))

    @cached_property
    def data_version(self) -> str:
        from kelix.tracking import data_version

        return data_version(self.data_dir)

    def forced(self, name: str) -> bool:
        """Whether to rerun `name`: forced itself, or downstream of a forced stage (keys do not change when a
        stage is retrained under the same key, so its consumers would keep outputs built on the old one)."""
        from kelix.stages.catalogue import downstream

        force = self.settings.force
        return name in force or "all" in force or any(name in downstream(f) for f in force)

    def lineage_tags(self) -> dict[str, str]:
        from kelix.stages.keys import data_fingerprint

        return {"kelix.data_version": self.data_version, "kelix.data_fingerprint": data_fingerprint(self.data_dir),
                "kelix.config_hash": config_hash(self.cfg), "kelix.preset": self.cfg.preset,
                "kelix.runner": self.runner.kind, "kelix.artifacts": self.artifacts}

    @contextmanager
    def parent_run(self, run_name: str) -> Iterator[str]:
        """The MLflow run stage runs nest under: the pipeline's, or one of this flow's own when run alone."""
        if self.settings.parent_run_id:
            yield self.settings.parent_run_id
            return
        run_id = self.tracker.start_pipeline(self.cfg, run_name=run_name, tags={**self.lineage_tags(), **_prefect_tags()})
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        finally:
            self.tracker.end_run(run_id, status)


def section_stages(section: str) -> list[str]:
    """The catalogue's stages of one config section, in catalogue order."""
    from kelix.stages.catalogue import STAGES

    return [name for name, stage in STAGES.items() if stage.section == section]


def _prefect_tags() -> dict[str, str]:
    try:
        from prefect.runtime import flow_run

        return {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow_run_name": str(flow_run.name or "")}
    except Exception:  # noqa: BLE001 - outside a flow run there is nothing to tag
        return {}


def retry_if_transient(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry interruptions and I/O trouble, never a bad config or a bug."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - we only classify it
            exc = raised
    return is_transient(exc)


def _short(metrics: dict[str, Any], n: int = 4) -> str:
    items = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return "  ".join(f"{k}={v:.4g}" for k, v in items[:n])


@task(name="stage", task_run_name="{name}", cache_policy=NO_CACHE)
def stage_task(name: str, ctx: Context, parent_run_id: str) -> dict[str, Any]:
    """Run one stage unless its outputs for this key exist; every attempt logs into the stage's MLflow run."""
    from kelix.config import config_hash as chash
    from kelix.rerun import up_to_date
    from kelix.stages.catalogue import get_stage
    from kelix.stages.keys import config_view
    from kelix.tracking import TAG_ERROR, TAG_SKIPPED, TAG_SOURCE_RUN

    log = get_run_logger()
    key = ctx.keys[name]
    tags = {**ctx.lineage_tags(), "kelix.stage_config_hash": chash(config_view(ctx.cfg, get_stage(name)))}
    t0 = time.perf_counter()
    force = ctx.force_before if ctx.forced(name) else False
    first_attempt = task_run.run_count == 1  # only a retry can find this stage's run already there
    if up_to_date(ctx.store, name, key, force):
        metrics = dict((ctx.store.status(name, key) or {}).get("metrics") or {})
        run = ctx.tracker.stage_run(parent_run_id, name, key, {**tags, TAG_SKIPPED: "true"}, reuse=not first_attempt)
        source = ctx.tracker.source_run(name, key)
        if source:
            run.set_tags({TAG_SOURCE_RUN: source})
        run.log_final(metrics)
        run.finish()
        seconds = time.perf_counter() - t0
        log.info("%-12s [%s] skipped: outputs exist (%.2fs)", name, key, seconds)
        return _record(name, key, True, seconds, metrics, ctx.store.local_dir(name, key), ctx, run.run_id)
    log.info("%-12s [%s] running (%s runner)%s", name, key, ctx.runner.kind, " forced" if force else "")
    run = ctx.tracker.stage_run(parent_run_id, name, key, {**tags, TAG_SKIPPED: "false"}, reuse=not first_attempt)
    try:
        result = ctx.runner.run(name, ctx.cfg, ctx.data_dir, ctx.artifacts, force=force, tracking=run)
    except BaseException as exc:
        run.set_tags({TAG_ERROR: f"{type(exc).__name__}: {exc}"[:5000]})
        run.finish("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
        retry = " - transient, will retry if attempts remain" if is_transient(exc) else ""
        log.error("%-12s [%s] failed after %.1fs: %s: %s%s", name, key, time.perf_counter() - t0,
                  type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", retry)
        raise
    if run.run_id in MLFLOW_FAILED_RUNS or (ctx.runner.kind != "local" and not run.child_logged()):
        # MLflow failed during the stage, here or in the child (or a pod could not reach it): replay the metrics file.
        text = ctx.store.read_text(name, key, "metrics.jsonl")
        if text:
            run.replay_jsonl(text, after_logged=True)
    run.set_tags({TAG_SKIPPED: str(result.skipped).lower()})
    run.log_final(result.metrics)
    run.finish()
    seconds = time.perf_counter() - t0
    log.info("%-12s [%s] %s in %.1fs  %s", name, key, "skipped" if result.skipped else "done", seconds,
             _short(result.metrics))
    return _record(name, key, result.skipped, seconds, result.metrics, result.out_dir, ctx, run.run_id)


def _record(name: str, key: str, skipped: bool, seconds: float, metrics: dict[str, Any], out_dir: Path,
            ctx: Context, run_id: str) -> dict[str, Any]:
    return {"name": name, "key": key, "skipped": skipped, "seconds": round(seconds, 3), "metrics": metrics,
            "out_dir": str(out_dir), "runner": ctx.runner.kind, "mlflow_run_id": run_id}


def run_stages(ctx: Context, names: list[str], parent_run_id: str) -> dict[str, dict[str, Any]]:
    """Run stages in order, each a task retried with exponential backoff on transient failures."""
    runnable = stage_task.with_options(
        retries=ctx.settings.retries,
        retry_delay_seconds=exponential_backoff(ctx.settings.retry_delay)(max(1, ctx.settings.retries)),
        retry_jitter_factor=0.2 if ctx.settings.retry_delay > 0 else None,
        retry_condition_fn=retry_if_transient,
    )
    done: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            done[name] = runnable(name, ctx, parent_run_id)
    except BaseException as exc:
        # The stages that finished before the failure travel with it, so the run's stage table still shows them.
        exc.kelix_stages = {**getattr(exc, "kelix_stages", {}), **done}
        raise
    return done
