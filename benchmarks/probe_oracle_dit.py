"""What the tiny AE-DiT can draw from a perfect condition: the DiT's own share of the reconstruction gap.

The AE-DiT is conditioned on the tokenizer's quantized embeddings; its detector agreement (same objects found
in the reconstruction as in the original) is far below the 0.9 target. This probe swaps the tokenizer for an
oracle: each merged position gets a fixed random vector for the (colour, shape) of the object covering its
centre, or for the background (`probe_oracle_reader.oracle_labels`), i.e. the condition a tokenizer that
encodes every object exactly would give. The DiT trains with the tiny preset's AE-DiT schedule through the
stage's own trainer, then is scored like the aedit stage (PSNR, detector agreement on val).

    .venv/bin/python benchmarks/probe_oracle_dit.py --steps 300
    .venv/bin/python benchmarks/probe_oracle_dit.py --tokenizer artifacts/tokenizer-3/<key>/model --val-images 256 --test

The DiT takes the preset's AE-DiT settings (`dit.ae_prediction`, `dit.ae_logit_mean`, `dit.ae_guidance_scale`);
`--conds` conditions on an aedit stage's cached tokenizer codes instead of the oracle, `--tokenizer` on a saved
tokenizer's codes computed here (any number of val or, with `--test`, test images; test holds the held-out
colour-shape pairs, and the agreement is also split by them). It also prints how far
the network's estimate of the image, x - sigma * v, is from the image at a few noise levels: at sigma = 1 the
input is pure noise, so whatever noise the estimate still holds is what sampling keeps as speckle.
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
from kelix.dit import flow  # noqa: E402
from kelix.dit.model import KelixDiT  # noqa: E402
from kelix.dit.pipeline import psnr, to_tensor  # noqa: E402
from kelix.dit.trainer import DiTData, grid_image, train_dit  # noqa: E402
from probe_oracle_reader import oracle_labels  # noqa: E402


@torch.no_grad()
def tokenizer_conditions(folder: str, images: torch.Tensor, val_images: torch.Tensor):
    """(train, val) conditions from a saved tokenizer's codes: any number of val images, unlike the stage cache."""
    from kelix.dit.pipeline import tokenizer_condition
    from kelix.tokenizer.model import KelixTokenizer

    tok = KelixTokenizer.from_pretrained(Path(folder)).eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokenizer_condition(tok, x[i:i + 256].float() / 255) for i in range(0, len(x), 256)])

    return embed(images), embed(val_images), "code-conditioned"


def conditions(conds_path: str, records: list[dict], val_records: list[dict], grid: int, size: int):
    """(train conditions, val conditions, what): the oracle's, or an aedit stage's cached tokenizer codes."""
    if conds_path:
        from safetensors.torch import load_file

        cache = load_file(conds_path)
        n = min(len(cache["val"]), len(val_records))  # the stage caches dit.num_eval_images val conditions
        return cache["train"], cache["val"][:n], "code-conditioned"
    table = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    return table[oracle_labels(records, grid, size)], table[oracle_labels(val_records, grid, size)], "oracle-conditioned"


