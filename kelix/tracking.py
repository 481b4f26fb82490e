"""MLflow lineage for pipelines and stages: one run per pipeline, one nested run per stage.

The orchestrator owns the runs: it creates the pipeline run, then for every stage a child run tagged with
the stage key, git SHA, data version and config hash. An in-process stage logs into it directly (the stage's
MetricLogger logs whenever an MLflow run is active); a child process or pod gets the run id through the
environment and `stage_run_from_env()` reopens it, so metrics land in the same run wherever the stage ran.
If the child did not open the run (an older entry point, a pod that cannot reach MLflow), the orchestrator
replays the stage's `metrics.jsonl` into it afterwards. A cached (skipped) stage still gets a run, tagged
`kelix.skipped=true` and pointing at the run that produced its outputs.

With no MLFLOW_TRACKING_URI set, runs go to `sqlite:///<repo>/mlflow.db` with artifacts in `<repo>/mlartifacts`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import yaml

from kelix.train.metrics import MLFLOW_FAILED_RUNS

if TYPE_CHECKING:
    from kelix.config import KelixConfig

EXPERIMENT = "kelix"
# Variables a child process or pod reads to log into the orchestrator's stage run.
ENV_RUN_ID = "MLFLOW_RUN_ID"  # mlflow.start_run() also honours it on its own
ENV_PARENT_RUN_ID = "KELIX_MLFLOW_PARENT_RUN_ID"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_EXPERIMENT_ID = "MLFLOW_EXPERIMENT_ID"

TAG_STAGE, TAG_KEY, TAG_SKIPPED = "kelix.stage", "kelix.stage_key", "kelix.skipped"
TAG_SOURCE_RUN, TAG_CHILD_LOGGED, TAG_ATTEMPTS = "kelix.source_run_id", "kelix.child_logged", "kelix.attempts"
TAG_ERROR = "kelix.error"


def repo_root() -> Path:
    """The checkout this package runs from, or the working directory for an installed package."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def default_tracking_uri() -> str:
    return os.environ.get(ENV_TRACKING_URI) or f"sqlite:///{repo_root() / 'mlflow.db'}"


@lru_cache(maxsize=1)
def git_sha() -> str:
    """The commit the code runs at (`+dirty` when the tree has changes, as in the registry's lineage); KELIX_GIT_SHA in images without .git."""
    if os.environ.get("KELIX_GIT_SHA"):
        return os.environ["KELIX_GIT_SHA"]
    try:
        root = repo_root()
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{sha}+dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _dvc_out(data_dir: str | Path, dvc_file: str | Path | None = None) -> tuple[dict, bool] | None:
    """(the .dvc file's output entry with an md5 that tracks `data_dir`, whether it is that folder itself rather
    than a folder above it), or None."""
    dvc_file = Path(dvc_file) if dvc_file else repo_root() / "data.dvc"
    if not dvc_file.exists():
        return None
    try:
        meta = yaml.safe_load(dvc_file.read_text()) or {}
    except yaml.YAMLError:
        return None
    target = Path(data_dir).resolve()
    for out in meta.get("outs", []) or []:
        tracked = (dvc_file.parent / out.get("path", "")).resolve()
        if (target == tracked or tracked in target.parents) and out.get("md5"):
            return out, target == tracked
    return None


def dvc_md5(data_dir: str | Path, dvc_file: str | Path | None = None) -> str | None:
    """The md5 data.dvc records for `data_dir`, if a .dvc file tracks that folder (or a folder above it)."""
    found = _dvc_out(data_dir, dvc_file)
    return str(found[0]["md5"]) if found else None


def data_version(data_dir: str | Path) -> str:
    """The dataset's version for lineage: the DVC md5 when data.dvc tracks it and the folder still holds what
    data.dvc recorded, else its content hash.

    data.dvc keeps its md5 when the folder is regenerated (another seed) or rewritten by validation, until the
    next `dvc commit`; recording that md5 would name data the run never read. The check compares the file count
    and total size data.dvc records (a stat walk, no hashing); a change that keeps both is not caught. A folder
    tracked through one above it is not checked: that record covers more than this folder."""
    from kelix.stages.keys import data_fingerprint

    found = _dvc_out(data_dir)
    if found:
        out, exact = found
        if not exact or "nfiles" not in out or "size" not in out:
            return str(out["md5"])
        files = [p for p in Path(data_dir).resolve().rglob("*") if p.is_file()]
        if len(files) == out["nfiles"] and sum(p.stat().st_size for p in files) == out["size"]:
            return str(out["md5"])
    return f"content:{data_fingerprint(data_dir)}"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys for MLflow params (`tokenizer.num_codebooks`); values as short strings."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    value = json.dumps(tree, default=str) if isinstance(tree, (list, tuple)) else str(tree)
    return {prefix.rstrip("."): value[:500]}


