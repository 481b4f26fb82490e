"""The subprocess runner drives the real `python -m kelix.stages run` command line in a child process.

The child is this module run as `python -m tests.test_runner_process run NAME ...`: it swaps the catalogue's
entries for `toy_stage` (the stage names, sections and inputs stay real, so keys match the parent's) and
calls `kelix.stages.cli.main` inside `kelix.tracking.stage_run_from_env()`, the way the stage entry point is
meant to. KELIX_TOY_MODE picks how the toy stage behaves.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from kelix.config import load_config
from kelix.runners import StageConfigError, StageFailed, TransientStageError, is_transient
from kelix.runners.process import SubprocessRunner

MODULE = "tests.test_runner_process"


def toy_stage(ctx) -> dict[str, float]:
    mode = os.environ.get("KELIX_TOY_MODE", "ok")
    ckpt = ctx.out_dir / "checkpoints"
    resumed = ckpt.exists() and any(ckpt.iterdir())
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "step_0000001").write_text("1")
    print(f"toy {ctx.name} mode={mode} resumed={resumed}", flush=True)
    for step in range(3):
        ctx.logger.log({"loss": 1.0 / (step + 1)}, step=step)
    if mode == "transient":
        raise ConnectionError("connection reset by the object store")
    if mode == "bug":
        raise ValueError("shapes do not match: (3, 4) vs (4, 3)")
    if mode == "missing":
        raise FileNotFoundError("no such file: weights.safetensors")
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang":
        (ctx.out_dir / "pid").write_text(str(os.getpid()))
        time.sleep(600)  # silent: no output for the runner to read
    (ctx.out_dir / "model").mkdir(exist_ok=True)
    return {"loss": 0.25, "resumed": float(resumed)}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "manifest.jsonl").write_text('{"key": "a"}\n')
    (data / "images" / "a.png").write_bytes(b"png")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the child finds `tests.` from the repo root
    return {"cfg": load_config("tiny"), "data": data, "artifacts": str(tmp_path / "artifacts")}


def _runner(mode: str, timeout: float = 120) -> SubprocessRunner:
    return SubprocessRunner(module=MODULE, env={"KELIX_TOY_MODE": mode}, timeout=timeout)


def test_stage_runs_in_a_child_logs_into_mlflow_and_is_skipped_after(setup, tmp_path, runner_log):
    from kelix.tracking import TAG_CHILD_LOGGED, Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_pipeline(setup["cfg"], run_name="test", tags={})
    run = tracker.stage_run(parent, "tokenizer-1", "k", {})
    result = _runner("ok").run("tokenizer-1", setup["cfg"], setup["data"], setup["artifacts"], tracking=run)
    assert not result.skipped and result.metrics == {"loss": 0.25, "resumed": 0.0}
    assert (result.out_dir / "model").is_dir()
    assert "[tokenizer-1] toy tokenizer-1 mode=ok resumed=False" in runner_log  # the child's output reached the log
    # The child reopened the stage's run from the environment and logged every step into it.
    logged = tracker.client.get_run(run.run_id)
    assert logged.data.tags[TAG_CHILD_LOGGED] == "true"
    assert [m.step for m in tracker.client.get_metric_history(run.run_id, "loss")] == [0, 1, 2]

    again = _runner("bug").run("tokenizer-1", setup["cfg"], setup["data"], setup["artifacts"])
    assert again.skipped and again.metrics["loss"] == 0.25  # finished: not started again, whatever it would do


def test_transient_failure_is_retryable_and_the_rerun_resumes(setup):
    with pytest.raises(TransientStageError, match="ConnectionError") as info:
        _runner("transient").run("tokenizer-1", setup["cfg"], setup["data"], setup["artifacts"])
    assert is_transient(info.value)
    result = _runner("ok").run("tokenizer-1", setup["cfg"], setup["data"], setup["artifacts"])
    assert result.metrics["resumed"] == 1.0


def test_a_bug_fails_permanently_with_the_error_and_log_tail(setup):
    with pytest.raises(StageFailed, match="ValueError: shapes do not match") as info:
        _runner("bug").run("tokenizer-1", setup["cfg"], setup["data"], setup["artifacts"])
    assert not is_transient(info.value)
    assert "toy tokenizer-1 mode=bug" in info.value.logs


def test_rejected_arguments_are_a_config_error(setup):
    with pytest.raises(StageConfigError, match="exited with code 2") as info:
        _runner("missing").run("tokenizer-1", setup["cfg"], setup["data"], setup["artifacts"])
    assert not is_transient(info.value)


def test_a_stage_another_process_is_running_is_retried_later(setup):
    """An orchestrator killed while its child trains, then rerun: the new child finds the stage locked, exits
    with EXIT_BUSY, and the flow retries it later (when the first has finished and this one skips)."""
    from kelix.artifacts import LOCK_FILE, ArtifactStore
    from kelix.files import exclusive_lock
    from kelix.stages.keys import data_fingerprint, stage_keys

    key = stage_keys(setup["cfg"], data_fingerprint(setup["data"]), ["tokenizer-1"])["tokenizer-1"]
    with exclusive_lock(ArtifactStore(setup["artifacts"]).local_dir("tokenizer-1", key) / LOCK_FILE):
        with pytest.raises(TransientStageError, match="exited with code 75: another process is running") as info:
            _runner("ok").run("tokenizer-1", setup["cfg"], setup["data"], setup["artifacts"])
    assert is_transient(info.value) and "is already running" in info.value.logs
    assert not _runner("ok").run("tokenizer-1", setup["cfg"], setup["data"], setup["artifacts"]).skipped


def test_a_killed_child_is_transient(setup):
    with pytest.raises(TransientStageError, match="SIGKILL"):
        _runner("kill").run("tokenizer-1", setup["cfg"], setup["data"], setup["artifacts"])


def test_a_silent_hang_is_stopped_at_the_timeout(setup):
    t0 = time.perf_counter()
    with pytest.raises(TransientStageError, match="ran past the runner's timeout of 20 s") as info:
        _runner("hang", timeout=20).run("tokenizer-1", setup["cfg"], setup["data"], setup["artifacts"])
    assert time.perf_counter() - t0 < 60
    assert "toy tokenizer-1 mode=hang" in info.value.logs  # what it printed before going quiet is kept
    pid = int(next(Path(setup["artifacts"]).rglob("pid")).read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child is gone, not left running


def test_missing_input_fails_before_starting_a_child(setup):
    from kelix.stages.run import StageInputMissing

    with pytest.raises(StageInputMissing, match="tokenizer-1"):
        _runner("ok").run("tokenizer-2", setup["cfg"], setup["data"], setup["artifacts"])


if __name__ == "__main__":
    import kelix.stages.catalogue as catalogue
    from kelix.stages.cli import main
    from kelix.tracking import stage_run_from_env

    catalogue.STAGES = {n: dataclasses.replace(s, entry=f"{MODULE}:toy_stage") for n, s in catalogue.STAGES.items()}
    with stage_run_from_env():
        code = main(sys.argv[1:])
    sys.exit(code)


def test_a_failed_marker_carries_the_verdict_of_where_it_failed(tmp_path):
    """A full disk is an OSError like a network blip; the stage judges it (not retried) and the runners, which
    see only the marker, follow that verdict. Markers without one are judged by the exception's name."""
    from kelix.artifacts import ArtifactStore
    from kelix.runners.base import marker_error

    store = ArtifactStore(tmp_path)
    full = "OSError: [Errno 28] no space left in /ckpt for the checkpoint of step 40"
    store.mark("llm-2", "k", "FAILED", error=full, transient=False)
    assert marker_error(store, "llm-2", "k") == (full, False)
    store.mark("llm-2", "k", "FAILED", error="OSError: [Errno 5] Input/output error")
    assert marker_error(store, "llm-2", "k")[1] is True
