"""Kelix-Tok stages: what each stage trains, the CLI path, outputs, crash resume and checkpoint integrity."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from small_config import TOKENIZER, schedules

from kelix.config import load_config
from kelix.data.reader import load_split
from kelix.stages.catalogue import StageContext
from kelix.text import TextTokenizer, dataset_texts, train_text_tokenizer
from kelix.tokenizer import stages as tok_stages
from kelix.tokenizer.aux_decoder import AuxDecoder
from kelix.tokenizer.model import KelixTokenizer
from kelix.tokenizer.objective import TokenizerTrainer, make_step_fn, param_groups, text_kinds
from kelix.tokenizer.text_rows import TextRows
from kelix.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from kelix.train.metrics import MetricLogger

TINY = [*TOKENIZER, *schedules("num_steps=4", "batch_size=8", "checkpoint_every=2", "warmup_steps=1", "log_every=2",
                               sections=("tokenizer.train1", "tokenizer.train2", "tokenizer.train3"))]
STAGE_OF = {"align": "tokenizer-1", "pretrain": "tokenizer-2", "anneal": "tokenizer-3"}


def cfg_with(*extra: str):
    return load_config("tiny", overrides=[*TINY, *extra])


def context(cfg, data, out: Path, task: str, inputs: dict | None = None) -> StageContext:
    return StageContext(name=STAGE_OF[task], cfg=cfg, data_dir=Path(data), inputs=inputs or {}, out_dir=out,
                        device=torch.device("cpu"), logger=MetricLogger(out / "metrics.jsonl"), progress=False)


@pytest.fixture(scope="module")
def stage1(tiny_dataset, tmp_path_factory):
    """One finished tokenizer-1 output shared by the tests that start from it."""
    out = tmp_path_factory.mktemp("tok1")
    metrics = tok_stages.align(context(cfg_with(), tiny_dataset, out, "align"))
    return out, metrics


def _trainer(tiny_dataset, cfg):
    records, images = load_split(tiny_dataset, "train", cfg.tokenizer.image_size, limit=8)
    text_tok = train_text_tokenizer(dataset_texts(records), cfg.tokenizer.text_vocab_size)
    model = TokenizerTrainer(KelixTokenizer.from_config(cfg.tokenizer),
                             AuxDecoder.from_tokenizer_config(cfg.tokenizer, text_tok.vocab_size))
    return model, images.float() / 255, TextRows(records, text_tok, cfg.tokenizer.max_text_len)


STAGE1_TRAINS = ("tokenizer.encoder.merge.", "tokenizer.encoder.adapter.", "tokenizer.quantizer.proj",
                 "tokenizer.up.", "aux.in_proj.")


@pytest.mark.parametrize("task", ["align", "pretrain", "anneal"])
def test_gradients_reach_exactly_the_trained_parameters(tiny_dataset, task):
    cfg = cfg_with("tokenizer.adapter_lr_scale=0.5")
    model, images, rows = _trainer(tiny_dataset, cfg)
    groups = param_groups(model, task, cfg.tokenizer.train1)
    loss, metrics = make_step_fn(task)(model, (images, rows.packed(range(8), **text_kinds(task))))
    loss.backward()
    in_groups = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        trains = name.startswith(STAGE1_TRAINS) if task == "align" else True
        assert (id(p) in in_groups) == trains == p.requires_grad, name
        if trains:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{task}: no gradient reaches {name}"
        else:
            assert p.grad is None, f"{task}: frozen {name} got a gradient"
    assert ("caption_loss" in metrics) == (task != "anneal") and ("qa_loss" in metrics) == (task != "align")
    if task != "align":
        # Stage 2-3: the ViT trains at encoder_lr, reached through the straight-through estimator.
        vit = {id(p) for p in model.tokenizer.vit_parameters()}
        adapter = {id(p) for p in model.tokenizer.encoder.adapter_parameters()}
        lrs = {frozenset(id(p) for p in g["params"]): g["lr"] for g in groups}
        tcfg = cfg.tokenizer.train1
        assert lrs[frozenset(vit)] == tcfg.encoder_lr and lrs[frozenset(adapter)] == 0.5 * tcfg.lr
        assert sorted(lrs.values()).count(tcfg.lr) == 1  # everything else (codebooks, up, aux) at lr
        assert model.tokenizer.encoder.vit.embeddings.patch_embedding.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_packed_segments_equal_separate_rows(tiny_dataset):
    """Packing all of an image's questions in one sequence must not let them see each other."""
    cfg = cfg_with()
    model, _, rows = _trainer(tiny_dataset, cfg)
    aux = model.aux
    prefix = torch.randn(2, cfg.tokenizer.num_positions, cfg.tokenizer.embed_dim)
    packed = aux.packed_losses(prefix, rows.packed([0, 1]))
    for kind in ("caption", "qa"):
        total, count = 0.0, 0
        for j, i in enumerate([0, 1]):
            segs = ([(rows.captions[i], [])] if kind == "caption" else [(q, a) for q, a, _, _ in rows.qas[i]])
            for first, answer in segs:
                ids = torch.tensor([[rows.tok.bos_id, *first, *answer, rows.tok.eos_id]])
                start = 0 if kind == "caption" else len(first)
                logits = aux.logits(prefix[j:j + 1], ids)[0, start:-1]
                total += float(torch.nn.functional.cross_entropy(logits, ids[0, start + 1:], reduction="sum"))
                count += ids.shape[1] - 1 - start
        assert float(packed[kind]) == pytest.approx(total / count, rel=1e-5), kind


