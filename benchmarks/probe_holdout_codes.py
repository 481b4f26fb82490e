"""Do the tokenizer's codes generalise to colour-shape pairs held out of training? A probe, object by object.

The shapes data keeps some colour-shape pairs (`data.holdout_combinations`: red triangle, blue star) out of
train and val; they appear only in test. For every object, an MLP trained on the train split's objects names its
shape and its colour from the tokenizer's output over the 3 x 3 merged positions around the object's centre;
it is scored on test objects of seen pairs and of held-out pairs separately. `quantized` reads the pooled code
embeddings (what the LLM and the AE-DiT get), `continuous` the adapter's features before quantization.

    .venv/bin/python benchmarks/probe_holdout_codes.py artifacts/tokenizer-3/<key>/model [more models]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kelix.config import load_config  # noqa: E402
from kelix.data.reader import load_split  # noqa: E402
from kelix.data.shapes import COLOURS, SHAPES, parse_combination  # noqa: E402
from kelix.tokenizer.model import KelixTokenizer  # noqa: E402

ATTRIBUTES = {"shape": list(SHAPES), "colour": list(COLOURS)}


@torch.no_grad()
def object_features(tok: KelixTokenizer, data: str, split: str, limit: int, held: set) -> tuple[dict, dict, torch.Tensor]:
    """({source: [objects, 9*D]}, {attribute: labels [objects]}, held-out flags [objects])."""
    records, images = load_split(data, split, tok.cfg.image_size, limit=limit)
    g = tok.cfg.grid
    feats: dict[str, list[torch.Tensor]] = {"quantized": [], "continuous": []}
    labels: dict[str, list[int]] = {a: [] for a in ATTRIBUTES}
    flags = []
    for start in range(0, len(records), 256):
        x = images[start:start + 256].float() / 255
        sources = {"quantized": tok.embed(tok.encode(x)), "continuous": tok.encoder(x)}
        for b, rec in enumerate(records[start:start + 256]):
            for obj in rec["objects"]:
                cx, cy = min(int(obj["x"] * g), g - 1), min(int(obj["y"] * g), g - 1)
                around = [min(max(cy + dy, 0), g - 1) * g + min(max(cx + dx, 0), g - 1)
                          for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
                for name, f in sources.items():
                    feats[name].append(f[b, around].flatten())
                for a, values in ATTRIBUTES.items():
                    labels[a].append(values.index(obj[a]))
                flags.append((obj["colour"], obj["shape"]) in held)
    return ({k: torch.stack(v) for k, v in feats.items()}, {a: torch.tensor(v) for a, v in labels.items()},
            torch.tensor(flags))


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, classes: int,
          epochs: int = 300) -> torch.Tensor:
    """Per test object, whether a one-hidden-layer MLP (full batch, standardised features) names it right."""
    torch.manual_seed(0)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizers", nargs="+", help="tokenizer model folders (a stage's out_dir/model)")
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    held = {parse_combination(c) for c in load_config("tiny").data.holdout_combinations}
    print("| tokenizer | source | shape seen | shape held-out | colour seen | colour held-out |")
    print("|---|---|---:|---:|---:|---:|")
    for folder in args.tokenizers:
        tok = KelixTokenizer.from_pretrained(folder)
        train_x, train_y, _ = object_features(tok, args.data, "train", args.train_images, held)
        test_x, test_y, flags = object_features(tok, args.data, "test", args.test_images, held)
        for source in train_x:
            cells = []
            for a, values in ATTRIBUTES.items():
                right = probe(train_x[source], train_y[a], test_x[source], len(values)) == test_y[a]
                cells += [f"{float(right[~flags].float().mean()):.3f}", f"{float(right[flags].float().mean()):.3f}"]
            print(f"| {folder} | {source} | {' | '.join(cells)} |", flush=True)
    print(f"({int(flags.sum())} held-out and {int((~flags).sum())} seen test objects)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