@torch.no_grad()
def estimate_errors(model: KelixDiT, x0: torch.Tensor, cond: torch.Tensor, sigmas=(0.1, 0.4, 0.8, 1.0)) -> dict[float, float]:
    """MSE of the network's image estimate x - sigma * v against x0 (in [-1, 1]) at fixed noise levels."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    c = model.prepare_cond(cond)
    out = {}
    for s in sigmas:
        sigma = torch.full((len(x0),), s)
        x = flow.noisy(x0, noise, sigma)
        out[s] = float(((x - s * model(x, sigma, c)).clamp(-1, 1) - x0).pow(2).mean())
    return out


def compare_objects(refs: torch.Tensor, outs: torch.Tensor) -> tuple[list[bool], str]:
    """(per image: the detector finds the same objects in both, `pipeline.same_objects`; where they differ:
    object count, then shape and colour of matched objects), from one detection pass over both."""
    from collections import Counter

    from kelix.data.detector import detect, match_objects

    count = pairs = shape = colour = 0
    confusions = Counter()
    exact = []
    for r, o in zip(refs, outs):
        expected = [{"shape": d.shape, "colour": d.colour, "box": d.box} for d in detect(r)]
        m = match_objects(expected, detect(o))
        exact.append(m.exact)
        count += not m.missing and not m.extra
        for e, d in m.pairs:
            pairs += 1
            shape += e["shape"] == d.shape
            colour += e["colour"] == d.colour
            if e["shape"] != d.shape:
                confusions[f"{e['shape']}->{d.shape}"] += 1
    top = ", ".join(f"{k} {v}" for k, v in confusions.most_common(4))
    summary = (f"count right {count / len(refs):.2f}; of {pairs} matched objects shape right "
               f"{shape / max(pairs, 1):.2f}, colour right {colour / max(pairs, 1):.2f}; shape errors: {top}")
    return exact, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: the preset's AE-DiT schedule)")
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--conds", default="", help="an aedit stage's cond_cache.safetensors: condition on the "
                                                    "tokenizer's codes (train split of the cache) instead of the oracle")
    parser.add_argument("--tokenizer", default="", help="a saved tokenizer (tokenizer-3's model/): condition on its "
                                                        "codes, computed here for every train and val image")
    parser.add_argument("--test", action="store_true", help="score on the test split (held-out colour-shape pairs "
                                                            "included) instead of val")
    parser.add_argument("--grid", default="", help="also save originals over samples (8 val images) as this PNG")
    parser.add_argument("--save", default="", help="also save the trained DiT (save_pretrained) in this folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.test and args.conds:
        parser.error("--test needs --tokenizer (or the oracle): the stage cache holds val conditions only")
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", overrides=args.overrides)
    tcfg = cfg.dit.train_ae
    if args.steps:
        tcfg.num_steps = args.steps
    size, grid = cfg.tokenizer.image_size, cfg.tokenizer.grid
    records, images = load_split(args.data, "train", size)
    val_records, val_images = load_split(args.data, "test" if args.test else "val", size, limit=args.val_images)
    if args.tokenizer:
        conds, val_conds, what = tokenizer_conditions(args.tokenizer, images, val_images)
    else:
        conds, val_conds, what = conditions(args.conds, records, val_records, grid, size)
    val_images = val_images[: len(val_conds)]
    dcfg = cfg.dit.for_autoencoder()
    torch.manual_seed(tcfg.seed)
    model = KelixDiT.from_config(dcfg, conds.shape[-1])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        train_dit(model, DiTData(images, conds), tcfg, Path(run_dir), "probe-aedit", progress=False)
    seconds = time.perf_counter() - t0
    model.eval()
    if args.save:
        model.save_pretrained(args.save)
    errors = estimate_errors(model, model.encode_images(val_images.float() / 255), val_conds)
    out = model.sample(val_conds, seed=0)
    ref = val_images.float() / 255
    agree, summary = compare_objects(ref, to_tensor(out, ref.shape[-1]))
    print(summary)
    # The generator's own flag: the dataset's held-out pairs, whatever this run's config names.
    with_held = [bool(r.get("holdout")) for r in val_records[:len(agree)]]
    for flag, name in ((True, "images with a held-out colour-shape pair"), (False, "images of seen pairs only")):
        part = [a for a, h in zip(agree, with_held) if h == flag]
        if part:
            print(f"{name}: agreement {sum(part) / len(part):.3f} on {len(part)}")
    if args.grid:
        grid_image([to_tensor(ref[:8], out.shape[-1]), out[:8]]).save(args.grid)
    print(f"{what} AE-DiT ({dcfg.prediction} prediction, logit mean {dcfg.logit_mean}), {tcfg.num_steps} steps "
          f"({seconds:.0f} s): PSNR {float(psnr(ref, out).mean()):.1f} dB, detector agreement "
          f"{sum(agree) / len(agree):.3f} on {len(agree)} {'test' if args.test else 'val'} images; image-estimate MSE "
          + ", ".join(f"{e:.3f} at sigma {s}" for s, e in errors.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
