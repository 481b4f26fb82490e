"""One split of a dataset folder in memory: its records and a uint8 image tensor [N,3,H,W].

The tiny sets fit in memory (6000 x 3 x 64 x 64 bytes = 74 MB), so every stage loads its splits once through
the data area's cached reader and batches are plain tensor indexing (no DataLoader workers on 2 cores).
"""
from __future__ import annotations

from pathlib import Path

import torch

from kelix.data.reader import iter_records, load_images


def load_split(root: str | Path, split: str, image_size: int, limit: int = 0) -> tuple[list[dict], torch.Tensor]:
    """(records, images uint8 [N,3,H,W]) of one split, in manifest order; `limit` > 0 keeps the first ones."""
    records = list(iter_records(root, split))
    if not records:
        raise ValueError(f"{root} has no {split} records: generate or import data first")
    keys, images = load_images(root, split, image_size=image_size)
    if keys != [r["key"] for r in records]:
        by_key = {k: i for i, k in enumerate(keys)}
        images = images[[by_key[r["key"]] for r in records]]
    if limit > 0:
        records, images = records[:limit], images[:limit]
    return records, images


def all_records(root: str | Path) -> list[dict]:
    """Every record of every split, in manifest order: what the text tokenizer is trained on."""
    return list(iter_records(root))
