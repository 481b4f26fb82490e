"""The stage catalogue and the one entry point that runs a stage anywhere.

A stage is data (Marin-executor style): a name, the stages whose outputs it reads, the config section and
train schedule it depends on, and the import path of its function `run(ctx: StageContext) -> metrics`.
Its key hashes its name, that config view, the dataset's content fingerprint and its inputs' keys; outputs
go to `<artifacts>/<stage>/<key>/` with a status marker, so an unchanged stage is skipped, a changed one
reruns with everything downstream, and a crashed one resumes from its checkpoints in the same folder.

    python -m kelix.stages run tokenizer-1 --preset tiny --data data/shapes --artifacts artifacts
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import importlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from kelix.artifacts import FAILED, LOCK_FILE, RUNNING, SUCCESS, ArtifactStore, store_uri
from kelix.config import KelixConfig, config_hash
from kelix.dit.config import AE_OVERRIDES
from kelix.files import LockHeld, exclusive_lock
from kelix.rerun import BUSY_PHRASE, EXIT_BUSY, Force, force_cutoff, up_to_date
from kelix.runtime_config import Resources
from kelix.train.metrics import MetricLogger


@dataclass(frozen=True)
class Stage:
    name: str
    section: str
    entry: str  # "module:function"
    inputs: tuple[str, ...] = ()
    # The TrainConfig field of the section this stage trains with; the others are left out of its key.
    train_field: str | None = None
    description: str = ""
    # Other fields of the section this stage never reads, left out of its key so changing them does not rerun it.
    ignores: tuple[str, ...] = ()

    def function(self) -> Callable[["StageContext"], dict[str, float]]:
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("tokenizer-1", "tokenizer", "kelix.tokenizer.stages:align", (), "train1",
          "codebook alignment on captions: adapter + SimVQ projections train; ViT and aux LLM frozen"),
    Stage("tokenizer-2", "tokenizer", "kelix.tokenizer.stages:pretrain", ("tokenizer-1",), "train2",
          "multi-task pre-training (captions + VQA), everything unfrozen, ViT at a lower rate"),
    Stage("tokenizer-3", "tokenizer", "kelix.tokenizer.stages:anneal", ("tokenizer-2",), "train3",
          "annealing on instruction-style data (VQA) with a decaying rate"),
    Stage("llm-1", "llm", "kelix.llm.stages:align", ("tokenizer-3",), "train1",
          "cross-modal alignment: Block Decoder, LM head, visual projection; Qwen3 frozen"),
    Stage("llm-2", "llm", "kelix.llm.stages:unify", ("llm-1", "tokenizer-3"), "train2",
          "unified embedding table, all parameters, understanding + generation"),
    Stage("llm-3", "llm", "kelix.llm.stages:anneal", ("llm-2", "tokenizer-3"), "train3",
          "annealing on the cleanest subset"),
    Stage("llm-4", "llm", "kelix.llm.stages:sft", ("llm-3", "tokenizer-3"), "train4",
          "SFT on instruction-style data"),
    Stage("aedit", "dit", "kelix.dit.stages:aedit", ("tokenizer-3",), "train_ae",
          "AE-DiT: reconstruct images from the tokenizer's quantized embeddings",
          (*AE_OVERRIDES.values(), "sft_fraction")),
    Stage("dit-1", "dit", "kelix.dit.stages:pretrain", ("tokenizer-3", "llm-4"), "train1",
          "DiT pre-training conditioned on the LLM's hidden states (teacher forcing)",
          (*AE_OVERRIDES, "sft_fraction")),
    Stage("dit-2", "dit", "kelix.dit.stages:sft", ("dit-1", "tokenizer-3", "llm-4"), "train2",
          "DiT SFT on the detector-curated subset", tuple(AE_OVERRIDES)),
    Stage("eval", "eval", "kelix.eval.stage:evaluate", ("tokenizer-3", "llm-4", "dit-2", "aedit"), None,
          "understanding, generation, reconstruction and tokenizer metrics"),
)}

ORDER = tuple(STAGES)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(ORDER)}")
    return STAGES[name]


def upstream(name: str) -> list[str]:
    """Every stage `name` depends on, in catalogue order."""
    seen: set[str] = set()

    def visit(n: str) -> None:
        for dep in STAGES[n].inputs:
            if dep not in seen:
                seen.add(dep)
                visit(dep)

    visit(name)
    return [n for n in ORDER if n in seen]


def downstream(name: str) -> list[str]:
    return [n for n in ORDER if name in upstream(n)]


def config_view(cfg: KelixConfig, stage: Stage) -> dict[str, Any]:
    """The part of the config a stage's outputs depend on: its section, minus other stages' schedules and the
    fields it ignores."""
    view = dataclasses.asdict(cfg.section(stage.section))
    for name in stage.ignores:
        view.pop(name)
    if stage.train_field:
        for f in dataclasses.fields(cfg.section(stage.section)):
            if f.name.startswith("train") and f.name != stage.train_field:
                view.pop(f.name)
    if stage.section == "eval":
        # The gate's thresholds decide promotion, not what evaluation computes.
        view.pop("thresholds", None)
        view.pop("regression_tolerance", None)
        view.pop("metric_tolerances", None)
    return view


@lru_cache(maxsize=8)
def _fingerprint_cached(root: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    base = Path(root)
    for name in ("dataset.json", "manifest.jsonl", "quarantine.jsonl"):
        if (base / name).exists():
            digest.update(name.encode() + (base / name).read_bytes())
    images = sorted(p for p in (base / "images").rglob("*") if p.is_file()) if (base / "images").exists() else []
    for path in images:
        digest.update(path.relative_to(base).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def data_fingerprint(data_dir: str | Path) -> str:
    """Content hash of a dataset folder (manifest, metadata and every image); cached per manifest state."""
    root = Path(data_dir).resolve()
    manifest = root / "manifest.jsonl"
    if not manifest.exists():
        raise FileNotFoundError(f"no dataset at {root} (manifest.jsonl missing): run `kelix data generate shapes --out {data_dir}`")
    stat = manifest.stat()
    return _fingerprint_cached(str(root), (stat.st_mtime_ns, stat.st_size))


def stage_keys(cfg: KelixConfig, data_version: str, names: list[str] | tuple[str, ...] = ORDER) -> dict[str, str]:
    keys: dict[str, str] = {}

    def key_of(name: str) -> str:
        if name not in keys:
            stage = STAGES[name]
            payload = {
                "stage": name,
                "config": config_view(cfg, stage),
                "data": data_version,
                "inputs": {dep: key_of(dep) for dep in stage.inputs},
            }
            keys[name] = config_hash(payload, length=16)
        return keys[name]

    for name in names:
        key_of(name)
    return keys


@dataclass
class StageContext:
    """Everything a stage function gets: config, data, its inputs' and its own folders."""

    name: str
    cfg: KelixConfig
    data_dir: Path
    inputs: dict[str, Path]
    out_dir: Path
    device: torch.device
    key: str = ""
    logger: MetricLogger = field(default_factory=MetricLogger)
    progress: bool = True
    # False on every torchrun rank but 0: only the main process writes final outputs.
    is_main: bool = True

    def input(self, name: str) -> Path:
        if name not in self.inputs:
            raise KeyError(f"stage {self.name} has no input {name!r}; it reads {sorted(self.inputs)}")
        return self.inputs[name]


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


