"""Batched NBP decoding: answers to questions about images, image codes from prompts, DiT conditions.

The LLM keeps a Qwen3 KV cache across blocks; the Block Decoder keeps its own small cache within a block.
Prompts are left-padded so every row's next block lands in the same column. Generation runs the conditional
and the unconditional (caption dropped) rows of classifier-free guidance as one batch and mixes their logits
with `lerp(uncond, cond, cfg_scale)`, which is exactly `cond` at scale 1. Slot i of an image block is scored
over sub-codebook i's ids only, so every generated code is a valid id of its own sub-codebook.

`mode="flat"` is the baseline NBP is measured against: every code its own LLM step, predicted by the LM head
from the LLM's hidden state (same model, same weight shapes, Block Decoder unused). `use_cache=False`
recomputes every prefix from scratch, the reference the cached path is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kelix.llm.answer_prior import bag_log_probs
from kelix.llm.model import KelixLLM
from kelix.llm.sequences import Batch, SequenceBuilder, collate
from kelix.llm.vocab import EMPTY
from kelix.text import TextTokenizer


class _LLMStepper:
    """The LLM side of decoding: prefill a left-padded prompt batch, then one step per block."""

    def __init__(self, llm: KelixLLM, batch: Batch, table: torch.Tensor, use_cache: bool):
        self.llm, self.table, self.use_cache = llm, table, use_cache
        self.blocks, self.mask, self.image_pos = batch.blocks, batch.attention_mask, batch.image_pos
        self.pos = batch.position_ids
        self.cache = DynamicCache(config=llm.lm.config) if use_cache else None
        self.h = llm.hidden_states(self.blocks, self.mask, self.pos, self.cache, table, self.image_pos)[:, -1]

    def step(self, block: torch.Tensor, image_pos: int = -1) -> None:
        """Append one block [B, N] (at grid position `image_pos` when it is image content) for every row;
        `self.h` becomes the hidden state that predicts the next block."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], 1)
        new_pos = self.pos[:, -1:] + 1
        self.pos = torch.cat([self.pos, new_pos], 1)
        new_image_pos = torch.full_like(new_pos, image_pos)
        if self.use_cache:
            h = self.llm.hidden_states(block[:, None], self.mask, new_pos, self.cache, self.table, new_image_pos)
        else:
            self.blocks = torch.cat([self.blocks, block[:, None]], 1)
            self.image_pos = torch.cat([self.image_pos, new_image_pos], 1)
            h = self.llm.hidden_states(self.blocks, self.mask, self.pos, None, self.table, self.image_pos)
        self.h = h[:, -1]


# Offsets the code draws' generator seeds from the DiT noise's (`flow.seeded_noise` uses seed + i as is), so an
# image's codes and its noise come from different streams instead of the same numbers transformed.
_CODE_STREAM = 1 << 62


