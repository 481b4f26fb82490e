"""Validation metrics of a tokenizer stage: codebook use, commitment, aux losses and VQA accuracy.

util_<i>: share of sub-codebook i's codes used on the split (the report's argument for N small codebooks is
that each stays well used); ppl_<i>: perplexity of its code histogram; vqa_accuracy: exact match of the aux
decoder's greedy answer, each question asked alone after its image (the ablation's score in miniature).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from kelix.tokenizer.objective import TokenizerTrainer
from kelix.tokenizer.text_rows import TextRows


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


@torch.no_grad()
def evaluate(model: TokenizerTrainer, rows: TextRows, images: torch.Tensor, batch_size: int = 128,
             max_answer_len: int = 4) -> dict[str, float]:
    tok, aux = model.tokenizer, model.aux
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts = None
    qa_sum = qa_weight = 0.0
    sums: dict[str, float] = defaultdict(float)
    right: dict[str, int] = defaultdict(int)
    asked: dict[str, int] = defaultdict(int)
    n = images.shape[0]
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        batch = images[idx].to(device).float().div_(255)
        emb, codes, _, stats = tok(batch)
        weight = len(idx) / n
        for k, v in stats.items():
            sums[k] += float(v) * weight
        if codes is not None:
            flat = codes.reshape(-1, codes.shape[-1]).cpu()
            hist = torch.stack([torch.bincount(flat[:, i], minlength=tok.codebook_size) for i in range(flat.shape[1])])
            counts = hist if counts is None else counts + hist
        losses = aux.packed_losses(emb, rows.packed(idx).to(device))
        sums["aux_caption_loss"] += float(losses["caption"]) * weight
        if "qa" in losses:  # a batch without questions (imported data may have none) has no QA loss, not 0
            qa_sum, qa_weight = qa_sum + float(losses["qa"]) * weight, qa_weight + weight
        # Greedy answers, grouped by question length so each group decodes without padding.
        groups: dict[int, list] = defaultdict(list)
        for q in rows.questions(idx):
            groups[len(q[1])].append(q)
        for group in groups.values():
            prefix = emb[torch.tensor([g[0] for g in group], device=device)]
            q_ids = torch.tensor([g[1] for g in group], device=device)
            for (_, _, answer, kind), out in zip(group, aux.greedy(prefix, q_ids, max_answer_len, rows.tok.eos_id)):
                ok = _normalise(rows.tok.decode(out)) == _normalise(answer)
                for key in ("all", kind or "other"):
                    right[key] += ok
                    asked[key] += 1
    model.train(was_training)
    metrics = dict(sums)
    if qa_weight:
        metrics["aux_vqa_loss"] = qa_sum / qa_weight
    if "commitment" in metrics:
        metrics["commitment_loss"] = metrics.pop("commitment")
    metrics["vqa_accuracy"] = right["all"] / max(1, asked["all"])
    for kind in sorted(k for k in asked if k != "all"):
        metrics[f"vqa_acc_{kind}"] = right[kind] / asked[kind]
    if counts is not None:
        utils = []
        for i, hist in enumerate(counts):
            p = hist.double() / hist.sum()
            utils.append(float((hist > 0).double().mean()))
            metrics[f"util_{i}"] = utils[-1]
            metrics[f"ppl_{i}"] = math.exp(float(-(p[p > 0] * p[p > 0].log()).sum()))
        metrics["util_min"] = min(utils)
    return metrics
