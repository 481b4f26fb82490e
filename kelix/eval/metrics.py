"""Evaluation metrics as pure functions over already-produced outputs (answers, images, detections, codes).

Keeping models out of this module is what makes every number here checkable by hand: the eval stage
produces the outputs, these functions score them. Conventions:
- VQA is exact match after light normalisation (case, surrounding space, trailing punctuation); the
  held-out colour-shape combinations (records with `holdout`) are scored separately from the seen ones,
  which is the compositional-generalisation test of the shapes data.
- Images are float arrays HxWx3 in [0, 1] (uint8 arrays and PIL images are converted).
- PSNR caps at 100 dB (MSE floored at 1e-10) so identical images do not turn a mean into infinity.
- SSIM is Wang et al. 2004: Gaussian window sigma 1.5 (truncated at 3.5 sigma, the 11x11 window),
  K1 = 0.01, K2 = 0.03, data range 1, computed per channel and averaged.
- Codebook utilisation is the share of a sub-codebook's entries used at least once; perplexity is
  exp(entropy) of its usage histogram (S when use is uniform over all S entries, 1 when one code is used).
"""
from __future__ import annotations

import math
import string
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

_STRIP = string.whitespace + string.punctuation


def normalize_answer(text: str) -> str:
    return " ".join(str(text).lower().strip(_STRIP).split())


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


# ------------------------------------------------------------------------------------------------- VQA


