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

import math
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


def recolour(images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] with each image's hues rotated about the grey axis and its brightness and saturation
    scaled, by its row of `draws` ([B, 3] uniforms in [0, 1)): the same shapes in other colours (a colour jitter)."""
    dev, dt = images.device, images.dtype
    u = draws.to(dev, dt)
    theta = u[:, 0] * 2 * math.pi
    k = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=dev, dtype=dt) / math.sqrt(3)
    # Rodrigues: rotation about the unit grey axis (1, 1, 1)/sqrt(3); it keeps grey grey.
    rot = (torch.eye(3, device=dev, dtype=dt) + theta.sin()[:, None, None] * k
           + (1 - theta.cos())[:, None, None] * (k @ k))
    grey = images.mean(1, keepdim=True)
    chroma = torch.einsum("bij,bjhw->bihw", rot, images - grey)
    gain, saturation = 0.6 + 0.6 * u[:, 1], 0.6 + 0.8 * u[:, 2]
    return (grey * gain[:, None, None, None] + chroma * saturation[:, None, None, None]).clamp(0, 1)


class GroundingHead(nn.Module):
    """One linear classifier per attribute on the adapter's per-position features (discarded after the warm-up).

    With `parts` > 1 (the quantizer's N sub-vectors of `feature_dim / parts`) the heads are factorised over the
    sub-codebooks: shape reads the first half of the sub-vectors, colour the second half, and `invariance` pulls
    the shape half of a recoloured image onto the original's. Each sub-codebook then holds one attribute, so a
    colour-shape pair held out of training quantizes to a new combination of seen codes instead of snapping to
    the code of a seen pair (docs/benchmarks.md)."""

    def __init__(self, feature_dim: int, vocab: dict[str, list[str]], parts: int = 1):
        super().__init__()
        self.parts = parts
        cut = feature_dim // parts * (parts // 2) if parts > 1 else 0
        self.reads = {"shape": slice(0, cut or feature_dim), "colour": slice(cut, feature_dim)}
        self.heads = nn.ModuleList(nn.Linear(self.reads[a].stop - self.reads[a].start, len(vocab[a]))
                                   for a in ATTRIBUTES)

    def invariance(self, features: torch.Tensor, recoloured: torch.Tensor) -> torch.Tensor:
        """Mean squared distance between the normalised shape sub-vectors of the images and their recolourings
        (the quantizer's matching space); 0 when the heads are not factorised."""
        if self.parts <= 1:
            return features.new_zeros(())
        cut = self.reads["shape"].stop
        a, b = (f[..., :cut].unflatten(-1, (self.parts // 2, -1)) for f in (features, recoloured))
        return (F.layer_norm(a, a.shape[-1:]) - F.layer_norm(b, b.shape[-1:])).pow(2).mean()

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
            logits, target = head(features[..., self.reads[a]]), labels[..., k]
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
            pred = head(features[..., self.reads[a]]).argmax(-1)
            out[a] = float((pred == labels[..., k])[held].float().mean()) if held.any() else 0.0
        return out


class GroundingTrainer(nn.Module):
    """The vision encoder and its head as one module, so the shared loop checkpoints both."""

    def __init__(self, encoder: nn.Module, head: GroundingHead):
        super().__init__()
        self.encoder = encoder
        self.head = head


def with_recolourings(images: torch.Tensor, labels: torch.Tensor, draws: torch.Tensor) -> tuple:
    """The batch with every odd example replaced by a recolouring (`draws` [B, 3], see `recolour`) of the one
    before it, whose object colours are left out of the loss: what a factorised head trains on, at the cost of
    the plain batch. Pairs sit side by side in the global batch, so under torchrun every rank holds whole pairs
    of an even slice and the ranks together train on what one process does."""
    m = images.shape[0] // 2
    x, y = images.clone(), labels.clone()
    x[1::2] = recolour(images[0::2][:m], draws[1::2])
    y[1::2] = labels[0::2][:m]
    colour = y[1::2, :, ATTRIBUTES.index("colour")]
    colour[y[1::2, :, 0] > 0] = IGNORE  # an object's new colour has no name; background stays "<none>"
    return x, y, True


def grounding_step_fn(model: GroundingTrainer, batch) -> tuple[torch.Tensor, dict[str, float]]:
    images, labels, paired = batch if len(batch) == 3 else (*batch, False)
    features = model.encoder(images)
    losses = model.head.losses(features, labels, distributed.sum_across_ranks, distributed.world_size())
    if paired:  # every rank holds the same number of whole pairs, so the plain mean is the global one
        m = images.shape[0] // 2
        losses["invariance"] = model.head.invariance(features[0::2][:m], features[1::2])
    return sum(losses.values()), {f"{a}_loss": float(v.detach()) for a, v in losses.items()}
