"""Do the tokenizer's codes generalise to colour-shape pairs held out of training? A probe, object by object.

The shapes data keeps some colour-shape pairs (`data.holdout_combinations`: red triangle, blue star) out of
train and val; they appear only in test. For every object, an MLP trained on the train split's objects names its
shape and its colour from the tokenizer's output over the 3 x 3 merged positions around the object's centre
(the MLP of probe_tokenizer_shape.py); it is scored on test objects of seen pairs and of held-out pairs apart.
`quantized` reads the pooled code embeddings (what the LLM and the AE-DiT get), `continuous` the adapter's
features before quantization.

    .venv/bin/python benchmarks/probe_holdout_codes.py artifacts/tokenizer-3/<key>/model [more models]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from probe_tokenizer_shape import fit_predict, positions_of, probe_parser  # noqa: E402  (the script's folder is on the path)

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
                around = positions_of(obj, g)[1]
                for name, f in sources.items():
                    feats[name].append(f[b, around].flatten())
                for a, values in ATTRIBUTES.items():
                    labels[a].append(values.index(obj[a]))
                flags.append((obj["colour"], obj["shape"]) in held)
    return ({k: torch.stack(v) for k, v in feats.items()}, {a: torch.tensor(v) for a, v in labels.items()},
            torch.tensor(flags))


def main(argv: list[str] | None = None) -> int:
    args = probe_parser(__doc__, "test").parse_args(argv)
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
                right = fit_predict(train_x[source], train_y[a], test_x[source], len(values)) == test_y[a]
                cells += [f"{float(right[~flags].float().mean()):.3f}", f"{float(right[flags].float().mean()):.3f}"]
            print(f"| {folder} | {source} | {' | '.join(cells)} |", flush=True)
    print(f"({int(flags.sum())} held-out and {int((~flags).sum())} seen test objects)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
