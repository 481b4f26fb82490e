"""Readers for the dataset format: a record stream, torch datasets, and a cached in-RAM image tensor.

Training on 64 px images is bound by PNG decoding, not by the model, so `load_images` decodes a split once
into one uint8 array kept next to the dataset (`<root>.cache/`), keyed by a fingerprint of the manifest and
of the image files (size, mtime) so a regenerated, re-imported or re-validated dataset never serves stale
pixels. Quarantined keys are skipped everywhere, even in the short window where validation has written the
quarantine but not yet rewritten the manifest.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from kelix.data.format import MANIFEST, QUARANTINE, SPLITS, DatasetError, iter_manifest_lines, quarantined_keys, resolve_inside
from kelix.data.images import to_rgb
from kelix.files import is_temporary, replace_atomically


def iter_records(root: str | Path, split: str | None = None) -> Iterator[dict]:
    """Manifest records in file order, optionally of one split, without quarantined keys."""
    if split is not None and split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    path = Path(root) / MANIFEST
    if not path.exists():
        raise DatasetError(f"{root} is not a dataset folder: {MANIFEST} is missing")
    skip = quarantined_keys(root)
    for _, rec in iter_manifest_lines(path):
        if (split is None or rec.get("split") == split) and rec.get("key") not in skip:
            yield rec


def open_image(root: str | Path, rec: dict, image_size: int | None = None) -> Image.Image:
    """The record's image as RGB, resized to image_size x image_size when given. A missing or undecodable file is
    a DatasetError naming the record: validation quarantines such records, so the fix is to run it."""
    path = resolve_inside(root, rec["image"], "image path")
    try:
        with Image.open(path) as im:
            im = to_rgb(im)  # as the importer does: a transparent palette image's hidden colours stay hidden
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL raises SyntaxError for some bad headers
        # An OSError with an errno (EIO, ESTALE, EACCES on a network volume) is the storage's, not the record's: it
        # stays an OSError, which the runners retry, instead of advice that would quarantine a good record.
        if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, FileNotFoundError):
            raise
        problem = "is missing" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc})"
        raise DatasetError(f"record {rec.get('key')!r}: image {path} {problem}; run `kelix data validate {root}` to "
                           "quarantine bad records, then rerun") from exc
    if image_size and im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BICUBIC)
    return im


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def _item(root: Path, rec: dict, image_size: int | None) -> dict:
    return {"key": rec["key"], "image": _to_tensor(open_image(root, rec, image_size)), "caption": rec.get("caption", ""),
            "qa": rec.get("qa", []), "prompt": rec.get("prompt", ""), "objects": rec.get("objects", []),
            "split": rec["split"]}


class ImageTextDataset(Dataset):
    """Map-style dataset: item = dict(key, image FloatTensor[3,H,W] RGB in [0,1], caption, qa, prompt,
    objects, split). `split=None` reads every split."""

    def __init__(self, root: str | Path, split: str | None = None, image_size: int | None = None):
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.records = list(iter_records(root, split))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return _item(self.root, self.records[index], self.image_size)


class ShapesStreamingDataset(IterableDataset):
    """Iterable dataset that streams the manifest; each DataLoader worker (and each distributed rank, when
    torch.distributed is initialised) takes every n-th record, so together they read each record once."""

    def __init__(self, root: str | Path, split: str | None = None, image_size: int | None = None,
                 rank: int | None = None, world_size: int | None = None):
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if ready else 0
            world_size = dist.get_world_size() if ready else 1
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        shards = self.world_size * workers
        shard = self.rank * workers + worker
        for i, rec in enumerate(iter_records(self.root, self.split)):
            if i % shards == shard:
                yield _item(self.root, rec, self.image_size)


def collate(batch: list[dict]) -> dict:
    """Stack images into [B,3,H,W]; keep every other field as a list (captions, qa, objects, ...)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out = {k: [item[k] for item in batch] for k in batch[0]}
    out["image"] = torch.stack(out["image"])
    return out


def _fingerprint(root: Path, split: str, image_size: int | None) -> str:
    """Manifest, quarantine and each of the split's image files' size and mtime: a re-import that rewrites an
    image but leaves the manifest byte-identical must not be served the old decode."""
    h = hashlib.sha1(f"{split}/{image_size}".encode())
    for name in (MANIFEST, QUARANTINE):
        p = root / name
        if p.exists():
            h.update(p.read_bytes())
    for rec in iter_records(root, split):
        try:
            st = (root / rec["image"]).stat()
            h.update(f"{rec['image']}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{rec['image']}:missing;".encode())  # open_image reports it
    return h.hexdigest()[:16]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append ".npy" to a temporary name
        np.save(fh, arr)


def load_images(root: str | Path, split: str, image_size: int | None = None,
                cache_dir: str | Path | None = None) -> tuple[list[str], torch.Tensor]:
    """All images of a split as (keys, uint8 tensor [N,3,H,W]); decoded once, then read from the cache.

    The cache lives beside the dataset, not inside it, so it never changes the DVC-tracked folder's hash.
    """
    root = Path(root)
    cache = Path(cache_dir) if cache_dir else root.with_name(root.name + ".cache")
    fp = _fingerprint(root, split, image_size)
    npy, keys_file = cache / f"{split}-{fp}.npy", cache / f"{split}-{fp}.keys.json"
    if npy.exists() and keys_file.exists():
        return json.loads(keys_file.read_text()), torch.from_numpy(np.load(npy))
    records = list(iter_records(root, split))
    if not records:
        raise DatasetError(f"{root} has no {split} records")
    first = np.asarray(open_image(root, records[0], image_size))
    arr = np.empty((len(records), 3, *first.shape[:2]), dtype=np.uint8)
    for i, rec in enumerate(records):
        im = np.asarray(open_image(root, rec, image_size)) if i else first
        if im.shape != first.shape:
            raise DatasetError(f"{rec['key']}: image is {im.shape[1]}x{im.shape[0]}, the split's first image is "
                               f"{first.shape[1]}x{first.shape[0]}; pass image_size to resize them all")
        arr[i] = im.transpose(2, 0, 1)
    keys = [r["key"] for r in records]
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for old in cache.glob(f"{split}-*"):
            if fp not in old.name and not is_temporary(old):  # another process's write in flight is its own
                old.unlink(missing_ok=True)  # stale decodes of an earlier dataset state: derived data, safe to drop
        # Per-process temporary names and renames: torchrun ranks fill the same cache at once, and one that
        # finds both files must find them whole (keys first, so the array's presence implies the keys').
        replace_atomically(keys_file, lambda tmp: tmp.write_text(json.dumps(keys)))
        replace_atomically(npy, lambda tmp: _save_npy(tmp, arr))
    except OSError:
        pass  # a read-only location only costs the speed-up
    return keys, torch.from_numpy(arr)


def load_split(root: str | Path, split: str, image_size: int, limit: int = 0) -> tuple[list[dict], torch.Tensor]:
    """(records, images uint8 [N,3,H,W]) of one split in manifest order; `limit` > 0 keeps the first ones.

    The tiny sets fit in memory (6000 x 3 x 64 x 64 bytes = 74 MB), so stages load their splits once and
    batch by plain tensor indexing (no DataLoader workers on 2 cores)."""
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
