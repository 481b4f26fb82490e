"""Stage keys: a stage's config view, the dataset's content fingerprint and its inputs' keys, hashed. An unchanged
key finds the stage's finished outputs; a changed one reruns it and everything downstream."""
from __future__ import annotations

import dataclasses
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from kelix.config import KelixConfig, config_hash
from kelix.stages.catalogue import ORDER, Stage, get_stage


def config_view(cfg: KelixConfig, stage: Stage) -> dict[str, Any]:
    """The part of the config a stage's outputs depend on: its section, minus other stages' schedules and the
    fields it ignores."""
    view = dataclasses.asdict(cfg.section(stage.section))
    for name in stage.ignores:
        view.pop(name)
    if stage.train_field:
        for f in dataclasses.fields(cfg.section(stage.section)):
            if f.name.startswith("train") and f.name != stage.train_field:
                view.pop(f.name)
    if stage.section == "eval":
        # The gate's thresholds decide promotion, not what evaluation computes.
        view.pop("thresholds", None)
        view.pop("regression_tolerance", None)
        view.pop("metric_tolerances", None)
    return view


@lru_cache(maxsize=8)
def _fingerprint_cached(root: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    base = Path(root)
    for name in ("dataset.json", "manifest.jsonl", "quarantine.jsonl"):
        if (base / name).exists():
            digest.update(name.encode() + (base / name).read_bytes())
    images = sorted(p for p in (base / "images").rglob("*") if p.is_file()) if (base / "images").exists() else []
    for path in images:
        digest.update(path.relative_to(base).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def data_fingerprint(data_dir: str | Path) -> str:
    """Content hash of a dataset folder (manifest, metadata and every image); cached per manifest state."""
    root = Path(data_dir).resolve()
    manifest = root / "manifest.jsonl"
    if not manifest.exists():
        raise FileNotFoundError(f"no dataset at {root} (manifest.jsonl missing): run `kelix data generate shapes --out {data_dir}`")
    stat = manifest.stat()
    return _fingerprint_cached(str(root), (stat.st_mtime_ns, stat.st_size))


def stage_keys(cfg: KelixConfig, data_version: str, names: list[str] | tuple[str, ...] = ORDER) -> dict[str, str]:
    keys: dict[str, str] = {}

    def key_of(name: str) -> str:
        if name not in keys:
            stage = get_stage(name)
            payload = {
                "stage": name,
                "config": config_view(cfg, stage),
                "data": data_version,
                "inputs": {dep: key_of(dep) for dep in stage.inputs},
            }
            keys[name] = config_hash(payload, length=16)
        return keys[name]

    for name in names:
        key_of(name)
    return keys
