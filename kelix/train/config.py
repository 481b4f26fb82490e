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

    def problems(self, prefix: str) -> list[str]:
        """What in this schedule no run could use, each naming its key (`prefix` is e.g. `llm.train2`): a
        negative step count trains nothing and would still mark the stage finished."""
        bounds = {
            "num_steps": (0, None), "batch_size": (1, None), "lr": (0, None), "encoder_lr": (0, None),
            "warmup_steps": (0, None), "min_lr_ratio": (0, 1), "weight_decay": (0, None), "beta1": (0, 1),
            "beta2": (0, 1), "grad_accum_steps": (1, None), "grad_clip": (0, None), "checkpoint_every": (1, None),
            "log_every": (1, None), "time_budget_s": (0, None),
        }
        found = []
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not low <= value or (high is not None and not value <= high):  # a NaN fails both
                want = f"at least {low}" if high is None else f"between {low} and {high}"
                found.append(f"{prefix}.{name} must be {want}, got {value!r}")
        return found
