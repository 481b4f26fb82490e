"""The ViT's grounded warm-up: per-position labels from object boxes, the head, and its place in stage 1."""
from __future__ import annotations

import json

import pytest
import torch
from test_tokenizer_stages import cfg_with, context

from kelix.data.reader import load_split
from kelix.tokenizer import grounding
from kelix.tokenizer import stages as tok_stages
from kelix.tokenizer.config import TokenizerConfig
from kelix.tokenizer.encoder import VisionEncoder, feature_dim
from kelix.tokenizer.model import KelixTokenizer
from kelix.train.loop import train
from kelix.train.config import TrainConfig

RECORDS = [
    {"objects": [{"shape": "star", "colour": "red", "box": [0, 0, 16, 16]},
                 {"shape": "circle", "colour": "blue", "box": [10, 10, 32, 32]}]},
    {"objects": []},
]
I = grounding.IGNORE


def test_vocab_puts_the_background_class_first():
    vocab = grounding.attribute_vocab(RECORDS)
    assert vocab == {"shape": ["<none>", "circle", "star"], "colour": ["<none>", "blue", "red"]}


def test_positions_are_labelled_by_the_object_that_fills_them():
    vocab = grounding.attribute_vocab(RECORDS)
    labels = grounding.position_labels(RECORDS, vocab, grid=4, image_size=32)  # cells of 8 px, centres 4, 12, ...
    assert labels.shape == (2, 16, 2)
    # Star (2): box [0, 16), centre (8, 8): its box holds the centres of rows/columns 0-1, its middle half
    # (|d| < 4) none, so only the cell holding its centre, (1, 1), is labelled; (0, 0), (0, 1), (1, 0) are edges.
    # Circle (1): box [10, 32), centre (21, 21): its box holds rows/columns 1-3, its middle half (|d| < 5.5)
    # only (2, 2). (1, 1) is an edge of the circle's box but the star's core: the core claim wins.
    assert labels[0, :, 0].view(4, 4).tolist() == [[I, I, 0, 0],
                                                   [I, 2, I, I],
                                                   [0, I, 1, I],
                                                   [0, I, I, I]]
    assert labels[0, 5, 1] == vocab["colour"].index("red") and labels[0, 10, 1] == vocab["colour"].index("blue")
    assert (labels[1] == 0).all()  # no objects: every position is background


def test_accuracy_counts_only_object_positions():
    vocab = grounding.attribute_vocab(RECORDS)
    head = grounding.GroundingHead(4, vocab)
    labels = torch.zeros(1, 3, 2, dtype=torch.long)
    labels[0, 0] = torch.tensor([2, 2])
    with torch.no_grad():
        for h in head.heads:
            h.weight.zero_()
            h.bias.copy_(torch.arange(h.out_features, dtype=torch.float))  # always predicts the last class (2)
    acc = head.accuracy(torch.zeros(1, 3, 4), labels)
    assert acc == {"shape": 1.0, "colour": 1.0}  # right on the one object position; the 2 background ones don't count


def test_the_warm_up_teaches_the_tower_where_objects_are(tiny_dataset, tmp_path, one_thread):
    """40 steps on 64 images cut the shape loss (object plus background cross-entropy) by more than 40%."""
    cfg = TokenizerConfig(vit_hidden_size=32, vit_num_layers=1, vit_num_heads=2, vit_intermediate_size=64,
                          num_codebooks=2, code_dim=8)
    records, images = load_split(tiny_dataset, "train", cfg.image_size, limit=64)
    vocab = grounding.attribute_vocab(records)
    labels = grounding.position_labels(records, vocab, cfg.grid, cfg.image_size)
    torch.manual_seed(0)
    model = grounding.GroundingTrainer(VisionEncoder(cfg), grounding.GroundingHead(feature_dim(cfg), vocab))
    x = images.float() / 255
    with torch.no_grad():
        before = model.head.losses(model.encoder(x), labels)["shape"]
    losses = []

    def step_fn(m, batch):
        loss, metrics = grounding.grounding_step_fn(m, batch)
        losses.append(metrics["shape_loss"])
        return loss, metrics

    tcfg = TrainConfig(num_steps=40, batch_size=64, lr=1e-3, warmup_steps=2, weight_decay=0.0, checkpoint_every=100)
    train(model, [{"params": list(model.parameters()), "lr": tcfg.lr}], lambda i: (x, labels), step_fn, tcfg,
          tmp_path / "run", progress=False)
    with torch.no_grad():
        after = model.head.losses(model.encoder(x), labels)["shape"]
    assert float(before) > 1.0 and float(after) < 0.6 * float(before), (float(before), losses)


