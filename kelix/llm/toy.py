"""A random KelixLLM and text tokenizer without any tokenizer stage: for tests and speed benchmarks.

The model depends only on (N, S, codebook vectors, text vocabulary size), so random codebook vectors and a
BPE trained on a few shapes sentences build it in a second; speed and decoding invariants don't need training.
"""
from __future__ import annotations

import torch

from kelix.llm.config import LLMConfig
from kelix.llm.model import KelixLLM
from kelix.text import TextTokenizer, train_text_tokenizer

SENTENCES = [
    "a red circle left of a blue square", "a green star", "a yellow diamond above a purple triangle",
    "a blue square, a red circle and an orange star", "What colour is the circle?", "What shape is the red object?",
    "How many objects are there?", "Is there a red star?", "yes", "no", "one", "two", "three", "left", "right",
    "above", "below", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle",
    "diamond", "star",
]


def toy_text_tokenizer(vocab_size: int = 300) -> TextTokenizer:
    return train_text_tokenizer(SENTENCES * 4, vocab_size)


def toy_llm(text_tok: TextTokenizer, cfg: LLMConfig | None = None, num_codebooks: int = 4, codebook_size: int = 32,
            num_positions: int = 4, code_dim: int = 16, seed: int = 0) -> KelixLLM:
    torch.manual_seed(seed)
    vectors = torch.randn(num_codebooks, codebook_size, code_dim)
    return KelixLLM.from_config(cfg or LLMConfig(), num_codebooks, codebook_size, text_tok.vocab_size, vectors,
                                num_positions=num_positions)
