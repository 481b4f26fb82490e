"""Vision side of Kelix-Tok: SigLIP tower -> 2x2 patch merge -> adapter MLP (report section on Kelix-Tok).

The tower is `transformers.SiglipVisionModel`, random-initialised from `TokenizerConfig` for the tiny preset
or loaded with `from_pretrained(vit_pretrained)`. The merge concatenates each 2x2 block of patch features and
maps it with one linear layer, so one LLM position covers (2*patch)^2 pixels; the adapter MLP then maps it to
the N * code_dim feature the quantizer splits. Merge + MLP are the "adapter" that stage 1 trains.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from kelix.tokenizer.config import TokenizerConfig


def feature_dim(cfg: TokenizerConfig) -> int:
    """Width of the adapter output: N sub-vectors of code_dim (one vector of N*code_dim for `single`)."""
    return cfg.num_codebooks * cfg.code_dim


def build_vit(cfg: TokenizerConfig, load_pretrained: bool = True) -> SiglipVisionModel:
    if cfg.vit_pretrained and load_pretrained:
        # The pooling head is unused (we keep every patch), so it is not built: no dead parameters.
        return SiglipVisionModel.from_pretrained(cfg.vit_pretrained, vision_use_head=False, dtype=torch.float32)
    vcfg = SiglipVisionConfig(
        hidden_size=cfg.vit_hidden_size, intermediate_size=cfg.vit_intermediate_size,
        num_hidden_layers=cfg.vit_num_layers, num_attention_heads=cfg.vit_num_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False,
    )
    return SiglipVisionModel(vcfg)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig, load_pretrained: bool = True):
        super().__init__()
        if cfg.image_size % (cfg.patch_size * cfg.merge):
            raise ValueError(f"image_size {cfg.image_size} must be a multiple of patch_size*merge "
                             f"({cfg.patch_size}*{cfg.merge})")
        self.cfg = cfg
        self.vit = build_vit(cfg, load_pretrained)
        width = self.vit.config.hidden_size
        self.native_size = self.vit.config.image_size
        self.merge = nn.Linear(cfg.merge * cfg.merge * width, width)
        hidden = cfg.adapter_hidden_size or width
        self.adapter = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, feature_dim(cfg)))

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [*self.merge.parameters(), *self.adapter.parameters()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> features [B, P, N*code_dim]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W], got {tuple(images.shape)}")
        size = self.cfg.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"images must be {size}x{size} (tokenizer.image_size), got {tuple(images.shape[-2:])}")
        pixels = (images.float() - 0.5) / 0.5  # SigLIP normalisation: mean 0.5, std 0.5
        out = self.vit(pixel_values=pixels, interpolate_pos_encoding=size != self.native_size)
        h = out.last_hidden_state  # [B, G*G, D]
        b, _, d = h.shape
        g, m = size // self.cfg.patch_size, self.cfg.merge
        # Concatenate each m x m block of neighbouring patches (row-major), then one linear map.
        h = h.view(b, g // m, m, g // m, m, d).permute(0, 1, 3, 2, 4, 5).reshape(b, (g // m) ** 2, m * m * d)
        return self.adapter(self.merge(h))