def test_stage_1_warms_the_tower_up_and_reports_it(tiny_dataset, tmp_path):
    out = tmp_path / "tok1"
    metrics = tok_stages.align(context(cfg_with("tokenizer.vit_warmup.num_steps=3"), tiny_dataset, out, "align"))
    assert 0 <= metrics["vit_warmup_shape_acc"] <= 1 and 0 <= metrics["vit_warmup_colour_acc"] <= 1
    logged = [json.loads(line) for line in (out / "vit_warmup" / "metrics.jsonl").read_text().splitlines()]
    assert any("vit_warmup_shape_loss" in row for row in logged)
    # Stage 1 itself keeps the tower frozen, so a tower unlike its seeded random init is the warm-up's work.
    trained = KelixTokenizer.from_pretrained(out / "model").encoder.vit.state_dict()
    init = KelixTokenizer.from_config(cfg_with().tokenizer).encoder.vit.state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in init)


@pytest.mark.parametrize("why", ["no boxes", "pretrained tower"])
def test_the_warm_up_is_skipped_where_it_cannot_or_need_not_run(tiny_dataset, tmp_path, capsys, why):
    cfg = cfg_with("tokenizer.vit_warmup.num_steps=3")
    records, images = load_split(tiny_dataset, "train", cfg.tokenizer.image_size, limit=8)
    if why == "no boxes":
        records = [{**r, "objects": []} for r in records]
    else:
        cfg.tokenizer.vit_pretrained = "weights/siglip"
    tok = KelixTokenizer.from_config(cfg_with().tokenizer)
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    assert tok_stages.warmup_vit(context(cfg, tiny_dataset, tmp_path, "align"), tok, records, images) == {}
    assert all(torch.equal(before[k], v) for k, v in tok.state_dict().items())
    assert ("no object boxes" in capsys.readouterr().out) == (why == "no boxes")


def test_recolouring_changes_colours_not_shapes():
    """Grey stays grey (the rotation's axis), coloured pixels change hue, and no pixel changes whether it
    differs from the background: the shapes are the same, in other colours."""
    x = torch.full((2, 3, 8, 8), 0.9)
    x[:, :, 2:5, 2:5] = torch.tensor([0.86, 0.15, 0.15])[:, None, None]  # a red square on light grey
    y = grounding.recolour(x, torch.rand(2, 3, generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(y[:, 0], y[:, 1], atol=1e-6)  # the square has a colour ...
    background = y[:, :, 0, 0]
    assert torch.allclose(background, background.mean(1, keepdim=True).expand_as(background), atol=1e-5)  # grey
    square = y[:, :, 3, 3]
    assert not torch.allclose(square[0], square[1], atol=0.05)  # each image draws its own colours
    assert ((y - y[:, :, :1, :1]).abs().amax(1) > 0.05).equal((x - x[:, :, :1, :1]).abs().amax(1) > 0.05)


def test_a_factorised_head_reads_shape_and_colour_from_their_own_sub_vectors():
    vocab = grounding.attribute_vocab(RECORDS)
    head = grounding.GroundingHead(16, vocab, parts=4)  # 4 sub-vectors of 4: shape reads 0-7, colour 8-15
    f = torch.randn(1, 3, 16)
    g = f.clone()
    g[..., 8:] += 1.0
    assert torch.equal(head.heads[0](f[..., head.reads["shape"]]), head.heads[0](g[..., head.reads["shape"]]))
    assert head.reads == {"shape": slice(0, 8), "colour": slice(8, 16)}
    # Invariance compares the shape sub-vectors in the quantizer's matching space (each LayerNorm-ed):
    # a colour-half change and a rescaling of a sub-vector cost nothing, a shape-half change does.
    assert float(head.invariance(f, g)) == 0.0
    scaled = f.clone()
    scaled[..., :4] *= 3.0
    assert float(head.invariance(f, scaled)) < 1e-8
    h = f.clone()
    h[..., 4:8] = torch.randn(1, 3, 4)
    assert float(head.invariance(f, h)) > 0.1
    assert float(grounding.GroundingHead(16, vocab).invariance(f, h)) == 0.0  # unfactorised: no invariance


def test_a_paired_batch_keeps_shape_labels_and_drops_recoloured_object_colours():
    vocab = grounding.attribute_vocab(RECORDS)
    labels = grounding.position_labels(RECORDS, vocab, grid=4, image_size=32)
    images = torch.rand(2, 3, 32, 32)
    draws = torch.rand(2, 3)
    x, y, paired = grounding.with_recolourings(images, labels, draws)
    # Every odd example is the recolouring of the one before it, with its row of the draws.
    assert paired and torch.equal(x[0], images[0]) and torch.equal(x[1], grounding.recolour(images[:1], draws[1:])[0])
    assert torch.equal(y[0], labels[0]) and torch.equal(y[1, :, 0], labels[0, :, 0])
    objects = labels[0, :, 0] > 0
    assert (y[1, objects, 1] == I).all()  # the recoloured objects' colours have no name
    assert torch.equal(y[1, ~objects, 1], labels[0, ~objects, 1])  # background and left-out edges are kept
