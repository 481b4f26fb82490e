"""MLflow lineage: pipeline and nested stage runs, retries reusing a stage's run, children logging via env."""
from __future__ import annotations

import pytest

from kelix.config import load_config
from kelix.tracking import (ENV_PARENT_RUN_ID, ENV_RUN_ID, ENV_TRACKING_URI, TAG_ATTEMPTS, TAG_CHILD_LOGGED, TAG_KEY,
                            TAG_SKIPPED, TAG_STAGE, Tracker, data_version, dvc_md5, flatten, stage_run_from_env)


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(ENV_RUN_ID, raising=False)
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "mlartifacts"))
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_pipeline_run_records_config_and_lineage(tracker):
    cfg = load_config("tiny", overrides=["tokenizer.num_codebooks=8"])
    run_id = tracker.start_pipeline(cfg, run_name="p", tags={"kelix.data_version": "abc"})
    run = tracker.client.get_run(run_id)
    assert run.data.params["tokenizer.num_codebooks"] == "8"
    assert run.data.tags["kelix.data_version"] == "abc" and run.data.tags["kelix.preset"] == "tiny"
    assert run.data.tags["kelix.git_sha"] and run.data.tags["kelix.config_hash"]
    assert "config.yaml" in {a.path for a in tracker.client.list_artifacts(run_id)}
    assert tracker.client.get_experiment(tracker.experiment_id).artifact_location.endswith("mlartifacts/kelix")


def test_stage_run_is_nested_reused_on_retry_and_replays_metrics(tracker):
    parent = tracker.start_pipeline(load_config("tiny"), run_name="p", tags={})
    first = tracker.stage_run(parent, "llm-1", "k1", {TAG_SKIPPED: "false"}, reuse=False)
    first.finish("FAILED")
    retry = tracker.stage_run(parent, "llm-1", "k1", {TAG_SKIPPED: "false"})
    assert retry.run_id == first.run_id
    run = tracker.client.get_run(retry.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags[TAG_ATTEMPTS] == "2"
    assert run.data.tags[TAG_STAGE] == "llm-1" and run.data.tags[TAG_KEY] == "k1" and run.info.status == "RUNNING"

    assert retry.replay_jsonl('{"step": 0, "loss": 2.0}\n{"step": 10, "loss": 1.5, "acc@1": 0.25}\n') == 3
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(retry.run_id, "loss")] == [(0, 2.0), (10, 1.5)]
    assert tracker.client.get_metric_history(retry.run_id, "acc_at_1")[0].value == 0.25
    retry.log_final({"loss": 1.5, "name": "not a number"})
    retry.finish()
    assert tracker.client.get_run(retry.run_id).data.metrics["final/loss"] == 1.5
    # A later pipeline that skips this stage points back at the run that trained it.
    assert tracker.source_run("llm-1", "k1") == retry.run_id


def test_in_process_activation_makes_the_metric_logger_log_into_the_stage_run(tracker, tmp_path):
    from kelix.train.metrics import MetricLogger

    parent = tracker.start_pipeline(load_config("tiny"), run_name="p", tags={})
    run = tracker.stage_run(parent, "dit-1", "k", {}, reuse=False)
    with run.active():
        MetricLogger(tmp_path / "m.jsonl").log({"loss": 0.5}, step=3)
    history = tracker.client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]


def test_a_child_reopens_the_stage_run_from_its_environment(tracker, monkeypatch, tmp_path):
    import mlflow

    from kelix.train.metrics import MetricLogger

    parent = tracker.start_pipeline(load_config("tiny"), run_name="p", tags={})
    run = tracker.stage_run(parent, "dit-2", "k", {}, reuse=False)
    env = run.env()
    assert env[ENV_RUN_ID] == run.run_id and env[ENV_PARENT_RUN_ID] == parent and env[ENV_TRACKING_URI] == tracker.uri
    assert run.env(remote=True) == {}  # a pod cannot reach a local SQLite file
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RANK", "1")
    with stage_run_from_env() as active:  # torchrun rank 1: logs nothing
        assert active is None and mlflow.active_run() is None
    monkeypatch.setenv("RANK", "0")
    with stage_run_from_env() as active:
        assert active.info.run_id == run.run_id
        MetricLogger(tmp_path / "m.jsonl").log({"loss": 0.25}, step=7)
    assert mlflow.active_run() is None
    logged = tracker.client.get_run(run.run_id)
    assert logged.data.tags[TAG_CHILD_LOGGED] == "true" and logged.data.metrics["loss"] == 0.25
    assert run.child_logged()