def vqa_scores(predictions: Sequence[str], questions: Sequence[dict]) -> dict[str, float]:
    """Exact-match accuracy overall, per question type, on held-out and on seen combinations.

    `questions[i]` is {"a": gold answer, "type": question type, "holdout": bool} for `predictions[i]`.
    A subset with no questions is left out rather than reported as 0 or NaN.
    """
    if len(predictions) != len(questions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    hits = [normalize_answer(p) == normalize_answer(q["a"]) for p, q in zip(predictions, questions)]
    out = {"vqa_accuracy": _mean(hits)} if hits else {}
    by_type: dict[str, list[bool]] = {}
    for hit, q in zip(hits, questions):
        by_type.setdefault(q.get("type", "other"), []).append(hit)
    for qtype, vals in sorted(by_type.items()):
        out[f"vqa_acc_{qtype}"] = _mean(vals)
    held = [h for h, q in zip(hits, questions) if q.get("holdout")]
    seen = [h for h, q in zip(hits, questions) if not q.get("holdout")]
    if held:
        out["vqa_holdout_accuracy"] = _mean(held)
    if seen:
        out["vqa_seen_accuracy"] = _mean(seen)
    return out


# ------------------------------------------------------------------------------------------ GenEval-style

# GenEval's six task families, on shapes. A prompt feeds every family it can test (one generation, several
# checks), and the overall score is the mean of the family scores, as in GenEval.
CATEGORIES = ("single_object", "two_object", "counting", "colours", "position", "colour_attr")


def geneval_checks(objects: Sequence[dict], relation: str | None, detections: Sequence) -> dict[str, bool]:
    """Verdicts for one generated image, keyed by the categories this prompt can test.

    `objects` are the prompt's [{colour, shape}] in prompt order, `relation` is "left of" / "right of" /
    "above" / "below" between the first and the second object (or None), `detections` are
    `kelix.data.detector.Detection`s of the image.
    - single_object (1 object): the named shape is there, whatever its colour;
    - colours (1 object): the named shape is there in the named colour;
    - two_object (2 objects): both named shapes are there;
    - counting (2+ objects): exactly as many objects as named;
    - colour_attr (2+ objects): every named shape carries its own named colour (binding, not presence);
    - position (a relation): the first object stands in that relation to the second.
    """
    from kelix.data.detector import colour_ok, find, position_ok

    n = len(objects)
    has_shape = [bool(find(detections, shape=o["shape"])) for o in objects]
    bound = [colour_ok(detections, o["colour"], o["shape"]) for o in objects]
    checks: dict[str, bool] = {}
    if n == 1:
        checks["single_object"] = has_shape[0]
        checks["colours"] = bound[0]
    if n == 2:
        checks["two_object"] = all(has_shape)
    if n >= 2:
        checks["counting"] = len(detections) == n
        checks["colour_attr"] = all(bound)
    if relation:
        a, b = objects[0], objects[1]
        checks["position"] = position_ok(detections, (a["colour"], a["shape"]), relation, (b["colour"], b["shape"]))
    return checks


def geneval_scores(checks: Iterable[dict[str, bool]]) -> dict[str, float]:
    """Per-category pass rates, `geneval_overall` (their mean) and `geneval_strict` (images passing every
    check they have). Categories no prompt tested are left out of both the table and the mean."""
    checks = list(checks)
    per: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    for item in checks:
        for cat, ok in item.items():
            per.setdefault(cat, []).append(bool(ok))
    out = {f"geneval_{c}": _mean(v) for c, v in per.items() if v}
    if out:
        out["geneval_overall"] = _mean(list(out.values()))
    if checks:
        out["geneval_strict"] = _mean([all(item.values()) for item in checks])
    return out


# -------------------------------------------------------------------------------------- reconstruction


def to_float_image(image) -> np.ndarray:
    """HxWx3 float64 in [0, 1] from a PIL image, a uint8 array or a float array already in [0, 1]."""
    if hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def psnr(a, b) -> float:
    x, y = to_float_image(a), to_float_image(b)
    if x.shape != y.shape:
        raise ValueError(f"PSNR needs images of one shape, got {x.shape} and {y.shape}")
    mse = max(float(np.mean((x - y) ** 2)), 1e-10)
    return 10.0 * math.log10(1.0 / mse)


def ssim(a, b, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    x, y = to_float_image(a), to_float_image(b)
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs images of one shape, got {x.shape} and {y.shape}")
    c1, c2 = k1 ** 2, k2 ** 2

    def blur(z: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(z, sigma=sigma, truncate=3.5, mode="reflect")

    scores = []
    for ch in range(x.shape[-1]):
        u, v = x[..., ch], y[..., ch]
        mu_u, mu_v = blur(u), blur(v)
        var_u = blur(u * u) - mu_u ** 2
        var_v = blur(v * v) - mu_v ** 2
        cov = blur(u * v) - mu_u * mu_v
        num = (2 * mu_u * mu_v + c1) * (2 * cov + c2)
        den = (mu_u ** 2 + mu_v ** 2 + c1) * (var_u + var_v + c2)
        scores.append(float(np.mean(num / den)))
    return _mean(scores)


def detector_agreement(expected: Sequence[Sequence[dict]], detections: Sequence[Sequence]) -> float:
    """Share of reconstructions whose detected objects match the original's exactly (count, shape, colour)."""
    from kelix.data.detector import match_objects

    if len(expected) != len(detections):
        raise ValueError(f"{len(expected)} expected object lists for {len(detections)} detection lists")
    return _mean([match_objects(list(e), list(d)).exact for e, d in zip(expected, detections)])


def reconstruction_scores(originals: Sequence, reconstructions: Sequence, expected: Sequence[Sequence[dict]],
                          detections: Sequence[Sequence]) -> dict[str, float]:
    if len(originals) != len(reconstructions):
        raise ValueError(f"{len(originals)} originals for {len(reconstructions)} reconstructions")
    return {
        "recon_psnr": _mean([psnr(a, b) for a, b in zip(originals, reconstructions)]),
        "recon_ssim": _mean([ssim(a, b) for a, b in zip(originals, reconstructions)]),
        "recon_detector_agreement": detector_agreement(expected, detections),
    }


# ------------------------------------------------------------------------------------------- tokenizer


def codebook_scores(codes, codebook_size: int) -> dict[str, float]:
    """`tok_util_<i>` and `tok_ppl_<i>` per sub-codebook from codes [..., N] (any leading shape)."""
    arr = np.asarray(codes)
    if arr.ndim < 1 or arr.size == 0:
        raise ValueError("codebook_scores needs a non-empty array of codes [..., N]")
    flat = arr.reshape(-1, arr.shape[-1])
    if flat.min() < 0 or flat.max() >= codebook_size:
        raise ValueError(f"codes must lie in [0, {codebook_size}), got [{flat.min()}, {flat.max()}]")
    out = {}
    for i in range(flat.shape[1]):
        counts = np.bincount(flat[:, i], minlength=codebook_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        out[f"tok_util_{i}"] = float((counts > 0).sum() / codebook_size)
        out[f"tok_ppl_{i}"] = float(np.exp(-(p * np.log(p)).sum()))
    return out
