"""The artifact store: where stage outputs live, addressed by `<root>/<stage>/<key>/`.

The root is a URI: a local folder, or `s3://bucket/prefix` (any fsspec URL) for clusters. Stages always
read and write local folders; for a remote root the store keeps a local mirror under the cache folder,
pulls a stage's inputs before it runs and pushes its outputs after, the status marker last, so a reader
never sees SUCCESS beside half-uploaded files.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import fsspec

from kelix.files import is_temporary, replace_atomically

STATUS_FILE = "_STATUS.json"
# Held (flock) by the process running the stage into this folder; like the marker, bookkeeping, never an output.
LOCK_FILE = ".kelix.lock"
BOOKKEEPING = (STATUS_FILE, LOCK_FILE)
SUCCESS, FAILED, RUNNING = "SUCCESS", "FAILED", "RUNNING"


ENV_ARTIFACTS = "KELIX_ARTIFACTS"


def output_files(folder: Path) -> dict[str, int]:
    """A finished stage's outputs, as `push` uploads them (no status marker, lock or checkpoints): relative path ->
    size in bytes. The SUCCESS marker records them, so a file truncated or deleted later is caught (`damaged`)."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in BOOKKEEPING and "checkpoints" not in p.relative_to(folder).parts
            and not is_temporary(p)}


