"""The shared loop: schedule, accumulation, atomic verified checkpoints, exact resume after a crash."""
from __future__ import annotations

import json

import pytest
import torch

from kelix.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from kelix.train.config import TrainConfig
from kelix.train.loop import train
from kelix.train.sampler import StepSampler
from kelix.train.schedule import lr_factor


class Crash(RuntimeError):
    pass


def _problem(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(64, 1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))
    model[0].weight.requires_grad_(False)  # a frozen part, as in stage 1s
    sampler = StepSampler(len(x), 8, seed=3)

    def get_batch(i):
        idx = torch.from_numpy(sampler.indices(i))
        return x[idx], y[idx]

    def step_fn(m, batch):
        xb, yb = batch
        loss = torch.nn.functional.mse_loss(m(xb), yb)
        return loss, {"mse": float(loss.detach())}

    return model, get_batch, step_fn


def _cfg(**kw):
    base = dict(num_steps=12, batch_size=8, lr=1e-2, warmup_steps=2, checkpoint_every=4, log_every=2, grad_accum_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.55)


def test_sampler_is_a_function_of_the_step():
    s = StepSampler(10, 4, seed=1)
    first = [s.indices(i).tolist() for i in range(5)]
    again = StepSampler(10, 4, seed=1)
    assert [again.indices(i).tolist() for i in reversed(range(5))][::-1] == first
    epoch0 = sorted(sum(first[:2], []) + first[2][:2])
    assert epoch0 == list(range(10))  # every example once per epoch
    # two ranks split the global batch without overlap
    r0, r1 = StepSampler(10, 4, seed=1, rank=0, world_size=2), StepSampler(10, 4, seed=1, rank=1, world_size=2)
    assert sorted(r0.indices(3).tolist() + r1.indices(3).tolist()) == sorted(s.indices(3).tolist())


