"""Optimiser and schedule settings of one training stage.

Every stage of every model (tokenizer 1-3, LLM 1-4, DiT 1-2, AE-DiT) carries one of these, so a stage's
cache key changes exactly when its own schedule does. Defaults follow the Kelix report: AdamW (0.9, 0.95),
weight decay 0.1, cosine decay after a linear warmup.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainConfig:
    num_steps: int = 100
    # Examples per micro-batch (over all processes); an optimiser step takes grad_accum_steps of them.
    batch_size: int = 32
    lr: float = 2e-4
    # Learning rate of the pretrained tower (the report trains the ViT at 1/10 of the adapters' rate).
    encoder_lr: float = 2e-5
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    # "fp32" | "bf16": bf16 autocast only where the device supports it.
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    # Stop early once this many seconds have passed (0 = no limit); the step reached is recorded.
    time_budget_s: float = 0.0
