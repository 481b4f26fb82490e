"""The real pipeline end to end: every real stage on a shrunken tiny config, then a rerun, then one stage forced
through the subprocess runner (the real `python -m kelix.stages` entry point).

Slow (a few minutes on 2 CPU cores): it trains every stage for 3 steps on 192 images, evaluates, registers
and gates the model, then checks that nothing reruns without a change.
"""
from __future__ import annotations

import time

import pytest
from small_config import SMALL

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_real_pipeline_trains_evaluates_registers_then_skips_everything(prefect_api, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from flows.pipeline import kelix_pipeline
    from kelix.stages.catalogue import STAGES

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("KELIX_CACHE", str(tmp_path / "cache"))
    args = dict(preset="tiny", overrides=SMALL, data=str(tmp_path / "data" / "shapes"),
                artifacts=str(tmp_path / "artifacts"), retry_delay=0, progress=False)

    first = kelix_pipeline(**args)  # generates the dataset too: it does not exist yet
    assert [r["name"] for r in first["stages"].values() if not r["skipped"]] == list(STAGES)
    metrics = first["eval_metrics"]
    assert {"vqa_accuracy", "geneval_overall", "recon_detector_agreement"} <= set(metrics)
    release = first["release"]
    assert release["version"] == "1" and release["registered_now"]
    # An untrained model may fail the gate; either way the verdict and its reasons are recorded.
    assert release["gate_passed"] == (not release["gate_failures"])
    assert (tmp_path / "artifacts" / "eval" / first["stages"]["eval"]["key"] / "grid.png").exists()
    version = MlflowClient().get_model_version("kelix", "1")
    assert version.tags["lineage.pipeline_run_id"] == first["mlflow_run_id"]
    assert version.tags["lineage.eval_key"] == first["stages"]["eval"]["key"]

    t0 = time.perf_counter()
    second = kelix_pipeline(**args)
    rerun_seconds = time.perf_counter() - t0
    assert all(r["skipped"] for r in second["stages"].values())
    assert second["release"]["version"] == "1" and not second["release"]["registered_now"]
    assert rerun_seconds < 90, f"a rerun with nothing changed took {rerun_seconds:.0f}s"

    # One real stage through the real entry point in a child process, forced; of the rest, only what is built
    # on it (eval) reruns.
    third = kelix_pipeline(**args, runner="subprocess", force=["dit-2"], release=False)
    ran = [r["name"] for r in third["stages"].values() if not r["skipped"]]
    assert ran == ["dit-2", "eval"]
    run = MlflowClient().get_run(third["stages"]["dit-2"]["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kelix.runner"] == "subprocess"
    assert any(not k.startswith("final/") for k in run.data.metrics), "the child's step metrics reached MLflow"
