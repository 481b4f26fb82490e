"""Block Encoder: one LLM input vector per block, the sum of its tokens' embeddings (Kelix report, NBP).

Summing keeps the LLM's sequence length at one step per block however many codes a block holds (the
tokenizer's sum pooling, carried to the LLM input). Slots marked EMPTY (a text block uses only slot 0) and
<eob> never enter the sum.

It also owns where the visual rows of the embedding table come from. Until stage 2 they are the tokenizer's
frozen codebook vectors [N, S, code_dim] through a learned per-sub-codebook up-projection, so an untrained
LLM already sees codes whose geometry the tokenizer learned; `fold()` then writes the projected rows into
Qwen3's one embedding table and drops the projection (the "unified embedding table" of stage 2). The
`random` init (the report's ablation) feeds random vectors of the same shape through the same projection.

With `num_positions` it adds a learned embedding of each image block's position on the tokenizer's grid. The
codes carry no position and Qwen3's 1-D RoPE only sees the flattened order, so a model trained from scratch
in minutes otherwise has to count blocks from <boi> to know where it is in the image (which shape outlines,
spatial answers and coherent generation all depend on); Qwen-VL's M-RoPE serves the same purpose.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kelix.llm.vocab import EMPTY, Vocab


def standardise(vectors: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per sub-codebook: the projection's init then gives rows of a known scale."""
    v = vectors.detach().float()
    mean = v.mean(dim=(1, 2), keepdim=True)
    std = v.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    return (v - mean) / std


class BlockEncoder(nn.Module):
    def __init__(self, vocab: Vocab, hidden_size: int, codebook_vectors: torch.Tensor, init_std: float = 0.02,
                 num_positions: int | None = None):
        super().__init__()
        n, s, code_dim = codebook_vectors.shape
        if (n, s) != (vocab.num_codebooks, vocab.codebook_size):
            raise ValueError(f"codebook vectors are {n}x{s}, the vocabulary has {vocab.num_codebooks}x{vocab.codebook_size}")
        self.vocab = vocab
        self.folded = False
        self.register_buffer("codebook", standardise(codebook_vectors))
        # Rows come out with the std of Qwen3's own embedding init.
        self.visual_proj = nn.Parameter(torch.randn(n, code_dim, hidden_size) * (init_std / code_dim**0.5))
        self.image_pos = nn.Parameter(torch.randn(num_positions, hidden_size) * init_std) if num_positions else None

    def visual_rows(self) -> torch.Tensor:
        """[N*S, hidden]: the visual part of the embedding table, in vocabulary order."""
        rows = torch.einsum("nsc,nch->nsh", self.codebook, self.visual_proj)
        return rows.reshape(-1, rows.shape[-1])

    def table(self, embed_weight: torch.Tensor) -> torch.Tensor:
        """The full [V, hidden] input embedding table given Qwen3's `embed_tokens.weight`."""
        if self.folded:
            return embed_weight
        v = self.vocab
        return torch.cat([embed_weight[: v.visual_start], self.visual_rows().to(embed_weight.dtype),
                          embed_weight[v.special_start:]])

    @torch.no_grad()
    def fold(self, embed: nn.Embedding) -> None:
        """Write the projected visual rows into `embed` and drop the projection (stage 2 onward)."""
        if self.folded:
            return
        embed.weight[self.vocab.visual_start: self.vocab.special_start] = self.visual_rows().to(embed.weight.dtype)
        del self.visual_proj
        del self.codebook
        self.folded = True

    @staticmethod
    def embed(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ids with EMPTY slots as zero vectors."""
        valid = ids != EMPTY
        return F.embedding(ids.clamp_min(0), table) * valid.unsqueeze(-1).to(table.dtype)

    def forward(self, blocks: torch.Tensor, table: torch.Tensor, image_pos: torch.Tensor | None = None) -> torch.Tensor:
        """blocks [B, L, K] token ids (EMPTY-filled), image_pos [B, L] (-1: not an image block)
        -> [B, L, hidden] block input vectors."""
        # embedding_bag sums without materialising [B, L, K, hidden]; the <pad> row is the bag's padding, so
        # EMPTY slots (and padding blocks) add nothing.
        pad = self.vocab.pad
        ids = blocks.masked_fill(blocks == EMPTY, pad).reshape(-1, blocks.shape[-1])
        out = F.embedding_bag(ids, table, mode="sum", padding_idx=pad).view(*blocks.shape[:-1], table.shape[-1])
        if self.image_pos is not None and image_pos is not None:
            out = out + self.embed(self.image_pos, image_pos)
        return out
