"""Kelix-DiT: a SANA transformer (diffusers) that turns a conditioning sequence [B,P,C] into an image.

The condition is either the unified LLM's last hidden states at the image positions (text-to-image) or the
tokenizer's quantized embeddings (the AE-DiT); the model sees only the tensor. Choices:
- The condition goes through a parameter-free LayerNorm (LLM hidden states and code embeddings live at very
  different scales), gets a fixed 2D sin-cos position code of its P-grid (neither source says where a position
  sits in the image: the LLM uses RoPE, the codes are per position), then SANA's own `caption_projection`
  (caption_channels = C -> inner width) and `caption_norm`, and is read by cross-attention in every block.
- Classifier-free guidance: a learned null condition (one vector, broadcast over positions) replaces the
  condition with probability `cond_dropout` in training and forms the unconditional half of the CFG batch.
- Latent space `pixel`: the DiT works on the image itself at `image_size` (in [-1, 1]), resized to
  `output_size` at the end. `dcae`: a frozen `diffusers.AutoencoderDC` (from `dcae_path`, copied into the
  saved model so a saved DiT is self-contained) maps images to latents and back.
- Optional aligned path (`spatial_cond_channels` > 0): both conditions are laid on the image's P-grid (one
  tokenizer position = one image cell), so a learned projection of the prepared condition is also
  nearest-upsampled to the latent grid and concatenated to the DiT's input channels, the usual way diffusion
  decoders read a spatial latent (SD upscaler, diffusion tokenizer decoders). Cross-attention still reads the
  full sequence; the aligned path only saves the tiny model from learning the position alignment from scratch.
- `prediction="sample"` (x-prediction, JiT arXiv 2511.13720): the network outputs the clean latent and the
  velocity it implies is derived from it. Pixel patches are high-dimensional (4x4x3 = 48 values on tiny) next
  to a 256-wide network; predicting the low-dimensional image instead of carrying the noise through trains far
  faster.
  The loss stays the velocity MSE, and the sampler sees velocities either way.
- Image tokens get SANA's sin-cos patch positions (`pos_embed="sincos"`; SANA-1.0 itself uses none and relies
  on the Mix-FFN convolutions, which is too local for a 2-layer tiny model to place objects).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC, SanaTransformer2DModel
from safetensors.torch import load_file, save_file

from kelix.dit import flow
from kelix.dit.config import DiTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DCAE_DIR = "dcae"


def sincos_positions(num_positions: int, dim: int) -> torch.Tensor:
    """[P, dim] fixed position code: 2D sin-cos on a sqrt(P) grid when P is a square, else 1D."""
    side = math.isqrt(num_positions)
    if side * side == num_positions and dim % 4 == 0:
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        return torch.cat([_sincos_1d(ys.flatten(), dim // 2), _sincos_1d(xs.flatten(), dim // 2)], dim=1)
    return _sincos_1d(torch.arange(num_positions), dim)


def _sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half, 1))
    angles = pos.float()[:, None] * freqs[None]
    out = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(out, (0, dim - out.shape[1]))


def _model_fields(cfg: DiTConfig) -> dict:
    """The DiTConfig fields a saved model depends on (not the training schedules)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if not k.startswith("train")}


