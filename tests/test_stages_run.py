"""`kelix.stages.run.run_stage` on a real training stage: skip when finished, start over when forced, and resume a
forced try that crashed instead of starting it over again."""
from __future__ import annotations

import os

from small_config import SMALL

from kelix.artifacts import FAILED, ArtifactStore


def test_forcing_a_finished_stage_trains_it_again_and_a_crashed_forced_try_resumes(tmp_path, tiny_dataset):
    from kelix.config import load_config
    from kelix.stages.run import run_stage

    cfg = load_config("tiny", overrides=[*SMALL, "tokenizer.train1.num_steps=4"])
    store = str(tmp_path / "store")
    first = run_stage("tokenizer-1", cfg, tiny_dataset, store, progress=False)
    assert not first.skipped and first.metrics["resumed_from_step"] == 0
    weights = (first.out_dir / "model" / "model.safetensors").read_bytes()
    assert run_stage("tokenizer-1", cfg, tiny_dataset, store, progress=False).skipped

    # Keys hash config and data, not code: a force (after a code fix) must train again, not resume the finished
    # run's last checkpoint and redo nothing.
    forced = run_stage("tokenizer-1", cfg, tiny_dataset, store, force=True, progress=False)
    assert not forced.skipped and forced.metrics["resumed_from_step"] == 0
    # The same seeded run, redone with deterministic kernels (runtime.deterministic): the same weights, bit for bit.
    assert forced.metrics["codebook_loss"] == first.metrics["codebook_loss"]
    assert (forced.out_dir / "model" / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in (forced.out_dir / "checkpoints").iterdir())[-1] == "step_0000004"

    # A forced try that crashed after its last checkpoint is not finished: forcing again resumes it.
    ArtifactStore(store).mark("tokenizer-1", forced.key, FAILED, error="killed")
    again = run_stage("tokenizer-1", cfg, tiny_dataset, store, force=True, progress=False)
    assert not again.skipped and again.metrics["resumed_from_step"] == 4