def test_without_a_run_in_the_environment_the_entry_point_runs_untracked(monkeypatch):
    monkeypatch.delenv(ENV_RUN_ID, raising=False)
    with stage_run_from_env() as active:
        assert active is None


def test_data_version_prefers_the_dvc_md5_of_the_tracked_folder(tmp_path):
    data = tmp_path / "data" / "shapes"
    (data / "images").mkdir(parents=True)
    (data / "manifest.jsonl").write_text('{"key": "a"}\n')
    dvc = tmp_path / "data.dvc"
    dvc.write_text("outs:\n- md5: 0123abcd.dir\n  path: data\n")
    assert dvc_md5(data, dvc) == "0123abcd.dir"
    assert dvc_md5(tmp_path / "elsewhere", dvc) is None
    assert data_version(data).startswith("content:")  # the repo's data.dvc does not track a tmp folder


def test_data_version_is_the_content_hash_when_the_folder_no_longer_holds_what_data_dvc_records(tmp_path, monkeypatch):
    """data.dvc keeps its md5 when the folder is regenerated or rewritten, until the next `dvc commit`."""
    import kelix.tracking as tracking

    data = tmp_path / "data" / "shapes"
    data.mkdir(parents=True)
    (data / "manifest.jsonl").write_text('{"key": "a"}\n')
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  size: 13\n  nfiles: 1\n  path: data/shapes\n")
    monkeypatch.setattr(tracking, "repo_root", lambda: tmp_path)
    assert data_version(data) == "0123abcd.dir"
    (data / "manifest.jsonl").write_text('{"key": "b"}\n{"key": "c"}\n')  # regenerated, not committed
    assert data_version(data).startswith("content:")


def test_flatten_gives_dotted_short_params():
    flat = flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x" * 900})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "x" * 500}


@pytest.mark.services
def test_a_child_keeps_training_when_the_mlflow_server_goes_away(tmp_path, monkeypatch, capsys):
    """The server dies mid-stage: training goes on, metrics.jsonl keeps every point, and the run is left untagged
    so the orchestrator replays the file (a tracking outage used to abort training with an MlflowException)."""
    import json

    from mlflow import MlflowClient
    from services import mlflow_server

    from kelix.train.metrics import MetricLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast here; production keeps its retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    logger = MetricLogger(tmp_path / "metrics.jsonl")
    with mlflow_server(tmp_path) as url:
        tracker = Tracker(url)
        parent = tracker.start_pipeline(load_config("tiny"), run_name="p", tags={})
        run = tracker.stage_run(parent, "llm-2", "k", {}, reuse=False)
        for k, v in run.env().items():
            monkeypatch.setenv(k, v)
        context = stage_run_from_env()
        context.__enter__()
        logger.log({"loss": 2.0}, step=1)
    # The server is gone (its SQLite file stays readable).
    for step in (2, 3):
        logger.log({"loss": 2.0 - 0.5 * step}, step=step)
    context.__exit__(None, None, None)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    err = capsys.readouterr().err
    assert err.count("MLflow stopped taking metrics at step 2") == 1 and "training goes on" in err
    stored = MlflowClient(f"sqlite:///{tmp_path / 'mlflow-server.db'}")
    assert [m.step for m in stored.get_metric_history(run.run_id, "loss")] == [1]
    assert TAG_CHILD_LOGGED not in stored.get_run(run.run_id).data.tags  # so the orchestrator replays the file

    # The orchestrator's replay, once MLflow is back, adds only what the outage lost: no step twice.
    replaying = Tracker(f"sqlite:///{tmp_path / 'mlflow-server.db'}")
    from kelix.tracking import StageRun

    again = StageRun(run.run_id, parent, replaying.uri, replaying.experiment_id, replaying)
    assert again.replay_jsonl((tmp_path / "metrics.jsonl").read_text(), after_logged=True) == 2
    assert [m.step for m in stored.get_metric_history(run.run_id, "loss")] == [1, 2, 3]
