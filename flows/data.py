"""The data phase: make sure the dataset is there, then validate it before any training.

A missing dataset is fetched with `dvc pull` when data.dvc tracks that folder (the versioned set), else
generated from the config (the shapes set of the tiny preset). A dataset that fails validation stops the
pipeline here, and its report is published as a Prefect markdown artifact either way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import flows  # noqa: F401  - environment defaults before Prefect is imported
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import Context, RunSettings
from kelix.tracking import dvc_md5, repo_root


class DataValidationFailed(RuntimeError):
    """The dataset did not pass validation; the pipeline stops before training."""


def _has_dataset(root: Path) -> bool:
    return (root / "manifest.jsonl").exists()


@task(name="ensure-dataset", cache_policy=NO_CACHE)
def ensure_dataset(ctx: Context) -> dict[str, Any]:
    log = get_run_logger()
    root = ctx.data_dir
    if _has_dataset(root):
        log.info("dataset %s present", root)
        return {"path": str(root), "action": "present"}
    dvc_file = repo_root() / "data.dvc"
    if dvc_md5(root, dvc_file):
        from kelix.data.versioning import VersioningError, pull, snapshot

        log.info("dataset %s missing: dvc pull %s", root, dvc_file.name)
        try:
            pull(dvc_file)
        except VersioningError as exc:
            # A fresh clone has data.dvc but an empty local remote. The shapes set is a pure function of its
            # seed, so regenerate it, then push it so `dvc pull` works from now on; data.dvc keeps its md5
            # when the bytes are the same, and the lineage records the md5 that was actually used.
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("dvc pull failed (%s): regenerating the dataset from its seed and pushing it", reason)
            generate_dataset(root, ctx.cfg)
            try:
                snapshot(root, ctx.cfg.data)
            except Exception as push_exc:  # the run can go on without a pushed copy; say so
                log.warning("could not push the regenerated dataset to the DVC remote: %s", push_exc)
            return {"path": str(root), "action": "generated (dvc pull failed)"}
        if not _has_dataset(root):
            raise RuntimeError(f"`dvc pull {dvc_file}` finished but {root} still has no manifest.jsonl")
        return {"path": str(root), "action": "dvc pull"}
    log.info("dataset %s missing: generating it from the %s preset's data config", root, ctx.cfg.preset)
    generate_dataset(root, ctx.cfg)
    return {"path": str(root), "action": "generated"}


def generate_dataset(root: Path, cfg) -> None:
    from kelix.data import shapes

    if hasattr(shapes, "generate"):
        shapes.generate(root, cfg.data, progress=False)
    else:  # the keyword form of the generator
        d = cfg.data
        shapes.generate_shapes(root, num_train=d.num_train, num_val=d.num_val, num_test=d.num_test, seed=d.seed,
                               image_size=d.image_size)


VALIDATION = "_validation"  # artifact store folder of passed validation reports, keyed by dataset + rules


def _validation_key(ctx: Context) -> str:
    import dataclasses

    from kelix.config import config_hash
    from kelix.stages.keys import data_fingerprint

    return config_hash({"data": data_fingerprint(ctx.data_dir), "rules": dataclasses.asdict(ctx.cfg.data)}, length=16)


@task(name="validate-dataset", cache_policy=NO_CACHE)
def validate_dataset(ctx: Context) -> dict[str, Any]:
    """Validate the dataset, or reuse the passed report of the same content under the same rules."""
    import json

    log = get_run_logger()
    key = _validation_key(ctx)
    if ctx.store.is_done(VALIDATION, key):
        markdown = ctx.store.read_text(VALIDATION, key, "report.md") or ""
        create_markdown_artifact(markdown, key="kelix-data-validation",
                                 description=f"Validation of {ctx.data_dir} (passed; dataset unchanged since)")
        log.info("dataset %s unchanged since it passed validation (%s)", ctx.data_dir, key)
        return {"passed": True, "cached": True,
                "report": json.loads(ctx.store.read_text(VALIDATION, key, "report.json") or "{}")}

    from kelix.data.validation import validate

    report = validate(ctx.data_dir, ctx.cfg.data)
    markdown = report.to_markdown()
    create_markdown_artifact(markdown, key="kelix-data-validation",
                             description=f"Validation of {ctx.data_dir} ({'passed' if report.passed else 'FAILED'})")
    if not report.passed:
        log.error("dataset %s failed validation:\n%s", ctx.data_dir, markdown)
        raise DataValidationFailed(f"dataset {ctx.data_dir} failed validation; see the 'kelix-data-validation' "
                                   f"artifact or run `kelix data validate`:\n{markdown[:3000]}")
    # Quarantining bad records rewrites the manifest: key the record by the content as it is now.
    key = _validation_key(ctx)
    out = ctx.store.local_dir(VALIDATION, key)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(report.to_json())
    ctx.store.push(VALIDATION, key)
    ctx.store.mark(VALIDATION, key, "SUCCESS", data=str(ctx.data_dir))
    log.info("dataset %s passed validation", ctx.data_dir)
    return {"passed": True, "cached": False, "report": json.loads(report.to_json())}


@flow(name="validate-data")
def validate_data(settings: RunSettings = RunSettings()) -> dict[str, Any]:
    """Fetch or generate the dataset if missing, then validate it (raises DataValidationFailed)."""
    ctx = Context(settings)
    ensured = ensure_dataset(ctx)
    validated = validate_dataset(ctx)
    return {**ensured, **validated, "data_version": ctx.data_version}
