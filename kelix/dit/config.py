"""Kelix-DiT settings: SANA transformer, latent space, flow matching, 2 stages plus the AE-DiT."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from kelix.train.config import TrainConfig

# The AE-DiT's own settings and the dit-1/dit-2 settings each stands in for (`DiTConfig.for_autoencoder`). The
# stage catalogue keys aedit on the first and dit-1/dit-2 on the second, so changing one reruns only its stages.
AE_OVERRIDES = {"ae_prediction": "prediction", "ae_logit_mean": "logit_mean", "ae_guidance_scale": "guidance_scale"}


@dataclass
class DiTConfig:
    # "pixel" (tiny: no autoencoder) | "dcae" (a frozen diffusers AutoencoderDC from `dcae_path`).
    latent: Literal["pixel", "dcae"] = "pixel"
    dcae_path: str = ""
    # Image side the DiT produces (before any DC-AE decode), and the side it is resized to at the end.
    image_size: int = 32
    output_size: int = 64
    # tiny: patch 4 at 32 px, so one image token per tokenizer position (8 x 8) and a quarter of patch 2's
    # tokens; the saved compute buys width 256 and many small-batch steps, which draw corners where patch 2 at
    # width 128 drew round blobs (docs/benchmarks.md, "The tiny DiT draws shapes").
    patch_size: int = 4
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 64
    cross_attention_dim: int = 256
    mlp_ratio: float = 2.5
    # Channels of the aligned condition path (the P-grid projected and concatenated to the DiT input; 0 = off,
    # cross-attention only as in SANA). The conditions are per image cell, so this is a cheap, strong prior.
    spatial_cond_channels: int = 16
    # "sincos" | "none": position code of the image tokens (SANA-1.0 uses none; a 2-layer model needs one).
    pos_embed: Literal["sincos", "none"] = "sincos"
    # What the network outputs: "velocity" (SANA) or "sample" (the clean latent, turned into the velocity it
    # implies; JiT, arXiv 2511.13720: in pixel space the data is low-dimensional but the noise is not, so a
    # narrow network can predict the image where it cannot carry the noise through). The loss is on the
    # velocity either way; `min_sigma` bounds the 1/sigma of the conversion.
    prediction: Literal["velocity", "sample"] = "velocity"
    min_sigma: float = 0.05
    # "logit_normal" | "uniform": flow-matching timestep sampling.
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    # Logit-normal sigma = sigmoid(mean + std * N(0,1)); mean > 0 trains more at high noise, where the condition
    # decides the image (SD3 uses 0, 1; JiT's x-prediction shifts towards noise).
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sample_steps: int = 20
    # FlowMatchEulerDiscreteScheduler shift at sampling (SANA uses 3 at 1024 px; >1 spends steps at high noise).
    sample_shift: float = 1.0
    guidance_scale: float = 3.0
    cond_dropout: float = 0.1
    # EMA of the weights used for sampling and saved (0 = the last iterate).
    ema_decay: float = 0.995
    # AE-DiT sampling guidance. Its condition pins the image down, so it needs far less than text-to-image;
    # on tiny a little (1.5) sharpens the corners a short run leaves soft, more only oversaturates.
    ae_guidance_scale: float = 1.0
    # The AE-DiT's own `prediction` and `logit_mean`. Its condition nearly fixes the image, so in pixel space
    # x-prediction trained towards noise gives clean reconstructions where velocity prediction leaves the
    # input noise in as speckle; text-to-image from generated codes scored lower with it (docs/benchmarks.md).
    ae_prediction: Literal["velocity", "sample"] = "velocity"
    ae_logit_mean: float = 0.0
    # Share of training images kept for SFT (best quality score first).
    sft_fraction: float = 0.5
    # Validation images scored (PSNR, detector agreement) at the end of each stage.
    num_eval_images: int = 32
    # Log a sample grid to the active MLflow run at the first checkpoint at least this many steps after the last.
    grid_every: int = 400
    # tiny: batch 8. For the same number of examples seen, 4x the steps at a quarter of the batch drew far more
    # recognisable shapes (AE-DiT val agreement 0.55 at batch 32 x 900 -> 0.81 at batch 8 x 3600; docs/benchmarks.md).
    train1: TrainConfig = field(default_factory=lambda: TrainConfig(
        num_steps=1500, batch_size=8, lr=2e-3, checkpoint_every=200))
    train2: TrainConfig = field(default_factory=lambda: TrainConfig(
        num_steps=500, batch_size=8, lr=5e-4, warmup_steps=0, checkpoint_every=200))
    train_ae: TrainConfig = field(default_factory=lambda: TrainConfig(
        num_steps=2400, batch_size=8, lr=2e-3, checkpoint_every=200))

    def for_autoencoder(self) -> "DiTConfig":
        """These settings with the AE-DiT's own prediction target, noise levels and guidance: what it trains and
        samples with (saved with its model)."""
        return dataclasses.replace(self, **{dit: getattr(self, ae) for ae, dit in AE_OVERRIDES.items()})


def dit_preset(preset: str) -> DiTConfig:
    if preset == "tiny":
        return DiTConfig(ae_prediction="sample", ae_logit_mean=0.8, ae_guidance_scale=1.5)
    if preset == "small":
        return DiTConfig(
            latent="dcae", dcae_path="weights/dc-ae-f32c32", image_size=256, output_size=224, patch_size=1,
            num_layers=12, num_heads=12, head_dim=64, cross_attention_dim=768, spatial_cond_channels=0,
            train1=TrainConfig(num_steps=50000, batch_size=128, precision="bf16"),
            train2=TrainConfig(num_steps=5000, batch_size=128, precision="bf16", warmup_steps=0),
            train_ae=TrainConfig(num_steps=50000, batch_size=128, precision="bf16"),
        )
    # SANA-1.6B-like: 20 layers, 70 heads x 32; DC-AE f32c32; 512 px latents (16x16) resized to 504 px.
    return DiTConfig(
        latent="dcae", dcae_path="weights/dc-ae-f32c32", image_size=512, output_size=504, patch_size=1,
        num_layers=20, num_heads=70, head_dim=32, cross_attention_dim=2240, spatial_cond_channels=0,
        train1=TrainConfig(num_steps=200000, batch_size=1024, precision="bf16", warmup_steps=2000),
        train2=TrainConfig(num_steps=10000, batch_size=256, precision="bf16", warmup_steps=0),
        train_ae=TrainConfig(num_steps=100000, batch_size=1024, precision="bf16", warmup_steps=2000),
    )
