"""The on-disk dataset format (docs/data.md): `dataset.json`, `manifest.jsonl`, `quarantine.jsonl`, images.

Every reader and writer goes through these helpers so the format has one definition: manifest lines are
read with their line numbers (a broken line is reported where it is), rewrites are atomic (a crash leaves the
old manifest, never half a new one), and record paths are checked so nothing resolves outside the dataset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
MANIFEST = "manifest.jsonl"
QUARANTINE = "quarantine.jsonl"
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset folder or input that does not fit the format; the message says where and why."""


def safe_relpath(rel: Any, what: str = "path") -> str:
    """Return `rel` as a normalised relative POSIX path, refusing anything that could leave its folder."""
    if not isinstance(rel, str) or not rel.strip():
        raise DatasetError(f"{what} must be a non-empty string, got {rel!r}")
    if "\x00" in rel or "\\" in rel:
        raise DatasetError(f"{what} {rel!r} contains a NUL byte or a backslash")
    path = PurePosixPath(rel)
    if path.is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        raise DatasetError(f"{what} {rel!r} is absolute; only paths relative to the dataset are allowed")
    if any(part == ".." for part in path.parts):
        raise DatasetError(f"{what} {rel!r} contains '..'; paths may not leave the dataset folder")
    return str(path)


def resolve_inside(root: str | Path, rel: str, what: str = "path") -> Path:
    """Join a checked relative path to `root` and make sure symlinks do not lead outside it either."""
    root = Path(root).resolve()
    full = (root / safe_relpath(rel, what)).resolve()
    if root != full and root not in full.parents:
        raise DatasetError(f"{what} {rel!r} resolves outside {root}")
    return full


def iter_manifest_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for a JSONL file; blank lines are skipped, a broken line is an error."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(rec, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append and fsync: quarantine entries must be durable before the manifest drops their records."""
    with open(path, "a", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_dataset_json(root: str | Path) -> dict:
    path = Path(root) / DATASET_JSON
    if not path.exists():
        raise DatasetError(f"{root} is not a dataset folder: {DATASET_JSON} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc.msg})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return meta


def write_dataset_json(root: str | Path, meta: dict) -> None:
    path = Path(root) / DATASET_JSON
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def quarantined_keys(root: str | Path) -> set[str]:
    """Keys of records moved out of the manifest (entries that never had a record carry no key)."""
    path = Path(root) / QUARANTINE
    if not path.exists():
        return set()
    return {rec["key"] for _, rec in iter_manifest_lines(path) if isinstance(rec.get("key"), str)}


def split_counts(records: Iterable[dict]) -> dict[str, int]:
    counts = {s: 0 for s in SPLITS}
    for rec in records:
        counts[rec.get("split")] = counts.get(rec.get("split"), 0) + 1
    return counts
