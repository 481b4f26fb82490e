"""The Prefect pipeline's mechanics on Prefect's ephemeral API, with a stand-in stage catalogue.

The catalogue keeps the real stage names, sections and inputs (so keys, skipping and downstream reruns are
the real ones) but points every entry at `fake_stage` below, which behaves like a training stage: it logs
metrics, writes a checkpoint before it can fail and resumes from it, saves a model; the eval stand-in
builds a real (untrained) bundle, so registration, the gate and promotion run for real against MLflow.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest

import kelix.stages.catalogue as stage_catalogue
from kelix.config import ConfigError

STATE: dict = {"calls": [], "fail": {}, "resumed": []}
EVAL_METRICS = {"vqa_accuracy": 0.9, "geneval_overall": 0.8, "recon_detector_agreement": 0.9}


def fake_stage(ctx) -> dict[str, float]:
    STATE["calls"].append(ctx.name)
    ckpt = ctx.out_dir / "checkpoints"
    resumed = ckpt.exists() and any(ckpt.iterdir())
    if resumed:
        STATE["resumed"].append(ctx.name)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "step_0000002").write_text("2")
    for step in range(3):
        ctx.logger.log({"loss": 1.0 / (step + 1)}, step=step)
    pending = STATE["fail"].get(ctx.name)
    if pending:
        raise pending.pop(0)
    for dep, path in ctx.inputs.items():
        assert (path / "model" / "weights.txt").exists(), f"{ctx.name} got no model from {dep}"
    model = ctx.out_dir / "model"
    model.mkdir(exist_ok=True)
    (model / "weights.txt").write_text(json.dumps({"stage": ctx.name, "key": ctx.key}))
    if ctx.name == "eval":
        from PIL import Image

        from kelix.bundle import init_bundle

        init_bundle(ctx.out_dir / "bundle", ctx.cfg)
        (ctx.out_dir / "eval.md").write_text("# Kelix evaluation\n\n| metric | value |\n|---|---|\n")
        Image.new("RGB", (32, 16), (200, 40, 40)).save(ctx.out_dir / "grid.png")
        return dict(EVAL_METRICS)
    return {"loss": 0.25, "resumed": float(resumed)}


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def catalogue(monkeypatch):
    fake = {name: dataclasses.replace(stage, entry=f"{__name__}:fake_stage")
            for name, stage in stage_catalogue.STAGES.items()}
    monkeypatch.setattr(stage_catalogue, "STAGES", fake)
    STATE.update(calls=[], fail={}, resumed=[])
    return fake


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory):
    from kelix.data.config import DataConfig
    from kelix.data.shapes import generate

    root = tmp_path_factory.mktemp("data") / "shapes"
    return generate(root, DataConfig(num_train=256, num_val=64, num_test=64))


@pytest.fixture
def workspace(tmp_path, shapes_dataset, monkeypatch):
    """A fresh artifact store and MLflow store; the session's tiny dataset copied (validation may edit it)."""
    data = tmp_path / "data"
    shutil.copytree(shapes_dataset, data)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("KELIX_CACHE", str(tmp_path / "cache"))
    return {"data": str(data), "artifacts": str(tmp_path / "artifacts"), "root": tmp_path}


# Small evaluation sizes: they travel with the registered bundle, which the champion check evaluates for real.
OVERRIDES = ["data.num_train=256", "data.num_val=64", "data.num_test=64", "eval.num_vqa=4",
             "eval.num_generation_prompts=2", "eval.num_reconstructions=2", "eval.num_tokenizer_images=4",
             "eval.sample_steps=2"]


def _run(workspace, flow=None, **kw):
    from flows.pipeline import kelix_pipeline

    flow = flow or kelix_pipeline
    args = dict(data=workspace["data"], artifacts=workspace["artifacts"], retry_delay=0, progress=False,
                overrides=OVERRIDES)
    args["overrides"] = args["overrides"] + kw.pop("overrides", [])
    args.update(kw)
    return flow(**args)


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda a: a.created)[-1] if found else None