def test_runtime_deterministic_switches_torch_to_deterministic_kernels(monkeypatch):
    import torch

    from kelix.config import load_config
    from kelix.stages.run import apply_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        assert load_config("tiny").runtime.deterministic and not load_config("small").runtime.deterministic
        apply_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # what cuBLAS needs to be deterministic
        apply_determinism(False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_a_stage_whose_input_was_rerun_starts_over_and_says_so(tmp_path, tiny_dataset, capsys):
    """Forcing tokenizer-1 keeps its key; tokenizer-2, built on the earlier tokenizer-1, must not be skipped (or
    resumed from its last checkpoint) as if nothing had changed. Then it is current again."""
    from kelix.config import load_config
    from kelix.stages.cli import main
    from kelix.stages.run import run_stage

    cfg = load_config("tiny", overrides=SMALL)
    store = str(tmp_path / "store")
    run_stage("tokenizer-1", cfg, tiny_dataset, store, progress=False)
    second = run_stage("tokenizer-2", cfg, tiny_dataset, store, progress=False)
    assert run_stage("tokenizer-2", cfg, tiny_dataset, store, progress=False).skipped

    run_stage("tokenizer-1", cfg, tiny_dataset, store, force=True, progress=False)
    assert ArtifactStore(store).stale_inputs("tokenizer-2", second.key) == ["tokenizer-1"]
    argv = ["keys", "--data", str(tiny_dataset), "--artifacts", store, *[a for kv in SMALL for a in ("--set", kv)]]
    assert main(argv) == 0
    assert f"tokenizer-2  {second.key}  SUCCESS (stale: tokenizer-1 rerun since)" in capsys.readouterr().out

    again = run_stage("tokenizer-2", cfg, tiny_dataset, store, progress=False)
    assert not again.skipped and again.metrics["resumed_from_step"] == 0
    assert "tokenizer-2: starting over, its inputs tokenizer-1 were rerun after it finished" in capsys.readouterr().err
    assert run_stage("tokenizer-2", cfg, tiny_dataset, store, progress=False).skipped


def test_a_second_process_on_a_running_stage_is_refused_naming_the_first(tmp_path, tiny_dataset):
    """Two runs of one stage in one folder overwrite each other's checkpoints and markers (an orchestrator killed
    while its child trains, then rerun): the second is refused at once, naming the holder."""
    import os

    import pytest

    from kelix.artifacts import LOCK_FILE
    from kelix.config import load_config
    from kelix.files import exclusive_lock
    from kelix.runners import is_transient
    from kelix.stages.keys import data_fingerprint, stage_keys
    from kelix.stages.run import StageBusy, run_stage

    cfg = load_config("tiny", overrides=SMALL)
    store = ArtifactStore(tmp_path / "store")
    key = stage_keys(cfg, data_fingerprint(tiny_dataset), ["tokenizer-1"])["tokenizer-1"]
    with exclusive_lock(store.local_dir("tokenizer-1", key) / LOCK_FILE):  # what the first run holds
        with pytest.raises(StageBusy, match=rf"tokenizer-1 \[{key}\] is already running .*\"pid\": {os.getpid()}") as busy:
            run_stage("tokenizer-1", cfg, tiny_dataset, str(store.local_root), progress=False)
    assert is_transient(busy.value)  # the in-process runner's flow retries it too
    assert store.status("tokenizer-1", key) is None  # the refused run touched nothing
    assert not run_stage("tokenizer-1", cfg, tiny_dataset, str(store.local_root), progress=False).skipped


def test_a_retry_of_a_forced_stage_keeps_what_the_forced_run_finished(tmp_path, tiny_dataset):
    """The flows and runners pass `force` as the moment the run started: a retry after the forced run marked
    SUCCESS (a child killed after it, a replaced pod with --force baked in) must not wipe and retrain it."""
    import time

    from kelix.config import load_config
    from kelix.rerun import force_args, up_to_date
    from kelix.stages.run import run_stage

    cfg = load_config("tiny", overrides=[*SMALL, "tokenizer.train1.num_steps=4"])
    store = str(tmp_path / "store")
    run_stage("tokenizer-1", cfg, tiny_dataset, store, progress=False)
    started = time.time()
    forced = run_stage("tokenizer-1", cfg, tiny_dataset, store, force=started, progress=False)
    assert not forced.skipped and forced.metrics["resumed_from_step"] == 0
    assert run_stage("tokenizer-1", cfg, tiny_dataset, store, force=started, progress=False).skipped
    assert up_to_date(ArtifactStore(store), "tokenizer-1", forced.key, started)
    assert not up_to_date(ArtifactStore(store), "tokenizer-1", forced.key, True)
    assert force_args(started) == ["--force-before", repr(started)] and force_args(True) == ["--force"]
    assert force_args(False) == []


def test_an_unfinished_try_whose_input_was_rerun_starts_over(tmp_path, tiny_dataset):
    """tokenizer-2 crashed with checkpoints trained on the old tokenizer-1; tokenizer-1 is then forced. Resuming
    those checkpoints would finish a stage built on two different inputs and mark it current."""
    from kelix.config import load_config
    from kelix.stages.run import run_stage

    cfg = load_config("tiny", overrides=SMALL)
    store = ArtifactStore(tmp_path / "store")
    run_stage("tokenizer-1", cfg, tiny_dataset, str(store.local_root), progress=False)
    second = run_stage("tokenizer-2", cfg, tiny_dataset, str(store.local_root), progress=False)
    runs = store.status("tokenizer-2", second.key)["input_runs"]
    store.mark("tokenizer-2", second.key, FAILED, error="killed", input_runs=runs)  # as a crashed try leaves it
    run_stage("tokenizer-1", cfg, tiny_dataset, str(store.local_root), force=True, progress=False)
    again = run_stage("tokenizer-2", cfg, tiny_dataset, str(store.local_root), progress=False)
    assert again.metrics["resumed_from_step"] == 0 and store.is_current("tokenizer-2", second.key)


def test_a_stage_refuses_an_input_that_is_itself_stale(tmp_path, tiny_dataset):
    """Staleness reaches every stage below a rerun one: tokenizer-3 is stale after tokenizer-1 is forced, even
    though tokenizer-2 (its direct input) has not rerun yet, and llm-1 must not train on it."""
    import pytest

    from kelix.config import load_config
    from kelix.stages.run import StageInputMissing, run_stage

    cfg = load_config("tiny", overrides=SMALL)
    store = ArtifactStore(tmp_path / "store")
    results = {n: run_stage(n, cfg, tiny_dataset, str(store.local_root), progress=False)
               for n in ("tokenizer-1", "tokenizer-2", "tokenizer-3")}
    run_stage("tokenizer-1", cfg, tiny_dataset, str(store.local_root), force=True, progress=False)
    assert store.stale_inputs("tokenizer-3", results["tokenizer-3"].key) == ["tokenizer-2"]
    with pytest.raises(StageInputMissing, match="needs tokenizer-3 .*whose inputs tokenizer-2 were rerun after it"):
        run_stage("llm-1", cfg, tiny_dataset, str(store.local_root), progress=False)


def test_a_volume_that_cannot_lock_runs_the_stage_unguarded_with_a_warning(tmp_path, tiny_dataset, monkeypatch, capsys):
    import errno

    import kelix.stages.run
    from kelix.config import load_config
    from kelix.stages.run import run_stage

    def no_flock(path, timeout=0.0):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(kelix.stages.run, "exclusive_lock", no_flock)
    cfg = load_config("tiny", overrides=SMALL)
    assert not run_stage("tokenizer-1", cfg, tiny_dataset, str(tmp_path / "store"), progress=False).skipped
    err = capsys.readouterr().err
    assert "cannot lock" in err and "(No locks available); running without the guard" in err


def test_other_torchrun_ranks_follow_the_main_process_plan_without_reading_the_markers(tmp_path, tiny_dataset,
                                                                                       monkeypatch):
    """Ranks that read the markers each on its own could disagree: one sees the SUCCESS a finishing run just wrote
    and returns, another the RUNNING before it and trains, waiting at a collective for ever. A rank other than
    the main process takes the plan the main process broadcasts (the busy refusal included) and never reads a
    marker itself."""
    import pytest

    from kelix.stages import run as stage_run
    from kelix.config import load_config
    from kelix.train import distributed

    cfg = load_config("tiny", overrides=[*SMALL, "tokenizer.train1.num_steps=2"])
    store = str(tmp_path / "store")
    done = stage_run.run_stage("tokenizer-1", cfg, tiny_dataset, store, progress=False)
    # This rank's own view: the stage crashed. The main process found it finished.
    ArtifactStore(store).mark("tokenizer-1", done.key, FAILED, error="killed")
    broadcast = []
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    monkeypatch.setattr(distributed, "from_main", lambda obj: (broadcast.append(obj), main_says)[1])

    def no_markers(*args, **kwargs):
        raise AssertionError("a non-main rank read a marker")

    monkeypatch.setattr(ArtifactStore, "status", no_markers)
    main_says = ("", stage_run._Plan(done=True), "")
    result = stage_run.run_stage("tokenizer-1", cfg, tiny_dataset, store, progress=False)
    assert result.skipped and result.metrics == done.metrics
    assert broadcast == [("", None, "")]  # it sent nothing of its own

    main_says = ("stage tokenizer-1 [k] is busy: pid 1 on host-a", None, "")
    with pytest.raises(stage_run.StageBusy, match="pid 1 on host-a"):
        stage_run.run_stage("tokenizer-1", cfg, tiny_dataset, store, progress=False)

    main_says = ("", stage_run._Plan(missing="stage tokenizer-2 needs tokenizer-1"), "")
    with pytest.raises(stage_run.StageInputMissing, match="needs tokenizer-1"):
        stage_run.run_stage("tokenizer-1", cfg, tiny_dataset, store, progress=False)

    # The main process failed while planning (an unreadable store): the others hear of it instead of waiting.
    main_says = ("", None, "OSError: [Errno 5] Input/output error")
    with pytest.raises(RuntimeError, match="main process could not plan the run .OSError: .Errno 5"):
        stage_run.run_stage("tokenizer-1", cfg, tiny_dataset, store, progress=False)


def test_the_main_process_sends_its_planning_failure_to_the_other_ranks_then_raises_it(tmp_path, tiny_dataset,
                                                                                     monkeypatch):
    import pytest

    from kelix.stages import run as stage_run
    from kelix.config import load_config
    from kelix.train import distributed

    sent = []
    monkeypatch.setattr(distributed, "from_main", lambda obj: (sent.append(obj), obj)[1])

    def unreadable(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ArtifactStore, "status", unreadable)
    with pytest.raises(OSError, match="Input/output error"):
        stage_run.run_stage("tokenizer-1", load_config("tiny", overrides=SMALL), tiny_dataset, str(tmp_path), progress=False)
    assert sent == [("", None, "OSError: [Errno 5] Input/output error")]


def test_a_finished_stage_whose_output_was_truncated_is_refused_as_input_and_runs_again(tmp_path, tiny_dataset,
                                                                                       capsys):
    """A model file cut short after its stage finished (a full disk, a copy killed half-way) must not reach the
    next stage as a deserialising traceback: the marker records each output's size, the next stage names the
    damaged file, and the damaged stage is no longer current, so running it again starts it over."""
    import pytest

    from kelix.config import load_config
    from kelix.rerun import up_to_date
    from kelix.stages.run import StageInputMissing, run_stage

    cfg = load_config("tiny", overrides=[*SMALL, "tokenizer.train1.num_steps=2"])
    store = ArtifactStore(tmp_path / "store")
    first = run_stage("tokenizer-1", cfg, tiny_dataset, str(store.local_root), progress=False)
    weights = first.out_dir / "model" / "model.safetensors"
    size = weights.stat().st_size
    assert store.status("tokenizer-1", first.key)["files"]["model/model.safetensors"] == size
    assert "checkpoints/" not in " ".join(store.status("tokenizer-1", first.key)["files"])
    assert store.damaged("tokenizer-1", first.key) == [] and up_to_date(store, "tokenizer-1", first.key)

    with open(weights, "r+b") as fh:
        fh.truncate(1000)
    assert store.damaged("tokenizer-1", first.key) == [f"model/model.safetensors has 1000 bytes, {size} recorded"]
    assert not up_to_date(store, "tokenizer-1", first.key)
    with pytest.raises(StageInputMissing, match=r"needs tokenizer-1 .*damaged after it finished "
                                                r"\(model/model.safetensors has 1000 bytes.*kelix stage run tokenizer-1"):
        run_stage("tokenizer-2", cfg, tiny_dataset, str(store.local_root), progress=False)

    again = run_stage("tokenizer-1", cfg, tiny_dataset, str(store.local_root), progress=False)
    assert not again.skipped and again.metrics["resumed_from_step"] == 0
    assert "starting over, its outputs were damaged after it finished" in capsys.readouterr().err
    assert weights.stat().st_size == size and store.damaged("tokenizer-1", first.key) == []


def test_an_unknown_stage_name_is_a_one_line_error(capsys):
    from kelix.stages.cli import main

    assert main(["run", "llm-5"]) == 2
    assert "error: unknown stage 'llm-5'; stages are tokenizer-1, " in capsys.readouterr().err