def store_uri(given: str | os.PathLike | None, configured: str) -> str:
    """The artifact store to use: the one given, else $KELIX_ARTIFACTS, else the config's runtime.artifacts."""
    return str(given or os.environ.get(ENV_ARTIFACTS) or configured)


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

    def damaged(self, stage: str, key: str) -> list[str]:
        """What of a finished stage's local outputs differs from the sizes its SUCCESS marker recorded (a file
        truncated or deleted since it finished); empty when they match, or when the marker records none. A remote
        store's outputs are not re-read: `pull` renames each downloaded file into place whole."""
        if self.remote:
            return []
        recorded = (self.status(stage, key) or {}).get("files") or {}
        local = self.local_dir(stage, key)
        found = []
        for rel, size in recorded.items():
            path = local / rel
            have = path.stat().st_size if path.is_file() else None
            if have != size:
                found.append(f"{rel} is missing" if have is None else f"{rel} has {have} bytes, {size} recorded")
        return found

    def is_done(self, stage: str, key: str) -> bool:
        status = self.status(stage, key)
        return bool(status and status.get("status") == SUCCESS)

    def stale_inputs(self, stage: str, key: str) -> list[str]:
        """The inputs this stage's finished outputs no longer match: rerun since it read them, or stale
        themselves (an input of theirs was rerun), so a change anywhere upstream reaches every stage below it.

        Keys hash config and data, not code, so a forced rerun of an upstream stage keeps its key; the SUCCESS
        marker therefore also records which run of each input it read (`input_runs`: the input marker's time).
        A marker written before that was recorded counts an input finished after it as rerun."""
        return self._stale(stage, key, {}, {})

    def _stale(self, stage: str, key: str, statuses: dict, verdicts: dict) -> list[str]:
        # The stage graph has diamonds (tokenizer-3 feeds nearly everything): each marker is read, and each
        # stage judged, once per call, which matters when a read is a request to S3.
        def status(s: str, k: str) -> dict:
            if (s, k) not in statuses:
                statuses[s, k] = self.status(s, k) or {}
            return statuses[s, k]

        if (stage, key) in verdicts:
            return verdicts[stage, key]
        mine = status(stage, key)
        runs = mine.get("input_runs")
        if runs is None:
            runs = {dep: {"key": k, "time": None} for dep, k in (mine.get("inputs") or {}).items()}
        stale = []
        for dep, seen in runs.items():
            now = status(dep, seen["key"])
            if now.get("status") != SUCCESS:
                changed = True
            elif seen["time"] is None:
                changed = float(now.get("time") or 0) > float(mine.get("time") or 0)
            else:
                changed = now.get("time") != seen["time"]
            if changed or self._stale(dep, seen["key"], statuses, verdicts):
                stale.append(dep)
        verdicts[stage, key] = stale
        return stale

    def is_current(self, stage: str, key: str) -> bool:
        """Finished, and from the runs of its inputs that are in the store now."""
        return self.is_done(stage, key) and not self.stale_inputs(stage, key)

    def input_run(self, stage: str, key: str) -> dict[str, Any]:
        """What a downstream marker records about its input `stage` (see `stale_inputs`)."""
        return {"key": key, "time": (self.status(stage, key) or {}).get("time")}

    def mark(self, stage: str, key: str, status: str, **info: Any) -> None:
        record = {"status": status, "stage": stage, "key": key, "time": time.time(), "host": socket.gethostname(), **info}
        local = self.local_dir(stage, key)
        local.mkdir(parents=True, exist_ok=True)
        tmp = local / f".{STATUS_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, local / STATUS_FILE)
        if self.remote:
            self.fs.pipe_file(f"{self._remote_path(stage, key)}/{STATUS_FILE}", json.dumps(record, indent=1).encode())

    def clear(self, stage: str, key: str) -> None:
        """Delete a stage's outputs, checkpoints included, leaving only its status marker (for a forced rerun).

        The caller marks the stage RUNNING first, so no reader takes the half-deleted folder as finished."""
        local = self.local_dir(stage, key)
        # Checkpoints first: a clear killed half-way must not leave the old run's last checkpoint for the next
        # try (which finds the stage unfinished) to resume from.
        for path in sorted(local.iterdir(), key=lambda p: (p.name != "checkpoints", p.name)) if local.exists() else []:
            if path.name in BOOKKEEPING:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        if self.remote:
            remote = self._remote_path(stage, key)
            for path in self.fs.find(remote):
                if path[len(remote) + 1:] != STATUS_FILE:
                    self.fs.rm_file(path)

    def pull(self, stage: str, key: str) -> Path:
        """Make a stage's outputs available locally (a no-op for a local store).

        The mirror counts as complete only once it holds a SUCCESS marker, which is written after every file.
        Each file arrives under a per-process name and is renamed into place, so a pull killed half-way is
        redone by the next one, and processes pulling the same folder at once (torchrun ranks sharing a
        cache) never read a file another one is still writing."""
        local = self.local_dir(stage, key)
        if not self.remote:
            return local
        marker = local / STATUS_FILE
        remote = self._remote_path(stage, key)
        status = self.fs.cat_file(f"{remote}/{STATUS_FILE}") if self.fs.exists(f"{remote}/{STATUS_FILE}") else None
        # Current only if it holds the store's own SUCCESS marker: a forced rerun re-marks the store, and its new
        # outputs must replace the mirror's.
        if status is not None and marker.exists() and marker.read_bytes() == status \
                and json.loads(status).get("status") == SUCCESS:
            return local
        files = sorted(self.fs.find(remote))
        if not files:
            raise FileNotFoundError(f"{self.uri} has no outputs for {stage}/{key}: run the stage first")
        wanted = set()
        for path in files:
            rel = path[len(remote) + 1:]  # find() answers in the same protocol-less form as the root
            if rel == STATUS_FILE:
                continue
            dest = local / rel
            wanted.add(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(dest, lambda tmp, src=path: self.fs.get_file(src, str(tmp)))
        # Files of an earlier run that the store no longer holds (a forced rerun wrote fewer) would otherwise sit
        # beside the new outputs. Another process's download in flight (a temporary name) is left alone.
        for path in [p for p in local.rglob("*") if p.is_file()]:
            if path not in wanted and path.name not in BOOKKEEPING and not is_temporary(path):
                path.unlink(missing_ok=True)
        if status is not None:
            replace_atomically(marker, lambda tmp: tmp.write_bytes(status))
        return local

    def push(self, stage: str, key: str) -> None:
        """Upload a finished stage's outputs (status marker excluded: `mark` writes it afterwards)."""
        if not self.remote:
            return
        local = self.local_dir(stage, key)
        for rel in output_files(local):
            self.fs.put_file(str(local / rel), f"{self._remote_path(stage, key)}/{rel}")

    # ---- additions for the orchestrator and the pods it starts (flows/, kelix/runners/) ----

    def read_text(self, stage: str, key: str, relpath: str) -> str | None:
        """One small output file's text, read straight from the store (no pull); None if absent."""
        if self.remote:
            path = f"{self._remote_path(stage, key)}/{relpath}"
            return self.fs.cat_file(path).decode() if self.fs.exists(path) else None
        path = self.local_dir(stage, key) / relpath
        return path.read_text() if path.exists() else None

    def exists(self, stage: str, key: str, relpath: str) -> bool:
        """Whether one output file is in the store (no pull)."""
        if self.remote:
            return bool(self.fs.exists(f"{self._remote_path(stage, key)}/{relpath}"))
        return (self.local_dir(stage, key) / relpath).exists()

    def publish(self, stage: str, key: str, src: str | os.PathLike, **info: Any) -> None:
        """Upload a finished local folder as `<stage>/<key>` and mark it SUCCESS (e.g. a dataset for pods).

        Skipped when the store already holds it; the marker goes last, as with `push`.
        """
        if self.is_done(stage, key):
            return
        src = Path(src)
        if self.remote:
            for path in sorted(src.rglob("*")):
                if path.is_file() and path.name not in BOOKKEEPING:
                    self.fs.put_file(str(path), f"{self._remote_path(stage, key)}/{path.relative_to(src).as_posix()}")
        elif src.resolve() != self.local_dir(stage, key):
            shutil.copytree(src, self.local_dir(stage, key), dirs_exist_ok=True)
        self.mark(stage, key, SUCCESS, **info)

    def url(self, stage: str, key: str, relpath: str, expires: int = 7 * 24 * 3600) -> str:
        """A link a person can open: a presigned https URL for S3 when the backend can sign, else the path."""
        if self.remote:
            path = f"{self._remote_path(stage, key)}/{relpath}"
            try:
                return self.fs.sign(path, expiration=expires)
            except (NotImplementedError, AttributeError, TypeError):
                return f"{self.uri}/{stage}/{key}/{relpath}"
        return (self.local_dir(stage, key) / relpath).as_uri()


def main(argv: list[str] | None = None) -> int:
    """`python -m kelix.artifacts pull URI STAGE KEY [--cache DIR]`: fetch outputs, print the local folder.

    Pods use it to fetch the dataset the orchestrator published before the stage starts.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kelix.artifacts")
    sub = parser.add_subparsers(dest="command", required=True)
    pull = sub.add_parser("pull", help="fetch <STAGE>/<KEY> from the store and print its local folder")
    pull.add_argument("uri")
    pull.add_argument("stage")
    pull.add_argument("key")
    pull.add_argument("--cache", default=None, help="local mirror folder (default: KELIX_CACHE)")
    args = parser.parse_args(argv)
    store = ArtifactStore(args.uri, cache_dir=args.cache)
    if not store.is_done(args.stage, args.key):
        print(f"error: {args.stage}/{args.key} is not finished in {store.uri}", file=sys.stderr)
        return 1
    print(store.pull(args.stage, args.key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
