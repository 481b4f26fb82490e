"""Text for the aux decoder: per image one packed sequence of segments after the image prefix.

Segments are <bos> caption <eos> (loss on every caption token) and <bos> question answer <eos> (loss on the
answer and <eos> only: the question is given). Every question of an image rides in the same sequence each
step (DESIGN.md section 4 lever) but each segment attends only to the image prefix and to itself and restarts
its positions right after the prefix, so training sees exactly what evaluation asks (one question alone after
its image) and "Is there a red star? yes" cannot leak into the next answer. Packing costs one image prefix
per image instead of one per question.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kelix.text import TextTokenizer

IGNORE = -100


@dataclass
class Packed:
    """Right-padded text of a batch; targets are aligned with positions (the token to predict there)."""

    ids: torch.Tensor  # [B, L]
    caption_targets: torch.Tensor  # [B, L]
    qa_targets: torch.Tensor  # [B, L]
    segments: torch.Tensor  # [B, L], 0 = padding, 1.. = segment number
    positions: torch.Tensor  # [B, L], position inside the segment (0 = its <bos>)

    def to(self, device) -> "Packed":
        return Packed(*(t.to(device) for t in (self.ids, self.caption_targets, self.qa_targets, self.segments,
                                               self.positions)))


class TextRows:
    def __init__(self, records: list[dict], text_tok: TextTokenizer, max_len: int):
        self.tok = text_tok
        self.max_len = max_len
        self.captions = [text_tok.encode(r.get("caption", ""))[: max_len - 2] for r in records]
        self.qas: list[list[tuple[list[int], list[int], str, str]]] = []
        for rec in records:
            pairs = rec.get("qa", [])
            qs = text_tok.encode_batch([p["q"] for p in pairs]) if pairs else []
            ans = text_tok.encode_batch([p["a"] for p in pairs]) if pairs else []
            self.qas.append([(q[: max_len - 2 - len(a)], a, p["a"], p.get("type", "")) for q, a, p in zip(qs, ans, pairs)])

    def packed(self, indices, caption: bool = True, qa: bool = True) -> Packed:
        bos, eos = self.tok.bos_id, self.tok.eos_id
        seqs = []  # per image: list of (tokens, first trained index, kind)
        for i in indices:
            segs = [([bos, *self.captions[i], eos], 1, "caption")] if caption else []
            if qa:
                segs += [([bos, *q, *a, eos], 1 + len(q), "qa") for q, a, _, _ in self.qas[i]]
            seqs.append(segs)
        width = max(1, max(sum(len(s[0]) for s in segs) for segs in seqs))
        b = len(seqs)
        ids = torch.full((b, width), self.tok.pad_id, dtype=torch.long)
        targets = {k: torch.full((b, width), IGNORE, dtype=torch.long) for k in ("caption", "qa")}
        segments = torch.zeros((b, width), dtype=torch.long)
        positions = torch.zeros((b, width), dtype=torch.long)
        for r, segs in enumerate(seqs):
            start = 0
            for n, (toks, first, kind) in enumerate(segs, start=1):
                end = start + len(toks)
                ids[r, start:end] = torch.tensor(toks)
                segments[r, start:end] = n
                positions[r, start:end] = torch.arange(len(toks))
                # The token at segment index j+1 is predicted at index j; trained from `first` on.
                targets[kind][r, start + first - 1: end - 1] = torch.tensor(toks[first:])
                start = end
        return Packed(ids, targets["caption"], targets["qa"], segments, positions)

    def questions(self, indices) -> list[tuple[int, list[int], str, str]]:
        """(image row, <bos>+question ids, answer text, type) of every question, for greedy evaluation."""
        return [(j, [self.tok.bos_id, *q], a, t) for j, i in enumerate(indices) for q, _, a, t in self.qas[i]]
