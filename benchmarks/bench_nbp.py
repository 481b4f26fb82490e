"""Next-Block Prediction vs flat autoregression: images/s of generating one image's codes, side by side.

The same KelixLLM (same weights, same LLM size) generates P x N codes per image two ways:
  nbp   one LLM step per position, the Block Decoder emits its N codes (kelix.llm.inference, mode="nbp")
  flat  one LLM step per code, the LM head predicts it from the LLM state (mode="flat")
Both run classifier-free guidance (conditional and unconditional rows batched), sample with temperature 1
and use the KV cache. Weights are random: speed does not depend on training. Timings are medians over
repeats, NBP and flat interleaved so a noisy machine hits both alike.

    .venv/bin/python benchmarks/bench_nbp.py                      # tiny preset, N = tiny's and 8, batch 1 and 16
    .venv/bin/python benchmarks/bench_nbp.py --codebooks 8 --batch-sizes 1 --set llm.num_layers=6
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kelix.config import load_config  # noqa: E402
from kelix.llm.inference import generate_codes  # noqa: E402
from kelix.llm.toy import SENTENCES, toy_llm, toy_text_tokenizer  # noqa: E402

PROMPTS = SENTENCES[:4]


def time_once(llm, text_tok, prompts, mode: str, cfg_scale: float) -> float:
    t0 = time.perf_counter()
    generate_codes(llm, text_tok, prompts, cfg_scale=cfg_scale, seed=0, mode=mode)
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)
    return time.perf_counter() - t0


def bench(cfg, num_codebooks: int, batch_sizes: list[int], repeats: int, cfg_scale: float, text_tok,
          device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[dict]:
    tok = cfg.tokenizer
    llm = toy_llm(text_tok, cfg.llm, num_codebooks, tok.codebook_size, tok.num_positions, tok.code_dim)
    llm = llm.to(device=device, dtype=dtype).eval()
    rows = []
    for b in batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        for mode in ("nbp", "flat"):  # warm-up
            time_once(llm, text_tok, prompts[:1], mode, cfg_scale)
        times = {"nbp": [], "flat": []}
        for _ in range(repeats):
            for mode in times:
                times[mode].append(time_once(llm, text_tok, prompts, mode, cfg_scale))
        nbp, flat = statistics.median(times["nbp"]), statistics.median(times["flat"])
        rows.append({"num_codebooks": num_codebooks, "positions": tok.num_positions, "batch": b,
                     "nbp_images_per_s": b / nbp, "flat_images_per_s": b / flat, "speedup": flat / nbp,
                     "nbp_llm_steps": tok.num_positions, "flat_llm_steps": tok.num_positions * num_codebooks})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="config preset whose LLM and tokenizer shapes are used")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. llm.num_layers=6 (repeatable)")
    parser.add_argument("--codebooks", default=None,
                        help="comma-separated N values (default: the preset's N and 8)")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (decoding tiny tensors gains nothing from more, and a shared CPU hurts)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--bf16", action="store_true", help="weights and activations in bfloat16 (GPU timings)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, None, args.overrides)
    ns = [int(x) for x in args.codebooks.split(",")] if args.codebooks else sorted({cfg.tokenizer.num_codebooks, 8})
    batches = [int(x) for x in args.batch_sizes.split(",")]
    text_tok = toy_text_tokenizer()
    print(f"LLM {cfg.llm.num_layers} layers x {cfg.llm.hidden_size}, Block Decoder {cfg.llm.bd_num_layers} x "
          f"{cfg.llm.bd_hidden_size} ({cfg.llm.block_decoder}); S={cfg.tokenizer.codebook_size}, "
          f"P={cfg.tokenizer.num_positions}; cfg_scale={args.cfg_scale}; threads={args.threads}; {args.device}"
          f"{' bf16' if args.bf16 else ''}")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    rows = [r for n in ns for r in bench(cfg, n, batches, args.repeats, args.cfg_scale, text_tok, args.device, dtype)]
    print(f"{'N':>3} {'batch':>5} {'LLM steps nbp/flat':>19} {'nbp img/s':>10} {'flat img/s':>11} {'speedup':>8}")
    for r in rows:
        steps = f"{r['nbp_llm_steps']}/{r['flat_llm_steps']}"
        print(f"{r['num_codebooks']:>3} {r['batch']:>5} {steps:>19} {r['nbp_images_per_s']:>10.2f} "
              f"{r['flat_images_per_s']:>11.2f} {r['speedup']:>7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