class KelixDiT(torch.nn.Module):
    def __init__(self, cfg: DiTConfig, cond_dim: int, autoencoder: AutoencoderDC | None = None):
        super().__init__()
        self.cfg = dataclasses.replace(cfg)  # a copy: stages adjust sampling defaults without touching the run's config
        self.cond_dim = cond_dim
        inner = cfg.num_heads * cfg.head_dim
        if cfg.cross_attention_dim != inner:
            # SANA's caption_projection always maps to the inner width, and cross-attention reads that.
            raise ValueError(f"dit.cross_attention_dim ({cfg.cross_attention_dim}) must equal num_heads * head_dim ({inner})")
        if cfg.prediction not in ("velocity", "sample"):
            raise ValueError(f"dit.prediction must be 'velocity' or 'sample', got {cfg.prediction!r}")
        if cfg.pos_embed not in ("sincos", "none"):
            raise ValueError(f"dit.pos_embed must be 'sincos' or 'none', got {cfg.pos_embed!r}")
        if cfg.latent == "pixel":
            in_channels, sample_size = 3, cfg.image_size
        elif cfg.latent == "dcae":
            if autoencoder is None:
                raise ValueError("latent 'dcae' needs an AutoencoderDC (set dit.dcae_path)")
            ratio = autoencoder.spatial_compression_ratio
            if cfg.image_size % ratio:
                raise ValueError(f"dit.image_size {cfg.image_size} is not a multiple of the DC-AE's compression {ratio}")
            in_channels, sample_size = autoencoder.config.latent_channels, cfg.image_size // ratio
        else:
            raise ValueError(f"dit.latent must be 'pixel' or 'dcae', got {cfg.latent!r}")
        if sample_size % cfg.patch_size:
            raise ValueError(f"latent side {sample_size} is not a multiple of dit.patch_size {cfg.patch_size}")
        self.latent_shape = (in_channels, sample_size, sample_size)
        k = cfg.spatial_cond_channels
        self.spatial_proj = torch.nn.Linear(cond_dim, k) if k > 0 else None
        self.transformer = SanaTransformer2DModel(
            in_channels=in_channels + k, out_channels=in_channels, num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim, num_layers=cfg.num_layers, num_cross_attention_heads=cfg.num_heads,
            cross_attention_head_dim=cfg.head_dim, cross_attention_dim=inner, caption_channels=cond_dim,
            mlp_ratio=cfg.mlp_ratio, sample_size=sample_size, patch_size=cfg.patch_size,
            interpolation_scale=1 if cfg.pos_embed == "sincos" else None,
        )
        # Zero-init the output (DiT's adaLN-zero idea, at the output only): training starts from a constant
        # prediction and learns the mean first instead of undoing a random map.
        torch.nn.init.zeros_(self.transformer.proj_out.weight)
        torch.nn.init.zeros_(self.transformer.proj_out.bias)
        self.null_cond = torch.nn.Parameter(torch.randn(cond_dim))
        self.autoencoder = autoencoder
        if autoencoder is not None:
            autoencoder.requires_grad_(False).eval()

    # ---- construction and persistence ----

    @classmethod
    def from_config(cls, cfg: DiTConfig, cond_dim: int) -> "KelixDiT":
        autoencoder = AutoencoderDC.from_pretrained(cfg.dcae_path) if cfg.latent == "dcae" else None
        return cls(cfg, cond_dim, autoencoder)

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # The DC-AE is saved in its own folder; a training-time weight average (trainer.EMA) is not part of the model.
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if not k.startswith(("autoencoder.", "ema."))}
        save_file(state, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps({"dit": _model_fields(self.cfg), "cond_dim": self.cond_dim}, indent=1))
        if self.autoencoder is not None:
            self.autoencoder.save_pretrained(folder / DCAE_DIR)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu") -> "KelixDiT":
        folder = Path(folder)
        if not (folder / CONFIG_FILE).exists():
            raise FileNotFoundError(f"no Kelix-DiT at {folder} ({CONFIG_FILE} missing)")
        meta = json.loads((folder / CONFIG_FILE).read_text())
        known = {f.name for f in dataclasses.fields(DiTConfig)}
        cfg = DiTConfig(**{k: v for k, v in meta["dit"].items() if k in known})
        autoencoder = None
        if cfg.latent == "dcae":
            autoencoder = AutoencoderDC.from_pretrained(folder / DCAE_DIR if (folder / DCAE_DIR).exists() else cfg.dcae_path)
        model = cls(cfg, int(meta["cond_dim"]), autoencoder)
        result = model.load_state_dict(load_file(folder / WEIGHTS_FILE), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("autoencoder.")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"{folder / WEIGHTS_FILE} does not fit its config: missing {missing[:3]}, "
                               f"unexpected {result.unexpected_keys[:3]}")
        return model.to(device).eval()

    @property
    def device(self) -> torch.device:
        return self.null_cond.device

    # ---- latent space ----

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> DiT targets x0 [B,*latent_shape]."""
        side = self.cfg.image_size
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        x = x * 2.0 - 1.0
        if self.autoencoder is None:
            return x
        return self.autoencoder.encode(x).latent * self.autoencoder.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """DiT outputs -> images [B,3,output_size,output_size] in [0,1]."""
        if self.autoencoder is not None:
            z = self.autoencoder.decode(z / self.autoencoder.config.scaling_factor).sample
        x = ((z.float() + 1.0) / 2.0).clamp(0, 1)
        side = self.cfg.output_size
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return x

    # ---- the network ----

    def prepare_cond(self, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise the condition, swap in the null condition where `drop` [B] is true, add positions."""
        if cond.ndim != 3 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"condition must be [B, P, {self.cond_dim}], got {tuple(cond.shape)}")
        c = F.layer_norm(cond.to(self.device, torch.float32), (self.cond_dim,))
        if drop is not None:
            c = torch.where(drop.to(self.device).reshape(-1, 1, 1), self.null_cond.expand_as(c), c)
        return c + sincos_positions(c.shape[1], self.cond_dim).to(c)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Velocity for latents `x` at noise levels `sigma` [B] given a prepared condition (`prepare_cond`)."""
        sigma = sigma.to(x)
        inp = x if self.spatial_proj is None else torch.cat([x, self._spatial(cond, x.shape[-2:])], dim=1)
        out = self.transformer(inp, encoder_hidden_states=cond, timestep=sigma * flow.NUM_TRAIN_TIMESTEPS,
                               return_dict=False)[0]
        if self.cfg.prediction == "velocity":
            return out
        # x-prediction: the network outputs the clean latent; the velocity through x that it implies is
        # (x - x0_hat) / sigma (clamped: at sigma -> 0 the velocity is undetermined and the loss would explode).
        return (x - out) / flow.expand_like(sigma.clamp_min(self.cfg.min_sigma), x)

    def _spatial(self, cond: torch.Tensor, size) -> torch.Tensor:
        """[B,P,C] prepared condition -> [B,k,h,w]: each position's projection fills its cell of the latent grid."""
        b, p, _ = cond.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"spatial_cond_channels needs a square grid of positions, got P={p}; set it to 0")
        grid = self.spatial_proj(cond).transpose(1, 2).reshape(b, -1, side, side)
        return F.interpolate(grid, size=tuple(size), mode="nearest")

    def loss(self, x0: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
             drop: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss; all randomness is passed in, so a batch is a pure function of its step."""
        c = self.prepare_cond(cond, drop)
        return flow.flow_matching_loss(lambda x, s: self(x, s, c), x0, noise.to(x0), sigma.to(x0))

    def guided_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, guidance_scale: float,
                        null: torch.Tensor | None = None) -> torch.Tensor:
        """CFG: v_null + g (v_cond - v_null), conditional and unconditional halves in one batch.

        `cond` and `null` are prepared conditions; at g == 1 the unconditional half is skipped (it cancels).
        """
        if guidance_scale == 1.0 or null is None:
            return self(x, sigma, cond)
        v = self(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, null]))
        v_cond, v_null = v.chunk(2)
        return v_null + guidance_scale * (v_cond - v_null)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, num_steps: int | None = None, guidance_scale: float | None = None,
               seed: int = 0, progress: bool = False) -> torch.Tensor:
        """Images [B,3,output_size,output_size] in [0,1] for conditions [B,P,C]; image i uses noise seed + i."""
        num_steps = num_steps or self.cfg.sample_steps
        g = self.cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
        was_training = self.training
        self.eval()
        c = self.prepare_cond(cond)
        null = self.prepare_cond(cond, torch.ones(cond.shape[0], dtype=torch.bool)) if g != 1.0 else None
        noise = flow.seeded_noise((cond.shape[0], *self.latent_shape), seed, self.device)
        z = flow.euler_sample(lambda x, s: self.guided_velocity(x, s, c, g, null), noise, num_steps,
                              shift=self.cfg.sample_shift, progress=progress)
        self.train(was_training)
        return self.decode_latents(z)
