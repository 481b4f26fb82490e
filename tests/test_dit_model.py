"""KelixDiT: tensor shapes through the whole path, guidance, persistence, and the DC-AE latent space."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderDC

from kelix.dit.config import DiTConfig
from kelix.dit.model import KelixDiT, sincos_positions

COND_DIM, P = 12, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the tensors here are tiny


def tiny_cfg(**kw) -> DiTConfig:
    base = dict(image_size=16, output_size=24, patch_size=2, num_layers=1, num_heads=2, head_dim=8,
                cross_attention_dim=16, sample_steps=3)
    base.update(kw)
    return DiTConfig(**base)


def _trained_a_little(model: KelixDiT) -> KelixDiT:
    # proj_out starts at zero (every velocity 0): perturb all weights so comparisons are not vacuous.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_shapes_through_the_path():
    torch.manual_seed(0)
    model = _trained_a_little(KelixDiT(tiny_cfg(), COND_DIM))
    images = torch.rand(2, 3, 20, 20)  # any input size: resized to image_size
    x0 = model.encode_images(images)
    assert x0.shape == (2, 3, 16, 16) and x0.min() >= -1 and x0.max() <= 1
    cond = torch.randn(2, P, COND_DIM) * 50 + 3  # LLM-like scale: normalised away
    c = model.prepare_cond(cond)
    assert c.shape == (2, P, COND_DIM)
    seen = {}

    def record(module, inputs, output):
        seen["proj"] = output.shape

    model.transformer.caption_projection.register_forward_hook(record)
    v = model(x0, torch.tensor([0.2, 0.9]), c)
    assert v.shape == x0.shape and seen["proj"] == (2, P, 16)  # projected to the DiT's caption (inner) width
    loss = model.loss(x0, cond, torch.randn_like(x0), torch.tensor([0.3, 0.7]), torch.tensor([True, False]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.null_cond.grad is not None and model.null_cond.grad.abs().sum() > 0
    out = model.sample(cond, num_steps=2, guidance_scale=2.0, seed=0)
    assert out.shape == (2, 3, 24, 24) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="condition"):
        model.prepare_cond(torch.randn(2, P, COND_DIM + 1))


def test_condition_changes_the_output_and_dropout_removes_it():
    torch.manual_seed(0)
    model = _trained_a_little(KelixDiT(tiny_cfg(), COND_DIM)).eval()
    x, s = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 0.5])
    a, b = torch.randn(2, P, COND_DIM), torch.randn(2, P, COND_DIM)
    assert not torch.allclose(model(x, s, model.prepare_cond(a)), model(x, s, model.prepare_cond(b)), atol=1e-4)
    drop = torch.ones(2, dtype=torch.bool)
    assert torch.allclose(model(x, s, model.prepare_cond(a, drop)), model(x, s, model.prepare_cond(b, drop)))


def test_guidance_scale_one_equals_unguided_and_halves_stay_paired():
    torch.manual_seed(0)
    model = _trained_a_little(KelixDiT(tiny_cfg(), COND_DIM)).eval()
    x, s = torch.randn(3, 3, 16, 16), torch.tensor([0.2, 0.5, 0.8])
    cond = torch.randn(3, P, COND_DIM)
    c, null = model.prepare_cond(cond), model.prepare_cond(cond, torch.ones(3, dtype=torch.bool))
    v_cond, v_null = model(x, s, c), model(x, s, null)
    # Force the batched CFG path at g = 1 (sample() skips it): conditional and null halves must not be swapped.
    v = torch.cat([x, x]), torch.cat([s, s]), torch.cat([c, null])
    batched = model(*v).chunk(2)
    g1 = batched[1] + 1.0 * (batched[0] - batched[1])
    assert torch.allclose(g1, v_cond, atol=1e-5)
    assert torch.allclose(model.guided_velocity(x, s, c, 0.0, null), v_null, atol=1e-5)
    g3 = model.guided_velocity(x, s, c, 3.0, null)
    assert torch.allclose(g3, v_null + 3 * (v_cond - v_null), atol=1e-4)
    # End to end: sample at g = 1 equals sampling the conditional velocity alone.
    unguided = model.sample(cond, num_steps=3, guidance_scale=1.0, seed=5)
    from kelix.dit import flow
    noise = flow.seeded_noise((3, *model.latent_shape), 5)
    manual = model.decode_latents(flow.euler_sample(lambda z, sg: model(z, sg, c), noise, 3))
    assert torch.allclose(unguided, manual, atol=1e-5)
    assert not torch.allclose(unguided, model.sample(cond, num_steps=3, guidance_scale=4.0, seed=5), atol=1e-3)


def test_sampling_is_seeded_and_batch_independent():
    torch.manual_seed(0)
    model = _trained_a_little(KelixDiT(tiny_cfg(), COND_DIM)).eval()
    cond = torch.randn(3, P, COND_DIM)
    full = model.sample(cond, num_steps=2, seed=7)
    assert torch.equal(full, model.sample(cond, num_steps=2, seed=7))
    assert not torch.allclose(full, model.sample(cond, num_steps=2, seed=8))
    # Image i uses seed + i: sampling item 2 alone with seed 9 gives the same image.
    assert torch.allclose(full[2:], model.sample(cond[2:], num_steps=2, seed=9), atol=1e-5)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _trained_a_little(KelixDiT(tiny_cfg(mlp_ratio=2.0, guidance_scale=2.5), COND_DIM)).eval()
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["cond_dim"] == COND_DIM and "train1" not in meta["dit"]
    loaded = KelixDiT.from_pretrained(tmp_path / "m")
    assert loaded.cfg == model.cfg  # train schedules are not saved; here they are the defaults on both sides
    cond = torch.randn(2, P, COND_DIM)
    assert torch.equal(model.sample(cond, seed=1), loaded.sample(cond, seed=1))
    with pytest.raises(FileNotFoundError):
        KelixDiT.from_pretrained(tmp_path / "nothing")


def test_cross_attention_width_must_match_inner_width():
    with pytest.raises(ValueError, match="cross_attention_dim"):
        KelixDiT(tiny_cfg(cross_attention_dim=32), COND_DIM)


def test_sincos_positions_distinguish_every_position():
    pos = sincos_positions(16, 12)
    assert pos.shape == (16, 12)
    assert torch.cdist(pos, pos).add(torch.eye(16)).min() > 0.1
    assert sincos_positions(5, 12).shape == (5, 12)  # not a square: 1D code


def _tiny_dcae(path):
    ae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
                       decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16),
                       decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                       decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                       decoder_qkv_multiscales=((), ()), scaling_factor=0.5)
    ae.save_pretrained(path)
    return ae


def test_dcae_latent_space(tmp_path):
    torch.manual_seed(0)
    _tiny_dcae(tmp_path / "dcae")
    cfg = tiny_cfg(latent="dcae", dcae_path=str(tmp_path / "dcae"), image_size=16, output_size=20, patch_size=1)
    model = KelixDiT.from_config(cfg, COND_DIM)
    assert model.latent_shape == (4, 8, 8)  # f2c4: 16 px -> 8x8x4 latents
    x0 = model.encode_images(torch.rand(2, 3, 16, 16))
    assert x0.shape == (2, 4, 8, 8)
    loss = model.loss(x0, torch.randn(2, P, COND_DIM), torch.randn_like(x0), torch.tensor([0.3, 0.6]))
    loss.backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())  # the DC-AE stays frozen
    assert not any(n.startswith("autoencoder.") for n, p in model.named_parameters() if p.requires_grad)
    _trained_a_little(model).eval()
    out = model.sample(torch.randn(2, P, COND_DIM), num_steps=2, seed=0)
    assert out.shape == (2, 3, 20, 20)
    # The saved model carries its DC-AE: loading does not need dcae_path any more.
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "dcae" / "config.json").unlink()
    loaded = KelixDiT.from_pretrained(tmp_path / "m")
    cond = torch.randn(1, P, COND_DIM)
    assert torch.equal(model.sample(cond, num_steps=2, seed=3), loaded.sample(cond, num_steps=2, seed=3))
