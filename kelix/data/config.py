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
    # Share of test images forced to contain a held-out combination, so the compositional test has enough
    # examples even on small test sets (the rest of the test split is drawn from the full distribution).
    holdout_fraction: float = 0.25
    # Generation worker processes (0 = one per CPU, capped at 4); small sets always run in-process.
    workers: int = 0
    # Validation bounds.
    min_image_size: int = 16
    max_image_size: int = 4096
    # PIL modes a stored image may have; "P" is the palette PNG the shapes generator writes (lossless RGB).
    allowed_modes: list[str] = field(default_factory=lambda: ["RGB", "P"])
    min_caption_chars: int = 3
    max_caption_chars: int = 2000
    max_bad_fraction: float = 0.01
    # Expected split shares come from num_train/num_val/num_test; a split may be off by this much (absolute).
    split_tolerance: float = 0.05
    # Importer: images above this many pixels are rejected as decompression bombs before decoding.
    max_image_pixels: int = 50_000_000


def data_preset(preset: str) -> DataConfig:
    if preset == "tiny":
        return DataConfig()
    if preset == "small":
        return DataConfig(image_size=224, num_train=200_000, num_val=5000, num_test=5000)
    return DataConfig(root="data/pretrain", image_size=504, num_train=0, num_val=0, num_test=0)