class Tracker:
    """The MLflow store the pipeline logs to; creates the experiment (with its artifact folder) on first use."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None):
        import mlflow
        from mlflow import MlflowClient

        if tracking_uri:
            # The registry reads the environment: make it agree with the store given here.
            os.environ[ENV_TRACKING_URI] = tracking_uri
        self.uri = tracking_uri or default_tracking_uri()
        mlflow.set_tracking_uri(self.uri)  # the registry and fluent calls in this process use the same store
        mlflow.set_registry_uri(self.uri)
        self.client = MlflowClient(self.uri, registry_uri=self.uri)
        name = experiment or os.environ.get("KELIX_MLFLOW_EXPERIMENT", EXPERIMENT)
        # Shared with the registry, which also decides where a local store keeps artifacts (mlartifacts/).
        from kelix.registry.store import ensure_experiment

        self.experiment_id = ensure_experiment(self.client, name)
        self.experiment = name

    def start_pipeline(self, cfg: "KelixConfig", *, run_name: str, tags: dict[str, str]) -> str:
        from mlflow.entities import Param

        from kelix.config import canonical_json, config_hash

        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"kelix.pipeline": "true", "kelix.config_hash": config_hash(cfg),
                                           "kelix.preset": cfg.preset, "kelix.git_sha": git_sha(), **tags})
        params = [Param(k, v) for k, v in sorted(flatten(json.loads(canonical_json(cfg))).items())]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        self.client.log_text(run.info.run_id, yaml.safe_dump(json.loads(canonical_json(cfg)), sort_keys=False),
                             "config.yaml")
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def run_url(self, run_id: str) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"run {run_id} in {self.uri} (browse: mlflow ui --backend-store-uri {self.uri})"

    def stage_run(self, parent_run_id: str, name: str, key: str, tags: dict[str, str], reuse: bool = True) -> "StageRun":
        """The stage's run under this pipeline run: reused across retries (so a resumed stage logs on), else new.

        `reuse=False` skips the lookup when the caller knows this is the first attempt.
        """
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=(f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TAG_STAGE}` = '{name}' "
                           f"and tags.`{TAG_KEY}` = '{key}'"),
            max_results=1,
        ) if reuse else []
        if found:
            run = found[0]
            attempts = int(run.data.tags.get(TAG_ATTEMPTS, "1")) + 1
            self.client.set_tag(run.info.run_id, TAG_ATTEMPTS, str(attempts))
            # This attempt's tags replace the last one's (kelix.skipped may differ); its error is history now.
            for tag, value in tags.items():
                self.client.set_tag(run.info.run_id, tag, value)
            if TAG_ERROR in run.data.tags:
                self.client.delete_tag(run.info.run_id, TAG_ERROR)
            self.client.update_run(run.info.run_id, status="RUNNING")
            return StageRun(run.info.run_id, parent_run_id, self.uri, self.experiment_id, self)
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={"mlflow.parentRunId": parent_run_id, TAG_STAGE: name, TAG_KEY: key, TAG_ATTEMPTS: "1",
                  "kelix.git_sha": git_sha(), **tags},
        )
        return StageRun(run.info.run_id, parent_run_id, self.uri, self.experiment_id, self)

    def source_run(self, name: str, key: str) -> str | None:
        """The run that actually trained stage `name` at `key` (for a skipped stage's lineage)."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=(f"tags.`{TAG_STAGE}` = '{name}' and tags.`{TAG_KEY}` = '{key}' "
                           f"and tags.`{TAG_SKIPPED}` = 'false' and attributes.status = 'FINISHED'"),
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        return found[0].info.run_id if found else None