def test_training_reduces_loss_and_freezes(tmp_path):
    model, get_batch, step_fn = _problem()
    frozen = model[0].weight.clone()
    before = float(step_fn(model.eval(), get_batch(0))[0])
    result = train(model, [{"params": model.parameters()}], get_batch, step_fn, _cfg(num_steps=40, lr=3e-2), tmp_path, progress=False)
    assert result.step == 40 and result.resumed_from == 0
    assert float(step_fn(model.eval(), get_batch(0))[0]) < 0.5 * before
    assert torch.equal(model[0].weight, frozen)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(2, 41, 2)) and "lr" in logged[0]
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert "0.weight" not in ckpt.model_state  # frozen weights come from the input stage, not the checkpoint
    assert len(list_checkpoints(tmp_path / "checkpoints")) == 2  # keeps the last two


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    model_a, get_batch, step_fn = _problem()
    train(model_a, [{"params": model_a.parameters()}], get_batch, step_fn, _cfg(), tmp_path / "a", progress=False)

    model_b, get_batch_b, step_fn_b = _problem()
    calls = {"n": 0}

    def crashing(m, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 6 + 1:  # micro-batch 13: during step 7, after the step-4 checkpoint
            raise Crash("killed")
        return step_fn_b(m, batch)

    with pytest.raises(Crash):
        train(model_b, [{"params": model_b.parameters()}], get_batch_b, crashing, _cfg(), tmp_path / "b", progress=False)
    model_c, get_batch_c, step_fn_c = _problem()
    result = train(model_c, [{"params": model_c.parameters()}], get_batch_c, step_fn_c, _cfg(), tmp_path / "b", progress=False)
    assert result.resumed_from == 4
    for (na, pa), (_, pc) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(pa, pc), na


def test_a_run_killed_after_its_last_checkpoint_still_returns_its_final_metrics(tmp_path):
    """Killed between the final checkpoint and the stage's SUCCESS, the rerun resumes with no step left to run;
    it used to return no metrics, so stages reported NaN losses for a finished training."""
    model, get_batch, step_fn = _problem()
    first = train(model, [{"params": model.parameters()}], get_batch, step_fn, _cfg(), tmp_path, progress=False)
    model_b, get_batch_b, step_fn_b = _problem()
    again = train(model_b, [{"params": model_b.parameters()}], get_batch_b, step_fn_b, _cfg(), tmp_path, progress=False)
    assert again.resumed_from == again.step == first.step
    assert again.metrics == first.metrics and "loss" in again.metrics


def test_corrupt_checkpoint_is_reported_and_skipped(tmp_path):
    model, get_batch, step_fn = _problem()
    train(model, [{"params": model.parameters()}], get_batch, step_fn, _cfg(num_steps=8), tmp_path, progress=False)
    older, newer = list_checkpoints(tmp_path / "checkpoints")
    blob = newer / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-7] + b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(newer)
    warnings = []
    assert latest_checkpoint(tmp_path / "checkpoints", warn=warnings.append).step == 4
    assert "corrupt" in warnings[0] and newer.exists()  # reported, never deleted
    (older / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(older)


def test_saving_below_corrupt_later_checkpoints_keeps_the_new_one_and_its_predecessor(tmp_path):
    """A run resumes from step 4 because steps 8 and 12 are corrupt; its next checkpoints must survive pruning
    (counting the corrupt later folders would delete the checkpoint just written and the good one before it)."""
    ckpts = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        save_checkpoint(ckpts, step, {"w": torch.ones(2)}, {}, keep=3)
    for step in (8, 12):
        (ckpts / f"step_{step:07d}" / "optim.pt").write_bytes(b"garbage")
    assert latest_checkpoint(ckpts, warn=lambda _: None).step == 4
    save_checkpoint(ckpts, 6, {"w": torch.ones(2)}, {}, keep=2)
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_0000004", "step_0000006", "step_0000008", "step_0000012"]
    save_checkpoint(ckpts, 7, {"w": torch.ones(2)}, {}, keep=2)
    assert [p.name for p in list_checkpoints(ckpts)][:2] == ["step_0000006", "step_0000007"]
    assert latest_checkpoint(ckpts, warn=lambda _: None).step == 7
    save_checkpoint(ckpts, 8, {"w": torch.ones(2)}, {}, keep=2)  # training passes the corrupt one: replaced
    assert latest_checkpoint(ckpts, warn=lambda _: None).step == 8


def test_half_written_checkpoint_is_ignored(tmp_path):
    model, get_batch, step_fn = _problem()
    train(model, [{"params": model.parameters()}], get_batch, step_fn, _cfg(num_steps=4), tmp_path, progress=False)
    (tmp_path / "checkpoints" / ".tmp-step_0000008-123").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_0000004"]


def test_a_full_disk_leaves_no_temporary_copy_and_is_not_retried(tmp_path, monkeypatch):
    """A checkpoint write that fails removes its half-written folder (as large as a good one, and no later run
    reuses its pid-named path); a full disk is a clear error the runners do not retry. Folders that killed
    processes left behind are swept at the next save."""
    import errno
    import shutil

    import kelix.train.checkpoint as checkpoint
    from kelix.files import disk_full as disk_full_error
    from kelix.runners import is_transient

    ckpts = tmp_path / "checkpoints"
    save_checkpoint(ckpts, 2, {"w": torch.ones(2)}, {}, keep=2)
    (ckpts / ".tmp-step_0000003-99999").mkdir()  # a process killed mid-write

    def disk_full(*_, **__):  # what torch.save raises when the disk fills: no OS error in sight
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    usage = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(path)._replace(free=1024))
    with pytest.raises(OSError, match="no space left in .* for the checkpoint of step 4.*free space there and rerun") as err:
        save_checkpoint(ckpts, 4, {"w": torch.ones(2)}, {}, keep=2)
    assert err.value.errno == errno.ENOSPC and not is_transient(err.value)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]
    # Ctrl-C during a save on a nearly full disk is still an interrupt, not a full disk.
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpts, 5, {"w": torch.ones(2)}, {}, keep=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]
    assert is_transient(OSError(errno.EIO, "I/O error"))  # other I/O trouble is still retried
    # safetensors says it in words; a failure with room on the disk is left as it was.
    from safetensors import SafetensorError
    assert not is_transient(RuntimeError("save failed")) and disk_full_error(SafetensorError(
        "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"))
    # A quota is named as a quota (the disk itself may have room).
    def over_quota(*_, **__):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(checkpoint.torch, "save", over_quota)
    with pytest.raises(OSError, match="disk quota exceeded in .* step 7.*raise the quota") as err:
        save_checkpoint(ckpts, 7, {"w": torch.ones(2)}, {}, keep=2)
    assert err.value.errno == errno.EDQUOT and not is_transient(err.value)
    assert disk_full_error(RuntimeError("IoError(Os { code: 122, message: \"Disk quota exceeded\" })")) == errno.EDQUOT
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(RuntimeError, match="file write failed"):
        save_checkpoint(ckpts, 6, {"w": torch.ones(2)}, {}, keep=2)


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    model, get_batch, step_fn = _problem()
    result = train(model, [{"params": model.parameters()}], get_batch, step_fn, _cfg(num_steps=10_000, time_budget_s=0.2),
                   tmp_path, progress=False)
    assert result.stopped_by_budget and 0 < result.step < 10_000
    assert latest_checkpoint(tmp_path / "checkpoints").step == result.step


