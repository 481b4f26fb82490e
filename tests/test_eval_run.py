"""The evaluation glue and reports, driven by an oracle model whose every score is known in advance.

The oracle answers with the gold answer, "generates" the test image a prompt was written for and
reconstructs an image by returning it, so a correct pipeline (selection, batching, detector, metrics,
reports) must report perfect scores; any slip in pairing outputs with their questions or prompts shows.
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from kelix.config import load_config
from kelix.data.config import DataConfig
from kelix.data.reader import iter_records, open_image
from kelix.eval.report import markdown
from kelix.eval.run import evaluate_bundle
from kelix.eval.samples import generation_prompts, palette_prompts, vqa_questions

P, N, S = 16, 2, 32


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from kelix.data.shapes import generate

    root = tmp_path_factory.mktemp("eval-data") / "shapes"
    return generate(root, DataConfig(num_train=0, num_val=0, num_test=30))


def _digest(image: Image.Image) -> str:
    return hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()


class Oracle:
    def __init__(self, root, cfg):
        self.cfg = cfg
        self.records = {_digest(open_image(root, r)): r for r in iter_records(root, "test")}
        self.by_prompt = {r["prompt"]: open_image(root, r) for r in reversed(list(iter_records(root, "test")))}
        self.tokenizer = type("Tok", (), {"codebook_size": S})()
        self.calls = {"answer": 0, "generate": 0}

    def answer(self, images, questions):
        self.calls["answer"] += 1
        out = []
        for im, q in zip(images, questions):
            gold = {qa["q"]: qa["a"] for qa in self.records[_digest(im)]["qa"]}
            out.append(gold[q].upper() + ".")  # normalisation must still count it right
        return out

    def generate(self, prompts, seed=0):
        self.calls["generate"] += 1
        # Image i of a batch comes from seed + i, as in `generate_images`.
        self.calls.setdefault("generated", []).extend((p, seed + i) for i, p in enumerate(prompts))
        return [self.by_prompt[p] for p in prompts]

    def reconstruct(self, images, seed=0):
        self.calls.setdefault("reconstruct_seeds", []).append(seed)
        return [im.copy() for im in images]

    def encode(self, images):
        # Position p always gets code p of every sub-codebook: P of S codes used, uniformly.
        return torch.arange(P).repeat(len(images), N, 1).transpose(1, 2).contiguous()


def test_oracle_scores_perfectly_and_reports(shapes, tmp_path):
    cfg = load_config("tiny", overrides=["eval.num_vqa=40", "eval.num_generation_prompts=12", "eval.images_per_prompt=3",
                                         "eval.num_reconstructions=6", "eval.num_tokenizer_images=10", "eval.batch_size=5"])
    oracle = Oracle(shapes, cfg)
    metrics = evaluate_bundle(oracle, shapes, tmp_path / "out", model_name="oracle", log=lambda _: None)
    assert metrics["vqa_accuracy"] == 1.0 and metrics["vqa_holdout_accuracy"] == 1.0
    assert {k for k in metrics if k.startswith("vqa_acc_")} >= {"vqa_acc_colour", "vqa_acc_shape", "vqa_acc_count"}
    assert metrics["geneval_overall"] == 1.0 and metrics["geneval_strict"] == 1.0
    assert {f"geneval_{c}" for c in ("single_object", "two_object", "counting", "colours", "position", "colour_attr")} <= set(metrics)
    assert metrics["recon_psnr"] == pytest.approx(100.0) and metrics["recon_ssim"] == pytest.approx(1.0)
    assert metrics["recon_detector_agreement"] == 1.0
    for i in range(N):
        assert metrics[f"tok_util_{i}"] == P / S and metrics[f"tok_ppl_{i}"] == pytest.approx(P)
    # 40 questions and 12 prompts x 3 images in batches of 5; a batch starts at seed + its first index.
    generated = oracle.calls.pop("generated")
    assert oracle.calls == {"answer": 8, "generate": 8, "reconstruct_seeds": [cfg.eval.seed, cfg.eval.seed + 5]}
    # GenEval's protocol: every prompt's images sit together and each has its own seed.
    prompts = [p.prompt for p in generation_prompts(list(iter_records(shapes, "test")), 12)]
    assert [p for p, _ in generated] == [p for p in prompts for _ in range(3)]
    assert [seed for _, seed in generated] == [cfg.eval.seed + i for i in range(36)]

    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["metrics"] == pytest.approx(metrics)
    assert report["details"]["vqa"]["n"] == 40
    assert {k: report["details"]["geneval"][k] for k in ("prompts", "images_per_prompt", "images")} == {
        "prompts": 12, "images_per_prompt": 3, "images": 36}
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "| vqa_accuracy | 1.0000 | 0.5000 | yes |" in md
    assert "| held-out combinations |" in md and "| position |" in md
    assert "12 test prompts, 3 image(s) each" in md and "| overall (mean of categories) | 36 | 1.0000 |" in md
    with Image.open(tmp_path / "out" / "grid.png") as grid:
        assert grid.width == 8 * 132 and grid.height == 3 * (128 + 5 * 12 + 4 + 4)


def test_unannotated_records_are_scored_against_the_detections_on_the_original(shapes, tmp_path):
    """Imported records carry `objects: []` (not annotated): a perfect reconstruction must still agree."""
    import shutil

    from kelix.data.format import MANIFEST

    data = tmp_path / "imported"
    shutil.copytree(shapes, data)
    lines = [json.loads(line) for line in (data / MANIFEST).read_text().splitlines()]
    (data / MANIFEST).write_text("".join(json.dumps({**r, "objects": []}) + "\n" for r in lines))
    cfg = load_config("tiny", overrides=["eval.num_vqa=5", "eval.num_generation_prompts=3",
                                         "eval.num_reconstructions=4", "eval.num_tokenizer_images=2"])
    metrics = evaluate_bundle(Oracle(data, cfg), data, tmp_path / "out", log=lambda _: None)
    assert metrics["recon_detector_agreement"] == 1.0


def test_wrong_answers_score_zero(shapes, tmp_path):
    cfg = load_config("tiny", overrides=["eval.num_vqa=10", "eval.num_generation_prompts=3",
                                         "eval.num_reconstructions=2", "eval.num_tokenizer_images=2"])
    oracle = Oracle(shapes, cfg)
    oracle.answer = lambda images, questions: ["purple banana"] * len(questions)
    oracle.generate = lambda prompts, seed=0: [Image.new("RGB", (64, 64), (250, 250, 250))] * len(prompts)
    metrics = evaluate_bundle(oracle, shapes, tmp_path, log=lambda _: None)
    assert metrics["vqa_accuracy"] == 0.0 and metrics["geneval_overall"] == 0.0


def test_sample_selection_is_deterministic_and_balanced(shapes):
    records = list(iter_records(shapes, "test"))
    qs = vqa_questions(records, 7)
    assert len(qs) == 7 and [q.q for q in qs] == [qa["q"] for r in records for qa in r["qa"]][:7]
    prompts = generation_prompts(records, 9)
    assert [min(len(p.objects), 3) for p in prompts] == [1, 2, 3] * 3
    assert prompts == generation_prompts(records, 9)
    two = [p for p in prompts if len(p.objects) == 2]
    assert all(p.relation in ("left of", "right of", "above", "below") for p in two)
    pal = palette_prompts(7)
    assert len(pal) == 7 and [len(p.objects) for p in pal] == [1, 2, 3, 1, 2, 3, 1] and pal[1].relation == "left of"


def test_prompts_outside_the_shapes_grammar_are_left_out(shapes):
    """Imported datasets keep their captions as prompts; the detector can only check shapes prompts."""
    records = list(iter_records(shapes, "test"))[:6]
    foreign = [{"key": "dog", "prompt": "a dog on a beach"}, {"key": "empty", "prompt": ""}]
    assert generation_prompts(foreign + records, 4) == generation_prompts(records, 4)
    assert generation_prompts(foreign, 4) == []  # the evaluation then falls back to palette_prompts


def test_markdown_marks_failed_thresholds():
    md = markdown({"vqa_accuracy": 0.4, "tok_util_0": 0.5, "tok_ppl_0": 3.0}, {}, {"vqa_accuracy": 0.5, "geneval_overall": 0.2})
    assert "| vqa_accuracy | 0.4000 | 0.5000 | no |" in md
    assert "| geneval_overall | n/a | 0.2000 | no |" in md
    assert "| 0 | 0.5000 | 3.0000 |" in md


def test_eval_stage_and_cli_with_untrained_models(shapes, tmp_path, tmp_path_factory, capsys):
    """The catalogue's `eval` stage on upstream outputs (untrained parts) run through kelix.stages.run.run_stage,
    then `kelix eval` on the bundle it assembled."""
    import shutil

    from kelix.artifacts import SUCCESS, ArtifactStore
    from kelix.bundle import PART_STAGES, check_bundle
    from kelix.cli import main
    from kelix.stages.keys import data_fingerprint, stage_keys
    from kelix.stages.run import run_stage
    from test_bundle_layout import tiny_bundle

    cfg = load_config("tiny", overrides=["eval.num_vqa=20", "eval.num_generation_prompts=3", "eval.num_reconstructions=2",
                                         "eval.num_tokenizer_images=4", "eval.sample_steps=2"])
    parts = tiny_bundle(tmp_path_factory.getbasetemp())
    store = ArtifactStore(tmp_path / "artifacts")
    keys = stage_keys(cfg, data_fingerprint(shapes))
    for part, stage in PART_STAGES.items():
        shutil.copytree(parts / part, store.local_dir(stage, keys[stage]) / "model")
        store.mark(stage, keys[stage], SUCCESS)
    shutil.copy(parts / "text_tokenizer.json", store.local_dir("llm-4", keys["llm-4"]) / "text_tokenizer.json")

    result = run_stage("eval", cfg, shapes, str(tmp_path / "artifacts"), progress=False)
    m = result.metrics
    for key in ("vqa_accuracy", "vqa_holdout_accuracy", "geneval_overall", "recon_ssim", "recon_detector_agreement",
                "tok_util_0"):
        assert 0.0 <= m[key] <= 1.0, key  # rates and SSIM
    assert 0.0 < m["recon_psnr"] <= 100.0
    # Perplexity of code use: 1 (one code) up to the codebook size (all used evenly).
    assert 1.0 <= m["tok_ppl_0"] <= cfg.tokenizer.codebook_size
    out = result.out_dir
    assert check_bundle(out / "bundle")["preset"] == "tiny"
    assert json.loads((out / "eval.json").read_text())["metrics"] == pytest.approx(m)
    assert (out / "eval.md").exists() and (out / "grid.png").exists()

    assert main(["eval", str(out / "bundle"), "--data", str(shapes), "--out", str(tmp_path / "cli"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "vqa_accuracy" in printed and (tmp_path / "cli" / "eval.md").exists()
    # The same model on the same data with the same seeds gives the same numbers.
    assert json.loads((tmp_path / "cli" / "eval.json").read_text())["metrics"] == pytest.approx(m)
