"""SimVQ sub-codebooks: Kelix-Tok's quantizer and the report's ablation variants.

SimVQ (Zhu et al., "Addressing Representation Collapse in Vector Quantized Models with One Linear Layer",
https://arxiv.org/abs/2411.02038): each codebook is a frozen base table [S, base_dim] times one learned
linear map base_dim -> dim applied to the whole table, so every gradient step moves every code and codes do
not die. As in the public Kelix code, features and projected codes are LayerNorm-ed before the squared
distance match. Straight-through gradients; loss = (1/N) sum_i (codebook loss + beta * commitment loss).

Layouts (the Kelix report's quantizer ablation), for a feature of N * code_dim per position:
  multi   N parts, part i matched only against its own codebook i of S codes   -> codes [B, P, N]
  shared  N parts, all matched against one shared codebook of S codes           -> codes [B, P, N]
  single  the whole feature matched against one codebook of N*S codes           -> codes [B, P, 1]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def layout(kind: str, num_codebooks: int, codebook_size: int, code_dim: int) -> tuple[int, int, int, int]:
    """(codebooks K, parts per position, codes per codebook, part dim) of a quantizer kind."""
    if kind == "multi":
        return num_codebooks, num_codebooks, codebook_size, code_dim
    if kind == "shared":
        return 1, num_codebooks, codebook_size, code_dim
    if kind == "single":
        return 1, 1, num_codebooks * codebook_size, num_codebooks * code_dim
    raise ValueError(f"unknown quantizer {kind!r}; choose multi, single, shared or continuous")


def normalize(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters over the last dim: the matching space of features and codes."""
    return F.layer_norm(x, x.shape[-1:])


class SimVQ(nn.Module):
    def __init__(self, kind: str, num_codebooks: int, codebook_size: int, code_dim: int, base_dim: int, beta: float):
        super().__init__()
        self.kind = kind
        self.books, self.parts, self.size, self.dim = layout(kind, num_codebooks, codebook_size, code_dim)
        # The base must be at least as wide as the codes so K-means centroids can be lifted into it exactly.
        self.base_dim = max(base_dim, self.dim)
        self.beta = beta
        self.register_buffer("base", torch.randn(self.books, self.size, self.base_dim))
        weight = torch.empty(self.books, self.dim, self.base_dim)
        for w in weight:
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)  # nn.Linear's default init, per codebook
        self.proj = nn.Parameter(weight)

    def book_of_part(self) -> list[int]:
        return list(range(self.parts)) if self.books == self.parts else [0] * self.parts

    def codes(self) -> torch.Tensor:
        """Projected, normalised codebooks [K, S, dim]: what features are matched against and replaced by."""
        return normalize(torch.einsum("ksb,kdb->ksd", self.base, self.proj))

    def split(self, z: torch.Tensor) -> torch.Tensor:
        """[B, P, N*code_dim] -> normalised parts [B, P, parts, dim]."""
        return normalize(z.view(*z.shape[:-1], self.parts, self.dim))

    def _per_part_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes if self.books == self.parts else codes.expand(self.parts, -1, -1)

    def match(self, parts: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Nearest code (squared distance) of each part -> indices [B, P, parts]."""
        per_part = self._per_part_codes(codes)  # [parts, S, dim]
        dist = (parts.pow(2).sum(-1, keepdim=True)
                - 2 * torch.einsum("bpnd,nsd->bpns", parts, per_part)
                + per_part.pow(2).sum(-1)[None, None])
        return dist.argmin(-1)

    def lookup(self, indices: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """indices [B, P, parts] -> code vectors [B, P, parts, dim]."""
        if indices.shape[-1] != self.parts:
            raise ValueError(f"codes must have {self.parts} entries per position for quantizer {self.kind!r}, "
                             f"got {indices.shape[-1]}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.size):
            raise ValueError(f"code indices must lie in [0, {self.size}), got {int(indices.min())}..{int(indices.max())}")
        per_part = self._per_part_codes(self.codes() if codes is None else codes)
        return torch.stack([per_part[i][indices[..., i]] for i in range(self.parts)], dim=-2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z [B,P,N*code_dim] -> (straight-through quantized parts [B,P,parts,dim], indices, loss, stats).

        In float32 even under bf16 autocast: codes picked from rounded distances would differ from the ones
        `encode` (fp32) hands the LLM, so the quantizer would train on other codes than it serves."""
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        parts = self.split(z)
        codes = self.codes()
        indices = self.match(parts.detach(), codes.detach())
        quant = self.lookup(indices, codes)
        # Codebook loss moves the projection towards the features; commitment keeps features near their codes.
        # Means per part, then averaged over parts: (1/N) sum_i (codebook_i + beta * commitment_i).
        codebook = (quant - parts.detach()).pow(2).mean(dim=(0, 1, 3))
        commit = (parts - quant.detach()).pow(2).mean(dim=(0, 1, 3))
        loss = (codebook + self.beta * commit).mean()
        out = parts + (quant - parts).detach()  # straight-through estimator
        return out, indices, loss, {"codebook_loss": codebook.mean().detach(), "commitment": commit.mean().detach()}

    @torch.no_grad()
    def init_from_centroids(self, centroids: torch.Tensor, seed: int) -> None:
        """Set base + projection so the projected codes start at `centroids` [K, S, dim] (K-means init).

        The centroids are lifted into the wider frozen base with a seeded matrix R of orthonormal rows
        (base = C R) and the projection starts at R, so base @ R^T = C exactly; training then moves all codes
        through the projection while the base stays fixed, as SimVQ prescribes.
        """
        if centroids.shape != (self.books, self.size, self.dim):
            raise ValueError(f"centroids must be {(self.books, self.size, self.dim)}, got {tuple(centroids.shape)}")
        gen = torch.Generator().manual_seed(seed)
        for k in range(self.books):
            q, _ = torch.linalg.qr(torch.randn(self.base_dim, self.dim, generator=gen))  # [base_dim, dim]
            rot = q.T.contiguous()  # [dim, base_dim], orthonormal rows
            self.base[k].copy_(centroids[k].to(self.base) @ rot.to(self.base))
            self.proj[k].copy_(rot.to(self.proj))
