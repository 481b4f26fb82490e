"""What a question alone predicts about its answer, trained beside the LLM so the LLM does not learn it.

The shapes data holds colour-shape pairs out of train (red triangles, blue stars): "What shape is the red
object?" is never answered "triangle" in training, so a model that answers from the image *and* the question's
words learns that red objects are not triangles, and on a test image with a red triangle its image evidence
loses to that prior. The remedy is a product of experts (Clark et al., "Don't Take the Easy Way Out", 2019):
answers are trained on log p_llm + log p_prior, where p_prior comes from this small question-only model
(trained on its own loss, detached in the product). Whatever the question alone explains, the prior already
scores, so the LLM's gradient only asks it for what the image adds. Inference uses the LLM alone.

The prior reads a bag of the question's tokens (and of the answer's earlier tokens), so it captures word-level
priors like "red -> not triangle" and nothing about the image.

Measured on tiny (`llm.answer_prior`, off; docs/benchmarks.md), it does not work as is: the prior also knows
which kind of answer a question wants (a number, a direction, yes or no), so the LLM alone stops learning that,
and test VQA falls from 0.82 to 0.50-0.59.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AnswerPrior(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Linear(dim, vocab_size)

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


def product_of_experts(llm_logits: torch.Tensor, prior_logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the product: the prior is a fixed expert here (it trains on its own loss)."""
    return F.log_softmax(llm_logits, -1) + F.log_softmax(prior_logits.detach(), -1)
