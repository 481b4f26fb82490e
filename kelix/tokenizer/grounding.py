"""Grounded warm-up of a randomly initialised vision tower: name the object under every merged position.

The report starts Kelix-Tok from a pretrained SigLIP tower whose patch features already say what is where. A
tiny tower trained from scratch does not: through the aux decoder's caption and VQA losses alone it never
learns shape (docs/benchmarks.md: 0.3 on 5 shapes after all three stages), and what the features do not hold
no quantizer and no reader can add back. Trained directly on the data's object boxes, the same tower learns
per-position shape in a few hundred steps. So stage 1 can start with this warm-up (TokenizerConfig.vit_warmup):
the tower, merge and adapter learn to classify each position's object attributes (shape, colour; "none" for
background) with a throwaway linear head, before K-means places the codes on those features. It uses only the
records' `objects` (boxes and attributes, as the shapes data and any grounding data carry them); data without
them skips the warm-up.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kelix.train import distributed

# The attributes a position is labelled with, each its own classifier (factorised, so colour-shape pairs held
# out of training stay unseen as pairs).
ATTRIBUTES = ("shape", "colour")
NONE = "<none>"
IGNORE = -100  # F.cross_entropy's ignore_index: positions left out of the loss


def attribute_vocab(records: list[dict]) -> dict[str, list[str]]:
    """Sorted values of each attribute over the records' objects, "<none>" first (the background class)."""
    return {a: [NONE, *sorted({str(o[a]) for r in records for o in r.get("objects", []) if a in o})]
            for a in ATTRIBUTES}


def position_labels(records: list[dict], vocab: dict[str, list[str]], grid: int, image_size: int) -> torch.Tensor:
    """[N, P, len(ATTRIBUTES)] class ids of the object at each merged position.

    A position is labelled with an object when it holds the object's centre or its centre lies in the middle
    half of the object's box: there the position's pixels are mostly the object's. Other positions whose centre
    is in the box hold only an edge or a corner (or, for a triangle, background): they are left out of the loss
    (IGNORE) rather than called background. Positions outside every box are "<none>" (0). Where two objects
    claim a position, a core claim beats an edge claim, then the nearer centre wins."""
    index = {a: {v: i for i, v in enumerate(vals)} for a, vals in vocab.items()}
    cell = image_size / grid
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * cell
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    out = torch.zeros(len(records), grid * grid, len(ATTRIBUTES), dtype=torch.long)
    for n, rec in enumerate(records):
        best = torch.full((grid * grid,), float("inf"))
        for obj in rec.get("objects", []):
            x0, y0, x1, y1 = (float(v) for v in obj["box"])
            cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            in_box = (xs - cx).abs().lt(hw) & (ys - cy).abs().lt(hh)
            core = (xs - cx).abs().lt(hw / 2) & (ys - cy).abs().lt(hh / 2)
            core[min(int(cy // cell), grid - 1) * grid + min(int(cx // cell), grid - 1)] = True
            # A core claim beats an edge claim; between two of a kind, the nearer centre wins.
            rank = (xs - cx) ** 2 + (ys - cy) ** 2 + (~core) * 1e9
            take = (in_box | core) & (rank < best)
            best = torch.where(take, rank, best)
            for k, a in enumerate(ATTRIBUTES):
                value = index[a].get(str(obj.get(a, NONE)), 0)
                out[n, take, k] = torch.where(core[take], value, IGNORE)
    return out


class GroundingHead(nn.Module):
    """One linear classifier per attribute on the adapter's per-position features (discarded after the warm-up)."""

    def __init__(self, feature_dim: int, vocab: dict[str, list[str]]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(feature_dim, len(vocab[a])) for a in ATTRIBUTES)

    def losses(self, features: torch.Tensor, labels: torch.Tensor,
               global_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
               world_size: int = 1) -> dict[str, torch.Tensor]:
        """Per attribute, the cross-entropy averaged over object positions plus that over background ones.

        Balanced, because background holds most positions (about 9 in 10 on shapes): a plain mean spends most of
        the gradient on "<none>" and learns shape more slowly (0.87 against 0.93 after 600 steps, 1 thread).
        Under data parallelism `global_counts` (an all-reduce) turns each mean into this rank's sum over the
        global batch's count, times the world size, as the aux decoder's losses do: ranks hold different numbers
        of object positions, and per-rank means would weight them unequally."""
        masks = (labels[..., 0] > 0, labels[..., 0] == 0)  # object, background (left-out edges are neither)
        local = torch.stack([m.sum() for m in masks]).double().cpu()
        counts = (global_counts(local) if global_counts is not None else local).tolist()
        out = {}
        for k, (a, head) in enumerate(zip(ATTRIBUTES, self.heads)):
            logits, target = head(features), labels[..., k]
            # Every rank takes the same branches: the counts are global.
            out[a] = sum(F.cross_entropy(logits[m], target[m], reduction="sum") * (world_size / n)
                         for m, n in zip(masks, counts) if n > 0)
        return out

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Per attribute, accuracy over the positions that hold an object (background would flatter it)."""
        held = labels[..., 0] > 0  # object positions (background is 0, left-out edges IGNORE)
        out = {}
        for k, (a, head) in enumerate(zip(ATTRIBUTES, self.heads)):
            pred = head(features).argmax(-1)
            out[a] = float((pred == labels[..., k])[held].float().mean()) if held.any() else 0.0
        return out


class GroundingTrainer(nn.Module):
    """The vision encoder and its head as one module, so the shared loop checkpoints both."""

    def __init__(self, encoder: nn.Module, head: GroundingHead):
        super().__init__()
        self.encoder = encoder
        self.head = head


def grounding_step_fn(model: GroundingTrainer, batch) -> tuple[torch.Tensor, dict[str, float]]:
    images, labels = batch
    losses = model.head.losses(model.encoder(images), labels, distributed.sum_across_ranks, distributed.world_size())
    return sum(losses.values()), {f"{a}_loss": float(v.detach()) for a, v in losses.items()}
