"""What the tiny AE-DiT can draw from a perfect condition: the DiT's own share of the reconstruction gap.

The AE-DiT is conditioned on the tokenizer's quantized embeddings; its detector agreement (same objects found
in the reconstruction as in the original) is far below the 0.9 target. This probe swaps the tokenizer for an
oracle: each merged position gets a fixed random vector for the (colour, shape) of the object covering its
centre, or for the background (`probe_oracle_reader.oracle_labels`), i.e. the condition a tokenizer that
encodes every object exactly would give. The DiT trains with the tiny preset's AE-DiT schedule through the
stage's own trainer, then is scored like the aedit stage (PSNR, detector agreement on val).

    .venv/bin/python benchmarks/probe_oracle_dit.py --steps 300
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

from kelix.config import load_config  # noqa: E402
from kelix.data.reader import load_split  # noqa: E402
from kelix.dit.model import KelixDiT  # noqa: E402
from kelix.dit.pipeline import psnr, same_objects, to_tensor  # noqa: E402
from kelix.dit.trainer import DiTData, grid_image, train_dit  # noqa: E402
from probe_oracle_reader import oracle_labels  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: the preset's AE-DiT schedule)")
    parser.add_argument("--cond-dim", type=int, default=64)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", default="", help="also save originals over samples (8 val images) as this PNG")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", overrides=args.overrides)
    tcfg = cfg.dit.train_ae
    if args.steps:
        tcfg.num_steps = args.steps
    size, grid = cfg.tokenizer.image_size, cfg.tokenizer.grid
    records, images = load_split(args.data, "train", size)
    val_records, val_images = load_split(args.data, "val", size, limit=args.val_images)
    table = torch.randn(64, args.cond_dim, generator=torch.Generator().manual_seed(0))
    conds = table[oracle_labels(records, grid, size)]
    val_conds = table[oracle_labels(val_records, grid, size)]
    torch.manual_seed(tcfg.seed)
    model = KelixDiT.from_config(cfg.dit, args.cond_dim)
    model.cfg.guidance_scale = cfg.dit.ae_guidance_scale
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        train_dit(model, DiTData(images, conds), tcfg, Path(run_dir), "oracle-aedit", progress=False)
    seconds = time.perf_counter() - t0
    model.eval()
    out = model.sample(val_conds, seed=0)
    ref = val_images.float() / 255
    agree = [same_objects(o, r) for o, r in zip(ref, to_tensor(out, ref.shape[-1]))]
    if args.grid:
        grid_image([to_tensor(ref[:8], out.shape[-1]), out[:8]]).save(args.grid)
    print(f"oracle-conditioned AE-DiT, {tcfg.num_steps} steps ({seconds:.0f} s): "
          f"PSNR {float(psnr(ref, out).mean()):.1f} dB, detector agreement {sum(agree) / len(agree):.3f} "
          f"on {len(agree)} val images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