def test_pipeline_runs_everything_then_skips_then_reruns_only_downstream(prefect_api, catalogue, workspace):
    from mlflow import MlflowClient

    from flows.report import summary_text

    # 1. First run: every stage runs, in catalogue order; the model is registered, gated and promoted.
    first = _run(workspace)
    assert STATE["calls"] == list(stage_catalogue.STAGES)
    assert all(not r["skipped"] for r in first["stages"].values())
    assert first["release"]["version"] == "1" and first["release"]["gate_passed"]
    assert first["release"]["aliases"]["champion"] == "1"
    text = summary_text(first)
    assert "11 ran, 0 skipped" in text and "kelix v1 - gate passed" in text
    assert first["mlflow_run_id"] in text and "flow-run/" in text

    client = MlflowClient()
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.tags["kelix.pipeline"] == "true" and parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    stage_runs = {r.data.tags["kelix.stage"]: r for r in children if "kelix.stage" in r.data.tags}
    assert set(stage_runs) == set(stage_catalogue.STAGES)
    llm2 = stage_runs["llm-2"]
    assert llm2.data.tags["kelix.stage_key"] == first["stages"]["llm-2"]["key"]
    assert llm2.data.tags["kelix.git_sha"] and llm2.data.tags["kelix.data_version"]
    # The in-process stage's MetricLogger logged its steps into the stage's own run.
    history = client.get_metric_history(llm2.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]

    # The artifacts a person looks at exist.
    assert "Kelix evaluation" in _artifact("kelix-eval-report").data
    metrics_table = json.loads(_artifact("kelix-eval-metrics").data)
    assert {row["metric"] for row in metrics_table} == set(EVAL_METRICS)
    assert "grid.png" in _artifact("kelix-samples").data
    assert len(json.loads(_artifact("kelix-stages").data)) == len(stage_catalogue.STAGES)
    assert "PASSED" in _artifact("kelix-data-validation").data

    # 2. Nothing changed: every stage is skipped, nothing new is registered, and it is quick.
    STATE["calls"].clear()
    t0 = time.perf_counter()
    second = _run(workspace)
    assert time.perf_counter() - t0 < 60
    assert STATE["calls"] == []
    assert all(r["skipped"] for r in second["stages"].values())
    assert second["release"]["version"] == "1" and not second["release"]["registered_now"]
    assert second["release"]["promotion"] == "version 1 is already the champion" and second["release"]["gate_passed"]
    assert "unchanged since" in _artifact("kelix-data-validation").description
    skipped_run = client.search_runs([parent.info.experiment_id],
                                     filter_string=f"tags.`mlflow.parentRunId` = '{second['mlflow_run_id']}' "
                                                   "and tags.`kelix.stage` = 'llm-2'")[0]
    assert skipped_run.data.tags["kelix.skipped"] == "true"
    assert skipped_run.data.tags["kelix.source_run_id"] == llm2.info.run_id

    # 3. A DiT training setting changed: only the DiT stages it feeds and evaluation rerun.
    STATE["calls"].clear()
    third = _run(workspace, overrides=["dit.train1.lr=0.0005"])
    assert STATE["calls"] == ["dit-1", "dit-2", "eval"]
    assert third["stages"]["aedit"]["skipped"] and third["stages"]["llm-4"]["skipped"]
    assert third["release"]["version"] == "2" and third["release"]["aliases"]["champion"] == "2"
    assert third["release"]["aliases"]["previous-champion"] == "1"

    # 3b. A forced re-evaluation (say, after a fix in the eval code: keys do not hash code) is a new bundle with
    # new metrics under the same eval key: it is registered, not answered with v2's stale tags.
    STATE["calls"].clear()
    forced = _run(workspace, overrides=["dit.train1.lr=0.0005"], force=["eval"])
    assert STATE["calls"] == ["eval"] and forced["stages"]["eval"]["key"] == third["stages"]["eval"]["key"]
    assert forced["release"]["version"] == "3" and forced["release"]["registered_now"]
    again = _run(workspace, overrides=["dit.train1.lr=0.0005"])
    assert again["release"]["version"] == "3" and not again["release"]["registered_now"]

    # 4. The nightly check scores the champion for real: the untrained bundle is far below the metrics the
    # stand-in eval registered, so the run fails and says which metrics dropped.
    from flows.common import RunSettings
    from flows.evaluate import ChampionRegressed, evaluate

    settings = RunSettings(data=workspace["data"], artifacts=workspace["artifacts"], overrides=OVERRIDES)
    with pytest.raises(ChampionRegressed, match="vqa_accuracy"):
        evaluate(settings, model="models:/kelix@champion")
    assert "REGRESSED" in _artifact("kelix-model-check").data
    checked = evaluate(settings, model="models:/kelix@champion", fail_on_regression=False)  # reuses the scores
    assert checked["version"] == "3" and checked["regressions"]