@dataclass
class StageRun:
    """One stage's MLflow run, as handed to a runner."""

    run_id: str
    parent_run_id: str
    tracking_uri: str
    experiment_id: str
    tracker: Tracker

    def env(self, remote: bool = False) -> dict[str, str]:
        """Variables that let a child process (or a pod, `remote=True`) log into this run.

        A pod cannot reach a local SQLite file, so a local store is passed only to local children; pods then
        get nothing here and the orchestrator replays their metrics.jsonl afterwards.
        """
        if remote and not self.tracking_uri.startswith(("http://", "https://", "databricks")):
            return {}
        return {ENV_RUN_ID: self.run_id, ENV_PARENT_RUN_ID: self.parent_run_id,
                ENV_TRACKING_URI: self.tracking_uri, ENV_EXPERIMENT_ID: self.experiment_id}

    @contextmanager
    def active(self) -> Iterator[Any]:
        """Make this the active MLflow run in this thread (for in-process stages)."""
        import mlflow

        run = mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None)
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        finally:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.tracker.client.set_tag(self.run_id, k, str(v))

    def log_final(self, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"final/{_metric_key(k)}", float(v), now, 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.tracker.client.log_batch(self.run_id, metrics=batch)

    def child_logged(self) -> bool:
        return self.tracker.client.get_run(self.run_id).data.tags.get(TAG_CHILD_LOGGED) == "true"

    def replay_jsonl(self, text: str, after_logged: bool = False) -> int:
        """Log a stage's metrics.jsonl (one `{"step": n, name: value}` per line) into this run.

        `after_logged`: only the steps after the last one the run already has (the child logged until MLflow
        went away), so the points logged before an outage do not appear twice."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        last = self._last_logged_step() if after_logged else None
        batch: list[Metric] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            step = int(record.pop("step", 0))
            if last is not None and step <= last:
                continue
            batch += [Metric(_metric_key(k), float(v), now, step) for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(batch), 1000):
            self.tracker.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        return len(batch)

    def _last_logged_step(self) -> int | None:
        client = self.tracker.client
        names = [k for k in client.get_run(self.run_id).data.metrics if not k.startswith("final/")]
        if not names:
            return None
        name = "loss" if "loss" in names else names[0]
        return max((m.step for m in client.get_metric_history(self.run_id, name)), default=None)

    def finish(self, status: str = "FINISHED") -> None:
        self.tracker.client.set_terminated(self.run_id, status)


def _metric_key(name: str) -> str:
    return name.replace("@", "_at_")


@contextmanager
def stage_run_from_env() -> Iterator[Any]:
    """Reopen the orchestrator's stage run in a child process or pod (`python -m kelix.stages run`).

    A no-op when no run id is in the environment (a plain `kelix stage run`) and on torchrun ranks other
    than 0, so metrics are logged once. Yields the active run or None.
    """
    run_id = os.environ.get(ENV_RUN_ID)
    if not run_id or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    import mlflow

    if os.environ.get(ENV_TRACKING_URI):
        mlflow.set_tracking_uri(os.environ[ENV_TRACKING_URI])
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield active
        return
    try:
        run = mlflow.start_run(run_id=run_id, nested=active is not None)
    except Exception as exc:  # noqa: BLE001 - MLflow unreachable from here: train anyway, the orchestrator replays
        print(f"warning: cannot open MLflow run {run_id} ({type(exc).__name__}); the stage runs without it and "
              "the orchestrator replays metrics.jsonl", file=sys.stderr)
        yield None
        return
    _quietly(lambda: mlflow.set_tag("kelix.host", socket.gethostname()))
    try:
        yield run
    except SystemExit as exc:
        _end_run("FINISHED" if exc.code in (0, None) else "FAILED")
        raise
    except BaseException:
        _end_run("FAILED")
        raise
    else:
        # Tagged at the end, and only if every point got through: otherwise the orchestrator replays the file.
        if run_id not in MLFLOW_FAILED_RUNS:
            _quietly(lambda: mlflow.set_tag(TAG_CHILD_LOGGED, "true"))
        _end_run("FINISHED")


def _end_run(status: str) -> None:
    import mlflow

    _quietly(lambda: mlflow.end_run(status))


def _quietly(call) -> None:
    """A tracking call at the end of a child's stage: the outputs are saved, so a failure here is only a warning."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        print(f"warning: MLflow call failed ({type(exc).__name__}: {exc})", file=sys.stderr)
