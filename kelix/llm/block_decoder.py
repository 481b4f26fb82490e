"""Block Decoder: decodes the next block's tokens one by one from the LLM hidden state h_i (Kelix report, NBP).

`TransformerBlockDecoder` is the report's design: a small causal transformer (1 layer, width 512, 4 heads,
FFN 2048 at paper scale; sizes from LLMConfig.bd_*) over [h_i, e(t_0), ..., e(t_{k-1})] with learned
positions, a projection from the LLM width in and back out, a residual from h_i, and the LLM's LM head on
top (shared, so a code has one output row whether the LLM or the decoder predicts it). Output k predicts
token k of the block. At inference it keeps its own KV cache, reset for every block.

`ParallelBlockDecoder` is the ablation (config `block_decoder: parallel`): N+1 independent heads read h_i
only, so the codes of a block are predicted without seeing each other (the report: -2 to -3 points).

Both return hidden states of the LLM width; the caller applies the LM head to the slice of the vocabulary
that slot may hold. Token embeddings come from the LLM's own table (the caller embeds).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    # Decoding runs this once per code on tiny tensors, where nn.Module dispatch costs as much as the matmul.
    return F.linear(x, layer.weight, layer.bias)


def _norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    # LayerNorm, not RMSNorm: one fused CPU kernel instead of a composite of five (decode is overhead-bound).
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class _Layer(nn.Module):
    """Pre-norm causal self-attention + GELU MLP, with an optional per-call KV cache."""

    def __init__(self, width: int, num_heads: int, ffn: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"Block Decoder width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, ffn)
        self.down = nn.Linear(ffn, width)

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        m, t, w = x.shape
        qkv = _linear(_norm(x, self.norm1), self.qkv)
        q, k, v = qkv.view(m, t, 3, self.num_heads, w // self.num_heads).permute(2, 0, 3, 1, 4)
        # One new query against a cache sees every cached key; a sequence from the block's start is causal.
        # Decided from the cache, a Python fact, not from `t`: torch.compile traces `t` as a symbol.
        causal = not cache
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + _linear(a.transpose(1, 2).reshape(m, t, w), self.out)
        return x + _linear(F.gelu(_linear(_norm(x, self.norm2), self.up), approximate="tanh"), self.down)


class DecoderState:
    """Where one block's decoding stands: the next position and the per-layer KV caches."""

    def __init__(self, h: torch.Tensor, num_layers: int):
        self.h = h
        self.pos = 0
        self.caches: list[list] = [[] for _ in range(num_layers)]
        self.embs: list[torch.Tensor] = []  # tokens fed so far, kept only when decoding without the cache
        self.outputs: torch.Tensor | None = None  # the parallel decoder's precomputed slots


class TransformerBlockDecoder(nn.Module):
    def __init__(self, hidden_size: int, width: int, num_layers: int, num_heads: int, ffn: int, block_len: int):
        super().__init__()
        self.block_len = block_len  # tokens per block incl. <eob>: N + 1
        self.proj_in = nn.Linear(hidden_size, width)
        self.pos = nn.Parameter(torch.randn(block_len, width) * 0.02)
        self.layers = nn.ModuleList(_Layer(width, num_heads, ffn) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, hidden_size)
        # Zero-init: an untrained decoder starts as "the LLM's own prediction from h_i" for every slot.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.out_norm = nn.LayerNorm(hidden_size)

    def _run(self, x: torch.Tensor, h: torch.Tensor, start: int, caches: list | None) -> torch.Tensor:
        x = _linear(x, self.proj_in) + self.pos[start: start + x.shape[1]]
        for i, layer in enumerate(self.layers):
            x = layer(x, None if caches is None else caches[i])
        return _norm(h.unsqueeze(1) + _linear(_norm(x, self.norm), self.proj_out), self.out_norm)

    def forward(self, h: torch.Tensor, token_emb: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: h [M, H], embeddings of the block's first k tokens [M, k, H] -> [M, k+1, H]."""
        return self._run(torch.cat([h.unsqueeze(1), token_emb], 1), h, 0, None)

    def start(self, h: torch.Tensor, use_cache: bool = True) -> tuple[DecoderState, torch.Tensor]:
        """Begin a block from h [M, H]; returns the state and the output that predicts token 0."""
        state = DecoderState(h, len(self.layers))
        out = self._run(h.unsqueeze(1), h, 0, state.caches if use_cache else None)[:, 0]
        state.pos = 1
        return state, out

    def step(self, state: DecoderState, emb: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
        """Feed the embedding [M, H] of the token just chosen; returns the output predicting the next one."""
        if use_cache:
            out = self._run(emb.unsqueeze(1), state.h, state.pos, state.caches)[:, 0]
        else:
            # Reference path (tests): recompute the whole prefix, no cache.
            state.embs.append(emb)
            out = self.forward(state.h, torch.stack(state.embs, 1))[:, -1]
        state.pos += 1
        return out


class ParallelBlockDecoder(nn.Module):
    """N+1 independent MLP heads on h_i, one per slot: no slot sees another (the report's ablation)."""

    def __init__(self, hidden_size: int, width: int, block_len: int):
        super().__init__()
        self.block_len = block_len
        self.up = nn.Parameter(torch.randn(block_len, hidden_size, width) / hidden_size**0.5)
        self.down = nn.Parameter(torch.zeros(block_len, width, hidden_size))
        self.out_norm = nn.LayerNorm(hidden_size)

    def _slots(self, h: torch.Tensor, k: int) -> torch.Tensor:
        z = torch.einsum("mh,khw->mkw", h, self.up[:k])
        return _norm(h.unsqueeze(1) + torch.einsum("mkw,kwh->mkh", F.gelu(z, approximate="tanh"), self.down[:k]),
                     self.out_norm)

    def forward(self, h: torch.Tensor, token_emb: torch.Tensor) -> torch.Tensor:
        return self._slots(h, token_emb.shape[1] + 1)

    def start(self, h: torch.Tensor, use_cache: bool = True) -> tuple[DecoderState, torch.Tensor]:
        state = DecoderState(h, 0)
        state.outputs = self._slots(h, self.block_len)
        state.pos = 1
        return state, state.outputs[:, 0]

    def step(self, state: DecoderState, emb: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
        out = state.outputs[:, state.pos]
        state.pos += 1
        return out


def build_block_decoder(kind: str, hidden_size: int, width: int, num_layers: int, num_heads: int, ffn: int,
                        block_len: int) -> nn.Module:
    if kind == "transformer":
        return TransformerBlockDecoder(hidden_size, width, num_layers, num_heads, ffn, block_len)
    if kind == "parallel":
        return ParallelBlockDecoder(hidden_size, width, block_len)
    raise ValueError(f"llm.block_decoder must be 'transformer' or 'parallel', got {kind!r}")
