"""What a tiny reader learns from a perfect tokenizer: the aux decoder on oracle per-position labels.

Each merged position of the image grid gets one learned vector for the (colour, shape) of the object whose box
covers the position's centre, or background: the image prefix a tokenizer that encodes every object exactly
would give. The tiny preset's aux decoder (a Qwen3 of the tiny LLM's size) then trains on captions and
questions as in tokenizer stage 2, and is scored every `--eval-every` steps by greedy answers on val, per
question type. It separates the tokenizer's share of the VQA gap from the reader's.

    .venv/bin/python benchmarks/probe_oracle_reader.py --steps 600
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kelix.data.reader import iter_records  # noqa: E402
from kelix.data.shapes import COLOURS, SHAPES  # noqa: E402
from kelix.dit.model import sincos_positions  # noqa: E402
from kelix.text import dataset_texts, train_text_tokenizer  # noqa: E402
from kelix.tokenizer.aux_decoder import AuxDecoder  # noqa: E402
from kelix.tokenizer.config import tokenizer_preset  # noqa: E402
from kelix.tokenizer.text_rows import TextRows  # noqa: E402


def oracle_labels(records: list[dict], grid: int, image_size: int) -> torch.Tensor:
    """[images, grid*grid]: 0 = background, else 1 + colour * len(SHAPES) + shape of the covering object."""
    cell = image_size / grid
    out = torch.zeros(len(records), grid * grid, dtype=torch.long)
    centres = (torch.arange(grid) + 0.5) * cell
    for b, rec in enumerate(records):
        for obj in rec["objects"]:
            x0, y0, x1, y1 = obj["box"]
            inside = ((centres[None, :] >= x0) & (centres[None, :] <= x1)) & ((centres[:, None] >= y0) & (centres[:, None] <= y1))
            out[b, inside.flatten()] = 1 + list(COLOURS).index(obj["colour"]) * len(SHAPES) + SHAPES.index(obj["shape"])
    return out


@torch.no_grad()
def answer_accuracy(aux: AuxDecoder, prefix: torch.Tensor, rows: TextRows, max_answer_len: int = 4) -> dict[str, float]:
    right, asked = defaultdict(int), defaultdict(int)
    groups = defaultdict(list)
    for q in rows.questions(range(prefix.shape[0])):
        groups[len(q[1])].append(q)
    for group in groups.values():
        ids = torch.tensor([g[1] for g in group])
        outs = aux.greedy(prefix[torch.tensor([g[0] for g in group])], ids, max_answer_len, rows.tok.eos_id)
        for (_, _, answer, kind), out in zip(group, outs):
            ok = rows.tok.decode(out).strip().lower() == answer.strip().lower()
            for key in ("all", kind):
                right[key] += ok
                asked[key] += 1
    return {k: right[k] / asked[k] for k in sorted(asked)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--position-embedding", choices=("none", "learned", "sincos"), default="none",
                        help="add a vector per grid position to the prefix, learned or a fixed 2D sin-cos code "
                             "(the reader's only other position signal is RoPE over the raster order)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = tokenizer_preset("tiny")
    train, val = list(iter_records(args.data, "train")), list(iter_records(args.data, "val"))[: args.val_images]
    text_tok = train_text_tokenizer(dataset_texts(train), cfg.text_vocab_size)
    rows, val_rows = TextRows(train, text_tok, cfg.max_text_len), TextRows(val, text_tok, cfg.max_text_len)
    labels, val_labels = (oracle_labels(r, cfg.grid, cfg.image_size) for r in (train, val))
    table = torch.nn.Embedding(1 + len(COLOURS) * len(SHAPES), cfg.embed_dim)
    init = (sincos_positions(cfg.num_positions, cfg.embed_dim) if args.position_embedding == "sincos"
            else torch.zeros(cfg.num_positions, cfg.embed_dim))
    positions = torch.nn.Parameter(init, requires_grad=args.position_embedding == "learned")
    aux = AuxDecoder.from_tokenizer_config(cfg, text_tok.vocab_size)

    def prefix(lab: torch.Tensor) -> torch.Tensor:
        return table(lab) + positions

    opt = torch.optim.AdamW([*table.parameters(), *aux.parameters(), positions], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    print("| step | seconds | " + " | ".join(["all", "colour", "count", "exists", "shape", "spatial"]) + " |")
    print("|---:|---:|" + "---:|" * 6)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (args.batch_size,), generator=gen).tolist()
        loss = sum(aux.packed_losses(prefix(labels[idx]), rows.packed(idx)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc = answer_accuracy(aux.eval(), prefix(val_labels), val_rows)
            aux.train()
            cols = [acc.get(k, float("nan")) for k in ("all", "colour", "count", "exists", "shape", "spatial")]
            print(f"| {step} | {time.perf_counter() - t0:.0f} | " + " | ".join(f"{c:.2f}" for c in cols) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
