"""What a person looks at after a run: Prefect artifacts and the closing summary on stdout.

Artifacts (keys are stable, so the UI's Artifacts page shows each one's history across runs):
  kelix-data-validation  the dataset report (flows/data.py)
  kelix-stages           every stage: key, ran or skipped, seconds, main metrics, MLflow run
  kelix-eval-report      the eval stage's eval.md
  kelix-eval-metrics     metric, value, threshold, pass
  kelix-samples          the sample grid: an image artifact when the store can give an http(s) link (presigned S3),
                         else a markdown artifact with the file's path (a browser cannot open file:// from the UI)
  kelix-release          registered version, gate verdict and why, aliases
  kelix-summary          all of the above in one page, with where to find it
"""
from __future__ import annotations

from typing import Any

import flows  # noqa: F401  - environment defaults before Prefect is imported
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def stage_rows(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in records.values():
        metrics = {k: v for k, v in sorted(rec["metrics"].items()) if isinstance(v, (int, float))}
        rows.append({"stage": rec["name"], "key": rec["key"], "status": "skipped" if rec["skipped"] else "ran",
                     "seconds": round(rec["seconds"], 2), "runner": rec["runner"],
                     "metrics": ", ".join(f"{k}={_num(v)}" for k, v in list(metrics.items())[:4]),
                     "mlflow_run": rec.get("mlflow_run_id", "")})
    return rows


def metric_rows(metrics: dict[str, Any], thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """One row per metric and per gated metric: a gated one the evaluation could not measure (no questions in
    the data, say) is a row that fails, as it fails the gate."""
    rows = []
    for name in sorted(set(metrics) | set(thresholds)):
        value, threshold = metrics.get(name), thresholds.get(name)
        measured = isinstance(value, (int, float)) and value == value
        passes = "" if threshold is None else ("yes" if measured and value >= threshold else "NO")
        rows.append({"metric": name, "value": value if measured else "missing",
                     "threshold": "" if threshold is None else threshold, "passes": passes})
    return rows


def publish_stages(records: dict[str, dict[str, Any]]) -> None:
    if records:
        create_table_artifact(stage_rows(records), key="kelix-stages",
                              description="Stages of this run: key, ran or skipped (cached), time, metrics")


def publish_eval(store: Any, record: dict[str, Any], thresholds: dict[str, float], stage: str = "eval") -> dict[str, str]:
    """eval.md, the metrics table and the sample grid of one evaluation; returns where the grid is."""
    key = record["key"]
    report = store.read_text(stage, key, "eval.md")
    if report:
        create_markdown_artifact(report, key="kelix-eval-report", description=f"Evaluation report ({stage} {key})")
    create_table_artifact(metric_rows(record["metrics"], thresholds), key="kelix-eval-metrics",
                          description="Evaluation metrics against the release thresholds (higher is better)")
    if not store.exists(stage, key, "grid.png"):
        return {}
    grid = store.url(stage, key, "grid.png")
    if grid.startswith(("http://", "https://")):
        create_image_artifact(grid, key="kelix-samples", description="Generations, answers and reconstructions")
    else:
        create_markdown_artifact(
            f"# Sample grid\n\nGenerations under their prompts, test images with the model's answers, originals beside "
            f"their reconstructions.\n\n![sample grid]({grid})\n\nFile: `{grid.removeprefix('file://')}`\n",
            key="kelix-samples", description="Sample grid (local file)")
    return {"grid": grid}


def release_markdown(release: dict[str, Any]) -> str:
    lines = [f"# Release: {release.get('model')} v{release.get('version')}", ""]
    lines.append(f"- registered: {'yes (this run)' if release.get('registered_now') else 'earlier run, reused'}")
    lines.append(f"- gate: **{'passed' if release.get('gate_passed') else 'FAILED'}**")
    for failure in release.get("gate_failures") or []:
        lines.append(f"  - {failure}")
    lines.append(f"- promotion: {release.get('promotion', 'not attempted')}")
    aliases = release.get("aliases") or {}
    if aliases:
        lines.append("- aliases: " + ", ".join(f"`{a}` -> v{v}" for a, v in sorted(aliases.items())))
    lines.append(f"- load it: `kelix.registry.load_bundle(\"models:/{release.get('model')}/{release.get('version')}\")`")
    return "\n".join(lines) + "\n"


def publish_release(release: dict[str, Any]) -> None:
    create_markdown_artifact(release_markdown(release), key="kelix-release",
                             description="Registered model version, gate verdict and aliases")


def summary_text(summary: dict[str, Any]) -> str:
    """The closing summary, as plain text for stdout (and, fenced, inside the markdown artifact)."""
    out = [f"Kelix pipeline {summary.get('status', '')}: preset {summary['preset']}, runner {summary['runner']}, "
           f"{summary['seconds']:.1f}s"]
    out.append(f"  data       {summary['data']} (version {summary['data_version']})")
    out.append(f"  artifacts  {summary['artifacts']}")
    ran = [r for r in summary["stages"].values() if not r["skipped"]]
    out.append(f"  stages     {len(ran)} ran, {len(summary['stages']) - len(ran)} skipped (outputs for their key existed)")
    for r in summary["stages"].values():
        state = "skipped" if r["skipped"] else f"ran {r['seconds']:.1f}s"
        out.append(f"    {r['name']:12s} {r['key']}  {state}")
    metrics = summary.get("eval_metrics") or {}
    if metrics:
        out.append("  evaluation " + "  ".join(f"{k}={_num(v)}" for k, v in sorted(metrics.items())[:8]))
    if summary.get("grid"):
        out.append(f"  samples    {summary['grid']}")
    release = summary.get("release")
    if release:
        gate = "passed" if release.get("gate_passed") else "FAILED: " + "; ".join(release.get("gate_failures") or [])
        out.append(f"  model      {release['model']} v{release['version']} - gate {gate}")
        out.append(f"  promotion  {release.get('promotion')}")
    out.append(f"  MLflow     {summary['mlflow']}")
    out.append(f"  Prefect    {summary['prefect']}")
    return "\n".join(out)


def publish_summary(summary: dict[str, Any]) -> None:
    create_markdown_artifact(f"# Kelix pipeline\n\n```\n{summary_text(summary)}\n```\n", key="kelix-summary",
                             description="Where to look: stages, evaluation, model version, MLflow and Prefect runs")


def prefect_location() -> str:
    """How to find this flow run in the Prefect UI."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    run_id, name = flow_run.id, flow_run.name
    ui = PREFECT_UI_URL.value()
    if PREFECT_API_URL.value() and ui:
        return f"{ui.rstrip('/')}/runs/flow-run/{run_id}"
    return (f"flow run '{name}' ({run_id}) in the local Prefect database; browse it with "
            f"`prefect server start` -> http://127.0.0.1:4200/runs/flow-run/{run_id}")
