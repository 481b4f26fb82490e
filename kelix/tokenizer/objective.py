"""What each tokenizer stage optimises and which parameters it unfreezes (the report's three stages).

  align    (stage 1) caption loss + quantizer loss; trains the adapter (merge + MLP), the SimVQ projections,
           the up-projections and the aux decoder's input projection; ViT and aux LLM frozen.
  pretrain (stage 2) caption + VQA loss + quantizer loss; everything trains, the ViT at `encoder_lr`, the
           adapter at lr * adapter_lr_scale (keeps codes in use, see TokenizerConfig).
  anneal   (stage 3) VQA loss + quantizer loss; everything trains with a decaying rate (no warmup).
"""
from __future__ import annotations

import torch
from torch import nn

from kelix.tokenizer.aux_decoder import AuxDecoder
from kelix.tokenizer.model import KelixTokenizer
from kelix.train import distributed
from kelix.train.config import TrainConfig

TASKS = {"align": ("caption",), "pretrain": ("caption", "qa"), "anneal": ("qa",)}


class TokenizerTrainer(nn.Module):
    """The tokenizer and its aux decoder as one module, so the shared loop checkpoints both together."""

    def __init__(self, tokenizer: KelixTokenizer, aux: AuxDecoder):
        super().__init__()
        self.tokenizer = tokenizer
        self.aux = aux


def param_groups(model: TokenizerTrainer, task: str, cfg: TrainConfig) -> list[dict]:
    """Set requires_grad for the stage and return the optimiser groups (ViT at encoder_lr in stages 2-3)."""
    if task not in TASKS:
        raise ValueError(f"unknown tokenizer task {task!r}; tasks are {', '.join(TASKS)}")
    if task == "align":
        model.requires_grad_(False)
        train = [*model.tokenizer.adapter_parameters(), *model.aux.in_proj.parameters()]
        for p in train:
            p.requires_grad_(True)
        return [{"params": train, "lr": cfg.lr}]
    model.requires_grad_(True)
    vit = model.tokenizer.vit_parameters()
    adapter = model.tokenizer.encoder.adapter_parameters()
    taken = {id(p) for p in [*vit, *adapter]}
    rest = [p for p in model.parameters() if id(p) not in taken]
    scale = model.tokenizer.cfg.adapter_lr_scale
    return [{"params": vit, "lr": cfg.encoder_lr}, {"params": adapter, "lr": cfg.lr * scale},
            {"params": rest, "lr": cfg.lr}]


def make_step_fn(task: str):
    """step_fn(model, (images, packed text)) -> (loss, metrics) for the shared loop."""
    if task not in TASKS:
        raise ValueError(f"unknown tokenizer task {task!r}; tasks are {', '.join(TASKS)}")

    def step_fn(model: TokenizerTrainer, batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, packed = batch
        emb, codes, quant_loss, stats = model.tokenizer(images)
        losses = model.aux.packed_losses(emb, packed, distributed.sum_across_ranks, distributed.world_size())
        # Caption and VQA losses are averaged over their own tokens and added, so the many caption tokens
        # do not drown the one-word answers in stage 2.
        loss = quant_loss + sum(losses.values())
        metrics = {"quant_loss": float(quant_loss.detach()), **{k: float(v) for k, v in stats.items()}}
        metrics.update({f"{k}_loss": float(v.detach()) for k, v in losses.items()})
        if codes is not None:
            # Distinct codes of the least-used sub-codebook in the global batch: an early warning of collapse.
            # Counted over all ranks' codes (each rank's own count would fall as the world size grows).
            size = model.tokenizer.codebook_size
            flat = codes.reshape(-1, codes.shape[-1])
            used = torch.zeros(codes.shape[-1], size, device=codes.device)
            used.scatter_(1, flat.T, 1.0)
            used = distributed.sum_across_ranks(used)
            metrics["batch_util_min"] = float((used > 0).sum(-1).min()) / size
        return loss, metrics

    return step_fn


def warmup_step_fn(model: TokenizerTrainer, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Aux decoder warm-up: caption + QA loss through the frozen, K-means-initialised tokenizer (no grad into it)."""
    images, packed = batch
    with torch.no_grad():
        emb = model.tokenizer(images)[0]
    losses = model.aux.packed_losses(emb, packed, distributed.sum_across_ranks, distributed.world_size())
    return sum(losses.values()), {f"{k}_loss": float(v.detach()) for k, v in losses.items()}


def text_kinds(task: str) -> dict[str, bool]:
    """Which segments a task's sequences carry: captions (stages 1-2), questions (stages 2-3)."""
    return {"caption": "caption" in TASKS[task], "qa": "qa" in TASKS[task]}
