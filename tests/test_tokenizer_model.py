"""Kelix-Tok model: shapes, quantizer layouts, straight-through gradients, K-means init, persistence."""
from __future__ import annotations

import pytest
import torch

from kelix.config import ConfigError, load_config
from kelix.tokenizer.kmeans import init_codebooks, kmeans
from kelix.tokenizer.model import KelixTokenizer
from kelix.tokenizer.simvq import SimVQ, normalize

SMALL = [
    "tokenizer.image_size=32", "tokenizer.patch_size=4", "tokenizer.vit_hidden_size=32", "tokenizer.vit_num_layers=1",
    "tokenizer.vit_num_heads=2", "tokenizer.vit_intermediate_size=64", "tokenizer.num_codebooks=2",
    "tokenizer.codebook_size=16", "tokenizer.code_dim=8", "tokenizer.base_dim=16", "tokenizer.embed_dim=32",
]


def small_cfg(*extra: str):
    return load_config("tiny", overrides=[*SMALL, *extra]).tokenizer


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,parts,size,dim", [("multi", 2, 16, 8), ("shared", 2, 16, 8), ("single", 1, 32, 16)])
def test_layouts_shapes_and_dtypes(kind, parts, size, dim):
    tok = KelixTokenizer.from_config(small_cfg(f"tokenizer.quantizer={kind}"))
    x = images()
    codes = tok.encode(x)
    assert codes.dtype == torch.long and codes.shape == (3, tok.num_positions, parts) == (3, 16, parts)
    assert int(codes.min()) >= 0 and int(codes.max()) < size
    assert (tok.num_codebooks, tok.codebook_size) == (parts, size)
    assert tok.codebook_vectors().shape == (parts, size, dim)
    emb = tok.embed(codes)
    assert emb.shape == (3, 16, 32) and emb.dtype == torch.float32
    tok.eval()
    fwd, fwd_codes, loss, stats = tok(x)
    assert torch.equal(fwd_codes, codes)
    torch.testing.assert_close(fwd, emb)  # straight-through forward value = looked-up codes
    assert loss.ndim == 0 and loss.item() > 0 and {"codebook_loss", "commitment"} <= set(stats)


def test_parts_match_their_own_codebook_only():
    """multi: part i against codebook i; shared: every part against the one codebook."""
    for kind in ("multi", "shared"):
        tok = KelixTokenizer.from_config(small_cfg(f"tokenizer.quantizer={kind}")).eval()
        x = images()
        parts = tok.quantizer.split(tok.encoder(x))
        books = tok.codebook_vectors()
        if kind == "shared":
            assert torch.equal(books[0], books[1])
        for i in range(2):
            expect = torch.cdist(parts[..., i, :], books[i][None]).argmin(-1)
            assert torch.equal(tok.encode(x)[..., i], expect)
        if kind == "multi":
            # Changing codebook 1 leaves part 0's codes untouched.
            before = tok.encode(x)[..., 0]
            with torch.no_grad():
                tok.quantizer.proj[1].mul_(-3.0)
            assert torch.equal(tok.encode(x)[..., 0], before)


def test_continuous_has_no_codes():
    tok = KelixTokenizer.from_config(small_cfg("tokenizer.quantizer=continuous"))
    emb, codes, loss, _ = tok(images())
    assert emb.shape == (3, 16, 32) and codes is None and loss.item() == 0
    with pytest.raises(ValueError, match="continuous"):
        tok.encode(images())
    with pytest.raises(ValueError, match="no discrete codes"):
        tok.codebook_vectors()


def test_unknown_quantizer_is_rejected():
    # The config refuses it as it loads; the model still refuses a config changed by hand.
    with pytest.raises(ConfigError, match="tokenizer.quantizer must be one of 'multi', 'single'"):
        small_cfg("tokenizer.quantizer=residual")
    cfg = small_cfg()
    cfg.quantizer = "residual"
    with pytest.raises(ValueError, match="unknown quantizer"):
        KelixTokenizer.from_config(cfg)


def test_sum_and_mean_pooling():
    s = KelixTokenizer.from_config(small_cfg("tokenizer.pooling=sum"))
    m = KelixTokenizer.from_config(small_cfg("tokenizer.pooling=mean"))
    codes = s.encode(images())
    torch.testing.assert_close(m.embed(codes) * 2, s.embed(codes))  # same seed, same weights; mean = sum / N


def test_encode_is_deterministic_and_leaves_mode():
    tok = KelixTokenizer.from_config(small_cfg()).train()
    a, b = tok.encode(images()), tok.encode(images())
    assert torch.equal(a, b) and tok.training
    again = KelixTokenizer.from_config(small_cfg())  # same config -> same random init
    assert torch.equal(again.encode(images()), a)


