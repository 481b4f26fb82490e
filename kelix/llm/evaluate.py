"""Validation metrics every LLM stage returns: VQA accuracy (greedy, exact match), teacher-forced text loss
and image-code loss per sub-codebook on a fixed slice of a split."""
from __future__ import annotations

from collections import defaultdict

import torch

from kelix.llm.corpus import Split
from kelix.llm.inference import answer_codes
from kelix.llm.loss import nbp_loss
from kelix.llm.model import KelixLLM
from kelix.llm.sequences import SequenceBuilder, collate
from kelix.text import TextTokenizer


def normalise(text: str) -> str:
    return text.strip().strip(".").lower()


# A spatial answer names an axis and an order on it; the axis is a property of the scene, the order needs the
# named objects found, so the share on the right axis tells which of the two a model has not learned.
AXIS = {"left": "horizontal", "right": "horizontal", "above": "vertical", "below": "vertical"}


def questions(split: Split, limit: int) -> list[tuple[int, str, str, str]]:
    """(record index, question, answer, type) for the first `limit` questions of the split."""
    out = [(i, qa["q"], qa["a"], qa.get("type", "other")) for i, rec in enumerate(split.records) for qa in rec.get("qa", [])]
    return out[:limit]


@torch.no_grad()
def predict(llm: KelixLLM, text_tok: TextTokenizer, split: Split, items: list[tuple[int, str, str, str]],
            batch_size: int = 64) -> list[str]:
    """Greedy answers to `questions(...)` items, in batches of `batch_size`."""
    out: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        out += answer_codes(llm, text_tok, split.codes[[i for i, *_ in chunk]], [q for _, q, _, _ in chunk])
    return out


@torch.no_grad()
def vqa_accuracy(llm: KelixLLM, text_tok: TextTokenizer, split: Split, limit: int = 500,
                 batch_size: int = 64) -> dict[str, float]:
    """`vqa_accuracy` overall and `vqa_accuracy_<type>` per question type; on a split with records of held-out
    colour-shape pairs (test), also `vqa_holdout_accuracy` on those records' questions and `vqa_seen_accuracy`
    on the others; with spatial questions, `vqa_spatial_axis_accuracy`: answers on the right axis (AXIS)."""
    llm.eval()
    items = questions(split, limit)
    right: dict[str, list[bool]] = defaultdict(list)
    pairs: dict[bool, list[bool]] = {True: [], False: []}  # by whether the record shows a held-out pair
    axes: list[bool] = []
    for (i, _, a, kind), pred in zip(items, predict(llm, text_tok, split, items, batch_size)):
        ok = normalise(pred) == normalise(a)
        right[kind].append(ok)
        if kind == "spatial":
            axes.append(AXIS.get(normalise(pred)) == AXIS.get(normalise(a)))
        right["all"].append(ok)
        pairs[bool(split.records[i].get("holdout"))].append(ok)
    out = {"vqa_accuracy": sum(right.pop("all", [])) / max(1, len(items))}
    out.update({f"vqa_accuracy_{k}": sum(v) / len(v) for k, v in sorted(right.items())})
    if axes:
        out["vqa_spatial_axis_accuracy"] = sum(axes) / len(axes)
    if pairs[True]:
        out.update({f"vqa_{name}_accuracy": sum(pairs[h]) / len(pairs[h])
                    for name, h in (("holdout", True), ("seen", False)) if pairs[h]})
    return out


@torch.no_grad()
def teacher_forced_losses(llm: KelixLLM, text_tok: TextTokenizer, split: Split, limit: int = 64,
                          batch_size: int = 32, prefix: str = "val_") -> dict[str, float]:
    """Mean text loss (answers) and code loss per sub-codebook (prompt -> image) on the first records."""
    llm.eval()
    builder = SequenceBuilder.for_model(llm, text_tok)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    end = min(limit, len(split.records))
    for start in range(0, end, batch_size):
        seqs = []
        stop = min(start + batch_size, end)
        for rec, codes in zip(split.records[start:stop], split.codes[start:stop]):
            if rec.get("qa"):
                seqs.append(builder.understanding(codes, [(x["q"], x["a"]) for x in rec["qa"]]))
            seqs.append(builder.generation(rec["prompt"], codes))
        _, metrics = nbp_loss(llm, collate(seqs, llm.vocab).to(llm.device))
        for k, v in metrics.items():  # a batch without questions has no text loss: it must not count as 0
            sums[k] += float(v)
            counts[k] += 1
    return {f"{prefix}{k}": v / counts[k] for k, v in sums.items()}
