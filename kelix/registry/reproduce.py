"""Rerun the pipeline that produced a registered version and compare the new metrics with the recorded ones.

From the version's lineage tags: the git SHA (we warn, not check out, when the working tree differs: the
user decides which code to run), the data version (fetched with DVC when the dataset is DVC-tracked and the
working copy differs, then verified against the recorded content fingerprint, which is what stage keys
are built from) and the resolved config (the `config.json` logged with the version). The rerun uses a fresh
artifact folder by default so every stage really runs again. Each metric must match within its tolerance:
the recorded config's release tolerance for it (`EvalConfig.tolerance`: what two evaluations of equally good
models may differ by) unless one is given for all, absolute for scores up to 1 and relative above (PSNR in
dB, perplexities). With `runtime.deterministic` a tiny run on as many threads repeats to the last digit; on
another machine the sums of its kernels, and so the metrics, move a little.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from kelix.config import KelixConfig, config_from_dict
from kelix.registry.lineage import data_path, read_lineage, read_metrics
from kelix.registry.store import RegistryError, configure, repo_root


class ReproduceError(RegistryError):
    """The recorded run cannot be set up again here (data or config missing); the message says what to do."""


@dataclass
class MetricDiff:
    name: str
    recorded: float | None
    new: float | None
    allowed: float
    ok: bool

    @property
    def diff(self) -> float:
        if self.recorded is None or self.new is None:
            return math.nan
        return self.new - self.recorded


def compare_metrics(recorded: dict[str, float], new: dict[str, float], tolerance: Callable[[str], float]
                    ) -> list[MetricDiff]:
    """One row per metric in either set; a metric missing on one side never matches. A metric may move by its
    `tolerance`, times the recorded value where that is above 1 (relative for dB and perplexities)."""
    rows = []
    for name in sorted(set(recorded) | set(new)):
        a, b = recorded.get(name), new.get(name)
        allowed = tolerance(name) * max(1.0, abs(a) if a is not None else 1.0)
        ok = a is not None and b is not None and abs(b - a) <= allowed + 1e-12
        rows.append(MetricDiff(name, a, b, allowed, ok))
    return rows


@dataclass
class Recorded:
    name: str
    version: str
    lineage: dict[str, str]
    metrics: dict[str, float]
    cfg: KelixConfig


def recorded(name: str, version: str) -> Recorded:
    """Lineage, metrics and resolved config of a registered version."""
    from mlflow.exceptions import MlflowException

    client = configure()
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise ReproduceError(f"model {name!r} has no version {version}: see `kelix registry status`") from exc
    run_id = mv.tags.get("kelix.run_id") or mv.run_id
    try:
        path = client.download_artifacts(run_id, "config.json")
        cfg = config_from_dict(json.loads(Path(path).read_text()))
    except (MlflowException, OSError, ValueError) as exc:
        raise ReproduceError(f"the config of {name} v{version} (config.json of run {run_id}) cannot be read: {exc}") from exc
    return Recorded(name, str(version), read_lineage(mv.tags), read_metrics(mv.tags), cfg)


def check_code(lineage: dict[str, str], warn: Callable[[str], None]) -> None:
    from kelix.tracking import git_sha

    want, have = lineage.get("git_sha", "unknown"), git_sha()
    if want == "unknown":
        warn("the version records no git SHA: the current code is used as is")
    elif want.removesuffix("+dirty") != have.removesuffix("+dirty"):
        warn(f"the model was trained at git {want}, the working tree is at {have}: run `git checkout "
             f"{want.removesuffix('+dirty')}` first for an exact rerun")
    elif want.endswith("+dirty") or have.endswith("+dirty"):
        warn(f"the model's tree ({want}) or this one ({have}) had uncommitted changes: the code may differ")


def _dvc() -> str:
    """The dvc beside this interpreter (a venv's bin is often not on PATH), else the one on PATH."""
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else "dvc"


def _fingerprint(path: Path) -> str | None:
    from kelix.stages.keys import data_fingerprint

    try:
        return data_fingerprint(path)
    except FileNotFoundError:
        return None


def prepare_data(rec: Recorded, work_dir: Path, log: Callable[[str], None]) -> Path:
    """A dataset folder whose content fingerprint equals the recorded one, fetched with DVC if need be:
    `dvc checkout` when data.dvc still tracks the recorded version (the workspace copy was changed), else
    `dvc get . PATH --rev SHA` of the recorded commit into the work folder (the workspace is left alone)."""
    from kelix.tracking import dvc_md5

    want = rec.lineage.get("data_fingerprint", "unknown")
    version = rec.lineage.get("data_version", "unknown")
    data = data_path(rec.cfg)
    if want == "unknown":
        log(f"warning: the version records no data fingerprint: using {data} unverified")
        return data
    # The folder the pipeline read first (`--data` may differ from data.root), then data.root; each hashed once.
    for candidate in dict.fromkeys([Path(rec.lineage.get("data_dir") or data), data]):
        if _fingerprint(candidate) == want:
            log(f"data: {candidate} is the recorded version ({version})")
            return candidate
    if version in ("", "unknown") or version.startswith("content:"):
        raise ReproduceError(f"{data} does not hold the recorded dataset (fingerprint {want}) and DVC did not track "
                             f"it: regenerate it with the recorded config (`kelix data generate`) or restore it")
    root = repo_root()
    if dvc_md5(data) == version:
        log(f"data: `dvc checkout data.dvc` (the workspace copy differs from the tracked version {version})")
        # Without --force DVC refuses to discard local changes to the data: the user decides that.
        cmd, target = [_dvc(), "checkout", str(root / "data.dvc")], data
    else:
        sha = rec.lineage.get("git_sha", "unknown").removesuffix("+dirty")
        if sha == "unknown":
            raise ReproduceError(f"data version {version} is not the one data.dvc tracks now, and no git SHA is "
                                 f"recorded to fetch it from")
        try:
            rel = data.resolve().relative_to(root.resolve()).as_posix()
        except ValueError as exc:
            raise ReproduceError(f"{data} is outside the repository {root}: DVC cannot fetch it") from exc
        target = work_dir / "data"
        shutil.rmtree(target, ignore_errors=True)
        log(f"data: `dvc get . {rel} --rev {sha[:12]}` (version {version}) into {target}")
        cmd = [_dvc(), "get", str(root), rel, "--rev", sha, "-o", str(target)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReproduceError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()[-800:]}\n"
                             f"(`dvc pull` fetches data missing from the cache; `dvc checkout --force data.dvc` "
                             f"discards local changes to the dataset, if that is what you want)")
    got = _fingerprint(target)
    if got != want:
        raise ReproduceError(f"after DVC, {target} has fingerprint {got}, the model was trained on {want}")
    return target


