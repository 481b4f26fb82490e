"""Kelix-Tok settings: vision tower, 2x2 merge, N independent SimVQ sub-codebooks, aux decoder, 3 stages."""
from __future__ import annotations

from dataclasses import dataclass, field

from kelix.train.config import TrainConfig


@dataclass
class TokenizerConfig:
    image_size: int = 64
    patch_size: int = 8
    vit_hidden_size: int = 128
    vit_num_layers: int = 4
    vit_num_heads: int = 4
    vit_intermediate_size: int = 512
    # Local folder with a pretrained SigLIP/SigLIP2 vision tower; empty = random init from this config.
    vit_pretrained: str = ""
    merge: int = 2
    # "multi" (Kelix-Tok) | "single" | "shared" | "continuous": the report's quantizer ablation.
    quantizer: str = "multi"
    num_codebooks: int = 4
    codebook_size: int = 256
    code_dim: int = 32
    # Width of the frozen base codebook (the public code: 4096-d K-means centroids).
    base_dim: int = 64
    beta: float = 0.25
    # "kmeans" | "random": how the frozen base codebooks start.
    codebook_init: str = "kmeans"
    kmeans_iters: int = 20
    kmeans_max_samples: int = 20000
    # "sum" | "mean": how the N up-projected sub-vectors pool into one position (sum won in the report).
    pooling: str = "sum"
    embed_dim: int = 128
    # Auxiliary Qwen3 decoder that reads the quantized prefix; discarded after training.
    aux_hidden_size: int = 128
    aux_num_layers: int = 3
    aux_num_heads: int = 4
    aux_num_kv_heads: int = 2
    aux_intermediate_size: int = 384
    text_vocab_size: int = 512
    max_text_len: int = 32
    train1: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=300, batch_size=64, lr=1e-3))
    train2: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=600, batch_size=64, lr=1e-3, encoder_lr=5e-4))
    train3: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=200, batch_size=64, lr=3e-4, encoder_lr=1e-4, warmup_steps=0))

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
            aux_intermediate_size=3072, text_vocab_size=32000, max_text_len=256,
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
        aux_intermediate_size=3072, text_vocab_size=151_669, max_text_len=1024,
        train1=TrainConfig(num_steps=20000, batch_size=1024, precision="bf16", warmup_steps=500),
        train2=TrainConfig(num_steps=100000, batch_size=1024, precision="bf16", warmup_steps=2000),
        train3=TrainConfig(num_steps=10000, batch_size=1024, precision="bf16", warmup_steps=0),
    )
