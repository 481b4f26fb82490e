"""File helpers: content hashes (checkpoints, bundles and caches verify what they read against them) and
atomic replacement (readers, and torchrun ranks writing the same cache, never see a half-written file)."""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Callable

# Part of every temporary name `replace_atomically` writes under.
TEMP_MARK = ".tmp-"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints are larger than we want in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_temporary(path: str | Path) -> bool:
    """Whether `path` is a `replace_atomically` write still in flight (or left by a killed process)."""
    return TEMP_MARK in Path(path).name


def replace_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` under a temporary name of its own beside `path`, then rename it onto `path`.

    The name is unique per call, not only per process: the ranks of a multi-node Job share one cache volume, and
    processes in different pods often have the same PID. A write that fails removes its temporary file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
