"""The artifact store: where stage outputs live, addressed by `<root>/<stage>/<key>/`.

The root is a URI: a local folder, or `s3://bucket/prefix` (any fsspec URL) for clusters. Stages always
read and write local folders; for a remote root the store keeps a local mirror under the cache folder,
pulls a stage's inputs before it runs and pushes its outputs after, the status marker last, so a reader
never sees SUCCESS beside half-uploaded files.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import fsspec

STATUS_FILE = "_STATUS.json"
SUCCESS, FAILED, RUNNING = "SUCCESS", "FAILED", "RUNNING"


class ArtifactStore:
    def __init__(self, uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.uri = str(uri).rstrip("/")
        self.remote = "://" in self.uri and not self.uri.startswith("file://")
        if self.remote:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri)
            cache = cache_dir or os.environ.get("KELIX_CACHE", Path.home() / ".cache" / "kelix" / "artifacts")
            self.local_root = Path(cache) / self.uri.replace("://", "/")
        else:
            self.fs, self.root = None, self.uri.removeprefix("file://")
            self.local_root = Path(self.root).resolve()

    def local_dir(self, stage: str, key: str) -> Path:
        return self.local_root / stage / key

    def _remote_path(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def status(self, stage: str, key: str) -> dict[str, Any] | None:
        if self.remote:
            path = f"{self._remote_path(stage, key)}/{STATUS_FILE}"
            if not self.fs.exists(path):
                return None
            return json.loads(self.fs.cat_file(path))
        path = self.local_dir(stage, key) / STATUS_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def is_done(self, stage: str, key: str) -> bool:
        status = self.status(stage, key)
        return bool(status and status.get("status") == SUCCESS)

    def mark(self, stage: str, key: str, status: str, **info: Any) -> None:
        record = {"status": status, "stage": stage, "key": key, "time": time.time(), "host": socket.gethostname(), **info}
        local = self.local_dir(stage, key)
        local.mkdir(parents=True, exist_ok=True)
        tmp = local / f".{STATUS_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, local / STATUS_FILE)
        if self.remote:
            self.fs.pipe_file(f"{self._remote_path(stage, key)}/{STATUS_FILE}", json.dumps(record, indent=1).encode())

    def pull(self, stage: str, key: str) -> Path:
        """Make a stage's outputs available locally (a no-op for a local store)."""
        local = self.local_dir(stage, key)
        if self.remote and not (local / STATUS_FILE).exists():
            local.mkdir(parents=True, exist_ok=True)
            self.fs.get(self._remote_path(stage, key) + "/", str(local) + "/", recursive=True)
        return local

    def push(self, stage: str, key: str) -> None:
        """Upload a finished stage's outputs (status marker excluded: `mark` writes it afterwards)."""
        if not self.remote:
            return
        local = self.local_dir(stage, key)
        for path in sorted(local.rglob("*")):
            if path.is_file() and path.name != STATUS_FILE and "checkpoints" not in path.relative_to(local).parts:
                self.fs.put_file(str(path), f"{self._remote_path(stage, key)}/{path.relative_to(local).as_posix()}")
