"""Dataset settings: which set, where it lives, how the shapes set is generated, what validation accepts."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    # Dataset folder (relative to the repo root or absolute); `data.dvc` tracks the default one.
    root: str = "data/shapes"
    image_size: int = 64
    num_train: int = 6000
    num_val: int = 500
    num_test: int = 500
    seed: int = 0
    max_objects: int = 3
    # "colour shape" combinations that appear only in the test split (compositional generalisation).
    holdout_combinations: list[str] = field(default_factory=lambda: ["red triangle", "blue star"])
    # Validation bounds.
    min_image_size: int = 16
    max_image_size: int = 4096
    min_caption_chars: int = 3
    max_caption_chars: int = 2000
    max_bad_fraction: float = 0.01
    split_tolerance: float = 0.05


def data_preset(preset: str) -> DataConfig:
    if preset == "tiny":
        return DataConfig()
    if preset == "small":
        return DataConfig(image_size=224, num_train=200_000, num_val=5000, num_test=5000)
    return DataConfig(root="data/pretrain", image_size=504, num_train=0, num_val=0, num_test=0)
