"""The two detokenizer pipelines: text -> image through the LLM, and image -> codes -> image (AE-DiT).

Text to image: prompt -> the LLM's NBP codes -> the LLM's hidden states at those image positions (teacher
forcing over its own codes, exactly what DiT-1/2 were trained on) -> DiT sampling -> (DC-AE decode) -> PIL.
Reconstruction: images -> tokenizer codes -> quantized embeddings -> AE-DiT sampling -> PIL; it measures what
the discrete tokens keep. Both are batched; image i of a call samples its codes and its DiT noise with seed + i,
so it does not depend on the batch size or on the other prompts.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from kelix.dit.model import KelixDiT


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [0,1] -> RGB PIL images."""
    arr = (images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def to_tensor(images: Sequence | torch.Tensor, size: int | None = None) -> torch.Tensor:
    """PIL images or a [B,3,H,W] tensor in [0,1] -> float tensor, resized to size x size when given."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                         for im in images])
    if size and x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def _tokenizer_size(tokenizer) -> int | None:
    cfg = getattr(tokenizer, "cfg", None)
    return getattr(cfg, "image_size", None)


@torch.no_grad()
def tokenizer_condition(tokenizer, images: torch.Tensor) -> torch.Tensor:
    """The AE-DiT's condition: the tokenizer's quantized, pooled embeddings of the images' codes [B,P,E]."""
    return tokenizer.embed(tokenizer.encode(images))


@torch.no_grad()
def generate_images(llm, text_tok, dit: KelixDiT, prompts: Sequence[str], cfg_scale: float | None = 3.0,
                    seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 32,
                    progress: bool = False) -> list[Image.Image]:
    """Images for prompts. `cfg_scale` guides the LLM's code sampling, `guidance_scale` the DiT's flow."""
    from kelix.llm.inference import generate_codes, image_hidden_states

    prompts = list(prompts)
    out: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        codes = generate_codes(llm, text_tok, chunk, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed + start)
        cond = image_hidden_states(llm, text_tok, chunk, codes)
        out += to_pil(dit.sample(cond, num_steps=steps, guidance_scale=guidance_scale, seed=seed + start,
                                 progress=progress))
    return out


@torch.no_grad()
def reconstruct(tokenizer, aedit: KelixDiT, images: Sequence | torch.Tensor, steps: int | None = None, seed: int = 0,
                guidance_scale: float | None = None, batch_size: int = 64, progress: bool = False) -> list[Image.Image]:
    """Images (PIL or [B,3,H,W] in [0,1]) -> tokenizer codes -> AE-DiT -> PIL images at the DiT's output size."""
    x = to_tensor(images, _tokenizer_size(tokenizer))
    device = next(tokenizer.parameters()).device
    out: list[Image.Image] = []
    for start in range(0, len(x), batch_size):
        cond = tokenizer_condition(tokenizer, x[start:start + batch_size].to(device))
        out += to_pil(aedit.sample(cond, num_steps=steps, guidance_scale=guidance_scale, seed=seed + start,
                                   progress=progress))
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [B,3,H,W] tensors in [0,1] (b is resized to a's size if needed)."""
    if a.shape[-2:] != b.shape[-2:]:
        b = to_tensor(b, a.shape[-1])
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def same_objects(original, reconstruction) -> bool:
    """The analytic detector finds the same objects (count, shape, colour) in both images."""
    from kelix.data.detector import detect, match_objects

    expected = [{"shape": d.shape, "colour": d.colour, "box": d.box} for d in detect(original)]
    return match_objects(expected, detect(reconstruction), image_size=None).exact
