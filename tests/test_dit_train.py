"""DiT training through the shared loop: step-pure batches, exact resume after a crash, learning, SFT curation."""
from __future__ import annotations

import pytest
import torch

from kelix.dit.config import DiTConfig
from kelix.dit.model import KelixDiT
from kelix.dit.trainer import DiTData, eval_loss, make_batches, per_example_loss, train_dit
from kelix.train.config import TrainConfig

COND_DIM, P = 12, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the tensors here are tiny


class Crash(RuntimeError):
    pass


def _setup(seed: int = 0):
    cfg = DiTConfig(image_size=8, output_size=8, patch_size=2, num_layers=1, num_heads=2, head_dim=16,
                    cross_attention_dim=32, cond_dropout=0.3)
    torch.manual_seed(seed)
    model = KelixDiT(cfg, COND_DIM)
    g = torch.Generator().manual_seed(1)
    # Images whose colour is a function of the condition: something a condition-reading model can learn.
    conds = torch.randn(24, P, COND_DIM, generator=g)
    colour = torch.sigmoid(conds[:, 0, :3] * 2)
    images = (colour[:, :, None, None].expand(24, 3, 8, 8) * 255).round().to(torch.uint8)
    return model, DiTData(images, conds)


def _train_cfg(**kw):
    base = dict(num_steps=6, batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, log_every=2)
    base.update(kw)
    return TrainConfig(**base)


def test_batches_are_a_pure_function_of_the_step():
    model, data = _setup()
    get_batch, _ = make_batches(model, data, _train_cfg())
    a, b, c = get_batch(3), get_batch(3), get_batch(4)
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
    assert not torch.equal(a["noise"], c["noise"]) and not torch.equal(a["sigma"], c["sigma"])
    assert a["x0"].shape == (4, 3, 8, 8) and a["cond"].shape == (4, P, COND_DIM) and a["drop"].dtype == torch.bool


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    model, data = _setup()
    assert model.cfg.ema_decay > 0  # the weight average is part of the state that must survive the crash
    train_dit(model, data, _train_cfg(), tmp_path / "straight", "dit", progress=False)

    crashing, data2 = _setup()
    real_loss, calls = crashing.loss, {"n": 0}

    def loss_then_crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 6, after the checkpoint of step 4
            raise Crash("killed")
        return real_loss(*args, **kwargs)

    crashing.loss = loss_then_crash
    with pytest.raises(Crash):
        train_dit(crashing, data2, _train_cfg(), tmp_path / "resumed", "dit", progress=False)
    resumed, data3 = _setup()  # a fresh process: same init, then the loop restores step 4
    result = train_dit(resumed, data3, _train_cfg(), tmp_path / "resumed", "dit", progress=False)
    assert result.resumed_from == 4 and result.step == 6
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_ema_averages_the_iterates_with_a_warmup():
    from kelix.dit.trainer import EMA

    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.9)
    expected = 0.0
    for n, w in enumerate([1.0, 2.0, 3.0, 4.0]):
        with torch.no_grad():
            net.weight.fill_(w)
        ema.update(net)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
    ema.copy_to(net)
    assert float(net.weight.detach()) == pytest.approx(expected)
    assert "num_updates" in dict(ema.named_buffers())


def test_training_learns_the_conditioned_images(tmp_path):
    model, data = _setup()
    before = eval_loss(model, data)
    train_dit(model, data, _train_cfg(num_steps=80, lr=1e-2, warmup_steps=5, checkpoint_every=80), tmp_path,
              "dit", progress=False)
    after = eval_loss(model, data)
    assert after < 0.5 * before
    # It reads the condition: the same images with each other's conditions are predicted worse.
    shuffled = DiTData(data.targets, data.conds[torch.roll(torch.arange(len(data.conds)), 1)])
    assert eval_loss(model, shuffled) > 1.1 * after
    # Per-example errors are batch-size independent and finite.
    e1, e2 = per_example_loss(model, data, batch_size=5), per_example_loss(model, data, batch_size=24)
    assert e1.shape == (24,) and torch.allclose(e1, e2, atol=1e-5)


def test_sft_selection_filters_disagreeing_labels_and_keeps_low_error_per_count():
    from kelix.data.shapes import ShapesSettings, make_example
    from kelix.dit.pipeline import to_tensor
    from kelix.dit.stages import select_sft
    import io
    from PIL import Image

    settings = ShapesSettings(counts={"train": 12, "val": 0, "test": 0})
    records, images = [], []
    for i in range(12):
        rec, png = make_example(settings, "train", i)
        records.append(rec)
        images.append(Image.open(io.BytesIO(png)).convert("RGB"))
    images = (to_tensor(images) * 255).round().to(torch.uint8)
    wrong = 3
    records[wrong]["objects"][0]["colour"] = "green" if records[wrong]["objects"][0]["colour"] != "green" else "red"
    errors = torch.arange(12, dtype=torch.float32).flip(0)  # later examples have lower error
    errors[wrong] = -1.0  # the lowest error of all: only the detector check can drop it
    keep = select_sft(records, images, errors, fraction=0.5)
    assert wrong not in keep
    by_count: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_count.setdefault(len(r["objects"]), []).append(i)
    for members in by_count.values():
        quota = max(1, round(0.5 * len(members)))
        agreeing = sorted((i for i in members if i != wrong), key=lambda i: float(errors[i]))
        assert sorted(i for i in members if i in keep) == sorted(agreeing[:quota])  # lowest error of that count


@pytest.mark.slow  # MLflow's SQLite store migrates its schema on first use (~5-30 s)
def test_sample_grids_go_to_the_active_mlflow_run(tmp_path):
    import mlflow

    from kelix.dit.trainer import grid_image

    model, data = _setup()
    calls = []

    def preview():
        calls.append(1)
        return grid_image([data.targets[:2].float() / 255])

    train_dit(model, data, _train_cfg(num_steps=4), tmp_path / "no-run", "dit", preview, grid_every=2, progress=False)
    assert not calls  # nobody would see the grid: not even sampled
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as run:
            train_dit(model, data, _train_cfg(num_steps=4), tmp_path / "run", "dit", preview, grid_every=2,
                      progress=False)
        found = mlflow.MlflowClient().list_artifacts(run.info.run_id, "images")
    finally:
        mlflow.set_tracking_uri(None)
    assert len(calls) == 2  # checkpoints at steps 2 and 4, grid_every 2
    assert len([f for f in found if f.path.endswith(".png")]) == 2
