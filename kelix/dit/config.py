"""Kelix-DiT settings: SANA transformer, latent space, flow matching, 2 stages plus the AE-DiT."""
from __future__ import annotations

from dataclasses import dataclass, field

from kelix.train.config import TrainConfig


@dataclass
class DiTConfig:
    # "pixel" (tiny: no autoencoder) | "dcae" (a frozen diffusers AutoencoderDC from `dcae_path`).
    latent: str = "pixel"
    dcae_path: str = ""
    # Image side the DiT produces (before any DC-AE decode), and the side it is resized to at the end.
    image_size: int = 32
    output_size: int = 64
    patch_size: int = 2
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    cross_attention_dim: int = 128
    mlp_ratio: float = 2.5
    # "logit_normal" | "uniform": flow-matching timestep sampling.
    timestep_sampling: str = "logit_normal"
    sample_steps: int = 20
    guidance_scale: float = 3.0
    cond_dropout: float = 0.1
    # Share of training images kept for SFT (best quality score first).
    sft_fraction: float = 0.5
    train1: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=300, batch_size=32, lr=1e-3))
    train2: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=100, batch_size=32, lr=3e-4, warmup_steps=0))
    train_ae: TrainConfig = field(default_factory=lambda: TrainConfig(num_steps=300, batch_size=32, lr=1e-3))


def dit_preset(preset: str) -> DiTConfig:
    if preset == "tiny":
        return DiTConfig()
    if preset == "small":
        return DiTConfig(
            latent="dcae", dcae_path="weights/dc-ae-f32c32", image_size=256, output_size=224, patch_size=1,
            num_layers=12, num_heads=12, head_dim=64, cross_attention_dim=768,
            train1=TrainConfig(num_steps=50000, batch_size=128, precision="bf16"),
            train2=TrainConfig(num_steps=5000, batch_size=128, precision="bf16", warmup_steps=0),
            train_ae=TrainConfig(num_steps=50000, batch_size=128, precision="bf16"),
        )
    # SANA-1.6B-like: 20 layers, 70 heads x 32; DC-AE f32c32; 512 px latents (16x16) resized to 504 px.
    return DiTConfig(
        latent="dcae", dcae_path="weights/dc-ae-f32c32", image_size=512, output_size=504, patch_size=1,
        num_layers=20, num_heads=70, head_dim=32, cross_attention_dim=2240,
        train1=TrainConfig(num_steps=200000, batch_size=1024, precision="bf16", warmup_steps=2000),
        train2=TrainConfig(num_steps=10000, batch_size=256, precision="bf16", warmup_steps=0),
        train_ae=TrainConfig(num_steps=100000, batch_size=1024, precision="bf16", warmup_steps=2000),
    )