def test_stages_through_the_cli(tiny_dataset, tmp_path, capsys):
    from kelix.cli import main

    common = ["--data", str(tiny_dataset), "--artifacts", str(tmp_path / "art"),
              *[a for o in TINY for a in ("--set", o)], "--set", "tokenizer.train1.num_steps=3"]
    outs = []
    for name in ("tokenizer-1", "tokenizer-2", "tokenizer-3"):
        assert main(["stage", "run", name, *common]) == 0
        text = capsys.readouterr().out
        assert f"{name} [" in text and "vqa_accuracy" in text and "util_min" in text
        outs.append(next((tmp_path / "art" / name).iterdir()))
    for out in outs:
        assert (out / "model" / "model.safetensors").exists() and (out / "aux" / "aux.safetensors").exists()
        assert (out / "text_tokenizer.json").read_text() == (outs[0] / "text_tokenizer.json").read_text()
        metrics = json.loads((out / "metrics.json").read_text())
        assert 0 <= metrics["util_min"] <= 1 and 0 <= metrics["vqa_accuracy"] <= 1
        assert {"util_0", "util_1", "ppl_0", "ppl_1", "commitment_loss", "aux_caption_loss", "aux_vqa_loss"} <= set(metrics)
    assert json.loads((outs[0] / "metrics.json").read_text())["steps"] == 3
    tok = KelixTokenizer.from_pretrained(outs[2] / "model")
    assert tok.encode(torch.rand(2, 3, 32, 32)).shape == (2, 16, 2)
    assert TextTokenizer.load(outs[2]).vocab_size == 320
    # Rerunning a finished stage is a cache hit, not a retrain.
    assert main(["stage", "run", "tokenizer-3", *common]) == 0
    assert "skipped" in capsys.readouterr().out


def _crash_at(call: int):
    """A make_step_fn whose step function raises on its `call`-th invocation (a simulated crash)."""
    real = tok_stages.make_step_fn

    def factory(task):
        inner, calls = real(task), {"n": 0}

        def step_fn(model, batch):
            calls["n"] += 1
            if calls["n"] == call:
                raise RuntimeError("simulated crash")
            return inner(model, batch)

        return step_fn

    return factory


