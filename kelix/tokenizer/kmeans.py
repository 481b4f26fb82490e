"""Batched, seeded K-means: the initial codes of the frozen SimVQ base codebooks.

The report initialises the base codebook with K-means centroids of ViT patch features; here the features are
the encoder + adapter outputs of training images in the LayerNorm-ed space where matching happens, so every
code starts where features actually are (random init left 70-80% of codes unused in the CPU probe, DESIGN.md
section 4). Deterministic for a given seed: k-means++ seeding from a seeded generator, Lloyd iterations with
chunked distance computations, and empty clusters re-seeded at the points farthest from their centroid.
"""
from __future__ import annotations

import torch

from kelix.tokenizer.simvq import SimVQ


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance of every row of x, in chunks to bound memory."""
    labels, dists = [], []
    c_sq = centroids.pow(2).sum(-1)
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk]
        d = xs.pow(2).sum(-1, keepdim=True) - 2 * xs @ centroids.T + c_sq
        best, idx = d.min(-1)
        labels.append(idx)
        dists.append(best.clamp_min(0))
    return torch.cat(labels), torch.cat(dists)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Centroids [k, d] of the rows of x [M, d] (M >= 1); with M < k the missing centroids are jittered copies."""
    x = x.detach().float()
    gen = torch.Generator().manual_seed(seed)
    m = x.shape[0]
    if m == 0:
        raise ValueError("k-means needs at least one feature vector")
    # k-means++ seeding: each new centroid is drawn proportionally to its squared distance from the chosen ones.
    first = int(torch.randint(m, (1,), generator=gen))
    centroids = [x[first]]
    best = (x - x[first]).pow(2).sum(-1)
    for _ in range(1, min(k, m)):
        total = best.sum()
        if total <= 0:
            break
        pick = int(torch.multinomial(best / total, 1, generator=gen))
        centroids.append(x[pick])
        best = torch.minimum(best, (x - x[pick]).pow(2).sum(-1))
    c = torch.stack(centroids)
    if c.shape[0] < k:  # fewer distinct points than codes: fill with jittered copies so codes stay distinct
        extra = c[torch.randint(c.shape[0], (k - c.shape[0],), generator=gen)]
        c = torch.cat([c, extra + 1e-3 * torch.randn(extra.shape, generator=gen)])
    for _ in range(iters):
        labels, dist = _assign(x, c)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).float()
        empty = (counts == 0).nonzero().flatten()
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        if len(empty):
            # Re-seed empty clusters at the worst-served points (deterministic: ordered by distance).
            # Points already sitting on a centroid (distance 0) would only duplicate it, so they are skipped.
            far = dist.argsort(descending=True)[: len(empty)]
            far = far[dist[far] > 0]
            c[empty[: len(far)]] = x[far]
    return c


@torch.no_grad()
def init_codebooks(quantizer: SimVQ, features: torch.Tensor, iters: int, max_samples: int, seed: int) -> None:
    """K-means the adapter features [M, N*code_dim] into each codebook of `quantizer` (its own parts only)."""
    parts = quantizer.split(features.reshape(-1, features.shape[-1]).float())  # [M, parts, dim], normalised
    gen = torch.Generator().manual_seed(seed)
    centroids = []
    for k in range(quantizer.books):
        # multi: codebook k sees part k only; shared/single: its one codebook sees all parts.
        own = parts[:, k] if quantizer.books == quantizer.parts else parts.reshape(-1, quantizer.dim)
        if own.shape[0] > max_samples:
            own = own[torch.randperm(own.shape[0], generator=gen)[:max_samples]]
        centroids.append(kmeans(own, quantizer.size, iters, seed=seed + k))
    quantizer.init_from_centroids(torch.stack(centroids), seed)