def test_the_time_budget_counts_the_training_time_of_earlier_tries(tmp_path, monkeypatch):
    """A budgeted stage killed and resumed used to get its whole budget again on every try."""
    import kelix.train.checkpoint as checkpoint

    model, get_batch, step_fn = _problem()
    real_save = checkpoint.save_checkpoint

    def as_if_it_had_trained_long(ckpt_dir, step, model_state, train_state, extra=None, keep=2):
        return real_save(ckpt_dir, step, model_state, train_state, {**extra, "train_seconds": 100.0}, keep)

    monkeypatch.setattr("kelix.train.loop.save_checkpoint", as_if_it_had_trained_long)
    train(model, [{"params": model.parameters()}], get_batch, step_fn, _cfg(num_steps=4), tmp_path, progress=False)
    monkeypatch.undo()
    model_b, get_batch_b, step_fn_b = _problem()
    result = train(model_b, [{"params": model_b.parameters()}], get_batch_b, step_fn_b,
                   _cfg(num_steps=10_000, time_budget_s=50), tmp_path, progress=False)
    assert result.resumed_from == 4 and result.stopped_by_budget and result.step == 5  # one step, then over
    assert result.seconds >= 100


def test_a_metric_some_micro_batches_lack_is_averaged_over_those_that_have_it(tmp_path):
    """With accumulation, a micro-batch without image blocks reports no code loss: it must not count as 0."""
    model, get_batch, step_fn = _problem()
    calls = []

    def counting_batches(i):
        calls.append(i)
        return get_batch(i)

    def only_even(m, batch):  # code loss on the first of each step's 2 micro-batches only
        loss, _ = step_fn(m, batch)
        return loss, ({"code_loss": 5.0} if len(calls) % 2 == 1 else {}) | {"always": 1.0}

    result = train(model, [{"params": model.parameters()}], counting_batches, only_even, _cfg(num_steps=2), tmp_path,
                   progress=False)
    assert result.metrics["code_loss"] == 5.0 and result.metrics["always"] == 1.0


def test_tensor_metrics_are_read_after_the_step_and_averaged_like_floats(tmp_path):
    """A step_fn may return its metrics as device tensors (nbp_loss does, so the host never waits mid-step)."""
    results = []
    for as_tensor in (False, True):
        model, get_batch, step_fn = _problem()

        def fn(m, batch, as_tensor=as_tensor):
            loss, _ = step_fn(m, batch)
            return loss, {"mse": loss.detach() if as_tensor else float(loss.detach())}

        results.append(train(model, [{"params": model.parameters()}], get_batch, fn, _cfg(num_steps=4),
                             tmp_path / str(as_tensor), progress=False))
    assert all(type(v) is float for v in results[1].metrics.values())
    assert results[1].metrics == pytest.approx(results[0].metrics, rel=1e-6)
    assert results[1].metrics["mse"] == pytest.approx(results[1].metrics["loss"], rel=1e-6)


def test_compile_units_train_compiled_and_run_eagerly_afterwards(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, get_batch, step_fn = _problem()
    compiled, _, _ = _problem()
    cfg = _cfg(num_steps=4, grad_accum_steps=1)
    plain = train(eager, [{"params": eager.parameters()}], get_batch, step_fn, cfg, tmp_path / "a", progress=False)
    fused = train(compiled, [{"params": compiled.parameters()}], get_batch, step_fn, cfg, tmp_path / "b",
                  progress=False, compile_units=lambda m: [m[2]])
    assert counters["stats"]["unique_graphs"] >= 1  # the unit really went through dynamo
    assert "forward" not in vars(compiled[2])  # the class's eager forward again
    assert fused.metrics["loss"] == pytest.approx(plain.metrics["loss"], rel=1e-4)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