@pytest.mark.parametrize("task", ["align", "pretrain"])
def test_resume_after_crash_matches_uninterrupted_run(tiny_dataset, stage1, tmp_path, monkeypatch, task):
    cfg = cfg_with("tokenizer.train1.num_steps=5", "tokenizer.train2.num_steps=5")
    inputs = {} if task == "align" else {"tokenizer-1": stage1[0]}
    straight = tmp_path / "straight"
    tok_stages.run_task(context(cfg, tiny_dataset, straight, task, inputs), task)

    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        patch.setattr(tok_stages, "make_step_fn", _crash_at(4))  # dies in step 4, after the step-2 checkpoint
        with pytest.raises(RuntimeError, match="simulated crash"):
            tok_stages.run_task(context(cfg, tiny_dataset, crashed, task, inputs), task)
    assert [p.name for p in list_checkpoints(crashed / "checkpoints")] == ["step_0000002"]
    metrics = tok_stages.run_task(context(cfg, tiny_dataset, crashed, task, inputs), task)
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 5
    for part, name in (("model", "model.safetensors"), ("aux", "aux.safetensors")):
        from safetensors.torch import load_file

        a, b = load_file(straight / part / name), load_file(crashed / part / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{part}/{k} differs after resume"


def test_corrupt_and_half_written_checkpoints_are_detected(tiny_dataset, tmp_path, capsys):
    cfg = cfg_with()
    out = tmp_path / "run"
    tok_stages.run_task(context(cfg, tiny_dataset, out, "align"), "align")
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step_0000002", "step_0000004"]
    # Flip bytes in the newest checkpoint's weights: it no longer matches its recorded sha256.
    weights = ckpts[-1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-16:] = bytes(16)
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpts[-1])
    # A half-written checkpoint (no meta.json: the writer died before finishing) is not trusted either.
    half = out / "checkpoints" / "step_0000006"
    shutil.copytree(ckpts[0], half)
    (half / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(half)
    # A rerun with more steps says so and resumes from the newest checkpoint that verifies (step 2).
    capsys.readouterr()
    metrics = tok_stages.run_task(context(cfg_with("tokenizer.train1.num_steps=6"), tiny_dataset, out, "align"), "align")
    said = capsys.readouterr().out
    assert "skipping" in said and "corrupt" in said and "incomplete" in said
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 6


def test_stage_metrics_and_later_stage_checks_architecture(tiny_dataset, stage1, tmp_path):
    out, metrics = stage1
    for i in range(2):
        assert 0 < metrics[f"util_{i}"] <= 1 and 1 <= metrics[f"ppl_{i}"] <= 16
    assert metrics["util_min"] == min(metrics["util_0"], metrics["util_1"])
    assert (out / "aux_warmup" / "checkpoints").is_dir()
    bad = cfg_with("tokenizer.codebook_size=32")
    with pytest.raises(ValueError, match="codebook_size"):
        tok_stages.run_task(context(bad, tiny_dataset, tmp_path / "t2", "pretrain", {"tokenizer-1": out}), "pretrain")


@pytest.mark.parametrize("kind", ["single", "shared", "continuous"])
def test_ablation_quantizers_run_through_stage_1(tiny_dataset, tmp_path, kind):
    cfg = cfg_with(f"tokenizer.quantizer={kind}", "tokenizer.train1.num_steps=2")
    metrics = tok_stages.align(context(cfg, tiny_dataset, tmp_path / kind, "align"))
    assert 0 <= metrics["vqa_accuracy"] <= 1
    assert ("util_min" in metrics) == (kind != "continuous")
    if kind == "single":
        assert "util_0" in metrics and "util_1" not in metrics


def test_the_aux_vqa_loss_averages_only_batches_that_have_questions(tiny_dataset):
    """Imported data may carry no questions for some images: such a batch has no QA loss, not a loss of 0."""
    from kelix.tokenizer.evaluate import evaluate

    cfg = cfg_with()
    model, images, rows = _trainer(tiny_dataset, cfg)
    uint8 = (images * 255).round().to(torch.uint8)
    full = evaluate(model, rows, uint8[:4], batch_size=4)["aux_vqa_loss"]
    rows.qas[4:] = [[] for _ in rows.qas[4:]]  # the second batch of 4 has no questions
    assert evaluate(model, rows, uint8, batch_size=4)["aux_vqa_loss"] == pytest.approx(full)
    rows.qas = [[] for _ in rows.qas]
    assert "aux_vqa_loss" not in evaluate(model, rows, uint8, batch_size=4)
