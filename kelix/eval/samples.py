"""What the evaluation asks of the model, chosen deterministically from the test split's records.

Same records in, same items out: the selection depends only on manifest order and the sizes in
`EvalConfig`, so two evaluations of two models are scored on identical questions, prompts and images.
- VQA: every question of the first test records, in order, until `num_vqa` questions (so the held-out
  combinations appear at their test-split rate; a sample too small to include one has no holdout score).
- Generation: the test records' prompts, interleaving 1-, 2- and 3+-object prompts so each GenEval
  category gets its share; the expected objects and relation come from parsing the prompt. A prompt outside
  the shapes grammar (an imported caption) cannot be checked by the detector and is left out; with none left,
  the palette's own prompts are used.
- Reconstruction: the first `num_reconstructions` test images; tokenizer statistics: the first
  `num_tokenizer_images`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True)
class Question:
    record: dict
    q: str
    a: str
    type: str
    holdout: bool

    def as_gold(self) -> dict:
        return {"a": self.a, "type": self.type, "holdout": self.holdout}


@dataclass(frozen=True)
class GenPrompt:
    prompt: str
    objects: list[dict] = field(hash=False)
    relation: str | None
    key: str = ""


def vqa_questions(records: Iterable[dict], limit: int) -> list[Question]:
    out: list[Question] = []
    for rec in records:
        for qa in rec.get("qa", []):
            if len(out) >= limit:
                return out
            out.append(Question(rec, qa["q"], qa["a"], qa.get("type", "other"), bool(rec.get("holdout"))))
    return out


def generation_prompts(records: Iterable[dict], limit: int) -> list[GenPrompt]:
    """Up to `limit` prompts, round-robin over object counts 1, 2 and 3+ (each group in manifest order)."""
    from kelix.data.detector import parse_prompt

    groups: dict[int, list[GenPrompt]] = {1: [], 2: [], 3: []}
    seen: set[str] = set()
    for rec in records:
        text = rec.get("prompt", "")
        if not text or text in seen:
            continue  # a repeated prompt would test the same thing twice
        seen.add(text)
        try:
            objects, relation = parse_prompt(text)
        except ValueError:
            continue  # not in the shapes grammar: nothing the detector could check
        groups[min(len(objects), 3)].append(GenPrompt(text, objects, relation, rec.get("key", "")))
    out: list[GenPrompt] = []
    i = 0
    while len(out) < limit and any(i < len(g) for g in groups.values()):
        for n in (1, 2, 3):
            if i < len(groups[n]) and len(out) < limit:
                out.append(groups[n][i])
        i += 1
    return out


def palette_prompts(limit: int) -> list[GenPrompt]:
    """A prompt set from the shapes palette alone, for data without test prompts (same cycle of forms)."""
    from kelix.data.detector import RELATIONS, parse_prompt
    from kelix.data.shapes import COLOURS, SHAPES

    colours, shapes = list(COLOURS), list(SHAPES)
    out: list[GenPrompt] = []
    k = 0
    while len(out) < limit:
        c = [colours[(k + j) % len(colours)] for j in range(3)]
        s = [shapes[(k + 2 * j) % len(shapes)] for j in range(3)]
        forms = [f"a {c[0]} {s[0]}",
                 f"a {c[0]} {s[0]} {RELATIONS[k % len(RELATIONS)]} a {c[1]} {s[1]}",
                 f"a {c[0]} {s[0]}, a {c[1]} {s[1]} and a {c[2]} {s[2]}"]
        for text in forms:
            if len(out) < limit:
                objects, relation = parse_prompt(text)
                out.append(GenPrompt(text, objects, relation))
        k += 1
    return out


def first_records(records: Iterable[dict], limit: int) -> list[dict]:
    out = []
    for rec in records:
        if len(out) >= limit:
            break
        out.append(rec)
    return out
