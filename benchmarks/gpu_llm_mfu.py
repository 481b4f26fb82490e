"""MFU of one LLM training step (the small preset, bf16) against a measured bf16 matmul peak.

One step = the NBP loss on a batch shaped like stage 2's (half understanding, half generation sequences of
the preset's image size), backward, AdamW. FLOPs are counted by torch's FlopCounterMode on one real step
(matmuls and attention, forward and backward), not estimated from a formula; the peak is the best of a few
large bf16 matmuls on the same device. Prints step time, blocks/s (LLM positions), tokens/s (text tokens +
N codes per image block), achieved TFLOP/s, peak TFLOP/s and MFU.

    python benchmarks/gpu_llm_mfu.py                 # on a GPU: small preset, bf16
    python benchmarks/gpu_llm_mfu.py --tiny          # anywhere: tiny preset, fp32 on CPU (checks the script)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from kelix.config import load_config  # noqa: E402
from kelix.llm.loss import nbp_loss  # noqa: E402
from kelix.llm.model import KelixLLM  # noqa: E402
from kelix.llm.sequences import Batch, SequenceBuilder, collate  # noqa: E402
from kelix.llm.vocab import EMPTY  # noqa: E402
from kelix.train.loop import compile_forwards  # noqa: E402

EOS = 2  # kelix.text: ids 0-2 are <pad> <bos> <eos>


def synthetic_batch(llm: KelixLLM, batch_size: int, positions: int, text_len: int, seed: int = 0) -> Batch:
    """Stage-2-shaped batch: understanding rows (image, question, answer) and generation rows (prompt, image)."""
    g = torch.Generator().manual_seed(seed)
    v = llm.vocab
    b = SequenceBuilder(v, text_tok=None)  # text()/image() take ids; no text tokenizer needed

    def text_ids(n: int) -> list[int]:
        return torch.randint(3, v.text_size, (n,), generator=g).tolist()

    seqs = []
    for i in range(batch_size):
        codes = torch.randint(0, v.codebook_size, (positions, v.num_codebooks), generator=g)
        if i % 2:
            seqs.append(b.generation_prompt("") + [b.text(text_ids(text_len)), b.image(codes, loss=True)])
        else:
            seqs.append([b.text([v.und, v.boi]), b.image(codes), b.text([v.eoi] + text_ids(text_len)),
                         b.text(text_ids(2) + [EOS], loss=True)])
    return collate(seqs, v)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, iters: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny preset (runs on a CPU; checks the script)")
    parser.add_argument("--preset", default="small", help="config preset of the measured LLM (default small)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. llm.num_layers=12 (repeatable)")
    parser.add_argument("--batch-size", type=int, default=0, help="sequences per step (default: the preset's train2)")
    parser.add_argument("--text-len", type=int, default=16, help="prompt / question tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--peak-size", type=int, default=0, help="matmul side for the peak (default 8192 GPU, 1024 CPU)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each Qwen3 decoder layer and the Block Decoder, as runtime.compile does")
    parser.add_argument("--profile", action="store_true", help="also print the top operators of one step (torch.profiler)")
    args = parser.parse_args(argv)

    cfg = load_config("tiny" if args.tiny else args.preset, None, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    tok = cfg.tokenizer
    torch.manual_seed(0)
    llm = KelixLLM.from_config(cfg.llm, tok.num_codebooks, tok.codebook_size, tok.text_vocab_size,
                               torch.randn(tok.num_codebooks, tok.codebook_size, tok.code_dim),
                               num_positions=tok.num_positions)
    llm.fold_visual_embeddings()  # stage 2 onward: one table, every parameter trains
    llm.to(device).train()
    batch_size = args.batch_size or cfg.llm.train2.batch_size
    batch = synthetic_batch(llm, batch_size, tok.num_positions, args.text_len).to(device)
    opt = torch.optim.AdamW(llm.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = nbp_loss(llm, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # FLOPs of an eager step (the same products a compiled one runs), counted before compiling so that the
    # counting mode never meets a compiled graph.
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if args.compile:
        # What a stage does with runtime.compile (kelix/train/loop.py); the counters below prove it compiled.
        compile_forwards(llm.repeated_blocks())
    t_warm = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t_warm  # with --compile: mostly compiling
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    step_s = (time.perf_counter() - t0) / args.steps

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            _sync(device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60))
    peak = matmul_peak(device, dtype, args.peak_size or (8192 if device.type == "cuda" else 1024))
    real = batch.attention_mask.bool()
    blocks = int(real.sum())
    tokens = int((batch.blocks != EMPTY)[real].sum())  # a text block holds 1 token, an image block N codes
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "preset": cfg.preset, "batch_size": batch_size,
        "seq_blocks": int(batch.blocks.shape[1]),
        "parameters": sum(p.numel() for p in llm.parameters()), "step_s": step_s,
        "blocks_per_s": blocks / step_s, "tokens_per_s": tokens / step_s,
        "step_tflop": flops / 1e12, "achieved_tflops": flops / step_s / 1e12, "peak_tflops": peak / 1e12,
        "mfu": flops / step_s / peak, "warmup_s": warmup_s,
    }
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if args.compile:
        from torch._dynamo.utils import counters

        result["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
        result["graph_breaks"] = int(sum(counters["graph_break"].values()))
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
