"""The one training loop every stage shares (tokenizer 1-3, LLM 1-4, DiT 1-2, AE-DiT).

What it owns: AdamW with per-group learning rates, warmup + cosine, gradient accumulation, clipping,
bf16 autocast where the device has it, seeding, a progress bar, metric logging, atomic checkpoints and
exact resume. What it does not own: the model, the loss and the data; a stage passes `get_batch(i)`
(micro-batch i, a pure function of i, see sampler.py) and `step_fn(model, batch) -> (loss, metrics)`.

Resume restores parameters, optimiser moments and RNG state, and batches depend only on the step, so a
run killed at step k and resumed gives the same weights as an uninterrupted run.
"""
from __future__ import annotations

import copy
import gc
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from kelix.train import distributed
from kelix.train.checkpoint import latest_checkpoint, save_checkpoint
from kelix.train.config import TrainConfig
from kelix.train.metrics import MetricLogger
from kelix.train.schedule import lr_factor

StepFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainResult:
    step: int
    resumed_from: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # training time up to the last checkpoint of earlier tries, plus this one's
    stopped_by_budget: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all buffers: what a stage changes. Frozen weights come from the input stage."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b for n, b in model.named_buffers() if b is not None})
    return state


class _StepModule(torch.nn.Module):
    """`step_fn(model, batch)` as the forward of one module. DDP syncs gradients and FSDP2 gathers weights in
    forward hooks, so a step_fn that calls submodules or methods (model.tokenizer(...), model.hidden_states(...))
    is only correct under them when it runs inside the wrapped module's forward."""

    def __init__(self, model: torch.nn.Module, step_fn: "StepFn"):
        super().__init__()
        self.model = model
        self.step_fn = step_fn

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.step_fn(self.model, batch)


