"""Learning-rate schedule of the report: linear warmup, then cosine decay to `min_lr_ratio` of the peak."""
from __future__ import annotations

import math


def lr_factor(step: int, num_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, num_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
