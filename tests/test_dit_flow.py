"""Flow matching: the training target, diffusers' scheduler and the sampler use one convention."""
from __future__ import annotations

import pytest
import torch

from kelix.dit import flow
from kelix.dit.config import DiTConfig
from kelix.dit.model import KelixDiT


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the tensors here are tiny


def test_noisy_point_matches_diffusers_scale_noise():
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    sched = flow.make_scheduler()
    sched.set_timesteps(10)
    for t in sched.timesteps[[0, 4, 9]]:
        sigma = float(t) / flow.NUM_TRAIN_TIMESTEPS
        ours = flow.noisy(x0, noise, torch.full((3,), sigma))
        theirs = sched.scale_noise(x0, t.reshape(1), noise)
        assert torch.allclose(ours, theirs, atol=1e-5)
    # The velocity target is the derivative of the path in sigma.
    s, ds = torch.full((3,), 0.4), 1e-3
    finite = (flow.noisy(x0, noise, s + ds) - flow.noisy(x0, noise, s)) / ds
    assert torch.allclose(finite, flow.velocity_target(x0, noise), atol=1e-2)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampling_the_true_velocity_recovers_the_image(shift):
    """An oracle that predicts the exact velocity toward a fixed x0 must land on x0 through the scheduler."""
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)

    def oracle(x, sigma):
        # x = (1 - s) x0 + s n  =>  n - x0 = (x - x0) / s
        return (x - x0) / flow.expand_like(sigma, x)

    out = flow.euler_sample(oracle, noise, num_steps=7, shift=shift)
    assert torch.allclose(out, x0, atol=1e-4)
    # The loss of the oracle under the training convention is zero.
    sigma = flow.sample_sigmas(2, "logit_normal", torch.Generator().manual_seed(0))
    assert float(flow.flow_matching_loss(oracle, x0, noise, sigma)) < 1e-8
    # A wrong sign convention (x = (1 - s) noise + s x0) does not recover it: the test can fail.
    wrong = flow.euler_sample(lambda x, s: -oracle(x, s), noise, num_steps=7, shift=shift)
    assert not torch.allclose(wrong, x0, atol=1e-2)


def test_model_sample_with_true_velocity_returns_the_image(monkeypatch):
    """The same through KelixDiT.sample: latent scaling, CFG plumbing and decoding back to [0, 1]."""
    cfg = DiTConfig(image_size=8, output_size=8, patch_size=2, num_layers=1, num_heads=2, head_dim=8,
                    cross_attention_dim=16, guidance_scale=3.0)
    model = KelixDiT(cfg, cond_dim=12)
    image = torch.rand(2, 3, 8, 8)
    x0 = model.encode_images(image)

    def true_velocity(x, sigma, cond):
        return (x - x0.repeat(x.shape[0] // 2, 1, 1, 1)) / flow.expand_like(sigma, x)

    monkeypatch.setattr(model, "forward", true_velocity)
    out = model.sample(torch.randn(2, 4, 12), num_steps=5, guidance_scale=3.0, seed=0)
    assert torch.allclose(out, image, atol=1e-4)


def test_timestep_sampling_kinds():
    gen = torch.Generator().manual_seed(0)
    ln = flow.sample_sigmas(20000, "logit_normal", gen)
    un = flow.sample_sigmas(20000, "uniform", gen)
    assert 0 < ln.min() and ln.max() < 1 and 0 <= un.min() and un.max() < 1
    # Logit-normal concentrates on the middle; uniform does not.
    assert ((ln - 0.5).abs() < 0.25).float().mean() > 0.7
    assert abs(((un - 0.5).abs() < 0.25).float().mean() - 0.5) < 0.03
    with pytest.raises(ValueError, match="timestep_sampling"):
        flow.sample_sigmas(2, "cosine")


def test_sample_prediction_converts_to_the_velocity_the_sampler_needs(monkeypatch):
    """x-prediction: a network that outputs the clean image exactly must also land on it."""
    cfg = DiTConfig(image_size=8, output_size=8, patch_size=2, num_layers=1, num_heads=2, head_dim=8,
                    cross_attention_dim=16, prediction="sample", spatial_cond_channels=0)
    model = KelixDiT(cfg, cond_dim=12)
    image = torch.rand(2, 3, 8, 8)
    x0 = model.encode_images(image)
    monkeypatch.setattr(model.transformer, "forward",
                        lambda x, **kw: (x0.repeat(x.shape[0] // 2, 1, 1, 1),))
    out = model.sample(torch.randn(2, 4, 12), num_steps=5, guidance_scale=2.0, seed=0)
    # Exact up to the min_sigma clamp on the last step (sigma 0.001 -> 0.05 leaves ~1e-3 of the noise).
    assert torch.allclose(out, image, atol=3e-3)
    sigma = torch.tensor([0.3, 0.8])
    noise = torch.randn_like(x0)
    assert float(model.loss(x0, torch.randn(2, 4, 12), noise, sigma)) < 1e-10