def _groups_by_name(model: torch.nn.Module, param_groups: Iterable[dict]) -> list[dict]:
    """Param groups as parameter names: FSDP2 replaces parameter objects, names survive."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in param_groups:
        params = list(group["params"])
        unknown = [p for p in params if id(p) not in names]
        if unknown:
            raise ValueError("a param group holds tensors that are not parameters of the trained model")
        out.append({**group, "params": [names[id(p)] for p in params]})
    return out


def _groups_from_names(model: torch.nn.Module, named_groups: list[dict]) -> list[dict]:
    params = dict(model.named_parameters())
    return [{**g, "params": [params[n] for n in g["params"]]} for g in named_groups]


def build_optimizer(param_groups: Iterable[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    groups = []
    for group in param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        # Norms, biases and embeddings-as-gains get no weight decay (1-d tensors).
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        lr = group.get("lr", cfg.lr)
        for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd})
    if not groups:
        raise ValueError("no trainable parameters: check which parts this stage unfreezes")
    return torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def compile_forwards(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """Route each module's forward through torch.compile (fuses a transformer layer's norms, rotary and
    activation work, which an eager step spends more time on than on its matrix products at width 1024).

    `module.forward = torch.compile(module.forward)` rather than `Module.compile()`: on torch 2.11-2.13 the latter
    left the module running eagerly (dynamo never saw a frame). Layers of one class share a code object, so one
    graph serves all of them. Undo with `del module.forward`."""
    modules = list(modules)
    for module in modules:
        module.forward = torch.compile(module.forward)
    return modules


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" and (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def _over_budget(cfg: TrainConfig, t0: float) -> bool:
    """Ranks must agree on stopping, or one would wait forever in the next collective: rank 0 decides."""
    if cfg.time_budget_s <= 0:
        return False  # every rank has the same config, so every rank skips the broadcast alike
    over = time.perf_counter() - t0 > cfg.time_budget_s
    if distributed.current() is None:
        return over
    flag = torch.tensor([1.0 if over else 0.0], device=distributed.collective_device())
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def train(
    model: torch.nn.Module,
    param_groups: Iterable[dict],
    get_batch: Callable[[int], Any],
    step_fn: StepFn,
    cfg: TrainConfig,
    run_dir: Path,
    desc: str = "train",
    logger: MetricLogger | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    progress: bool = True,
    fsdp_units: Callable[[torch.nn.Module], Iterable[torch.nn.Module]] | None = None,
    compile_units: Callable[[torch.nn.Module], Iterable[torch.nn.Module]] | None = None,
) -> TrainResult:
    """Train `model` for `cfg.num_steps` optimiser steps, resuming from `run_dir/checkpoints` if present.

    `fsdp_units(m)` names the submodules of `m` that FSDP2 shards as their own units (distributed.wrap says
    which qualify); without it the whole model is one unit. `compile_units(m)` names the submodules whose
    forward runs through torch.compile while training (`compile_forwards`); they run eagerly again afterwards."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    info = distributed.current()
    main = info is None or info.is_main
    logger = logger or MetricLogger(run_dir / "metrics.jsonl" if main else None)
    device = next(model.parameters()).device
    seed_everything(cfg.seed)
    named_groups = _groups_by_name(model, param_groups)

    start = 0
    ckpt = latest_checkpoint(ckpt_dir)
    if ckpt is not None and ckpt.meta.get("format") != "dcp":
        missing = set(trainable_state(model)) - set(ckpt.model_state)
        if missing:
            raise RuntimeError(f"checkpoint {ckpt.path} does not match this stage's model (missing {sorted(missing)[:3]})")
        model.load_state_dict(ckpt.model_state, strict=False)
    # FSDP2 shards the module it is given in place. Sharding a copy keeps `model` whole: it is brought up to date
    # from the shards whenever the stage looks at it (checkpoint callbacks, the end), so everything a stage does
    # outside the training step (EMA, previews, evaluation, save_pretrained) runs as on one process.
    fsdp = info is not None and info.strategy == "fsdp"
    # A stage that does not look at `model` while it trains (no checkpoint callback) gets it parked in host
    # memory meanwhile: the accelerator holds only the shards (an 8B LLM's whole copy is 35 GB per GPU).
    # (On a CPU the moves are no-ops.)
    park = fsdp and on_checkpoint is None
    trained = copy.deepcopy(model) if fsdp else model
    if park:
        # After the copy, not before: a copy made in host memory would hold the model twice there, on every
        # process of a node at once. On the accelerator the second copy lasts only until it is sharded below.
        model.to("cpu")
    units = list(fsdp_units(trained)) if fsdp and fsdp_units else []
    # On the copy FSDP trains, not on `model`: a compiled forward is bound to the module it was made from.
    compiled = compile_forwards(compile_units(trained)) if compile_units else []
    forward_step = (distributed.wrap(_StepModule(trained, step_fn), info, units) if info
                    else (lambda batch: step_fn(model, batch)))
    optimizer = build_optimizer(_groups_from_names(trained, named_groups), cfg)
    if ckpt is not None:
        if ckpt.meta.get("format") == "dcp":
            distributed.load_dcp(ckpt.path, trained, optimizer)
        elif info is None or info.strategy == "ddp":
            optimizer.load_state_dict(ckpt.train_state["optimizer"])
            torch.set_rng_state(ckpt.train_state["torch_rng"])
        elif main:
            # A 1-process checkpoint's optimiser state is keyed for the whole model, not FSDP's shards (the stage
            # key does not include the strategy, so switching to fsdp meets it): the weights resume, AdamW's
            # moments start again.
            print(f"warning: {ckpt.path} was written by a single process; under FSDP its weights resume but the "
                  "optimiser state starts fresh (the first steps after it move differently than an unbroken run)")
        start = ckpt.step

    # The time budget counts the training time of earlier tries too (saved with each checkpoint): a stage killed
    # and resumed must not train longer in total than one that ran through.
    before = float(ckpt.meta.get("train_seconds") or 0.0) if ckpt is not None else 0.0
    t0 = time.perf_counter() - before
    metrics: dict[str, float] = dict(ckpt.meta.get("metrics") or {}) if ckpt is not None else {}
    stopped = False
    trained.train()
    bar = tqdm(total=cfg.num_steps, initial=start, desc=desc, disable=not (progress and main), dynamic_ncols=True, leave=False)
    step = start
    while step < cfg.num_steps:
        factor = lr_factor(step, cfg.num_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        # Metrics may be tensors on the device (a step_fn that reads them itself would make the host wait for the
        # forward before it can queue the backward): they are read once, after the optimiser step is queued.
        sums: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for micro in range(cfg.grad_accum_steps):
            batch = get_batch(step * cfg.grad_accum_steps + micro)
            with _autocast(device, cfg.precision):
                loss, step_metrics = forward_step(batch)
            (loss / cfg.grad_accum_steps).backward()
            for k, v in {"loss": loss.detach(), **step_metrics}.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        if cfg.grad_clip > 0:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            sums["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            counts["grad_norm"] = 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # Each metric over the micro-batches that reported it (one without image blocks has no code loss).
        metrics = {k: float(v) / counts[k] for k, v in sums.items()}
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.num_steps:
            metrics = distributed.mean_across_ranks(metrics)
            logger.log({**metrics, "lr": cfg.lr * factor}, step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        over_budget = _over_budget(cfg, t0)
        if step % cfg.checkpoint_every == 0 or step == cfg.num_steps or over_budget:
            # The metrics too: a run killed after its last checkpoint resumes there with no step left to run,
            # and must still return (and its stage report) what training ended at.
            extra = {"desc": desc, "loss": metrics.get("loss"), "metrics": metrics,
                     "train_seconds": time.perf_counter() - t0}
            if info is not None:
                distributed.save_dcp(ckpt_dir, step, trained, optimizer, extra=extra)
            else:
                save_checkpoint(
                    ckpt_dir, step, trainable_state(model),
                    {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, extra=extra,
                )
            if on_checkpoint:
                if fsdp:
                    distributed.gather_full(trained, model)
                on_checkpoint(step)
        if over_budget and step < cfg.num_steps:  # a budget that runs out on the last step stopped nothing
            stopped = True
            break
    bar.close()
    for module in compiled:  # evaluation after training meets other shapes (KV cache, one block at a time)
        del module.forward
    if fsdp:
        distributed.gather_full(trained, model)
    if park:
        # The shards and their optimiser state go first, so the whole model fits where they were.
        del forward_step, optimizer, trained, units
        gc.collect()  # FSDP2's module <-> state reference cycle keeps the shards alive until a collection
        model.to(device)
    return TrainResult(step=step, resumed_from=start, metrics=metrics, seconds=time.perf_counter() - t0,
                       stopped_by_budget=stopped)