def test_reproduce_reruns_a_registered_version_from_its_lineage(prefect_api, catalogue, workspace, monkeypatch):
    from kelix.registry.reproduce import reproduce

    # `--data` names the dataset; the config's data.root (data/shapes) does not hold it: the lineage does.
    first = _run(workspace)
    version = first["release"]["version"]
    STATE["calls"].clear()
    work, logs = workspace["root"] / "reproduce", []
    ok, rows = reproduce("kelix", version, artifacts=str(work / "artifacts"), work_dir=work, log=logs.append)
    assert ok, logs
    assert {r.name for r in rows} >= set(EVAL_METRICS) and all(r.ok for r in rows)
    assert set(STATE["calls"]) == set(stage_catalogue.ORDER)  # every stage ran again, into the new artifact store
    assert any("is the recorded version" in line for line in logs)
    report = json.loads((work / "reproduce.json").read_text())
    assert report["version"] == version and report["lineage"]["data_fingerprint"]
    # A rerun that lands elsewhere is reported, metric by metric.
    monkeypatch.setitem(EVAL_METRICS, "vqa_accuracy", 0.5)
    ok, rows = reproduce("kelix", version, artifacts=str(work / "artifacts-2"), work_dir=work, log=logs.append)
    assert not ok and [r.name for r in rows if not r.ok] == ["vqa_accuracy"]


def test_transient_failure_is_retried_and_resumes_from_its_checkpoint(prefect_api, catalogue, workspace):
    STATE["fail"]["tokenizer-2"] = [ConnectionError("S3 went away")]
    result = _run(workspace, release=False)
    assert STATE["calls"].count("tokenizer-2") == 2
    assert "tokenizer-2" in STATE["resumed"]
    assert result["stages"]["tokenizer-2"]["metrics"]["resumed"] == 1.0

    from mlflow import MlflowClient

    run = MlflowClient().get_run(result["stages"]["tokenizer-2"]["mlflow_run_id"])
    assert run.data.tags["kelix.attempts"] == "2" and run.info.status == "FINISHED"
    assert "kelix.error" not in run.data.tags  # the failed attempt's error is not the finished run's


def test_a_retried_flow_run_keeps_the_forced_stages_its_first_try_finished(prefect_api, catalogue, workspace):
    """A flow run retried by Prefect keeps its parameters: `force` has to mean the moment it first started, or
    the retry would start the forced stages over that the first try had finished."""
    from flows.pipeline import kelix_pipeline

    _run(workspace, release=False)
    STATE["calls"].clear()
    STATE["fail"]["llm-2"] = [ConfigError("fails the flow run (not retried as a stage)")]
    retried = kelix_pipeline.with_options(retries=1, retry_delay_seconds=0)
    result = _run(workspace, flow=retried, release=False, force=["llm-1"])
    assert STATE["calls"] == ["llm-1", "llm-2", "llm-2", "llm-3", "llm-4", "dit-1", "dit-2", "eval"]
    assert result["stages"]["llm-1"]["skipped"]


def test_bad_config_in_a_stage_fails_fast_without_retry(prefect_api, catalogue, workspace):
    STATE["fail"]["llm-2"] = [ConfigError("llm.hidden_size must divide by heads"), ConfigError("again")]
    with pytest.raises(ConfigError, match="hidden_size"):
        _run(workspace, release=False, retries=3)
    assert STATE["calls"].count("llm-2") == 1
    assert "llm-3" not in STATE["calls"]
    # The stage table still shows what finished before the failure, in the failed phase too (llm-1).
    shown = [row["stage"] for row in json.loads(_artifact("kelix-stages").data)]
    assert shown == ["tokenizer-1", "tokenizer-2", "tokenizer-3", "llm-1"]


def test_dataset_failing_validation_stops_before_training(prefect_api, catalogue, workspace):
    from flows.data import DataValidationFailed

    images = sorted((Path(workspace["data"]) / "images").rglob("*.png"))[:20]
    for path in images:
        path.write_bytes(b"not a png")
    with pytest.raises(DataValidationFailed):
        _run(workspace)
    assert STATE["calls"] == []
    assert "FAILED" in _artifact("kelix-data-validation").data


