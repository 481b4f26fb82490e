"""Run a loaded model over the test split and score it: the glue between KelixBundle and the metrics.

`evaluate_bundle` takes anything with the bundle's methods (`answer`, `generate`, `reconstruct`, `encode`,
`cfg`, `tokenizer.codebook_size`), produces the outputs in batches, scores them with the pure functions in
`kelix.eval.metrics` and writes the reports. It is shared by the eval stage and `kelix eval MODEL_URI`.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from kelix.data.format import DatasetError
from kelix.eval import metrics as M
from kelix.eval.report import write_reports
from kelix.eval.samples import first_records, generation_prompts, palette_prompts, vqa_questions

GRID_COLUMNS = 8


def _batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield i, items[i:i + size]


def _one_per_image(questions: list, answers: list[str]) -> list:
    """The first question of each image (grid variety), up to a row of the grid."""
    seen, out = set(), []
    for q, a in zip(questions, answers):
        if q.record["key"] not in seen and len(out) < GRID_COLUMNS:
            seen.add(q.record["key"])
            out.append((q, a))
    return out


def score_generation(bundle: Any, prompts: list, per_prompt: int, seed: int, batch_size: int
                     ) -> tuple[list[Image.Image], list[dict[str, bool]]]:
    """GenEval's protocol: `per_prompt` images for each prompt (`GenPrompt`s), each from its own seed, and the
    checks of every image; both lists hold a prompt's images next to each other."""
    from kelix.data.detector import detect

    samples = [p for p in prompts for _ in range(per_prompt)]
    generated: list[Image.Image] = []
    for start, chunk in _batched(samples, batch_size):
        # seed + start: image i gets seed + i whatever the batch size, so a prompt's images differ.
        generated += bundle.generate([p.prompt for p in chunk], seed=seed + start)
    return generated, [M.geneval_checks(p.objects, p.relation, detect(im)) for p, im in zip(samples, generated)]


def evaluate_bundle(bundle: Any, data_dir: str | Path, out_dir: str | Path, model_name: str = "",
                    log: Callable[[str], None] = print) -> dict[str, float]:
    """Every metric of the model on the test split of `data_dir`; writes eval.json, eval.md, grid.png."""
    from kelix.data.detector import detect
    from kelix.data.reader import iter_records, open_image

    ecfg = bundle.cfg.eval
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    records = list(iter_records(data_dir, "test"))
    if not records:
        raise DatasetError(f"{data_dir} has no test records to evaluate on: give a dataset with a test split (--data)")
    images: dict[str, Image.Image] = {}

    def image_of(rec: dict) -> Image.Image:
        if rec["key"] not in images:
            images[rec["key"]] = open_image(data_dir, rec)
        return images[rec["key"]]

    bs = max(1, ecfg.batch_size)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {"model": model_name, "data": str(data_dir), "test_records": len(records)}

    # Understanding.
    questions = vqa_questions(records, ecfg.num_vqa)
    answers: list[str] = []
    for _, chunk in _batched(questions, bs):
        answers += bundle.answer([image_of(q.record) for q in chunk], [q.q for q in chunk])
    metrics.update(M.vqa_scores(answers, [q.as_gold() for q in questions]))
    details["vqa"] = {"n": len(questions), "by_type": dict(Counter(q.type for q in questions)),
                      "holdout": sum(q.holdout for q in questions), "seen": sum(not q.holdout for q in questions)}
    log(f"eval: VQA accuracy {metrics.get('vqa_accuracy', float('nan')):.3f} on {len(questions)} questions")

    # Generation.
    prompts = generation_prompts(records, ecfg.num_generation_prompts) or palette_prompts(ecfg.num_generation_prompts)
    per_prompt = max(1, ecfg.images_per_prompt)
    generated, checks = score_generation(bundle, prompts, per_prompt, ecfg.seed, bs)
    metrics.update(M.geneval_scores(checks))
    details["geneval"] = {"prompts": len(prompts), "images_per_prompt": per_prompt, "images": len(checks),
                          "per_category": dict(Counter(c for ch in checks for c in ch))}
    log(f"eval: GenEval overall {metrics.get('geneval_overall', float('nan')):.3f} on {len(prompts)} prompts "
        f"x {per_prompt} images")
    first = slice(None, None, per_prompt)  # each prompt's first image, for the grid and the samples

    # Reconstruction.
    recon_recs = first_records(records, ecfg.num_reconstructions)
    originals = [image_of(r) for r in recon_recs]
    recons: list[Image.Image] = []
    for start, chunk in _batched(originals, bs):
        # seed + start: image i gets seed + i whatever the batch size, as in generation.
        recons += bundle.reconstruct(chunk, seed=ecfg.seed + start)
    recons = [r.convert("RGB").resize(o.size, Image.BICUBIC) if r.size != o.size else r.convert("RGB")
              for r, o in zip(recons, originals)]
    # An imported record's empty `objects` means "not annotated", not "nothing there": its reference is what
    # the detector finds in the original (the AE-DiT stage's own measure).
    expected = [r["objects"] or [{"shape": d.shape, "colour": d.colour, "box": list(d.box)} for d in detect(o)]
                for r, o in zip(recon_recs, originals)]
    metrics.update(M.reconstruction_scores(originals, recons, expected, [detect(im) for im in recons]))
    details["reconstruction"] = {"n": len(recons)}
    log(f"eval: reconstruction PSNR {metrics['recon_psnr']:.2f} dB, SSIM {metrics['recon_ssim']:.3f}")

    # Tokenizer codebooks.
    tok_recs = first_records(records, ecfg.num_tokenizer_images)
    codes = [bundle.encode([image_of(r) for r in chunk]).cpu() for _, chunk in _batched(tok_recs, bs)]
    size = int(bundle.tokenizer.codebook_size)
    metrics.update(M.codebook_scores(torch.cat(codes).numpy(), size))
    details["tokenizer"] = {"images": len(tok_recs), "codebook_size": size}

    tiles = [
        [(im, [p.prompt, "PASS" if all(c.values()) else "FAIL"])
         for p, im, c in zip(prompts, generated[first], checks[first])][:GRID_COLUMNS],
        [(image_of(q.record), [q.q, f"model: {a}", f"gold: {q.a}"]) for q, a in _one_per_image(questions, answers)],
        [tile for o, im, r in list(zip(originals, recons, recon_recs))[:GRID_COLUMNS // 2]
         for tile in ((o, ["original", r["key"]]), (im, ["reconstruction", r["key"]]))],
    ]
    details["samples"] = {
        "generation": [{"prompt": p.prompt, "checks": c} for p, c in zip(prompts[:GRID_COLUMNS], checks[first])],
        "vqa": [{"key": q.record["key"], "q": q.q, "answer": a, "gold": q.a} for q, a in zip(questions[:GRID_COLUMNS], answers)],
    }
    write_reports(out_dir, metrics, details, dict(ecfg.thresholds), tiles)
    return {k: float(v) for k, v in metrics.items() if not (isinstance(v, float) and np.isnan(v))}
