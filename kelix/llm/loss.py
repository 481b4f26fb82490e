"""The NBP training loss: the LLM reads blocks, the Block Decoder predicts each target block token by token.

Each slot is scored over the ids it may hold, the same restriction decoding applies: a text slot over the
text ids and the specials, code i of an image block over sub-codebook i only, <eob> over the whole vocabulary. The
three terms are averaged separately and summed, so the few answer tokens of understanding are not drowned
by the P*N codes of a generation example in the same batch.

Under data parallelism each rank holds a different mix of text and image targets, so a term's mean over the
rank's own tokens would weight tokens unequally across ranks. `global_counts` (the trainer passes an
all-reduce) turns each term into a sum over the rank's tokens divided by the token count of the whole global
batch, times the world size: DDP's gradient average then equals the single-process gradient, and so does the
mean of the ranks' losses.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
import torch.nn.functional as F

from kelix.llm.answer_prior import product_of_experts, question_bags
from kelix.llm.model import KelixLLM
from kelix.llm.sequences import IMAGE, TEXT, Batch


def target_counts(batch: Batch) -> torch.Tensor:
    """[text, image] target blocks in the batch (float64 on the CPU, ready for an all-reduce)."""
    return torch.stack([(batch.kinds == TEXT).sum(), (batch.kinds == IMAGE).sum()]).double().cpu()


def nbp_loss(llm: KelixLLM, batch: Batch, global_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
             world_size: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics); the metrics are detached 0-d tensors. Reading them waits for the device, so a training
    step converts them after its backward: the one wait of this function comes before the LLM's forward is
    queued (the target positions, whose count sizes the Block Decoder's batch), never in the middle of it."""
    v = llm.vocab
    n = v.num_codebooks
    text_at = (batch.kinds == TEXT).nonzero(as_tuple=True)
    image_at = (batch.kinds == IMAGE).nonzero(as_tuple=True)
    n_text, n_image = len(text_at[0]), len(image_at[0])
    # Answers inside question groups, scored as a product with the question-only prior (answer_prior.py).
    prior = llm.answer_prior
    answers = (batch.groups[text_at] > 0).nonzero(as_tuple=True)[0] if prior is not None else None
    local = torch.tensor([n_text, n_image], dtype=torch.float64)
    counts = global_counts(local) if global_counts is not None else local
    # Sum over this rank's tokens / tokens in the global batch * world size (= the local mean on one process).
    scale = (world_size / counts.clamp_min(1)).tolist()
    eob_scale = world_size / max(float(counts.sum()), 1.0)

    table = llm.embedding_table()
    h = llm.hidden_states(batch.blocks, batch.attention_mask, batch.position_ids, table=table,
                          image_pos=batch.image_pos, groups=batch.groups)
    terms: list[torch.Tensor] = []
    metrics: dict[str, torch.Tensor] = {}
    eob_logits = []

    if n_text:
        tgt = batch.targets[text_at]  # [M, N+1]: token, <eob>, IGNORE...
        out = llm.block_decoder(h[text_at], llm.block_encoder.embed(table, tgt[:, :1]))  # [M, 2, H]
        logits = llm.logits(out[:, 0])
        # A text slot holds a text id or a special (<boi>, <eoi>, ...), never a code.
        logits[:, v.visual_start: v.special_start] = float("-inf")
        token_loss = F.cross_entropy(logits, tgt[:, 0], reduction="none")
        if answers is not None and len(answers):
            rows, cols = text_at[0][answers], text_at[1][answers]
            prior_logits = prior(*question_bags(batch.blocks, batch.groups, batch.image_pos, batch.attention_mask,
                                                rows, cols))
            prior_logits[:, v.visual_start: v.special_start] = float("-inf")
            want = tgt[answers, 0]
            prior_loss = F.cross_entropy(prior_logits, want, reduction="none")
            token_loss = token_loss.index_put((answers,), F.cross_entropy(
                product_of_experts(logits[answers], prior_logits), want, reduction="none"))
            terms.append(prior_loss.sum() * scale[0])
            metrics["answer_prior_loss"] = prior_loss.detach().mean()
        metrics["text_loss"] = token_loss.detach().mean()  # answers as trained: with the whole prior
        terms.append(token_loss.sum() * scale[0])
        metrics["text_acc"] = (logits.detach().argmax(-1) == tgt[:, 0]).float().mean()  # the LLM's own
        eob_logits.append(out[:, 1])

    if n_image:
        tgt = batch.targets[image_at]  # [M, N+1]: c_0..c_{N-1}, <eob>
        out = llm.block_decoder(h[image_at], llm.block_encoder.embed(table, tgt[:, :n]))  # [M, N+1, H]
        code_losses = []
        for i in range(n):
            start, stop = v.codebook_range(i)
            logits = llm.logits(out[:, i], start, stop)
            code_losses.append(F.cross_entropy(logits, tgt[:, i] - start, reduction="sum"))
            metrics[f"code_loss_{i}"] = code_losses[-1].detach() / n_image
        terms.append(torch.stack(code_losses).mean() * scale[1])
        metrics["code_loss"] = torch.stack([metrics[f"code_loss_{i}"] for i in range(n)]).mean()
        eob_logits.append(out[:, n])

    if not terms:
        raise ValueError("batch has no target blocks")
    if prior is not None and not len(answers):
        # The prior takes part in every step, with a zero term when this batch asks nothing: FSDP reduces the
        # root unit's gradients as one collective, and a rank whose prior got no gradient would leave it short.
        nothing = torch.zeros(1, 1, dtype=torch.bool, device=batch.blocks.device)
        terms.append(0.0 * prior(batch.blocks[:1, :1, 0], nothing).sum())
    eob_out = torch.cat(eob_logits)
    eob = F.cross_entropy(llm.logits(eob_out), torch.full((len(eob_out),), v.eob, device=eob_out.device),
                          reduction="sum")
    metrics["eob_loss"] = eob.detach() / len(eob_out)
    terms.append(eob * eob_scale)
    return sum(terms), metrics


def bucketed_nbp_loss(llm: KelixLLM, batch: Batch, buckets: int,
                      global_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      world_size: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`nbp_loss` of the batch computed on `buckets` length-sorted pieces (`Batch.buckets`), each padded only to
    its own longest row. Every piece is normalised by the whole batch's token counts, so the summed loss and its
    gradient are the whole batch's; the metrics are the pieces' means weighted by their token counts."""
    if buckets <= 1:
        return nbp_loss(llm, batch, global_counts, world_size)
    local = target_counts(batch)
    total = global_counts(local) if global_counts is not None else local  # one all-reduce for all pieces
    loss = 0.0
    sums: dict[str, torch.Tensor] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    for piece in batch.buckets(buckets):
        piece_loss, metrics = nbp_loss(llm, piece, lambda _: total, world_size)
        loss = loss + piece_loss
        n_text, n_image = target_counts(piece).tolist()
        for k, v in metrics.items():
            w = n_text if k.startswith("text") else n_image if k.startswith("code") else n_text + n_image
            sums[k] += v * w
            weights[k] += w
    return loss, {k: sums[k] / weights[k] for k in sums}