def test_save_load_round_trip(tmp_path):
    tok = KelixTokenizer.from_config(small_cfg())
    init_codebooks(tok.quantizer, tok.encoder(images(8, seed=1)).detach(), iters=3, max_samples=1000, seed=0)
    tok.save_pretrained(tmp_path / "model")
    loaded = KelixTokenizer.from_pretrained(tmp_path / "model")
    assert loaded.cfg == tok.cfg
    x = images(4, seed=2)
    assert torch.equal(loaded.encode(x), tok.encode(x))
    torch.testing.assert_close(loaded.embed(tok.encode(x)), tok.embed(tok.encode(x)), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no Kelix tokenizer"):
        KelixTokenizer.from_pretrained(tmp_path / "missing")


def test_straight_through_gradient_and_losses():
    q = SimVQ("multi", 2, 16, 8, 16, beta=0.25)
    z = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(2, 5, 2, 8)
    out, idx, loss, _ = q(z)
    (out * w).sum().backward(retain_graph=True)
    z_ref = z.detach().clone().requires_grad_(True)
    (normalize(z_ref.view(2, 5, 2, 8)) * w).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad)  # the quantizer passes the gradient straight through
    assert q.proj.grad is None  # the output path alone does not train the codebook...
    z.grad = None
    loss.backward()  # ...the codebook loss does, and commitment pulls the features
    assert q.proj.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    parts = q.split(z.detach())
    codes = q.lookup(idx)
    expect = ((codes - parts) ** 2).mean() * 1.25  # codebook + 0.25 * commitment, same value
    torch.testing.assert_close(loss.detach(), expect)


def test_lookup_rejects_bad_codes():
    tok = KelixTokenizer.from_config(small_cfg())
    with pytest.raises(ValueError, match="entries per position"):
        tok.embed(torch.zeros(1, 16, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        tok.embed(torch.full((1, 16, 2), 16, dtype=torch.long))


def test_kmeans_recovers_separated_clusters_deterministically():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=gen) for c in centres])
    found = kmeans(x, 4, iters=10, seed=3)
    assert torch.equal(found, kmeans(x, 4, iters=10, seed=3))
    dist = torch.cdist(centres, found)
    assert dist.min(1).values.max() < 0.1 and len(set(dist.argmin(1).tolist())) == 4
    few = kmeans(x[:3], 8, iters=2, seed=0)  # fewer points than codes: still 8 distinct centroids
    assert few.shape == (8, 2) and len({tuple(r.tolist()) for r in few}) == 8


def test_kmeans_init_puts_codes_on_features_and_uses_them():
    tok = KelixTokenizer.from_config(small_cfg("tokenizer.codebook_size=8"))
    x = images(16, seed=4)
    feats = tok.encoder(x).detach()
    init_codebooks(tok.quantizer, feats, iters=10, max_samples=10_000, seed=0)
    parts = tok.quantizer.split(feats.reshape(-1, 16))
    for i in range(2):
        centroids = kmeans(parts[:, i], 8, iters=10, seed=i)
        torch.testing.assert_close(tok.codebook_vectors()[i], normalize(centroids), atol=1e-4, rtol=1e-4)
    after = tok.encode(x)
    assert [len(after[..., i].unique()) for i in range(2)] == [8, 8]  # every code starts with features


def test_pretrained_vision_tower_is_loaded_from_a_local_folder(tmp_path):
    """vit_pretrained: the tower's weights come from the folder (its pooling head is dropped, not used)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(123)
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=32, patch_size=4))
    tower.save_pretrained(tmp_path / "siglip")
    tok = KelixTokenizer.from_config(small_cfg(f"tokenizer.vit_pretrained={tmp_path / 'siglip'}"))
    for name, value in tower.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tok.encoder.vit.state_dict()[name], value), name
    assert not any(n.startswith("head.") for n, _ in tok.encoder.vit.named_parameters())
    # A saved tokenizer carries the tower's weights itself: loading it needs no tower folder.
    # Released towers are bf16: they load as float32 like the rest of the tokenizer (no dtype mix in encode).
    tower.to(torch.bfloat16).save_pretrained(tmp_path / "siglip-bf16")
    from_bf16 = KelixTokenizer.from_config(small_cfg(f"tokenizer.vit_pretrained={tmp_path / 'siglip-bf16'}"))
    assert {p.dtype for p in from_bf16.parameters()} == {torch.float32}
    assert from_bf16.encode(images()).shape == tok.encode(images()).shape
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "siglip" / "model.safetensors").unlink()
    assert torch.equal(KelixTokenizer.from_pretrained(tmp_path / "model").encode(images()), tok.encode(images()))


def test_codes_under_bf16_autocast_are_the_float32_codes():
    """Training runs the quantizer under bf16 autocast; `encode` in fp32. Both must pick the same codes."""
    torch.manual_seed(0)
    q = SimVQ("multi", 2, 1024, 64, 512, beta=0.25)
    z = torch.randn(4, 16, 128)
    _, fp32, _, _ = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, bf16, loss, _ = q(z)
    assert torch.equal(bf16, fp32) and out.dtype == torch.float32 and loss.dtype == torch.float32
