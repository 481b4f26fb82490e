"""The real pipeline end to end: every real stage on a shrunken tiny config, then a rerun, then one stage forced
through the subprocess runner (the real `python -m kelix.stages` entry point).

Slow (a few minutes on 2 CPU cores): it trains every stage for 3 steps on 192 images, evaluates, registers
and gates the model, then checks that nothing reruns without a change.
"""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow

SMALL = [
    "data.num_train=128", "data.num_val=32", "data.num_test=32",
    "tokenizer.image_size=32", "tokenizer.patch_size=4", "tokenizer.vit_hidden_size=32", "tokenizer.vit_num_layers=1",
    "tokenizer.vit_num_heads=2", "tokenizer.vit_intermediate_size=64", "tokenizer.num_codebooks=2",
    "tokenizer.codebook_size=16", "tokenizer.code_dim=8", "tokenizer.base_dim=16", "tokenizer.embed_dim=32",
    "tokenizer.aux_hidden_size=32", "tokenizer.aux_num_layers=1", "tokenizer.aux_num_heads=2",
    "tokenizer.aux_num_kv_heads=1", "tokenizer.aux_intermediate_size=64", "tokenizer.text_vocab_size=320",
    "tokenizer.eval_images=16", "tokenizer.kmeans_images=64", "tokenizer.kmeans_iters=3",
    "tokenizer.aux_warmup.num_steps=2", "tokenizer.aux_warmup.batch_size=8",
    "llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=2", "llm.num_kv_heads=1", "llm.head_dim=16",
    "llm.intermediate_size=64", "llm.bd_hidden_size=32", "llm.bd_num_heads=2", "llm.bd_intermediate_size=64",
    "llm.val_questions=16", "llm.val_records=8",
    "dit.image_size=16", "dit.num_layers=1", "dit.num_eval_images=4", "dit.sample_steps=2",
    "eval.num_vqa=8", "eval.num_generation_prompts=3", "eval.num_reconstructions=2", "eval.num_tokenizer_images=8",
    "eval.sample_steps=2",
    *(f"{section}.{kv}" for section in ("tokenizer.train1", "tokenizer.train2", "tokenizer.train3", "llm.train1",
                                         "llm.train2", "llm.train3", "llm.train4", "dit.train1", "dit.train2",
                                         "dit.train_ae")
      for kv in ("num_steps=3", "batch_size=4", "checkpoint_every=2", "warmup_steps=1", "log_every=1")),
]


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_real_pipeline_trains_evaluates_registers_then_skips_everything(prefect_api, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    import kelix.stages as stages
    from flows.pipeline import kelix_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("KELIX_CACHE", str(tmp_path / "cache"))
    args = dict(preset="tiny", overrides=SMALL, data=str(tmp_path / "data" / "shapes"),
                artifacts=str(tmp_path / "artifacts"), retry_delay=0, progress=False)

    first = kelix_pipeline(**args)  # generates the dataset too: it does not exist yet
    assert [r["name"] for r in first["stages"].values() if not r["skipped"]] == list(stages.STAGES)
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

    # One real stage through the real entry point in a child process, forced; nothing else reruns.
    third = kelix_pipeline(**args, runner="subprocess", force=["dit-2"], release=False)
    ran = [r["name"] for r in third["stages"].values() if not r["skipped"]]
    assert ran == ["dit-2"]
    run = MlflowClient().get_run(third["stages"]["dit-2"]["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kelix.runner"] == "subprocess"
    assert any(not k.startswith("final/") for k in run.data.metrics), "the child's step metrics reached MLflow"
