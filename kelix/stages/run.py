"""`run_stage`: run one stage unless its outputs for this key exist, resume it if a previous try crashed, and
mark the outcome in the store; the same call in a shell, a test, a flow's process or a pod."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kelix.artifacts import FAILED, LOCK_FILE, RUNNING, SUCCESS, ArtifactStore, output_files, store_uri
from kelix.config import KelixConfig
from kelix.files import LockHeld, exclusive_lock
from kelix.rerun import BUSY_PHRASE, Force, force_cutoff, up_to_date
from kelix.stages.catalogue import Stage, StageContext, get_stage
from kelix.stages.keys import data_fingerprint, stage_keys
from kelix.train.metrics import MetricLogger


@dataclass
class StageResult:
    name: str
    key: str
    out_dir: Path
    metrics: dict[str, float]
    skipped: bool
    seconds: float


class StageInputMissing(RuntimeError):
    """An input stage has not finished: run the stages in order (or the pipeline)."""


class StageBusy(RuntimeError):
    """Another process is running the same stage into the same folder (two would overwrite each other)."""


# Errors that say the filesystem cannot hold a lock here at all (as opposed to "someone holds it").
_NO_LOCKING = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EROFS, errno.EACCES, errno.EPERM)


def resolve_device(spec: str | torch.device) -> torch.device:
    """`auto` (cuda when torch sees one, else cpu) or a device torch has here; anything else is a ValueError
    that says what to pass, not an assertion deep inside the first tensor move."""
    if str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {str(spec)!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {str(spec)!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s) "
                         "here: use cpu (or auto)")
    return device


def run_stage(
    name: str,
    cfg: KelixConfig,
    data_dir: str | Path,
    artifacts: str | None = None,
    force: Force = False,
    progress: bool = True,
) -> StageResult:
    """Run one stage unless its outputs for this key exist; resume it if a previous try crashed.

    `force`: start a finished stage over (True), or only if it finished before that Unix time (a float)."""
    from kelix.train import distributed

    stage = get_stage(name)
    main = distributed.is_main_process()
    data_dir = Path(data_dir)
    store = ArtifactStore(store_uri(artifacts, cfg.runtime.artifacts))
    keys = stage_keys(cfg, data_fingerprint(data_dir), [name])
    key = keys[name]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        busy, plan, failure = "", None, None
        if main:
            try:
                busy = _lock(stack, store, name, key)
                plan = None if busy else _plan(stage, store, keys, force_cutoff(force))
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
                failure = exc
        # Only the main process, holding the lock, reads the markers; the other torchrun ranks follow its plan.
        # Ranks that each read them could disagree (one sees the SUCCESS a finishing run just wrote, another the
        # RUNNING before it) and one would train while another returned, waiting at a collective for ever. A
        # failure is sent too, so no rank waits for a plan that never comes.
        why = f"{type(failure).__name__}: {failure}" if failure is not None else ""
        busy, plan, failed = distributed.from_main((busy, plan, why))
        if failure is not None:
            raise failure
        if failed:
            raise RuntimeError(f"stage {name}: the main process could not plan the run ({failed})")
        if busy:
            raise StageBusy(busy)
        return _run_stage(stage, cfg, data_dir, store, keys, plan, progress, main, t0)


def _lock(stack: contextlib.ExitStack, store: ArtifactStore, name: str, key: str) -> str:
    """Take the stage folder's lock for the rest of `stack`; the refusal to give when another process holds it."""
    try:
        stack.enter_context(exclusive_lock(store.local_dir(name, key) / LOCK_FILE))
    except LockHeld as held:
        return (f"stage {name} [{key}] {BUSY_PHRASE} {store.local_dir(name, key)}: {held}. "
                "Wait for it to finish, or stop that process, then rerun")
    except OSError as exc:
        if exc.errno not in _NO_LOCKING:
            raise
        # A volume without flock (some NFS/Lustre mounts, FUSE) or a read-only store: run unguarded rather
        # than not at all; the guard only matters when two runs of one stage overlap.
        print(f"warning: cannot lock {store.local_dir(name, key)} ({exc.strerror}); running without the "
              "guard against a second run of this stage", file=sys.stderr)
    return ""