def stage_resources(cfg: KelixConfig, name: str) -> Resources:
    return cfg.runtime.resources.get(name, cfg.runtime.default_resources)


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
        upstream = store.stale_inputs(dep, keys[dep])
        if upstream:
            return _Plan(missing=f"stage {name} needs {dep} (key {keys[dep]}), whose inputs {', '.join(upstream)} "
                                 f"were rerun after it finished: run `kelix stage run {dep}` first, or "
                                 "`kelix pipeline run`")
        input_runs[dep] = store.input_run(dep, keys[dep])
    # An unfinished try (crashed or killed) resumes from its checkpoints only if they were trained on the same
    # runs of its inputs; its RUNNING/FAILED marker says which.
    moved = not done and status.get("input_runs") not in (None, input_runs)
    note = (f"{name}: starting over, its inputs {', '.join(stale)} were rerun after it finished" if stale else
            f"{name}: starting over, its inputs were rerun since its unfinished try" if moved else "")
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
                   metrics=metrics)
    return StageResult(name, key, out_dir, metrics, False, time.perf_counter() - t0)


def _read_metrics(out_dir: Path) -> dict[str, float]:
    path = out_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ---- command line: `kelix stage ...` and `python -m kelix.stages ...` ----

def _cmd_list(args: argparse.Namespace) -> int:
    for stage in STAGES.values():
        deps = ", ".join(stage.inputs) or "data"
        print(f"{stage.name:12s} <- {deps:32s} {stage.description}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from kelix.cli import UserError
    from kelix.config_cli import config_from_args

    cfg = config_from_args(args)
    data_dir = args.data or cfg.data.root
    _join_torchrun(cfg)
    from kelix.tracking import stage_run_from_env

    try:
        # A child process or pod logs into the MLflow run its orchestrator opened (MLFLOW_RUN_ID).
        with stage_run_from_env():
            force = args.force_before if args.force_before is not None else args.force
            result = run_stage(args.name, cfg, data_dir, args.artifacts, force=force)
    except StageBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except (KeyError, StageInputMissing, FileNotFoundError) as exc:
        raise UserError(str(exc).strip('"')) from exc
    state = "skipped (already done)" if result.skipped else f"done in {result.seconds:.1f}s"
    print(f"{result.name} [{result.key}] {state} -> {result.out_dir}")
    for k, v in sorted(result.metrics.items()):
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


def _join_torchrun(cfg: KelixConfig) -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group with the configured strategy."""
    import os

    from kelix.train import distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault(distributed.ENV_STRATEGY, cfg.runtime.distributed if cfg.runtime.distributed != "none" else "ddp")
        distributed.init_from_env()


def _cmd_keys(args: argparse.Namespace) -> int:
    from kelix.config_cli import config_from_args

    from kelix.cli import UserError

    cfg = config_from_args(args)
    try:
        keys = stage_keys(cfg, data_fingerprint(args.data or cfg.data.root))
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc
    store = ArtifactStore(store_uri(args.artifacts, cfg.runtime.artifacts))
    for name, key in keys.items():
        status = (store.status(name, key) or {}).get("status", "-")
        stale = store.stale_inputs(name, key) if status == SUCCESS else []
        print(f"{name:12s} {key}  {status}" + (f" (stale: {', '.join(stale)} rerun since)" if stale else ""))
    return 0


def _add_commands(sub) -> None:
    from kelix.config_cli import add_config_args

    run = sub.add_parser("run", help="run one stage (skipped when its outputs for this key exist)")
    run.add_argument("name", help=f"stage name: {', '.join(ORDER)}")
    add_config_args(run)
    run.add_argument("--data", default=None, help="dataset folder (default: data.root of the config)")
    run.add_argument("--artifacts", default=None, help="artifact store URI (default: $KELIX_ARTIFACTS or runtime.artifacts)")
    run.add_argument("--force", action="store_true",
                     help="start a finished stage over (its outputs and checkpoints are deleted); an unfinished one resumes")
    run.add_argument("--force-before", type=float, default=None, metavar="UNIX_TIME",
                     help="like --force, but only if the stage finished before this time (what the runners pass, so "
                          "a retry keeps a forced stage that finished)")
    run.set_defaults(func=_cmd_run)
    lst = sub.add_parser("list", help="list the stages and what they read")
    lst.set_defaults(func=_cmd_list)
    keys = sub.add_parser("keys", help="print each stage's key and status for a config")
    add_config_args(keys)
    keys.add_argument("--data", default=None)
    keys.add_argument("--artifacts", default=None, help="artifact store URI (default: $KELIX_ARTIFACTS or runtime.artifacts)")
    keys.set_defaults(func=_cmd_keys)


def register(sub) -> None:
    stage = sub.add_parser("stage", help="run or inspect single stages")
    stage_sub = stage.add_subparsers(dest="stage_command", metavar="ACTION")
    stage_sub.required = True
    _add_commands(stage_sub)


def main(argv: list[str] | None = None) -> int:
    from kelix.cli import UserError
    from kelix.env import apply_env_defaults

    apply_env_defaults()
    parser = argparse.ArgumentParser(prog="python -m kelix.stages", description="Run one Kelix stage.")
    sub = parser.add_subparsers(dest="stage_command", metavar="ACTION")
    sub.required = True
    _add_commands(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
