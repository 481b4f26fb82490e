"""The evaluation's outputs people read: `eval.json` (every number), `eval.md` (tables) and `grid.png`.

The grid shows what the numbers summarise: generations under their prompts (with the detector's verdict),
test images with a question, the model's answer and the gold answer, and originals beside their
reconstructions. Text is drawn with PIL's default font so no font file is needed.
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from kelix.eval.metrics import CATEGORIES

TILE = 128
TEXT_LINES = 5
LINE_H = 12


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def markdown(metrics: dict[str, float], details: dict, thresholds: dict[str, float]) -> str:
    out = ["# Kelix evaluation", ""]
    if details.get("model"):
        out += [f"Model: `{details['model']}`", ""]
    out += ["## Release gate", ""]
    out += _table(["metric", "value", "threshold", "passes"],
                  [(k, metrics.get(k, float("nan")), t, "yes" if metrics.get(k, -math.inf) >= t else "no")
                   for k, t in sorted(thresholds.items())])
    vqa = details.get("vqa", {})
    out += ["## Understanding (VQA exact match, test split)", ""]
    rows = [("all", vqa.get("n", 0), metrics.get("vqa_accuracy", float("nan")))]
    rows += [(f"type: {t}", n, metrics.get(f"vqa_acc_{t}", float("nan"))) for t, n in sorted(vqa.get("by_type", {}).items())]
    rows += [("held-out combinations", vqa.get("holdout", 0), metrics.get("vqa_holdout_accuracy", float("nan"))),
             ("seen combinations", vqa.get("seen", 0), metrics.get("vqa_seen_accuracy", float("nan")))]
    out += _table(["questions", "n", "accuracy"], rows)
    gen = details.get("geneval", {})
    per_prompt = gen.get("images_per_prompt", 1)
    images = gen.get("images", gen.get("prompts", 0))
    out += ["## Generation (GenEval-style, analytic detector)", "",
            f"{gen.get('prompts', 0)} test prompts, {per_prompt} image(s) each; every image is scored.", ""]
    rows = [(c, gen.get("per_category", {}).get(c, 0), metrics.get(f"geneval_{c}", float("nan"))) for c in CATEGORIES]
    rows += [("overall (mean of categories)", images, metrics.get("geneval_overall", float("nan"))),
             ("strict (every check of an image)", images, metrics.get("geneval_strict", float("nan")))]
    out += _table(["category", "images", "score"], rows)
    out += ["## Reconstruction (AE-DiT)", ""]
    out += _table(["images", "PSNR (dB)", "SSIM", "detector agreement"],
                  [(details.get("reconstruction", {}).get("n", 0), metrics.get("recon_psnr", float("nan")),
                    metrics.get("recon_ssim", float("nan")), metrics.get("recon_detector_agreement", float("nan")))])
    tok = details.get("tokenizer", {})
    out += [f"## Tokenizer codebooks ({tok.get('images', 0)} images, codebook size {tok.get('codebook_size', '?')})", ""]
    n_books = len([k for k in metrics if k.startswith("tok_util_")])
    out += _table(["sub-codebook", "utilisation", "perplexity"],
                  [(i, metrics[f"tok_util_{i}"], metrics[f"tok_ppl_{i}"]) for i in range(n_books)])
    return "\n".join(out)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=10)
    except TypeError:  # older Pillow without sized default fonts
        return ImageFont.load_default()


def _tile(image: Image.Image, lines: Sequence[str], font) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE + TEXT_LINES * LINE_H + 4), "white")
    tile.paste(image.convert("RGB").resize((TILE, TILE), Image.NEAREST), (0, 0))
    draw = ImageDraw.Draw(tile)
    wrapped = [w for line in lines for w in textwrap.wrap(line, 24) or [""]][:TEXT_LINES]
    for i, line in enumerate(wrapped):
        draw.text((2, TILE + 2 + i * LINE_H), line, fill="black", font=font)
    return tile


def grid(rows: Sequence[Sequence[tuple[Image.Image, Sequence[str]]]], path: Path) -> Path:
    """Save rows of (image, caption lines) tiles as one PNG."""
    font = _font()
    rows = [r for r in rows if r]
    cols = max((len(r) for r in rows), default=1)
    th = TILE + TEXT_LINES * LINE_H + 4
    canvas = Image.new("RGB", (cols * (TILE + 4), max(1, len(rows)) * (th + 4)), (235, 235, 235))
    for y, row in enumerate(rows):
        for x, (image, lines) in enumerate(row):
            canvas.paste(_tile(image, lines, font), (x * (TILE + 4), y * (th + 4)))
    canvas.save(path)
    return path


def write_reports(out_dir: Path, metrics: dict[str, float], details: dict, thresholds: dict[str, float],
                  tiles: Sequence[Sequence[tuple[Image.Image, Sequence[str]]]]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md", "grid": out_dir / "grid.png"}
    paths["json"].write_text(json.dumps({"metrics": metrics, "details": details}, indent=1, sort_keys=True, default=str))
    paths["md"].write_text(markdown(metrics, details, thresholds))
    grid(tiles, paths["grid"])
    return paths
