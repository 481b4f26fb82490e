"""Text-to-image sampling settings, scored GenEval-style on one split's prompts, side by side in one run.

Loads a registered bundle (the eval stage's `bundle/` folder, or any `kelix` bundle) and generates the same
prompts with the same seeds under each setting: the LLM's code sampling (CFG scale, temperature, top-k) and
the DiT's flow guidance. Choose on `val` (no held-out colour-shape pairs there, so scores read higher than
test), then confirm once on `test`. `--aedit` adds a row per setting with the same LLM codes drawn by the AE-DiT
from the codes alone (no LLM hidden states): where both rows miss an object, the codes lack it.

    .venv/bin/python benchmarks/sweep_generation.py --bundle artifacts/eval/<key>/bundle --data data/shapes \
        --split val --prompts 96 --cfg 3,5 --temperature 1,0.7 --top-k 0 --dit-guidance 3
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kelix.bundle import KelixBundle  # noqa: E402
from kelix.data.detector import detect  # noqa: E402
from kelix.data.reader import iter_records  # noqa: E402
from kelix.dit.pipeline import generate_images, to_pil  # noqa: E402
from kelix.eval import metrics as M  # noqa: E402
from kelix.eval.samples import generation_prompts  # noqa: E402
from kelix.llm.inference import generate_codes  # noqa: E402

CATEGORIES = ("single_object", "two_object", "counting", "colours", "position", "colour_attr")
# Prompts per batch for both drawers: generate_images seeds a batch's codes with seed + its start, so the AE-DiT
# rows see the same codes only with the same batches.
BATCH = 32


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


@torch.inference_mode()
def aedit_images(bundle, prompts: list[str], cfg: float, temp: float, top_k: int, seed: int, steps: int,
                 batch_size: int = BATCH) -> list:
    """The codes `generate_images` samples (same batches, same seeds), drawn by the AE-DiT from the codes alone."""
    out = []
    for start in range(0, len(prompts), batch_size):
        codes = generate_codes(bundle.llm, bundle.text_tok, prompts[start:start + batch_size], cfg_scale=cfg,
                               temperature=temp, top_k=top_k, seed=seed + start)
        out += to_pil(bundle.aedit.sample(bundle.tokenizer.embed(codes), num_steps=steps, seed=seed + start))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="a bundle folder (artifacts/eval/<key>/bundle)")
    parser.add_argument("--data", required=True, help="dataset folder with the split's manifest")
    parser.add_argument("--split", default="val")
    parser.add_argument("--prompts", type=int, default=96, help="prompts, round-robin over 1, 2 and 3+ objects")
    parser.add_argument("--cfg", type=floats, default=[3.0], help="LLM CFG scales, comma-separated")
    parser.add_argument("--temperature", type=floats, default=[1.0], help="LLM sampling temperatures")
    parser.add_argument("--top-k", type=lambda s: [int(x) for x in s.split(",")], default=[0], help="LLM top-k (0: off)")
    parser.add_argument("--dit-guidance", type=floats, default=[3.0], help="DiT guidance scales")
    parser.add_argument("--steps", type=int, default=20, help="DiT sampling steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--aedit", action="store_true", help="also draw each setting's codes with the AE-DiT")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    bundle = KelixBundle.load(args.bundle, device="cpu")
    prompts = generation_prompts(iter_records(Path(args.data), args.split), args.prompts)
    if not prompts:
        raise SystemExit(f"no prompts in the {args.split} split of {args.data}")
    print(f"{len(prompts)} {args.split} prompts; bundle {args.bundle}")
    header = ["drawn by", "cfg", "temperature", "top_k", "dit guidance", "overall", *CATEGORIES, "strict", "s"]
    print("| " + " | ".join(header) + " |\n|" + "---:|" * len(header))
    texts = [p.prompt for p in prompts]

    def report(drawn_by: str, setting: tuple, images: list, t0: float) -> None:
        scores = M.geneval_scores(M.geneval_checks(p.objects, p.relation, detect(im)) for p, im in zip(prompts, images))
        row = [drawn_by, *setting, scores["geneval_overall"],
               *(scores.get(f"geneval_{c}", float("nan")) for c in CATEGORIES), scores["geneval_strict"],
               time.perf_counter() - t0]
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |", flush=True)

    for setting in itertools.product(args.cfg, args.temperature, args.top_k, args.dit_guidance):
        cfg, temp, top_k, guidance = setting
        t0 = time.perf_counter()
        report("dit-2", setting, generate_images(bundle.llm, bundle.text_tok, bundle.dit, texts, cfg_scale=cfg,
                                                 seed=args.seed, steps=args.steps, guidance_scale=guidance,
                                                 temperature=temp, top_k=top_k, batch_size=BATCH), t0)
        if args.aedit:
            t0 = time.perf_counter()
            report("AE-DiT", setting, aedit_images(bundle, texts, cfg, temp, top_k, args.seed, args.steps), t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