def apply_determinism(on: bool) -> None:
    """`runtime.deterministic`: torch's deterministic kernels, so one config trains the same weights twice on one
    machine. Without them two runs of tokenizer-1 differed in the 7th digit (CPU kernels whose sums depend on
    thread timing), and four LLM stages later by 0.05 of test VQA (docs/benchmarks.md, "Same config"). An op with
    no deterministic kernel warns instead of failing; cuBLAS needs a fixed workspace, set before CUDA starts."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)


@dataclass
class _Plan:
    """What the store says a stage needs: nothing (`done`), a start over (`restart`) or a run or resume."""
    done: bool = False
    restart: bool = False
    input_runs: dict[str, dict] = field(default_factory=dict)  # per input: the run it read (key, time)
    note: str = ""  # why it starts over
    missing: str = ""  # an input is not finished or not current: the stage cannot run


def _plan(stage: Stage, store: ArtifactStore, keys: dict[str, str], cutoff: float | None) -> _Plan:
    name, key = stage.name, keys[stage.name]
    if up_to_date(store, name, key, cutoff):
        return _Plan(done=True)
    # Finished here means finished but forced or stale (the runners skip by the same rule).
    status = store.status(name, key) or {}
    done = status.get("status") == SUCCESS
    stale = store.stale_inputs(name, key) if done else []
    input_runs = {}
    for dep in stage.inputs:
        if not store.is_done(dep, keys[dep]):
            return _Plan(missing=f"stage {name} needs {dep} (key {keys[dep]}) which has not finished in {store.uri}: "
                                 f"run `kelix stage run {dep}` first, or `kelix pipeline run`")
        damaged = store.damaged(dep, keys[dep])
        if damaged:
            return _Plan(missing=f"stage {name} needs {dep} (key {keys[dep]}), whose outputs in "
                                 f"{store.local_dir(dep, keys[dep])} were damaged after it finished "
                                 f"({'; '.join(damaged[:3])}): rerun it: `kelix stage run {dep}`, or `kelix pipeline run`")
        upstream = store.stale_inputs(dep, keys[dep])
        if upstream:
            return _Plan(missing=f"stage {name} needs {dep} (key {keys[dep]}), whose inputs {', '.join(upstream)} "
                                 f"were rerun after it finished: run `kelix stage run {dep}` first, or "
                                 "`kelix pipeline run`")
        input_runs[dep] = store.input_run(dep, keys[dep])
    # An unfinished try (crashed or killed) resumes from its checkpoints only if they were trained on the same
    # runs of its inputs; its RUNNING/FAILED marker says which.
    moved = not done and status.get("input_runs") not in (None, input_runs)
    damaged = store.damaged(name, key) if done else []
    note = (f"{name}: starting over, its inputs {', '.join(stale)} were rerun after it finished" if stale else
            f"{name}: starting over, its outputs were damaged after it finished ({'; '.join(damaged[:3])})"
            if damaged else f"{name}: starting over, its inputs were rerun since its unfinished try" if moved else "")
    # Forcing a finished stage, or one whose inputs were rerun, starts it over: its checkpoints would otherwise
    # resume it at its last step and redo nothing (keys hash config and data, not code, so a force usually
    # follows a code change). A forced try that crashed is not finished, so the next one resumes it instead of
    # starting over again.
    return _Plan(restart=done or moved, input_runs=input_runs, note=note)


def _run_stage(stage: Stage, cfg: KelixConfig, data_dir: Path, store: ArtifactStore, keys: dict[str, str],
               plan: _Plan, progress: bool, main: bool, t0: float) -> StageResult:
    """`run_stage` once the main process holds the stage's lock and has planned the run for every rank."""
    from kelix.runners.base import is_transient
    from kelix.train import distributed

    name, key = stage.name, keys[stage.name]
    if plan.missing:
        raise StageInputMissing(plan.missing)
    if plan.done:
        out_dir = store.pull(name, key)
        return StageResult(name, key, out_dir, _read_metrics(out_dir), True, time.perf_counter() - t0)
    inputs = {dep: store.pull(dep, keys[dep]) for dep in stage.inputs}
    input_runs = plan.input_runs
    if main and plan.note:
        print(plan.note, file=sys.stderr)
    out_dir = store.local_dir(name, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        store.mark(name, key, RUNNING, inputs={d: keys[d] for d in stage.inputs}, input_runs=input_runs)
        if plan.restart:
            store.clear(name, key)
    distributed.barrier()  # no rank reads a checkpoint before the main process has cleared them
    ctx = StageContext(
        name=name, cfg=cfg, data_dir=data_dir, inputs=inputs, out_dir=out_dir,
        device=resolve_device(cfg.runtime.device), key=key,
        logger=MetricLogger(out_dir / "metrics.jsonl" if main else None), progress=progress and main, is_main=main,
    )
    if cfg.runtime.num_threads > 0:
        torch.set_num_threads(cfg.runtime.num_threads)
    apply_determinism(cfg.runtime.deterministic)
    try:
        metrics = stage.function()(ctx) or {}
    except BaseException as exc:
        if main:
            store.mark(name, key, FAILED, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:],
                       input_runs=input_runs, transient=is_transient(exc))
        raise
    if main:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        store.push(name, key)
        store.mark(name, key, SUCCESS, inputs={d: keys[d] for d in stage.inputs}, input_runs=input_runs,
                   metrics=metrics, files=output_files(out_dir))
    return StageResult(name, key, out_dir, metrics, False, time.perf_counter() - t0)


def _read_metrics(out_dir: Path) -> dict[str, float]:
    path = out_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}