def seeded_uniforms(rows: int, count: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[rows, count] uniforms in [0, 1); row i is drawn from its own generator (seed + i) on the CPU, so a
    row's draws depend on neither the batch it is in nor the device."""
    draws = [torch.rand(count, generator=torch.Generator().manual_seed(_CODE_STREAM + seed + i)) for i in range(rows)]
    return torch.stack(draws).to(device)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """One id per row; `u` [rows] holds each row's uniform draw in [0, 1). Temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the ones before it already hold top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False  # at top_p <= 0 the test above drops it too: keep the most likely id (greedy)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # Inverse-CDF draw: same distribution as torch.multinomial at a fraction of its per-call cost, which
    # matters when one id is drawn per code.
    # In float32 whatever the logits' dtype: in bf16, u near 1 rounds to 1 and the draw falls off the end.
    cdf = logits.float().softmax(-1).cumsum(-1)
    # right=True: the first id whose cdf exceeds the target, so u = 0 cannot land on a dropped (zero-mass) id;
    # the clamp keeps a rounding overshoot on the last id that has mass (the first where the cdf is complete).
    target = u.to(cdf)[:, None] * cdf[:, -1:]
    last = (cdf < cdf[:, -1:]).sum(-1)
    return torch.minimum(torch.searchsorted(cdf, target, right=True)[:, 0], last)


def _text_block(ids: torch.Tensor, n: int) -> torch.Tensor:
    block = torch.full((len(ids), n), EMPTY, dtype=torch.long, device=ids.device)
    block[:, 0] = ids
    return block


def answer_scores(llm: KelixLLM, out: torch.Tensor, bags: list[list[int]]) -> torch.Tensor:
    """Scores of the next answer token over the text ids, from the Block Decoder's output [B, H]: the LLM's
    log-probabilities, plus the log-probability of each token's kind of answer under the answer prior where the
    model was trained as a product with one (answer_prior.py; `bags`: each row's question and answer so far, as
    `SequenceBuilder.question_text` starts them)."""
    size = llm.vocab.text_size
    logp = llm.logits(out, 0, size).log_softmax(-1)
    if llm.answer_prior is not None:
        logp = logp + bag_log_probs(llm.answer_prior, bags, size, out.device)
    return logp


@torch.no_grad()
def answer_codes(llm: KelixLLM, text_tok: TextTokenizer, codes: torch.Tensor, questions: list[str],
                 max_new_tokens: int = 8, use_cache: bool = True) -> list[str]:
    """Greedy answers to `questions` about images given as tokenizer codes [B, P, N]."""
    v, device = llm.vocab, llm.device
    builder = SequenceBuilder.for_model(llm, text_tok)
    batch = collate([builder.understanding_prompt(c, q) for c, q in zip(codes.cpu(), questions)], v, left_pad=True)
    table = llm.embedding_table()
    lm = _LLMStepper(llm, batch.to(device), table, use_cache)
    banned = torch.tensor([text_tok.pad_id, text_tok.bos_id], device=device)
    eos = text_tok.eos_id
    done = torch.zeros(len(questions), dtype=torch.bool, device=device)
    bags = [builder.question_text(q) for q in questions]
    tokens = []
    for t in range(max_new_tokens):
        _, out = llm.block_decoder.start(lm.h, use_cache)
        logits = answer_scores(llm, out, bags)
        logits[:, banned] = float("-inf")
        tok = logits.argmax(-1).masked_fill(done, eos)
        tokens.append(tok)
        for bag, k in zip(bags, tok.tolist()):
            bag.append(k)
        done |= tok == eos
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        lm.step(_text_block(tok, v.num_codebooks))
    rows = torch.stack(tokens, 1).tolist()
    return [text_tok.decode(row[: row.index(eos)] if eos in row else row) for row in rows]


@torch.no_grad()
def answer(llm: KelixLLM, tokenizer, text_tok: TextTokenizer, images: torch.Tensor, questions: list[str],
           max_new_tokens: int = 8, use_cache: bool = True) -> list[str]:
    """Answers to one question per image; images [B, 3, H, W] float in [0, 1] (uint8 is scaled)."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    device = next(tokenizer.parameters()).device
    codes = tokenizer.encode(images.to(device))
    return answer_codes(llm, text_tok, codes, questions, max_new_tokens, use_cache)


@torch.no_grad()
def generate_codes(llm: KelixLLM, text_tok: TextTokenizer, prompts: list[str], cfg_scale: float | None = 3.0,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, *,
                   num_positions: int | None = None, mode: str = "nbp", use_cache: bool = True) -> torch.Tensor:
    """Image codes [B, P, N] (each in [0, S)) for `prompts`. `cfg_scale=None` runs no unconditional rows.

    Row i samples with seed + i: a prompt's codes do not depend on the other prompts of the batch."""
    if mode not in ("nbp", "flat"):
        raise ValueError(f"mode must be 'nbp' or 'flat', got {mode!r}")
    num_positions = num_positions or llm.num_positions
    if not num_positions:
        raise ValueError("the model does not know its image size: pass num_positions")
    if llm.num_positions and num_positions > llm.num_positions and llm.block_encoder.image_pos is not None:
        raise ValueError(f"num_positions {num_positions} is more than the {llm.num_positions} image positions this "
                         "model has embeddings for (llm.image_position_embed): generate at most that many")
    v, device, b, n = llm.vocab, llm.device, len(prompts), llm.vocab.num_codebooks
    guided = cfg_scale is not None
    builder = SequenceBuilder.for_model(llm, text_tok)
    seqs = [builder.generation_prompt(p) for p in prompts] + [builder.generation_prompt("")] * (b if guided else 0)
    table = llm.embedding_table()
    lm = _LLMStepper(llm, collate(seqs, v, left_pad=True).to(device), table, use_cache)
    # One draw per code: code i of position p uses draw p * n + i, in both modes.
    draws = seeded_uniforms(b, num_positions * n, seed, device)
    ranges = [v.codebook_range(i) for i in range(n)]
    heads = [llm.lm.lm_head.weight[start:stop] for start, stop in ranges]

    def choose(out: torch.Tensor, p: int, i: int) -> torch.Tensor:
        logits = F.linear(out, heads[i])
        if guided:
            logits = torch.lerp(logits[b:], logits[:b], cfg_scale)
        return sample(logits, temperature, top_k, top_p, draws[:, p * n + i])

    def both(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if guided else x

    codes = torch.empty(b, num_positions, n, dtype=torch.long, device=device)
    for p in range(num_positions):
        if mode == "nbp":
            state, out = llm.block_decoder.start(lm.h, use_cache)
            for i in range(n):
                code = codes[:, p, i] = choose(out, p, i)
                if i < n - 1:
                    out = llm.block_decoder.step(state, both(table[code + ranges[i][0]]), use_cache)
            if p < num_positions - 1:
                lm.step(both(v.codes_to_ids(codes[:, p])), p)
        else:
            for i in range(n):
                codes[:, p, i] = choose(lm.h, p, i)
                if p < num_positions - 1 or i < n - 1:
                    lm.step(both(_text_block(codes[:, p, i] + ranges[i][0], n)), p)
    return codes


@torch.no_grad()
def image_hidden_states(llm: KelixLLM, text_tok: TextTokenizer, prompts: list[str], codes: torch.Tensor) -> torch.Tensor:
    """The LLM's last hidden states at the P image blocks of `<gen> prompt <boi> codes` (teacher forcing):
    [B, P, hidden], what the DiT is conditioned on."""
    v = llm.vocab
    builder = SequenceBuilder.for_model(llm, text_tok)
    batch = collate([builder.generation(p, c) for p, c in zip(prompts, codes.cpu())], v, left_pad=True).to(llm.device)
    h = llm.hidden_states(batch.blocks, batch.attention_mask, batch.position_ids, image_pos=batch.image_pos)
    return h[:, -codes.shape[1]:]
