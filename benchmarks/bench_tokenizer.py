"""Kelix-Tok benchmark: encode throughput and the report's quantizer ablation in miniature.

    python benchmarks/bench_tokenizer.py --data /tmp/tokdata                 # throughput + full ablation
    python benchmarks/bench_tokenizer.py --data /tmp/tokdata --skip-ablation --model artifacts/tokenizer-3/KEY/model
    python benchmarks/bench_tokenizer.py --data /tmp/tokdata --quantizers multi single --time-budget 300
    python benchmarks/bench_tokenizer.py --data /tmp/tokdata --jobs 4 --threads 1   # variants side by side

The ablation runs tokenizer-1..3 for each `tokenizer.quantizer` (same preset, same steps, same seeds) in a
temporary artifact store and prints a markdown table: VQA exact match of the aux decoder on val (overall and
per question type), minimum sub-codebook use, mean perplexity, wall and CPU seconds. Report (arXiv 2602.09843):
continuous 78.0 > Kelix-Tok 76.8 >> single code 66.5; shared codebook 63.0 vs independent 75.4.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kelix.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

import torch  # noqa: E402

from kelix.config import load_config  # noqa: E402
from kelix.stages.run import run_stage  # noqa: E402
from kelix.data.reader import load_split  # noqa: E402
from kelix.tokenizer.model import KelixTokenizer  # noqa: E402

STAGES = ("tokenizer-1", "tokenizer-2", "tokenizer-3")
TYPES = ("colour", "shape", "count", "spatial", "exists")


def throughput(cfg, data: Path, model_dir: str | None, batch: int, batches: int) -> str:
    tok = KelixTokenizer.from_pretrained(model_dir) if model_dir else KelixTokenizer.from_config(cfg.tokenizer)
    tok.eval()
    _, images = load_split(data, "val", tok.cfg.image_size)
    x = images[:batch].float() / 255
    tok.encode(x)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        tok.encode(x)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = batch * batches
    return (f"encode throughput ({tok.cfg.quantizer}, {tok.cfg.image_size}px, {tok.num_positions} positions x "
            f"{tok.num_codebooks} codes, batch {batch}, {torch.get_num_threads()} threads): "
            f"{n / wall:.0f} images/s wall, {n / cpu:.0f} images per CPU-second")


def run_variant(args: tuple) -> tuple:
    """Stages 1-3 of one quantizer kind (in its own process when --jobs > 1) -> (kind, metrics, wall, CPU)."""
    kind, data, root, overrides, budget, threads = args
    apply_env_defaults()
    torch.set_num_threads(threads)
    extra = [f"tokenizer.quantizer={kind}"]
    if budget > 0:
        # Split the budget like the default steps: stage 2 does most of the work.
        cfg = load_config("tiny", overrides=overrides)
        steps = [getattr(cfg.tokenizer, f).num_steps for f in ("train1", "train2", "train3")]
        extra += [f"tokenizer.{f}.time_budget_s={budget * s / sum(steps):.1f}"
                  for f, s in zip(("train1", "train2", "train3"), steps)]
    cfg = load_config("tiny", overrides=[*overrides, *extra])
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = {}
    for name in STAGES:
        metrics = run_stage(name, cfg, data, root, progress=False).metrics
        print(f"  {kind:10s} {name}: vqa {metrics['vqa_accuracy']:.3f} util_min "
              f"{metrics.get('util_min', float('nan')):.3f} ({time.perf_counter() - wall:.0f}s)", flush=True)
    return kind, metrics, time.perf_counter() - wall, time.process_time() - cpu


def ablation(data: Path, quantizers: list[str], overrides: list[str], budget: float, keep: str | None,
             jobs: int, threads: int) -> str:
    root = keep or tempfile.mkdtemp(prefix="kelix-tok-ablation-")
    work = [(kind, data, root, overrides, budget, threads) for kind in quantizers]
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            results = pool.map(run_variant, work)
    else:
        results = [run_variant(w) for w in work]
    rows = [(kind, m, [v for k, v in m.items() if k.startswith("ppl_")], wall, cpu) for kind, m, wall, cpu in results]
    lines = ["| quantizer | VQA acc | " + " | ".join(TYPES) + " | util_min | mean ppl | codes/position | wall s | CPU s |",
             "|---|---|" + "---|" * len(TYPES) + "---|---|---|---|---|"]
    for kind, m, ppl, wall, cpu in rows:
        per = " | ".join(f"{m.get(f'vqa_acc_{t}', float('nan')):.3f}" for t in TYPES)
        util = f"{m['util_min']:.3f}" if "util_min" in m else "-"
        mean_ppl = f"{sum(ppl) / len(ppl):.1f}" if ppl else "-"
        codes = "continuous" if kind == "continuous" else str(len(ppl))
        lines.append(f"| {kind} | {m['vqa_accuracy']:.3f} | {per} | {util} | {mean_ppl} | {codes} | {wall:.0f} | {cpu:.0f} |")
    return "\n".join(lines) + f"\n\n(artifacts: {root})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="shapes dataset folder (kelix data generate shapes --out DIR)")
    parser.add_argument("--model", default=None, help="a trained tokenizer model/ folder for the throughput test")
    parser.add_argument("--quantizers", nargs="+", default=["multi", "continuous", "single", "shared"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--time-budget", type=float, default=0.0, help="training seconds per quantizer (0 = preset steps)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads per process")
    parser.add_argument("--jobs", type=int, default=1, help="quantizer variants trained in parallel processes")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--artifacts", default=None, help="keep the ablation's stage outputs here (default: temp)")
    parser.add_argument("--skip-ablation", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", overrides=args.overrides)
    print(throughput(cfg, Path(args.data), args.model, args.batch, args.batches), flush=True)
    if not args.skip_ablation:
        print(ablation(Path(args.data), args.quantizers, args.overrides, args.time_budget, args.artifacts,
                       args.jobs, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
