"""Pixel space or a small DC-AE for the tiny DiT: what an autoencoder stage would buy per CPU minute.

The DiT issue lets `tiny` work in pixel space or in the latent space of a small `diffusers` AutoencoderDC
trained as a stage of its own. This probe trains such an autoencoder on the shapes train split (MSE + L1,
no adversarial loss), scores its own reconstructions (PSNR, detector agreement on val: the ceiling of any
DiT in its latent space), then trains the AE-DiT in that latent space on the oracle condition of
`probe_oracle_dit.py` (or, with `--conds`, on an aedit stage's cached tokenizer conditions) with the preset's
AE-DiT settings and schedule, so the last line compares with that probe's rows and with the aedit stage.

    .venv/bin/python benchmarks/probe_tiny_dcae.py --ae-steps 300
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderDC  # noqa: E402

from kelix.config import load_config  # noqa: E402
from kelix.data.reader import load_split  # noqa: E402
from kelix.dit.model import KelixDiT  # noqa: E402
from kelix.dit.pipeline import psnr, same_objects, to_tensor  # noqa: E402
from kelix.dit.trainer import DiTData, grid_image, train_dit  # noqa: E402
from probe_oracle_dit import conditions  # noqa: E402


def small_dcae(channels: tuple[int, ...], latent_channels: int) -> AutoencoderDC:
    """ResBlock-only DC-AE, one block per stage: compression 2 ** (len(channels) - 1)."""
    n = len(channels)
    return AutoencoderDC(latent_channels=latent_channels, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                         encoder_block_out_channels=channels, decoder_block_out_channels=channels,
                         encoder_layers_per_block=(1,) * n, decoder_layers_per_block=(1,) * n,
                         encoder_qkv_multiscales=((),) * n, decoder_qkv_multiscales=((),) * n)


def train_dcae(ae: AutoencoderDC, images: torch.Tensor, steps: int, batch_size: int, lr: float) -> None:
    opt = torch.optim.AdamW(ae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = images[torch.randint(len(images), (batch_size,), generator=gen)].float() / 127.5 - 1
        r = ae.decode(ae.encode(x).latent).sample
        loss = F.mse_loss(r, x) + F.l1_loss(r, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"dcae step {step}: loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def latents(ae: AutoencoderDC, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([ae.encode(images[i:i + batch_size].float() / 127.5 - 1).latent
                      for i in range(0, len(images), batch_size)])


def agreement(ref: torch.Tensor, out: torch.Tensor) -> float:
    return sum(same_objects(o, r) for o, r in zip(ref, to_tensor(out, ref.shape[-1]))) / len(ref)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--ae-steps", type=int, default=300)
    parser.add_argument("--ae-channels", default="32,64,64", help="block widths; compression 2 ** (blocks - 1)")
    parser.add_argument("--latent-channels", type=int, default=8)
    parser.add_argument("--ae-dir", default="", help="save the trained DC-AE here; if it holds one, load it instead")
    parser.add_argument("--conds", default="", help="an aedit stage's cond_cache.safetensors: condition on the "
                        "tokenizer's codes (the stage's own condition) instead of the oracle")
    parser.add_argument("--dit-steps", type=int, default=0, help="AE-DiT steps (default: the preset's)")
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", default="", help="save originals / DC-AE reconstructions / AE-DiT samples as this PNG")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", overrides=args.overrides)
    size, grid = cfg.tokenizer.image_size, cfg.tokenizer.grid
    records, images = load_split(args.data, "train", size)
    val_records, val_images = load_split(args.data, "val", size, limit=args.val_images)
    ref = val_images.float() / 255

    t0 = time.perf_counter()
    if args.ae_dir and (Path(args.ae_dir) / "config.json").exists():
        ae = AutoencoderDC.from_pretrained(args.ae_dir)
    else:
        torch.manual_seed(0)
        ae = small_dcae(tuple(int(c) for c in args.ae_channels.split(",")), args.latent_channels)
        train_dcae(ae, images, args.ae_steps, 32, 2e-3)
    ae_seconds = time.perf_counter() - t0
    ae.eval()
    z = latents(ae, images)
    ae.register_to_config(scaling_factor=float(1.0 / z.std()))  # unit-variance latents for the DiT
    if args.ae_dir:
        ae.save_pretrained(args.ae_dir)
    recon = ((ae.decode(latents(ae, val_images)).sample + 1) / 2).clamp(0, 1).detach()
    print(f"DC-AE {sum(p.numel() for p in ae.parameters()) / 1e6:.2f} M params, f{ae.spatial_compression_ratio} "
          f"c{args.latent_channels}, {args.ae_steps} steps ({ae_seconds:.0f} s): PSNR {float(psnr(ref, recon).mean()):.1f} dB, "
          f"detector agreement {agreement(ref, recon):.3f} on {len(ref)} val images", flush=True)

    dit_cfg = cfg.dit.for_autoencoder()
    dit_cfg.latent, dit_cfg.image_size, dit_cfg.output_size = "dcae", size, size
    conds, val_conds, what = conditions(args.conds, records, val_records, grid, size)
    ref = ref[: len(val_conds)]
    tcfg = cfg.dit.train_ae
    if args.dit_steps:
        tcfg.num_steps = args.dit_steps
    torch.manual_seed(tcfg.seed)
    model = KelixDiT(dit_cfg, conds.shape[-1], ae)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        train_dit(model, DiTData(z * ae.config.scaling_factor, conds), tcfg, Path(run_dir), "dcae-aedit", progress=False)
    seconds = time.perf_counter() - t0
    out = model.sample(val_conds, seed=0)
    if args.grid:
        grid_image([ref[:8], recon[:8], to_tensor(out[:8], size)]).save(args.grid)
    print(f"{what} AE-DiT in its latent space, {tcfg.num_steps} steps ({seconds:.0f} s, latent "
          f"{tuple(model.latent_shape)}, patch {dit_cfg.patch_size}): PSNR {float(psnr(ref, out).mean()):.1f} dB, "
          f"detector agreement {agreement(ref, out):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
