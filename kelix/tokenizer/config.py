"""Kelix-Tok settings: vision tower, 2x2 merge, N independent SimVQ sub-codebooks, aux decoder, 3 stages.

The tiny preset is calibrated for 64 px shapes on 2 CPU cores (shared/DESIGN.md section 4): patch 4 so one
merged position covers 8x8 pixels (objects are 14-22 px wide, so colour and shape of one object land in the
same few positions), a grounded warm-up of the random ViT on the data's object boxes (in place of the report's
pretrained SigLIP), K-means-initialised base codebooks with LayerNorm-ed matching, captions that name shape and
colour in stage 1 and every question of an image in each step of stages 2-3.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kelix.train.config import TrainConfig

QUANTIZERS = ("multi", "single", "shared", "continuous")


@dataclass
class TokenizerConfig:
    image_size: int = 64
    patch_size: int = 4
    vit_hidden_size: int = 96
    vit_num_layers: int = 2
    vit_num_heads: int = 4
    vit_intermediate_size: int = 256
    # Local folder with a pretrained SigLIP vision tower; empty = random init from this config.
    vit_pretrained: str = ""
    merge: int = 2
    # Hidden width of the adapter MLP between the merged patch and the quantizer (0 = vit_hidden_size).
    adapter_hidden_size: int = 0
    # "multi" (Kelix-Tok) | "single" | "shared" | "continuous": the report's quantizer ablation.
    quantizer: Literal["multi", "single", "shared", "continuous"] = "multi"
    num_codebooks: int = 4
    codebook_size: int = 128
    code_dim: int = 32
    # Width of the frozen base codebook (the public code: 4096-d K-means centroids).
    base_dim: int = 64
    beta: float = 0.25
    # Stages 2-3: learning rate of the adapter (merge + MLP) relative to the stage's lr. Below 1 the features
    # drift more slowly than the SimVQ projections can follow them, which keeps K-means-placed codes in use
    # (probe: util fell 0.99 -> 0.72 over stage 2 at 1.0). 1.0 = the report's single adapter rate.
    adapter_lr_scale: float = 0.2
    # "kmeans" | "random": how the frozen base codebooks start.
    codebook_init: Literal["kmeans", "random"] = "kmeans"
    kmeans_iters: int = 20
    kmeans_max_samples: int = 20000
    # Training images whose features feed K-means (their positions are subsampled to kmeans_max_samples).
    kmeans_images: int = 1024
    # "sum" | "mean": how the N up-projected sub-vectors pool into one position (sum won in the report).
    pooling: Literal["sum", "mean"] = "sum"
    embed_dim: int = 128
    # Auxiliary Qwen3 decoder that reads the quantized prefix; discarded after training.
    aux_hidden_size: int = 128
    aux_num_layers: int = 3
    aux_num_heads: int = 4
    aux_num_kv_heads: int = 2
    aux_intermediate_size: int = 384
    text_vocab_size: int = 512
    max_text_len: int = 48
    max_answer_len: int = 4
    # Warm-up of the aux decoder (LM + input projection) at the start of stage 1 on captions and QA read through
    # the frozen K-means-initialised tokenizer (0 steps = none). The report's aux decoder is a pretrained
    # Qwen3-0.6B that can use a prefix; a random one frozen in stage 1 cannot, so the caption loss can only be
    # lowered by one constant "soft prompt" and its gradient pulls every image's features onto one code (seen:
    # util 0.008 after 80 steps, with or without commitment loss: Adam turns that tiny, image-independent
    # gradient into full-size steps). Stage 1 therefore also runs at the report's adapter rate 2e-4.
    # Named without the `train` prefix so it is part of every tokenizer stage's key.
    aux_warmup: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=80, batch_size=32, lr=2e-3, warmup_steps=10))
    # Grounded warm-up of a randomly initialised ViT at the start of stage 1, before K-means: tower, merge and
    # adapter learn to name the object (shape, colour) under every position from the data's object boxes
    # (kelix/tokenizer/grounding.py). Stands in for the report's pretrained SigLIP, whose patch features already
    # say what is where; skipped with `vit_pretrained` and on data without object boxes. 0 steps = none.
    vit_warmup: TrainConfig = field(default_factory=lambda: TrainConfig(
        num_steps=600, batch_size=32, lr=1e-3, warmup_steps=10, weight_decay=0.0))
    # Factorise the warm-up over the sub-codebooks: shape in the first half of the N sub-vectors (and kept the
    # same under random recolouring), colour in the second half, so held-out colour-shape pairs quantize to new
    # combinations of seen codes (grounding.GroundingHead). Needs the `multi` quantizer and N >= 2.
    vit_warmup_factorise: bool = True
    # Validation images used for the returned metrics (0 = the whole val split).
    eval_images: int = 0
    # Seed of every random init (ViT, adapter, codebooks, aux decoder) and of K-means.
    seed: int = 0
    train1: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=60, batch_size=32, lr=2e-4, warmup_steps=5))
    train2: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=500, batch_size=32, lr=1e-3, encoder_lr=2e-4, warmup_steps=50))
    train3: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=120, batch_size=32, lr=3e-4, encoder_lr=5e-5, warmup_steps=0))

    @property
    def grid(self) -> int:
        """Positions per side after the patch merge."""
        return self.image_size // (self.patch_size * self.merge)

    @property
    def num_positions(self) -> int:
        return self.grid * self.grid


def tokenizer_preset(preset: str) -> TokenizerConfig:
    if preset == "tiny":
        return TokenizerConfig()
    if preset == "small":
        return TokenizerConfig(
            image_size=224, patch_size=16, vit_hidden_size=768, vit_num_layers=12, vit_num_heads=12,
            vit_intermediate_size=3072, num_codebooks=8, codebook_size=1024, code_dim=64, base_dim=768,
            embed_dim=1024, aux_hidden_size=1024, aux_num_layers=8, aux_num_heads=16, aux_num_kv_heads=8,
            aux_intermediate_size=3072, text_vocab_size=32000, max_text_len=256, kmeans_images=8192, adapter_lr_scale=1.0,
            kmeans_max_samples=200_000, vit_warmup=TrainConfig(num_steps=0),
            train1=TrainConfig(num_steps=5000, batch_size=256, precision="bf16"),
            train2=TrainConfig(num_steps=20000, batch_size=256, precision="bf16"),
            train3=TrainConfig(num_steps=5000, batch_size=256, precision="bf16", warmup_steps=0),
        )
    # The report: SigLIP-style 27 layers x 1152, patch 14, 2x2 merge; 8 x 8192 codes of dim 128;
    # aux decoder Qwen3-0.6B. 504 px -> 36x36 patches -> 18x18 positions.
    return TokenizerConfig(
        image_size=504, patch_size=14, vit_hidden_size=1152, vit_num_layers=27, vit_num_heads=16,
        vit_intermediate_size=4304, num_codebooks=8, codebook_size=8192, code_dim=128, base_dim=4096,
        embed_dim=4096, aux_hidden_size=1024, aux_num_layers=28, aux_num_heads=16, aux_num_kv_heads=8,
        aux_intermediate_size=3072, text_vocab_size=151_669, max_text_len=1024, kmeans_images=65536, adapter_lr_scale=1.0,
        kmeans_max_samples=1_000_000, vit_warmup=TrainConfig(num_steps=0),
        train1=TrainConfig(num_steps=20000, batch_size=1024, precision="bf16", warmup_steps=500),
        train2=TrainConfig(num_steps=100000, batch_size=1024, precision="bf16", warmup_steps=2000),
        train3=TrainConfig(num_steps=10000, batch_size=1024, precision="bf16", warmup_steps=0),
    )
