"""Where the LLM's image-code loss goes: teacher-forced code loss per cell kind of the tokenizer's grid.

For each image of a split, the LLM reads `<gen> prompt <boi> codes` (what generation training and dit-1 see) and
scores every true code given the prompt and the true codes before it (nats, per sub-codebook). A cell is
background when fewer than `--min-pixels` of its pixels belong to an object (the detector's segmentation);
object cells are split into the first of an object in raster order (no object cell above or to the left of it:
where the model must decide to start one) and the continuation cells; background cells by their distance to
the nearest object cell. The last column of the table is each kind's share of an image's total nats.
`--redraw` also reports how many blocks change when every code is redrawn from those predictions (temperature
1), as generation draws them.

    .venv/bin/python benchmarks/probe_code_loss.py --bundle artifacts/eval/<key>/bundle --data data/shapes \
        --splits train,val --images 256
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kelix.bundle import KelixBundle  # noqa: E402
from kelix.data.detector import segment  # noqa: E402
from kelix.data.reader import load_split  # noqa: E402
from kelix.llm.inference import sample, seeded_uniforms  # noqa: E402
from kelix.llm.sequences import IMAGE, SequenceBuilder, collate  # noqa: E402


def cell_kinds(images: torch.Tensor, grid: int, min_pixels: int) -> dict[str, torch.Tensor]:
    """Boolean masks [B, grid*grid] of each cell kind."""
    cell = images.shape[-1] // grid
    obj = torch.stack([
        torch.from_numpy((segment(im.permute(1, 2, 0).float().numpy())[0] >= 0).astype(np.float32))
        for im in images])  # [B, H, W]
    count = F.avg_pool2d(obj[:, None], cell)[:, 0] * cell * cell  # object pixels per cell [B, g, g]
    o = count >= min_pixels
    before = torch.zeros_like(o)  # an object cell above (left, straight, right) or to the left
    before[:, 1:, :] |= o[:, :-1, :]
    before[:, 1:, 1:] |= o[:, :-1, :-1]
    before[:, 1:, :-1] |= o[:, :-1, 1:]
    before[:, :, 1:] |= o[:, :, :-1]
    near = [F.max_pool2d(o[:, None].float(), 2 * r + 1, 1, r)[:, 0] > 0 for r in (1, 2)]
    kinds = {"object, first cell": o & ~before, "object, continuation": o & before,
             "background next to an object": ~o & near[0], "background 2 cells away": ~o & near[1] & ~near[0],
             "background further": ~o & ~near[1]}
    return {k: v.flatten(1) for k, v in kinds.items()}


@torch.no_grad()
def code_losses(bundle: KelixBundle, prompts: list[str], codes: torch.Tensor, redraw: bool, bs: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced nats [B, P, N] of every true code, and (with `redraw`) which blocks a temperature-1 redraw
    changes [B, P]."""
    llm, v = bundle.llm, bundle.llm.vocab
    n = v.num_codebooks
    builder = SequenceBuilder.for_model(llm, bundle.text_tok)
    table = llm.embedding_table()
    losses, changed = [], []
    for i in range(0, len(codes), bs):
        c = codes[i:i + bs]
        batch = collate([builder.generation(p, x) for p, x in zip(prompts[i:i + bs], c)], v, left_pad=True)
        h = llm.hidden_states(batch.blocks, batch.attention_mask, batch.position_ids, table=table,
                              image_pos=batch.image_pos)
        at = (batch.kinds == IMAGE).nonzero(as_tuple=True)  # row-major: each row's positions in order
        tgt = batch.targets[at]
        out = llm.block_decoder(h[at], llm.block_encoder.embed(table, tgt[:, :n]))
        logits = [llm.logits(out[:, k], *v.codebook_range(k)) for k in range(n)]
        nats = torch.stack([F.cross_entropy(lg, tgt[:, k] - v.codebook_range(k)[0], reduction="none")
                            for k, lg in enumerate(logits)], -1)
        losses.append(nats.view(len(c), -1, n))
        if redraw:
            u = seeded_uniforms(len(c), c.shape[1] * n, i).view(-1, n)
            new = torch.stack([sample(lg, 1.0, 0, 1.0, u[:, k]) for k, lg in enumerate(logits)], -1)
            changed.append((new.view_as(c) != c).any(-1))
    return torch.cat(losses), (torch.cat(changed) if redraw else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="a bundle folder (artifacts/eval/<key>/bundle)")
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--splits", default="val")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--min-pixels", type=int, default=4, help="object pixels that make a cell an object cell")
    parser.add_argument("--redraw", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = KelixBundle.load(args.bundle, device="cpu")
    tcfg = bundle.tokenizer.cfg
    n = bundle.llm.vocab.num_codebooks
    codes_head = " | ".join(f"code {k}" for k in range(n))
    print(f"| split | cells | share of cells | {codes_head} | nats per block | share of the image's nats |"
          + (" blocks a redraw changes |" if args.redraw else ""))
    print("|---|---|---:|" + "---:|" * (n + 2) + ("---:|" if args.redraw else ""))
    for split in args.splits.split(","):
        records, images = load_split(args.data, split, tcfg.image_size, limit=args.images)
        codes = bundle.tokenizer.encode(images.float() / 255)
        nats, changed = code_losses(bundle, [r.get("prompt") or r.get("caption", "") for r in records], codes,
                                    args.redraw)
        kinds = cell_kinds(images, tcfg.grid, args.min_pixels)
        total = float(nats.sum())
        for name, m in kinds.items():
            per_code = " | ".join(f"{x:.3f}" for x in nats[m].mean(0).tolist())
            row = (f"| {split} | {name} | {float(m.float().mean()):.3f} | {per_code} | {float(nats[m].sum(-1).mean()):.2f} "
                   f"| {float(nats[m].sum()) / total:.2f} |")
            print(row + (f" {float(changed[m].float().mean()):.2f} |" if changed is not None else ""), flush=True)
        print(f"| {split} | all ({len(images)} images) | 1.000 | "
              + " | ".join(f"{x:.3f}" for x in nats.flatten(0, 1).mean(0).tolist())
              + f" | {float(nats.sum(-1).mean()):.2f} | {float(nats.sum((1, 2)).mean()):.1f} nats per image |"
              + (f" {float(changed.float().mean()):.2f} |" if changed is not None else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
