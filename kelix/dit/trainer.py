"""Training a KelixDiT through the shared loop: step-pure batches, the flow-matching step, sample grids.

Every random draw of a batch (examples, noise, noise levels, condition dropout) comes from a generator seeded by
(seed, micro-batch index), so a batch is a pure function of its step and a run resumed after a crash reads and
draws exactly what the uninterrupted run would have (tests/test_dit_train.py checks the weights match).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from kelix.dit import flow
from kelix.dit.model import KelixDiT
from kelix.train.config import TrainConfig
from kelix.train.loop import TrainResult, train
from kelix.train.metrics import MetricLogger
from kelix.train.sampler import StepSampler


@dataclass
class DiTData:
    """Training pairs: `targets` are uint8 images [N,3,H,W] (pixel) or precomputed latents (dcae); `conds` [N,P,C]."""

    targets: torch.Tensor
    conds: torch.Tensor

    def __post_init__(self):
        if len(self.targets) != len(self.conds):
            raise ValueError(f"{len(self.targets)} targets but {len(self.conds)} conditions")

    def x0(self, model: KelixDiT, idx: torch.Tensor) -> torch.Tensor:
        t = self.targets[idx]
        return model.encode_images(t.float() / 255.0) if t.dtype == torch.uint8 else t.to(model.device, torch.float32)


class EMA(torch.nn.Module):
    """Exponential moving average of the trainable weights, kept as buffers so the loop checkpoints and restores
    it with the model. Diffusion samples from averaged weights are much cleaner than from the last iterate,
    most of all after short runs at a high learning rate like the tiny preset's. The decay warms up as
    (1 + n) / (10 + n) so the average does not remember the random init."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        for n in self.names:
            self.register_buffer(n.replace(".", "__"), params[n].detach().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        n = int(self.num_updates)
        d = min(self.decay, (1 + n) / (10 + n))
        params = dict(model.named_parameters())
        for name in self.names:
            getattr(self, name.replace(".", "__")).lerp_(params[name].detach(), 1 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for name in self.names:
            params[name].copy_(getattr(self, name.replace(".", "__")))


def make_batches(model: KelixDiT, data: DiTData, cfg: TrainConfig) -> tuple[Callable, Callable]:
    """(get_batch, step_fn) for `kelix.train.loop.train`."""
    sampler = StepSampler(len(data.conds), cfg.batch_size, seed=cfg.seed)
    dit = model.cfg

    def get_batch(i: int) -> dict:
        idx = torch.from_numpy(sampler.indices(i))
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        x0 = data.x0(model, idx)
        # Drawn for the global batch, then this rank's rows: the same noise per example on any world size.
        n, mine = sampler.batch_size, sampler.rank_slice
        return {
            "x0": x0,
            "cond": data.conds[idx].to(model.device, torch.float32),
            "noise": torch.randn((n, *x0.shape[1:]), generator=gen)[mine].to(x0),
            "sigma": flow.sample_sigmas(n, dit.timestep_sampling, gen, dit.logit_mean, dit.logit_std)[mine].to(x0),
            "drop": (torch.rand(n, generator=gen) < dit.cond_dropout)[mine].to(model.device),
            # The weights change once per optimiser step, not per micro-batch.
            "first_micro": i % cfg.grad_accum_steps == 0,
        }

    def step_fn(m: KelixDiT, b: dict) -> tuple[torch.Tensor, dict[str, float]]:
        ema = getattr(m, "ema", None)
        if ema is not None and b["first_micro"]:
            ema.update(m)  # folds in the weights of the previous optimiser step
        loss = m.loss(b["x0"], b["cond"], b["noise"], b["sigma"], b["drop"])
        return loss, {}

    return get_batch, step_fn


@torch.no_grad()
def eval_loss(model: KelixDiT, data: DiTData, batch_size: int = 64, seed: int = 1234) -> float:
    """Flow-matching loss with fixed noise and evenly spread noise levels: comparable across runs and stages."""
    model.eval()
    total, n = 0.0, len(data.conds)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        x0 = data.x0(model, idx)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        sigma = ((idx.float() + 0.5) / n).to(x0)  # stratified over (0, 1)
        total += float(model.loss(x0, data.conds[idx].to(x0), noise, sigma)) * len(idx)
    return total / max(n, 1)


@torch.no_grad()
def per_example_loss(model: KelixDiT, data: DiTData, sigmas=(0.6, 0.9), batch_size: int = 128,
                     seed: int = 4321) -> torch.Tensor:
    """[N] flow-matching loss of each pair at fixed high noise levels, where the input is mostly noise and the
    prediction has to come from the condition: how well the condition explains its image."""
    model.eval()
    out = []
    for start in range(0, len(data.conds), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data.conds)))
        x0 = data.x0(model, idx)
        cond = model.prepare_cond(data.conds[idx].to(x0))
        # The noise of example k depends only on k, so scores do not depend on the batch size.
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed + int(k))) for k in idx]).to(x0)
        err = torch.zeros(len(idx), device=x0.device)
        for s in sigmas:
            sigma = torch.full((len(idx),), s, device=x0.device)
            pred = model(flow.noisy(x0, noise, sigma), sigma, cond)
            err += (pred - flow.velocity_target(x0, noise)).pow(2).flatten(1).mean(1)
        out.append((err / len(sigmas)).cpu())
    return torch.cat(out)


def grid_image(rows: list[torch.Tensor]) -> Image.Image:
    """Rows of images [n,3,H,W] in [0,1] (same H, W) -> one PIL grid."""
    lines = [torch.cat(list(r.float().cpu().clamp(0, 1)), dim=2) for r in rows]
    width = max(line.shape[2] for line in lines)
    lines = [torch.nn.functional.pad(line, (0, width - line.shape[2])) for line in lines]
    arr = (torch.cat(lines, dim=1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)


def mlflow_active() -> bool:
    """Whether an MLflow run is open: the stage runner opens runs, model code only logs into them."""
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a hard dependency
        return False
    return mlflow.active_run() is not None


def log_grid(image: Image.Image, name: str, step: int) -> None:
    if mlflow_active():
        import mlflow

        mlflow.log_image(image, key=name, step=step)


def train_dit(model: KelixDiT, data: DiTData, cfg: TrainConfig, run_dir: Path, desc: str,
              preview: Callable[[], Image.Image] | None = None, grid_every: int = 100,
              logger: MetricLogger | None = None, progress: bool = True) -> TrainResult:
    """Train with the shared loop (checkpoints and resume in run_dir); log `preview()` grids to MLflow.

    With `model.cfg.ema_decay` > 0 the model ends holding the averaged weights."""
    if model.cfg.ema_decay > 0:
        model.ema = EMA(model, model.cfg.ema_decay)  # a submodule: its buffers are checkpointed with the model
    get_batch, step_fn = make_batches(model, data, cfg)
    last = {"step": 0}

    def on_checkpoint(step: int) -> None:
        # Sampling a grid costs a few seconds: only when someone will see it.
        if preview is not None and mlflow_active() and (step - last["step"] >= grid_every or step == cfg.num_steps):
            last["step"] = step
            log_grid(preview(), f"{desc}_samples", step)

    params = [p for p in model.parameters() if p.requires_grad]
    result = train(model, [{"params": params}], get_batch, step_fn, cfg, run_dir, desc=desc, logger=logger,
                   on_checkpoint=on_checkpoint, progress=progress)
    ema = getattr(model, "ema", None)
    if ema is not None:
        ema.update(model)  # the last optimiser step
        ema.copy_to(model)
        del model.ema
    return result