def test_missing_dataset_is_generated(prefect_api, catalogue, workspace, tmp_path):
    from flows.common import RunSettings
    from flows.data import validate_data

    target = tmp_path / "fresh" / "shapes"
    checked = validate_data(RunSettings(data=str(target), artifacts=str(tmp_path / "artifacts"), overrides=[
        "data.num_train=40", "data.num_val=10", "data.num_test=10"]))
    assert checked["action"] == "generated" and checked["passed"]
    assert (target / "manifest.jsonl").exists()


@pytest.mark.slow
def test_missing_dvc_tracked_dataset_is_pulled(prefect_api, tmp_path, monkeypatch):
    import subprocess

    import flows.data
    from flows.common import RunSettings
    from flows.data import validate_data
    from kelix.data.config import DataConfig
    from kelix.data.shapes import generate
    from kelix.data.versioning import run_dvc, snapshot

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    small = DataConfig(num_train=24, num_val=4, num_test=4)
    generate(repo / "data" / "shapes", small)
    run_dvc(["init", "-q"], repo)
    run_dvc(["remote", "add", "-d", "local", str(tmp_path / "remote")], repo)
    md5 = snapshot(repo / "data" / "shapes", small)
    shutil.rmtree(repo / "data" / "shapes")
    monkeypatch.setattr(flows.data, "repo_root", lambda: repo)  # the checkout whose data.dvc tracks the set

    checked = validate_data(RunSettings(data=str(repo / "data" / "shapes"), artifacts=str(tmp_path / "artifacts"),
                                        overrides=["data.num_train=24", "data.num_val=4", "data.num_test=4"]))
    assert checked["action"] == "dvc pull" and checked["passed"]
    assert (repo / "data" / "shapes" / "manifest.jsonl").exists() and md5.endswith(".dir")


