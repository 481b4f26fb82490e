"""Per-step overhead of the shared training loop (kelix/train/loop.py) against a bare PyTorch loop.

Both loops train the same tiny Kelix-Tok model (tokenizer + aux decoder, stage-2 objective: everything
unfrozen, ViT at encoder_lr) on the same precomputed batches with the same AdamW groups, schedule and
gradient clipping; the shared loop adds what it owns (metric collection, logging, progress bar, atomic
checkpoints every `checkpoint_every` steps). Runs alternate A/B blocks so drift on a shared machine hits both
alike, and time is process CPU time (wall time is also printed) because other jobs share the cores.
Target: overhead <= 3%.

    python benchmarks/bench_train_loop.py --steps 30 --blocks 3
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kelix.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

import torch  # noqa: E402

from kelix.config import load_config  # noqa: E402
from kelix.text import dataset_texts, train_text_tokenizer  # noqa: E402
from kelix.tokenizer.aux_decoder import AuxDecoder  # noqa: E402
from kelix.tokenizer.model import KelixTokenizer  # noqa: E402
from kelix.tokenizer.objective import TokenizerTrainer, make_step_fn, param_groups  # noqa: E402
from kelix.tokenizer.text_rows import TextRows  # noqa: E402
from kelix.train.loop import build_optimizer, train  # noqa: E402
from kelix.train.schedule import lr_factor  # noqa: E402


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """Caption + QA records shaped like the shapes set (the benchmark needs no dataset on disk)."""
    g = torch.Generator().manual_seed(seed)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "star"]
    out = []
    for _ in range(n):
        c, s = colours[int(torch.randint(4, (1,), generator=g))], shapes[int(torch.randint(4, (1,), generator=g))]
        out.append({"caption": f"One object: a large {c} {s}.", "qa": [
            {"q": f"What colour is the {s}?", "a": c, "type": "colour"},
            {"q": f"What shape is the {c} object?", "a": s, "type": "shape"},
            {"q": "How many objects are there?", "a": "one", "type": "count"}]})
    return out


def build(cfg):
    torch.manual_seed(0)
    records = synthetic_records(256)
    text_tok = train_text_tokenizer(dataset_texts(records), cfg.text_vocab_size)
    model = TokenizerTrainer(KelixTokenizer.from_config(cfg), AuxDecoder.from_tokenizer_config(cfg, text_tok.vocab_size))
    rows = TextRows(records, text_tok, cfg.max_text_len)
    b = cfg.train2.batch_size
    images = torch.rand(len(records), 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    batches = [(images[i * b:(i + 1) * b], rows.packed(range(i * b, (i + 1) * b))) for i in range(len(records) // b)]
    return model, batches


def bare_loop(model, batches, tcfg, steps: int) -> None:
    """What a hand-written PyTorch loop does for the same training: AdamW groups, schedule, clip, step."""
    optimizer = build_optimizer(param_groups(model, "pretrain", tcfg), tcfg)
    step_fn = make_step_fn("pretrain")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    for step in range(steps):
        factor = lr_factor(step, steps, tcfg.warmup_steps, tcfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss, _ = step_fn(model, batches[step % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def shared_loop(model, batches, tcfg, steps: int) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        tcfg.num_steps = steps
        train(model, param_groups(model, "pretrain", tcfg), lambda i: batches[i % len(batches)],
              make_step_fn("pretrain"), tcfg, Path(run_dir), desc="bench", progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", overrides=args.overrides).tokenizer
    model, batches = build(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    tcfg = cfg.train2
    times = {"bare": [0.0, 0.0], "shared": [0.0, 0.0]}
    for block in range(args.blocks + 1):  # block 0 warms both paths up and is not counted
        for name, fn in (("bare", bare_loop), ("shared", shared_loop)) if block % 2 else (("shared", shared_loop), ("bare", bare_loop)):
            model.load_state_dict(init)
            wall, cpu = time.perf_counter(), time.process_time()
            fn(model, batches, tcfg, args.steps)
            if block:
                times[name][0] += time.perf_counter() - wall
                times[name][1] += time.process_time() - cpu
    n = args.steps * args.blocks
    bare_cpu, shared_cpu = times["bare"][1] / n, times["shared"][1] / n
    bare_wall, shared_wall = times["bare"][0] / n, times["shared"][0] / n
    print(f"model: tiny Kelix-Tok + aux decoder, stage-2 objective, batch {tcfg.batch_size}, {args.threads} thread(s), "
          f"{n} timed steps per loop ({args.blocks} alternating blocks of {args.steps}; a checkpoint ends every block, "
          f"checkpoint_every={tcfg.checkpoint_every})")
    print("| loop | CPU s/step | wall s/step |")
    print("|---|---|---|")
    print(f"| bare PyTorch | {bare_cpu:.4f} | {bare_wall:.4f} |")
    print(f"| kelix.train.loop | {shared_cpu:.4f} | {shared_wall:.4f} |")
    print(f"overhead: {100 * (shared_cpu / bare_cpu - 1):+.2f}% CPU, {100 * (shared_wall / bare_wall - 1):+.2f}% wall (target <= 3%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
