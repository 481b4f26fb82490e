"""File helpers: content hashes (checkpoints, bundles and caches verify what they read against them) and
atomic replacement (readers, and torchrun ranks writing the same cache, never see a half-written file)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

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


class LockHeld(RuntimeError):
    """Another process holds the lock; the message names it (pid, host, since when) as it recorded itself."""


@contextlib.contextmanager
def exclusive_lock(path: str | Path, timeout: float = 0.0) -> Iterator[Path]:
    """Hold an exclusive `flock` on `path` (created if missing), waiting up to `timeout` seconds for it.

    The holder writes its pid, host and start time into the file, so whoever waits in vain can be told who
    holds it. The kernel drops the lock when the holder dies, however it dies: a killed process never leaves
    a stale lock behind, only a stale description, which the next holder overwrites."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(path, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    raise LockHeld(fh.read().strip() or "an unknown process") from None
                time.sleep(0.05)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
            fh.flush()
            yield path
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


_DISK_FULL_WORDS = {errno.ENOSPC: ("No space left on device", "os error 28"),
                    errno.EDQUOT: ("Disk quota exceeded", "os error 122")}


def disk_full(exc: BaseException | None) -> int:
    """errno.ENOSPC or errno.EDQUOT when `exc` (or an error it came from) is a full disk or quota, else 0. torch
    and safetensors report it as a RuntimeError or SafetensorError whose message carries the OS error, not as
    an OSError."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_WORDS:
            return exc.errno
        for code, words in _DISK_FULL_WORDS.items():
            if any(word in str(exc) for word in words):
                return code
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return 0
