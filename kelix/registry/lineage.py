"""Lineage of a registered model: where its code, data and config came from, as model-version tags.

Tags (all strings, so the registry UI and `kelix registry status` show them):
  lineage.git_sha          commit of the code that trained it (`+dirty` when the tree had changes)
  lineage.data_version     the md5 data.dvc records when DVC tracks the dataset, else `content:<fingerprint>`
  lineage.data_fingerprint content hash of the dataset folder (kelix.stages.keys.data_fingerprint; stage keys use it)
  lineage.config_hash      hash of the resolved config; lineage.preset its preset
  lineage.stage_keys       JSON {stage: key} of the stages that produced it
  lineage.pipeline_run_id  the pipeline's MLflow run
  lineage.eval_key, lineage.eval_done_at  the eval stage run it was registered from (set by the release flow)
  metric.<name>            every evaluation metric (the gate reads these, not the run)
The caller's values win (the release flow passes more, e.g. eval_key); missing ones are computed from the
working tree with the same helpers the pipeline's lineage uses (kelix.tracking), "unknown" when they cannot be.
"""
from __future__ import annotations

import json
from pathlib import Path

from kelix.config import KelixConfig, config_hash
from kelix.registry.store import repo_root

LINEAGE = "lineage."
METRIC = "metric."
REQUIRED = ("git_sha", "data_version", "data_fingerprint", "config_hash", "preset", "stage_keys", "pipeline_run_id")


def data_path(cfg: KelixConfig, data_dir: str | Path | None = None) -> Path:
    """The dataset folder: as given, else cfg.data.root relative to the working directory or the repo."""
    path = Path(data_dir or cfg.data.root)
    return path if path.is_absolute() or path.exists() else repo_root() / path


def complete_lineage(cfg: KelixConfig, given: dict[str, str] | None = None, data_dir: str | Path | None = None) -> dict[str, str]:
    """The caller's lineage plus whatever of REQUIRED can be computed here ("unknown" for the rest)."""
    from kelix.stages.keys import data_fingerprint, stage_keys
    from kelix.tracking import data_version, git_sha

    out = {k: str(v) for k, v in (given or {}).items()}
    out.setdefault("git_sha", git_sha())
    out.setdefault("config_hash", config_hash(cfg))
    out.setdefault("preset", cfg.preset)
    data = data_path(cfg, data_dir)
    try:
        out.setdefault("data_fingerprint", data_fingerprint(data))
        out.setdefault("data_version", data_version(data))
        out.setdefault("stage_keys", json.dumps(stage_keys(cfg, out["data_fingerprint"]), sort_keys=True))
    except FileNotFoundError:
        pass  # no dataset here (e.g. registering a downloaded bundle): left "unknown" below
    for key in REQUIRED:
        out.setdefault(key, "unknown")
    return out


def version_tags(lineage: dict[str, str], metrics: dict[str, float]) -> dict[str, str]:
    tags = {f"{LINEAGE}{k}": str(v)[:5000] for k, v in lineage.items()}
    tags.update({f"{METRIC}{k}": repr(float(v)) for k, v in metrics.items()})
    return tags


def read_metrics(tags: dict[str, str]) -> dict[str, float]:
    return {k[len(METRIC):]: float(v) for k, v in tags.items() if k.startswith(METRIC)}


def read_lineage(tags: dict[str, str]) -> dict[str, str]:
    return {k[len(LINEAGE):]: v for k, v in tags.items() if k.startswith(LINEAGE)}
