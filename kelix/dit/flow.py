"""Rectified-flow matching in the convention of diffusers' `FlowMatchEulerDiscreteScheduler`.

One convention everywhere (SD3 / SANA): noise level sigma in [0, 1], `x_sigma = (1 - sigma) * x0 + sigma * noise`
(exactly `scheduler.scale_noise`), the network predicts the velocity `noise - x0`, and the transformer sees the
timestep `sigma * 1000` (`scheduler.timesteps`). Sampling integrates from sigma = 1 (pure noise) to 0 with the
scheduler's Euler step `x <- x + (sigma_next - sigma) * v`, so a network that predicts the true velocity lands
exactly on x0 (tests/test_dit_flow.py checks that training target and sampler agree).

Training timesteps are `logit_normal` (SD3's choice: most weight on the middle noise levels, where the velocity
is hardest to predict) or `uniform`.
"""
from __future__ import annotations

from typing import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLING = ("logit_normal", "uniform")

# velocity_fn(x_sigma [B,...], sigma [B]) -> predicted velocity [B,...]
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_sigmas(n: int, kind: str, generator: torch.Generator | None = None, mean: float = 0.0,
                  std: float = 1.0) -> torch.Tensor:
    """Training noise levels in (0, 1); logit-normal sigma = sigmoid(mean + std * N(0, 1))."""
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {kind!r}")


def expand_like(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like)


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise: the point on the straight path (scheduler.scale_noise)."""
    s = expand_like(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_sigma / d sigma: what the network learns to predict."""
    return noise - x0


def flow_matching_loss(velocity_fn: VelocityFn, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    pred = velocity_fn(noisy(x0, noise, sigma), sigma)
    return torch.nn.functional.mse_loss(pred.float(), velocity_target(x0, noise).float())


def make_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, num_steps: int, shift: float = 1.0,
                 progress: bool = False, desc: str = "sample") -> torch.Tensor:
    """Integrate the flow from `noise` (sigma = 1) to data (sigma = 0) with the diffusers Euler scheduler."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = make_scheduler(shift)
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise
    for t in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        sigma = (t / NUM_TRAIN_TIMESTEPS).expand(x.shape[0])
        v = velocity_fn(x, sigma)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def seeded_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Item i of the batch uses seed + i (drawn on the CPU), so an image does not depend on its batch or device."""
    items = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed + i)) for i in range(shape[0])]
    return torch.stack(items).to(device)
