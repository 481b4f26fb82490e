"""How far the evaluation's GenEval-style score moves with the seed, at 1 and at k images per prompt.

Scores one bundle on the evaluation's own test prompts (`eval.num_generation_prompts`, the same selection) with
several seeds, at 1 image per prompt and at `--images-per-prompt` (GenEval's protocol: 4), and prints the mean,
spread and range of each category over the seeds. The release gate compares one such number against the
champion's, so its seed-to-seed spread is the smallest difference the gate can tell from noise.

    .venv/bin/python benchmarks/bench_geneval_seeds.py --bundle artifacts/eval/<key>/bundle --data data/shapes \
        --seeds 6 --images-per-prompt 4
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kelix.bundle import KelixBundle  # noqa: E402
from kelix.data.reader import iter_records  # noqa: E402
from kelix.eval import metrics as M  # noqa: E402
from kelix.eval.run import score_generation  # noqa: E402
from kelix.eval.samples import generation_prompts  # noqa: E402

COLUMNS = ("overall", "single_object", "two_object", "counting", "colours", "position", "colour_attr")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="a bundle folder (artifacts/eval/<key>/bundle)")
    parser.add_argument("--data", required=True, help="dataset folder with a test split")
    parser.add_argument("--seeds", type=int, default=6, help="seeds 0, 1000, 2000, ... (far apart: no shared images)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=0, help="prompts (0: the bundle's eval.num_generation_prompts)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    bundle = KelixBundle.load(args.bundle, device="cpu")
    ecfg = bundle.cfg.eval
    prompts = generation_prompts(iter_records(Path(args.data), "test"), args.prompts or ecfg.num_generation_prompts)
    print(f"{len(prompts)} test prompts, {args.seeds} seeds; bundle {args.bundle}")
    header = ["images per prompt", "statistic", *COLUMNS, "s per seed"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * 2 + "---:|" * (len(header) - 2))
    for per_prompt in sorted({1, args.images_per_prompt}):
        runs, seconds = [], []
        for s in range(args.seeds):
            t0 = time.perf_counter()
            _, checks = score_generation(bundle, prompts, per_prompt, 1000 * s, ecfg.batch_size)
            seconds.append(time.perf_counter() - t0)
            runs.append(M.geneval_scores(checks))
        for name, stat in (("mean", statistics.mean), ("std over seeds", statistics.stdev),
                           ("min", min), ("max", max)):
            values = [stat([r.get(f"geneval_{c}", float("nan")) for r in runs]) for c in COLUMNS]
            row = [str(per_prompt), name, *(f"{v:.3f}" for v in values), f"{statistics.mean(seconds):.1f}"]
            print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
