"""The auxiliary decoder of Kelix-Tok: a small Qwen3 that reads the quantized image as a prefix.

Report: the tokenizer is trained through next-token prediction of an auxiliary LLM (Qwen3-0.6B there) that
reads the quantized features and predicts captions and answers; it is discarded after training. Here it is a
`transformers.Qwen3ForCausalLM` built from the aux_* fields with the dataset's text vocabulary, plus a linear
`in_proj` from the tokenizer's embedding width to the decoder's. Text after the prefix is either one plain
row (evaluation) or packed segments (training, see text_rows.py) that each see only the prefix and themselves.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from kelix.tokenizer.config import TokenizerConfig
from kelix.tokenizer.text_rows import IGNORE, Packed

CONFIG_FILE = "aux_config.json"
WEIGHTS_FILE = "aux.safetensors"


def packed_mask(num_prefix: int, segments: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B,1,T,T] (True = attend): the prefix is causal; a text token sees the whole
    prefix and the earlier tokens of its own segment; padding sees the prefix only (never an empty row)."""
    b, length = segments.shape
    total = num_prefix + length
    seg = torch.cat([torch.zeros(b, num_prefix, dtype=segments.dtype, device=segments.device), segments], dim=1)
    causal = torch.ones(total, total, dtype=torch.bool, device=segments.device).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    is_prefix_key = torch.zeros(total, dtype=torch.bool, device=segments.device)
    is_prefix_key[:num_prefix] = True
    prefix_rows = torch.zeros(total, dtype=torch.bool, device=segments.device)
    prefix_rows[:num_prefix] = True
    text_sees = (same | is_prefix_key[None, None, :]) & causal
    prefix_sees = causal & is_prefix_key[None, :]
    mask = torch.where(prefix_rows[None, :, None], prefix_sees, text_sees)
    return mask[:, None]


class AuxDecoder(nn.Module):
    def __init__(self, embed_dim: int, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
                 intermediate: int, max_len: int):
        super().__init__()
        self.spec = dict(embed_dim=embed_dim, vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads,
                         kv_heads=kv_heads, intermediate=intermediate, max_len=max_len)
        qcfg = Qwen3Config(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
            max_position_embeddings=max_len, tie_word_embeddings=True, use_cache=False,
        )
        qcfg._attn_implementation = "sdpa"
        self.lm = Qwen3ForCausalLM(qcfg)
        self.in_proj = nn.Linear(embed_dim, hidden)

    @classmethod
    def from_tokenizer_config(cls, cfg: TokenizerConfig, vocab_size: int) -> "AuxDecoder":
        return cls(cfg.embed_dim, vocab_size, cfg.aux_hidden_size, cfg.aux_num_layers, cfg.aux_num_heads,
                   cfg.aux_num_kv_heads, cfg.aux_intermediate_size,
                   max_len=cfg.num_positions + cfg.max_text_len + cfg.max_answer_len + 8)

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # Tied input/output embeddings share memory; safetensors wants independent copies.
        state = {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(self.spec, indent=1, sort_keys=True))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "AuxDecoder":
        folder = Path(folder)
        if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"no aux decoder at {folder} (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        model = cls(**json.loads((folder / CONFIG_FILE).read_text()))
        model.load_state_dict(load_file(folder / WEIGHTS_FILE))
        return model

    def logits(self, prefix: torch.Tensor, ids: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        """prefix [R,P,E] + text ids [R,L] -> logits [R,L,V] at the text positions (position t predicts the
        next token). Plain rows need no mask (right padding is never seen under causal attention); packed
        segments get the block mask and positions that restart after the prefix."""
        p = prefix.shape[1]
        inputs = torch.cat([self.in_proj(prefix), self.lm.get_input_embeddings()(ids)], dim=1)
        kwargs = {}
        if packed is not None:
            pre = torch.arange(p, device=ids.device).expand(ids.shape[0], p)
            kwargs = {"attention_mask": packed_mask(p, packed.segments), "position_ids": torch.cat([pre, p + packed.positions], 1)}
        # Only the text positions need the LM head (the prefix has no targets).
        return self.lm(inputs_embeds=inputs, use_cache=False, logits_to_keep=ids.shape[1], **kwargs).logits

    def packed_losses(self, prefix: torch.Tensor, packed: Packed,
                      global_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      world_size: int = 1) -> dict[str, torch.Tensor]:
        """Mean next-token loss of each kind of segment present ('caption', 'qa').

        Under data parallelism `global_counts` (an all-reduce) makes each term the sum over this rank's tokens
        divided by the global batch's token count, times the world size, as in kelix/llm/loss.py: ranks hold
        different numbers of caption and answer tokens, and a per-rank mean would weight tokens unequally.
        """
        logits = self.logits(prefix, packed.ids, packed).float()
        flat = logits.reshape(-1, logits.shape[-1])
        kinds = (("caption", packed.caption_targets.reshape(-1)), ("qa", packed.qa_targets.reshape(-1)))
        local = torch.stack([(t != IGNORE).sum() for _, t in kinds]).double().cpu()
        counts = global_counts(local) if global_counts is not None else local
        out = {}
        for (kind, targets), count in zip(kinds, counts.tolist()):
            if count > 0:  # every rank takes the same branches: the counts are global
                total = F.cross_entropy(flat, targets, ignore_index=IGNORE, reduction="sum")
                out[kind] = total * (world_size / count)
        return out

    @torch.no_grad()
    def greedy(self, prefix: torch.Tensor, ids: torch.Tensor, max_new: int, eos_id: int) -> list[list[int]]:
        """Greedy continuation of equal-length rows [prefix][ids] until <eos> or max_new tokens."""
        out: list[list[int]] = [[] for _ in range(ids.shape[0])]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new):
            nxt = self.logits(prefix, ids)[:, -1].argmax(-1)
            for r in (~done & (nxt != eos_id)).nonzero().flatten().tolist():
                out[r].append(int(nxt[r]))
            done |= nxt == eos_id
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return out
