"""What a question alone predicts about its answer, trained beside the LLM so the LLM does not learn it.

The shapes data holds colour-shape pairs out of train (red triangles, blue stars): "What shape is the red
object?" is never answered "triangle" in training, so a model that answers from the image *and* the question's
words learns that red objects are not triangles, and on a test image with a red triangle its image evidence
loses to that prior. The remedy is a product of experts (Clark et al., "Don't Take the Easy Way Out", 2019):
answers are trained on log p_llm + log p_prior, where p_prior comes from this small question-only model
(trained on its own loss, detached in the product). Whatever the question alone explains, the prior already
scores, so the LLM's gradient only asks it for what the image adds.

The prior reads a bag of the question's tokens (and of the answer's earlier tokens), so it captures word-level
priors like "red -> not triangle" and nothing about the image.

The fourteenth session decoded with the same product (`inference.answer_codes`). Clark et al. read the main
model alone at test time, to drop the bias; here that fails, because the prior also knows which kind of answer a question
wants (a number, a direction, yes or no) and the LLM alone stops learning it (test VQA 0.50-0.59 on tiny). Read
as the product, three tiny runs answered 0.828-0.868 against 0.817-0.826 for the LLM trained alone, and 0.867-0.891
with `llm.extra_position_questions` (docs/benchmarks.md, "Where each object is, and an answer prior as a second
expert"). Held-out pairs gain less than hoped: the product cannot give a pair mass both experts withhold.

Decoding reads only the prior's *kind* of answer, not its choice within the kind (`answer_kinds`): the answers
one question was given in training are one kind (all colours answer "What colour is the star?"), and at
decoding each answer token's prior score is the probability of its kind. The prior still says "a colour",
"a number", "yes or no"; the LLM alone says which colour. That is Clark et al.'s reading (drop the bias
at test) kept where the bias is the answer's form: "red objects are never triangles" is a choice within a
kind, and the LLM was trained beside a prior that already scored it, so the LLM holds less of it.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class AnswerPrior(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Linear(dim, vocab_size)
        # The kind of answer each token starts (answer_kinds), -1 for tokens that start none; set from the
        # training data by each stage, saved with the model.
        self.register_buffer("kind", torch.full((vocab_size,), -1, dtype=torch.long))

    def set_kinds(self, question_answers: Iterable[tuple[str, str]], encode) -> None:
        """The kinds of answer (answer_kinds) of training (question, answer) text pairs; `encode`: text -> ids."""
        firsts = ((q, encode(a)[0]) for q, a in question_answers if a)
        self.kind.copy_(answer_kinds(firsts, len(self.kind)))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens [M, L] ids, mask [M, L] which of them each row's bag holds -> logits [M, vocab]."""
        weights = mask.to(self.embed.weight.dtype)
        bag = torch.einsum("ml,mld->md", weights, self.embed(tokens)) / weights.sum(1, keepdim=True).clamp_min(1)
        return self.out(self.mlp(bag))


def question_bags(blocks: torch.Tensor, groups: torch.Tensor, image_pos: torch.Tensor, attention_mask: torch.Tensor,
                  rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For target positions (rows, cols) inside question groups: each one's text tokens so far in its group
    (the question, and the answer up to it), as (tokens [M, L], mask [M, L]) for `AnswerPrior`."""
    length = blocks.shape[1]
    same_group = groups[rows] == groups[rows, cols][:, None]
    text = (image_pos[rows] < 0) & attention_mask[rows].bool()
    so_far = torch.arange(length, device=blocks.device)[None] <= cols[:, None]
    return blocks[rows, :, 0], same_group & text & so_far


def answer_kinds(question_answers: Iterable[tuple[str, int]], vocab_size: int) -> torch.Tensor:
    """Kind ids [vocab_size] (-1: no kind) from (question, first token of its answer) pairs: tokens that answer
    one question are one kind, and kinds that share a token merge (union-find), so "above" joins the
    directions of "Where is A relative to B?" and of "Where is A?" alike."""
    parent: dict[int, int] = {}

    def root(t: int) -> int:
        while parent.setdefault(t, t) != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    first_of: dict[str, int] = {}
    for question, token in question_answers:
        parent[root(token)] = root(first_of.setdefault(question, token))
    kind = torch.full((vocab_size,), -1, dtype=torch.long)
    number = {r: k for k, r in enumerate(sorted({root(t) for t in parent}))}
    for t in parent:
        kind[t] = number[root(t)]
    return kind


def kind_log_probs(logp: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """Each token's log-probability replaced by its kind's (the sum over the kind's tokens), for tokens with a
    kind; logp [B, V] normalised, kind [V]."""
    has = kind >= 0
    if not has.any():
        return logp
    index, members = kind.clamp_min(0), logp[:, has]
    at = index[has].expand(len(logp), -1)
    # A log-sum-exp per kind, shifted by the kind's largest member: a kind the prior all but rules out keeps a
    # finite score instead of exp() underflowing to log(0).
    top = logp.new_full((len(logp), int(kind.max()) + 1), float("-inf")).scatter_reduce(1, at, members, "amax")
    mass = torch.zeros_like(top).scatter_add(1, at, (members - top.gather(1, at)).exp())
    return torch.where(has, (top + mass.log())[:, index], logp)


def bag_log_probs(prior: AnswerPrior, bags: list[list[int]], size: int, device: torch.device | str) -> torch.Tensor:
    """log p_prior of each text id's kind of answer (its own log p_prior where it starts none) for each bag of
    token ids [0, size): decoding's side of the product."""
    width = max(map(len, bags))
    tokens = torch.zeros(len(bags), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(bags), width, dtype=torch.bool, device=device)
    for k, bag in enumerate(bags):
        tokens[k, :len(bag)] = torch.tensor(bag, dtype=torch.long, device=device)
        mask[k, :len(bag)] = True
    return kind_log_probs(prior(tokens, mask)[:, :size].log_softmax(-1), prior.kind[:size])


def product_of_experts(llm_logits: torch.Tensor, prior_logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the product: the prior is a fixed expert here (it trains on its own loss)."""
    return F.log_softmax(llm_logits, -1) + F.log_softmax(prior_logits.detach(), -1)
