"""Where a trained LLM's test answers go wrong on held-out colour-shape pairs, and by how much.

Two tables for each `llm-N` folder, on every question of the test split:
1. accuracy by question type, for images of seen pairs only, and for images with a held-out pair split by
   whether the question names the held-out object or another object of the image;
2. for colour and shape questions, the rank of the right answer's first token among the text ids at the answer
   position, and the median log-probability gap to the top answer when it is not first (scored as decoding
   scores them: with the answer prior where the model has one).

    .venv/bin/python benchmarks/probe_holdout_answers.py --data data/shapes \
        --tokenizer artifacts/tokenizer-3/<key> artifacts/llm-4/<key> [more llm folders]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kelix.data.shapes import parse_combination  # noqa: E402
from kelix.llm.corpus import Split, encode_split  # noqa: E402
from kelix.llm.evaluate import normalise, predict, questions  # noqa: E402
from kelix.llm.inference import _LLMStepper, answer_scores  # noqa: E402
from kelix.llm.model import KelixLLM  # noqa: E402
from kelix.llm.sequences import SequenceBuilder, collate  # noqa: E402
from kelix.text import TextTokenizer  # noqa: E402
from kelix.tokenizer.model import KelixTokenizer  # noqa: E402


def named_object(record: dict, question: str, kind: str) -> dict | None:
    """The object a colour, shape or exists question is about (colours and shapes are distinct per image)."""
    for o in record["objects"]:
        if (kind == "colour" and o["shape"] in question) or (kind == "shape" and o["colour"] in question) or \
                (kind == "exists" and f"{o['colour']} {o['shape']}" in question):
            return o
    return None


def group_of(record: dict, question: str, kind: str, held: set) -> str:
    if not record.get("holdout"):
        return "seen pairs only"
    o = named_object(record, question, kind) if kind in ("colour", "shape", "exists") else None
    if o is None:
        return "held-out pair in the image, all" if kind in ("count", "spatial") else "held-out pair, other"
    return "held-out pair, about it" if (o["colour"], o["shape"]) in held else "held-out pair, about another object"


@torch.no_grad()
def first_token_ranks(llm: KelixLLM, text_tok: TextTokenizer, split: Split, items: list) -> list[tuple[int, float]]:
    """(rank of the right answer's first token, log-prob gap to the top one) per (record, question, answer)."""
    builder, v, out = SequenceBuilder.for_model(llm, text_tok), llm.vocab, []
    for start in range(0, len(items), 64):
        chunk = items[start:start + 64]
        batch = collate([builder.understanding_prompt(split.codes[i], q) for i, q, _ in chunk], v, left_pad=True)
        _, h = llm.block_decoder.start(_LLMStepper(llm, batch.to(llm.device), llm.embedding_table(), True).h, True)
        logp = answer_scores(llm, h, [builder.question_text(q) for _, q, _ in chunk])
        for (_, _, a), lp in zip(chunk, logp):
            right = builder.encode(a)[0]
            out.append((int((lp > lp[right]).sum()), float(lp.max() - lp[right])))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("llm", nargs="+", help="llm-N output folders (model/ and text_tokenizer.json)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True, help="the tokenizer-3 output folder the LLM was trained on")
    parser.add_argument("--holdout", default="red triangle,blue star", help="the data's held-out pairs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    held = {parse_combination(c.strip()) for c in args.holdout.split(",")}
    tok = KelixTokenizer.from_pretrained(Path(args.tokenizer) / "model")
    test = encode_split(Path(args.data), "test", tok, torch.device("cpu"))
    items = questions(test, 10 ** 9)
    for folder in map(Path, args.llm):
        llm = KelixLLM.from_pretrained(folder / "model").eval()
        text_tok = TextTokenizer.load(folder)
        said = predict(llm, text_tok, test, items)
        right: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for (i, q, a, kind), s in zip(items, said):
            right[group_of(test.records[i], q, kind, held)][kind].append(normalise(s) == normalise(a))
        kinds = sorted({k for g in right.values() for k in g})
        print(f"\n{folder}: accuracy (questions)\n| test questions | " + " | ".join(kinds) + " |")
        print("|---|" + "---:|" * len(kinds))
        for group, by_kind in sorted(right.items()):
            cells = [f"{sum(v) / len(v):.3f} ({len(v)})" if (v := by_kind.get(k)) else "" for k in kinds]
            print(f"| {group} | " + " | ".join(cells) + " |")

        attr = [(n, (i, q, a)) for n, (i, q, a, kind) in enumerate(items) if kind in ("colour", "shape")]
        ranks = first_token_ranks(llm, text_tok, test, [x for _, x in attr])
        table: dict[tuple[str, bool], list[tuple[int, float]]] = defaultdict(list)
        for (n, (i, q, _)), r in zip(attr, ranks):
            kind = items[n][3]
            o = named_object(test.records[i], q, kind)
            table[(kind, o is not None and (o["colour"], o["shape"]) in held)].append(r)
        print("\n| question | about | n | right answer ranked 1st / 2nd / 3rd / lower | median gap when wrong (nats) |")
        print("|---|---|---:|---|---:|")
        for (kind, is_held), rows in sorted(table.items()):
            c = Counter(min(r, 3) for r, _ in rows)
            gaps = [g for r, g in rows if r > 0]
            print(f"| {kind} | {'the held-out object' if is_held else 'an object of a seen pair'} | {len(rows)} | "
                  f"{' / '.join(str(c[k]) for k in range(4))} | {statistics.median(gaps) if gaps else 0:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