def rerun_pipeline(cfg: KelixConfig, data_dir: Path, artifacts: str, work_dir: Path,
                   log: Callable[[str], None], in_process: bool = False) -> dict[str, float]:
    """Every stage again with the recorded config; returns the eval metrics. Uses the Prefect pipeline
    (flows.pipeline.kelix_pipeline, without the release phase) when it is installed and `in_process` is
    not asked for, else the stages in catalogue order in this process."""
    kelix_pipeline = None
    if not in_process:
        try:
            from flows.pipeline import kelix_pipeline
        except ImportError:
            pass
    if kelix_pipeline is not None:
        # The recorded config as a params file, so the pipeline resolves exactly that config. Dumped by YAML
        # itself (via JSON, for plain lists): JSON's `2e-05` would read back as a string in YAML 1.1.
        params = work_dir / "params.yaml"
        params.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
        summary = kelix_pipeline(params=str(params), data=str(data_dir), artifacts=artifacts, release=False,
                                 progress=False)
        return {k: float(v) for k, v in (summary.get("eval_metrics") or {}).items()}
    from kelix.stages.catalogue import ORDER
    from kelix.stages.run import run_stage

    metrics: dict[str, float] = {}
    for name in ORDER:
        res = run_stage(name, cfg, data_dir, artifacts, progress=False)
        log(f"{name} [{res.key}] {'skipped' if res.skipped else f'done in {res.seconds:.0f}s'}")
        metrics = res.metrics
    return metrics


def reproduce(name: str, version: str, tolerance: float | None = None, artifacts: str | None = None,
              work_dir: str | Path | None = None, in_process: bool = False,
              log: Callable[[str], None] = print) -> tuple[bool, list[MetricDiff]]:
    """Rerun a registered version's pipeline; True when every recorded metric is matched within its tolerance
    (`tolerance` for all of them, or by default the recorded config's `EvalConfig.tolerance`)."""
    rec = recorded(name, version)
    check_code(rec.lineage, lambda msg: log(f"warning: {msg}"))
    work = Path(work_dir or repo_root() / "outputs" / "reproduce" / f"{name}-v{version}")
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(rec, work, log)
    new = rerun_pipeline(rec.cfg, data, artifacts or str(work / "artifacts"), work, log, in_process)
    rows = compare_metrics(rec.metrics, new, rec.cfg.eval.tolerance if tolerance is None else lambda _: tolerance)
    (work / "reproduce.json").write_text(json.dumps(
        {"model": name, "version": version, "tolerance": tolerance, "lineage": rec.lineage,
         "rows": [{"metric": r.name, "recorded": r.recorded, "new": r.new, "allowed": r.allowed, "ok": r.ok}
                  for r in rows]}, indent=1))
    if not rows:
        log(f"warning: {name} v{version} records no metrics, so the rerun cannot be checked against it")
    return bool(rows) and all(r.ok for r in rows), rows