def test_cli_rejects_a_bad_override_before_starting(capsys):
    from kelix.cli import main

    assert main(["pipeline", "run", "--set", "dit.no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err


def test_cli_refuses_the_kubernetes_runner_with_a_local_store(capsys, tmp_path):
    from kelix.cli import main

    assert main(["pipeline", "run", "--runner", "kubernetes", "--artifacts", str(tmp_path)]) == 2
    assert "s3://" in capsys.readouterr().err


@pytest.mark.parametrize("given, expected", [(["--schedule-timeout", "600"], 600.0),
                                             (["--schedule-timeout", "0"], None), ([], "unset")])
def test_cli_passes_the_schedule_timeout_to_the_kubernetes_runner(monkeypatch, given, expected):
    import flows.pipeline
    from kelix.cli import main

    seen = {}
    monkeypatch.setattr(flows.pipeline, "kelix_pipeline", lambda **kw: seen.update(kw["runner_options"]))
    assert main(["pipeline", "run", "--runner", "kubernetes", "--artifacts", "s3://bucket/runs", *given]) == 0
    assert seen.get("schedule_timeout", "unset") == expected


@pytest.mark.parametrize("force, finished, advice", [
    ([], [], "rerun the same command to resume"),
    (["llm-1", "llm-2"], ["llm-1", "llm-2"], "rerun the same command without --force to resume"),
    (["llm-1", "llm-2"], ["llm-1"], "rerun the same command with --force llm-2 only to resume"),
])
def test_a_failed_run_says_how_to_resume(monkeypatch, capsys, tiny_dataset, tmp_path, force, finished, advice):
    """Repeating --force after a failure would start over the forced stages this run finished; dropping it would
    skip those it had not reached (their old outputs count as finished)."""
    import flows.pipeline
    from flows.common import Context, RunSettings
    from kelix.artifacts import SUCCESS
    from kelix.cli import main

    store = str(tmp_path / "a")
    ctx = Context(RunSettings(artifacts=store, data=str(tiny_dataset)))
    for name in force:  # finished before this run: the force is meant to redo them
        ctx.store.mark(name, ctx.keys[name], SUCCESS)

    def fails(**kw):
        for name in finished:  # the forced stages this run got through before it failed
            ctx.store.mark(name, ctx.keys[name], SUCCESS, note="forced rerun")
        raise RuntimeError("llm-3 ran out of memory")

    monkeypatch.setattr(flows.pipeline, "kelix_pipeline", fails)
    flags = [a for name in force for a in ("--force", name)]
    assert main(["pipeline", "run", "--artifacts", store, "--data", str(tiny_dataset), *flags]) == 1
    assert advice in capsys.readouterr().err


def test_the_settings_mlflow_uri_is_the_registry_store_from_the_start(tmp_path, monkeypatch):
    """A flow that only registers or promotes never touches `ctx.tracker`: the registry must still use the
    store given in the settings, not the environment's."""
    from flows.common import Context, RunSettings
    from kelix.registry.store import tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    wanted = f"sqlite:///{tmp_path / 'mine.db'}"
    Context(RunSettings(mlflow_uri=wanted, artifacts=str(tmp_path / "artifacts"), data=str(tmp_path / "data")))
    assert tracking_uri() == wanted


def test_only_a_whole_pipeline_run_counts_as_having_trained_a_data_version(tmp_path, monkeypatch):
    """A phase flow run by hand on new data (here `evaluate`) must not stop watch-data from announcing it."""
    from flows.watch_data import last_trained_version
    from kelix.config import load_config
    from kelix.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the Tracker sets it: restored after the test
    tracker, cfg = Tracker(uri), load_config("tiny")
    for run_name, version in (("kelix-pipeline", "A.dir"), ("evaluate", "B.dir"), ("train-tokenizer", "B.dir")):
        run_id = tracker.start_pipeline(cfg, run_name=run_name, tags={"kelix.data_version": version})
        tracker.end_run(run_id, "FINISHED")
    assert last_trained_version(uri) == "A.dir"


def test_the_champion_check_counts_an_unmeasurable_gated_metric_as_a_regression():
    from flows.evaluate import regressions

    then = {"vqa_accuracy": 0.8, "geneval_overall": 0.5, "recon_psnr": 20.0}
    gated = {"vqa_accuracy": 0.5, "geneval_overall": 0.2}
    flat = lambda _: 0.02  # noqa: E731
    assert regressions({"vqa_accuracy": 0.79, "geneval_overall": 0.5}, then, gated, flat) == []
    assert regressions({"vqa_accuracy": 0.7, "geneval_overall": 0.5}, then, gated, flat) == [
        "vqa_accuracy: 0.8000 when registered -> 0.7000 now"]
    assert regressions({"geneval_overall": 0.5, "vqa_accuracy": float("nan")}, then, gated, flat) == [
        "vqa_accuracy: 0.8000 when registered -> not measured now"]
    assert regressions({"vqa_accuracy": 0.8}, then, gated, flat) == [
        "geneval_overall: 0.5000 when registered -> not measured now"]
    assert regressions({}, {"vqa_accuracy": 0.8}, {"recon_psnr": 18.0}, flat) == []  # ungated: not checked
    assert regressions({"vqa_accuracy": 0.8, "geneval_overall": 0.45}, then, gated, flat) == [
        "geneval_overall: 0.5000 when registered -> 0.4500 now"]
    per_metric = {"geneval_overall": 0.06}.get
    assert regressions({"vqa_accuracy": 0.8, "geneval_overall": 0.45}, then, gated, lambda k: per_metric(k, 0.02)) == []


def test_the_metrics_table_shows_a_gated_metric_the_evaluation_could_not_measure():
    from flows.report import metric_rows

    rows = {r["metric"]: r for r in metric_rows({"geneval_overall": 0.9, "recon_psnr": 20.0, "recon_ssim": float("nan")},
                                                {"geneval_overall": 0.6, "vqa_accuracy": 0.7})}
    assert rows["geneval_overall"]["passes"] == "yes" and rows["recon_psnr"]["passes"] == ""
    assert rows["vqa_accuracy"] == {"metric": "vqa_accuracy", "value": "missing", "threshold": 0.7, "passes": "NO"}
    assert rows["recon_ssim"]["value"] == "missing"


def test_forcing_a_stage_reruns_what_is_built_on_it(tmp_path):
    from flows.common import Context, RunSettings

    ctx = Context(RunSettings(force=["dit-1"], artifacts=str(tmp_path / "a"), data=str(tmp_path / "d")))
    assert [n for n in stage_catalogue.STAGES if ctx.forced(n)] == ["dit-1", "dit-2", "eval"]
    ctx = Context(RunSettings(force=["eval"], artifacts=str(tmp_path / "a"), data=str(tmp_path / "d")))
    assert [n for n in stage_catalogue.STAGES if ctx.forced(n)] == ["eval"]
