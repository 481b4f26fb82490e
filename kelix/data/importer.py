"""Import an image folder with `captions.jsonl` into the dataset format.

Input: `SRC/captions.jsonl`, one JSON object per line: {"image": "rel/path.jpg", "caption": "...",
"qa": [{"q": "...", "a": "..."}], optional "key" and "split"}, with the images under SRC. Real folders are
messy, so nothing here stops at the first bad entry and nothing is dropped: every entry either becomes an RGB
PNG record or a line in `quarantine.jsonl` saying why (broken JSON with its line number, unsafe paths, missing,
empty, truncated or non-image files, decompression bombs, empty or huge captions, bad QA, duplicate keys).
Paths are checked before any file is opened, so an entry can never make the importer read outside SRC.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from kelix.data.config import DataConfig
from kelix.data.format import (FORMAT_VERSION, MANIFEST, QUARANTINE, SPLITS, DatasetError, resolve_inside,
                               safe_relpath, split_counts, write_dataset_json, write_jsonl_atomic)
from kelix.data.images import to_rgb

CAPTIONS = "captions.jsonl"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class _Bad(Exception):
    """One entry that cannot be imported; its message is the quarantine reason."""


@dataclass
class ImportReport:
    out: Path
    imported: int = 0
    quarantined: list[dict] = field(default_factory=list)  # {"line", "reason", "entry" or "raw"}
    converted: dict[str, str] = field(default_factory=dict)  # key -> source mode, for non-RGB inputs
    # Image files under SRC that no line of captions.jsonl names: not imported, and not an error either.
    unreferenced: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"imported {self.imported} records into {self.out}, quarantined {len(self.quarantined)}"]
        if self.converted:
            modes = sorted(set(self.converted.values()))
            lines.append(f"converted {len(self.converted)} images to RGB from {', '.join(modes)}")
        for q in self.quarantined[:20]:
            lines.append(f"  line {q['line']}: {q['reason']}")
        if len(self.quarantined) > 20:
            lines.append(f"  ... {len(self.quarantined) - 20} more in {self.out / QUARANTINE}")
        if self.unreferenced:
            shown = ", ".join(self.unreferenced[:5]) + (", ..." if len(self.unreferenced) > 5 else "")
            lines.append(f"{len(self.unreferenced)} images in the source are named by no line of {CAPTIONS} and "
                         f"were not imported: {shown}")
        return "\n".join(lines)


def _split_for(path: str, cfg: DataConfig) -> str:
    """Deterministic split from the path's hash, in the configured train/val/test proportions."""
    total = cfg.num_train + cfg.num_val + cfg.num_test
    shares = (cfg.num_train / total, cfg.num_val / total) if total else (0.9, 0.05)
    u = int(hashlib.sha256(path.encode()).hexdigest()[:12], 16) / float(1 << 48)
    return "train" if u < shares[0] else "val" if u < shares[0] + shares[1] else "test"


def _key_for(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.rsplit(".", 1)[0]).strip("-.") or "image"
    return f"{stem[:100]}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def _load_image(path: Path, max_pixels: int) -> tuple[Image.Image, str]:
    if not path.exists():
        raise _Bad("image file not found")
    if not path.is_file():
        raise _Bad("image path is not a regular file")
    if path.stat().st_size == 0:
        raise _Bad("image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise _Bad(f"image is {w}x{h} = {w * h} pixels, over the {max_pixels} pixel limit "
                               f"(decompression bomb guard)")
                im.load()
                mode = im.mode
                im = ImageOps.exif_transpose(im)
                return to_rgb(im), mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Bad(f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise _Bad("not an image file (no known image format in its bytes)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise _Bad(f"image is truncated or corrupt: {exc}") from exc


def _check_text(entry: dict, cfg: DataConfig) -> tuple[str, list[dict]]:
    caption = entry.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise _Bad("caption is missing or empty")
    caption = caption.strip()
    if len(caption) > cfg.max_caption_chars:
        raise _Bad(f"caption has {len(caption)} characters, over the {cfg.max_caption_chars} limit")
    if len(caption) < cfg.min_caption_chars:
        raise _Bad(f"caption has {len(caption)} characters, under the {cfg.min_caption_chars} minimum")
    qa = entry.get("qa") or []
    if not isinstance(qa, list):
        raise _Bad("qa must be a list of {\"q\", \"a\"} objects")
    out = []
    for i, pair in enumerate(qa):
        if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) and pair[k].strip() for k in ("q", "a")):
            raise _Bad(f"qa[{i}] must have non-empty string 'q' and 'a'")
        out.append({"q": pair["q"].strip(), "a": pair["a"].strip(), "type": str(pair.get("type") or "open")})
    return caption, out


