"""Atomic, verified training checkpoints.

A checkpoint is a folder `step_NNNNNNN/` holding `model.safetensors` (trainable parameters and buffers),
`optim.pt` (optimiser, scheduler and RNG state: plain tensors, loaded with `weights_only=True`) and
`meta.json`, written last with the sha256 of both files. It is written under a temporary name and renamed,
so a crash mid-write leaves no folder that looks finished; a finished folder whose files no longer match
their checksums is corrupt and reported as such.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kelix.files import disk_full, file_sha256


PREFIX = "step_"
TMP_PREFIX = ".tmp-"  # a checkpoint being written (renamed to step_N when whole)
NEARLY_FULL_BYTES = 64 << 20  # free space below which a failed write is taken for a full disk


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: missing files, wrong checksums, unreadable tensors."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    meta: dict[str, Any]



def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_dir: Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
    extra: dict[str, Any] | None = None, keep: int = 2,
) -> Path:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:07d}"
    tmp = ckpt_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    _sweep_abandoned(ckpt_dir, keep=tmp)
    tmp.mkdir()
    try:
        _write(tmp, step, model_state, train_state, extra)
    except BaseException as exc:
        # A half-written copy of the weights and optimiser state is as large as a good one: never leave it.
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.save reports a full disk as "file write failed" with no OS error: look at the disk as well. An
        # interrupt (Ctrl-C, SystemExit) stays what it is, however full the disk.
        if not isinstance(exc, Exception):
            raise
        code = disk_full(exc) or (errno.ENOSPC if shutil.disk_usage(ckpt_dir).free < NEARLY_FULL_BYTES else 0)
        if not code:
            raise
        what, fix = (("disk quota exceeded", "free space there or raise the quota, and rerun") if code == errno.EDQUOT
                     else ("no space left", "free space there and rerun"))
        raise OSError(code, f"{what} in {ckpt_dir} for the checkpoint of step {step} ({exc}); {fix}: training "
                      "resumes from the last checkpoint") from exc
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    prune_checkpoints(ckpt_dir, step, keep)
    return final


def _write(tmp: Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
           extra: dict[str, Any] | None) -> None:
    # safetensors refuses tensors that share memory (tied weights): store independent copies.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model_state.items()}
    save_file(tensors, tmp / "model.safetensors")
    torch.save(train_state, tmp / "optim.pt")
    meta = {
        "step": step,
        "files": {name: file_sha256(tmp / name) for name in ("model.safetensors", "optim.pt")},
        **(extra or {}),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    for name in ("model.safetensors", "optim.pt", "meta.json"):
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())


def _sweep_abandoned(ckpt_dir: Path, keep: Path) -> None:
    """Remove temporary folders that killed processes left (`.tmp-step_N-<pid>`): each is a full copy of the
    weights and optimiser state, and no later run reuses its name. The sharded writer's `-dcp` folders are its
    own to manage (all ranks write into one at once)."""
    for path in ckpt_dir.glob(f"{TMP_PREFIX}{PREFIX}*"):
        if path != keep and not path.name.endswith("-dcp"):
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(ckpt_dir: Path, step: int, keep: int) -> None:
    """After saving `step`, delete all but the `keep - 1` newest checkpoints *older* than it.

    Folders of later steps are left alone: they exist only when a run resumed below them because they failed
    to verify, and counting them would delete the checkpoint just written and the good one before it."""
    older = [p for p in list_checkpoints(ckpt_dir) if checkpoint_step(p) < step]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders of interrupted writes are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=checkpoint_step)


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete (no meta.json): it was not finished writing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path} has an unreadable meta.json ({exc})") from exc
    for name, expected in meta.get("files", {}).items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"checkpoint {path} lacks {name}")
        actual = file_sha256(file)
        if actual != expected:
            raise CheckpointError(
                f"checkpoint {path}: {name} is corrupt (sha256 {actual[:12]} != recorded {expected[:12]})")
    if meta.get("format") == "dcp":
        # Sharded (torchrun) checkpoint: verified here, loaded by kelix.train.distributed.load_dcp.
        return Checkpoint(path=path, step=int(meta["step"]), model_state={}, train_state={}, meta=meta)
    try:
        model_state = load_file(path / "model.safetensors")
        train_state = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    return Checkpoint(path=path, step=int(meta["step"]), model_state=model_state, train_state=train_state, meta=meta)


def latest_checkpoint(ckpt_dir: Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped (left for a later save at their step to replace)."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            # Nothing to do by hand: the run resumes from an earlier checkpoint (or the start), and a later save at
            # this step replaces the bad one.
            warn(f"warning: skipping {exc}; resuming from the checkpoint before it")
    return None
