"""Where shape gets lost: probes of a trained tokenizer's features, object by object.

For every object of the train/val images, a small MLP is trained to name its shape (5 classes, chance 0.2)
from what the tokenizer gives at the object's position:
  quantized  the pooled embeddings of the codes (what the LLM and the AE-DiT read)
  continuous the adapter's features before quantization
  pixels     a 24 x 24 crop around the object (the probe's own ceiling)
each either at the one merged position under the object's centre (`cell`) or its 3 x 3 neighbourhood (`3x3`).
A reader that attends to one position at a time (the aux decoder and the LLM answering "what shape is the red
object?") needs the shape in `cell`; `3x3` says whether it is there at all.

    .venv/bin/python benchmarks/probe_tokenizer_shape.py artifacts/tokenizer-1/<key>/model artifacts/tokenizer-3/<key>/model
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kelix.data.reader import load_split  # noqa: E402
from kelix.data.shapes import SHAPES  # noqa: E402
from kelix.tokenizer.model import KelixTokenizer  # noqa: E402

CROP = 24


def positions_of(obj: dict, g: int) -> tuple[int, list[int]]:
    """The merged position under an object's centre on a g x g grid, and its 3 x 3 neighbourhood (edge-clamped)."""
    cx, cy = min(int(obj["x"] * g), g - 1), min(int(obj["y"] * g), g - 1)
    around = [min(max(cy + dy, 0), g - 1) * g + min(max(cx + dx, 0), g - 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return cy * g + cx, around


@torch.no_grad()
def object_features(tok: KelixTokenizer, data: str, split: str, limit: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """{'<source>/<where>': [objects, features]} and the shape labels [objects]."""
    records, images = load_split(data, split, tok.cfg.image_size, limit=limit)
    g = tok.cfg.grid
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    for start in range(0, len(records), 256):
        x = images[start:start + 256].float() / 255
        sources = {"quantized": tok.embed(tok.encode(x)), "continuous": tok.encoder(x)}
        padded = F.pad(x, (CROP // 2,) * 4, value=1.0)
        side = tok.cfg.image_size
        for b, rec in enumerate(records[start:start + 256]):
            for obj in rec["objects"]:
                cell, around = positions_of(obj, g)
                for name, f in sources.items():
                    feats.setdefault(f"{name}/cell", []).append(f[b, cell])
                    feats.setdefault(f"{name}/3x3", []).append(f[b, around].flatten())
                px, py = int(obj["x"] * side), int(obj["y"] * side)
                feats.setdefault("pixels/crop", []).append(padded[b, :, py:py + CROP, px:px + CROP].flatten())
                labels.append(SHAPES.index(obj["shape"]))
    return {k: torch.stack(v) for k, v in feats.items()}, torch.tensor(labels)


def fit_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, classes: int,
                epochs: int = 300, seed: int = 0) -> torch.Tensor:
    """Test predictions of a one-hidden-layer MLP trained full-batch on standardised features."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    a, b = (train_x - mean) / std, (test_x - mean) / std
    net = torch.nn.Sequential(torch.nn.Linear(a.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, classes))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        loss = F.cross_entropy(net(a), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net(b).argmax(1)


def probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
          epochs: int = 300, seed: int = 0) -> float:
    """Val accuracy of the MLP on shape labels."""
    return float((fit_predict(train_x, train_y, val_x, len(SHAPES), epochs, seed) == val_y).float().mean())


def probe_parser(doc: str, scored_split: str) -> argparse.ArgumentParser:
    """The probes' command line: tokenizer folders, data, image counts of train and the scored split, threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("tokenizers", nargs="+", help="tokenizer model folders (a stage's out_dir/model)")
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument(f"--{scored_split}-images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = probe_parser(__doc__, "val").parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for folder in args.tokenizers:
        tok = KelixTokenizer.from_pretrained(folder)
        train_x, train_y = object_features(tok, args.data, "train", args.train_images)
        val_x, val_y = object_features(tok, args.data, "val", args.val_images)
        rows.append((folder, {k: probe(train_x[k], train_y, val_x[k], val_y) for k in train_x}))
    keys = list(rows[0][1])
    print("| tokenizer | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for folder, accs in rows:
        print(f"| {folder} | " + " | ".join(f"{accs[k]:.3f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