def import_folder(src: str | Path, out: str | Path, image_size: int | None = None, cfg: DataConfig | None = None,
                  *, overwrite: bool = False) -> ImportReport:
    """Convert SRC (images + captions.jsonl) into a dataset folder at `out`.

    `image_size`: when given, each image is resized (shorter side) and centre-cropped to a square of that
    side; otherwise images keep their size. Raises DatasetError for problems with SRC as a whole.
    """
    cfg = cfg or DataConfig()
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DatasetError(f"source {src} is not a folder")
    captions = src / CAPTIONS
    if not captions.is_file():
        raise DatasetError(f"source {src} has no {CAPTIONS} (one JSON object per line: image, caption, qa)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DatasetError(f"{out} exists and is not empty; pass overwrite=True (--force) to replace it")
    tmp = out.with_name(f".{out.name}.importing")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    report = ImportReport(out=out)
    records: list[dict] = []
    seen: set[str] = set()
    named: set[str] = set()  # every image path a line names, imported or not
    sizes: set[tuple[int, int]] = set()
    with open(captions, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            entry: dict = {}
            try:
                try:
                    # utf-8-sig: editors that save "UTF-8 with BOM" put one before the first line.
                    entry = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                except UnicodeDecodeError as exc:
                    raise _Bad(f"line {lineno} is not UTF-8 text") from exc
                except json.JSONDecodeError as exc:
                    raise _Bad(f"line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})") from exc
                except (ValueError, RecursionError) as exc:  # a 5,000-digit number, "[" nested 100,000 deep
                    raise _Bad(f"line {lineno} is not JSON this importer can read ({type(exc).__name__})") from exc
                if not isinstance(entry, dict):
                    raise _Bad(f"line {lineno} is a JSON {type(entry).__name__}, not an object")
                if isinstance(entry.get("image"), str):
                    named.add(os.path.normpath(entry["image"]))
                records.append(_import_entry(src, tmp, entry, lineno, cfg, image_size, seen, sizes, report))
            except (_Bad, DatasetError) as exc:
                # No top-level "key": readers skip quarantined keys, and a rejected entry's key (say, a
                # duplicate) may belong to a record that was imported.
                q = {"line": lineno, "reason": str(exc), "quarantined_from": CAPTIONS}
                if isinstance(entry, dict) and entry:
                    q["entry"] = entry
                else:
                    q["raw"] = raw.decode("utf-8", errors="replace").rstrip("\n")
                report.quarantined.append(q)
    write_jsonl_atomic(tmp / MANIFEST, records)
    write_jsonl_atomic(tmp / QUARANTINE, report.quarantined)
    report.imported = len(records)
    report.unreferenced = _unreferenced_images(src, named, skip=(out, tmp))
    counts = split_counts(records)
    write_dataset_json(tmp, {
        "name": out.name, "format_version": FORMAT_VERSION,
        "image_size": image_size or _common_side(sizes),
        "counts": {s: counts.get(s, 0) for s in SPLITS},
        "generator": {"name": "kelix.data.importer", "source": src.name, "image_size": image_size,
                      "quarantined": len(report.quarantined), "unreferenced": len(report.unreferenced)},
    })
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return report


def _unreferenced_images(src: Path, named: set[str], skip: tuple[Path, ...] = ()) -> list[str]:
    """Image files under `src` (by extension) that no captions line names, sorted; folders in `skip` (the
    import's own output and staging folder, when the output lies inside the source) are not looked at."""
    skip = tuple(p.resolve() for p in skip)
    found = (p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    rels = (p.relative_to(src).as_posix() for p in found if not any(p.resolve().is_relative_to(d) for d in skip))
    return sorted(rel for rel in rels if os.path.normpath(rel) not in named)


def _common_side(sizes: set[tuple[int, int]]) -> int | None:
    """The side length when every image is the same square, else None (mixed sizes)."""
    if len(sizes) == 1:
        w, h = next(iter(sizes))
        return w if w == h else None
    return None


def _import_entry(src: Path, tmp: Path, entry: dict, lineno: int, cfg: DataConfig, image_size: int | None,
                  seen: set[str], sizes: set, report: ImportReport) -> dict:
    rel = safe_relpath(entry.get("image"), "image path")
    path = resolve_inside(src, rel, "image path")
    key = entry.get("key")
    if key is None:
        key = _key_for(rel)
    elif not isinstance(key, str) or not _KEY.fullmatch(key) or ".." in key:
        raise _Bad(f"key {key!r} must be 1-128 characters of letters, digits, '.', '_' or '-' (no '..')")
    if key in seen:
        raise _Bad(f"duplicate key {key!r} (an earlier line already uses it)")
    split = entry.get("split")
    if split is None:
        split = _split_for(rel, cfg)
    elif split not in SPLITS:
        raise _Bad(f"split {split!r} must be one of {', '.join(SPLITS)}")
    caption, qa = _check_text(entry, cfg)
    im, mode = _load_image(path, cfg.max_image_pixels)
    if image_size:
        im = ImageOps.fit(im, (image_size, image_size), Image.BICUBIC)
    seen.add(key)
    sizes.add(im.size)
    out_rel = f"images/{split}/{key}.png"
    (tmp / out_rel).parent.mkdir(parents=True, exist_ok=True)
    im.save(tmp / out_rel, format="PNG", compress_level=6)
    if mode != "RGB":
        report.converted[key] = mode
    return {"key": key, "image": out_rel, "split": split, "caption": caption, "qa": qa, "prompt": caption,
            "objects": [], "holdout": False, "source": {"image": rel, "mode": mode, "line": lineno}}
