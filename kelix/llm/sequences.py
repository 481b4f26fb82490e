"""Training and prompt sequences in the block format of vocab.py, and their padded batches.

A sequence is a list of segments, each a run of blocks of one kind (text or image) that either is or is not
a training target. Position t of a batch carries block t as input and, when block t+1 is a target, block
t+1's tokens plus <eob> as the Block Decoder's targets:

    understanding   loss on the answers (and their <eos>)          -> text loss, VQA. Every question of an
                    image rides in one sequence, but each question-answer pair is its own attention group:
                    it sees the image prefix and itself, never another pair (whose answers would let the
                    model answer from text instead of the image), and its positions restart after the
                    prefix, so each pair looks exactly like the one-question prompt of inference.
    captioning      loss on the caption, which names every object's colour, shape and relation: the densest
                    supervision of binding attributes to objects that the data has
    generation      loss on the image codes; caption dropped with
                    probability caption_dropout (CFG's unconditional)  -> image-code loss per sub-codebook
    interleaved     loss on everything after the first block (image -> caption -> image -> caption)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kelix.llm.vocab import EMPTY, IGNORE, Vocab
from kelix.text import TextTokenizer

TEXT, IMAGE = 1, 2


@dataclass
class Segment:
    ids: torch.Tensor  # [n, N] block token ids, EMPTY-filled (a text block uses slot 0)
    kind: int  # TEXT | IMAGE
    loss: bool
    group: int = 0  # 0: shared prefix, seen by every later block; k > 0: seen only by group k

    @property
    def positions(self) -> torch.Tensor:
        """Image position of each block (row-major over the tokenizer's grid), -1 for text blocks."""
        n = len(self.ids)
        return torch.arange(n) if self.kind == IMAGE else torch.full((n,), -1, dtype=torch.long)


@dataclass
class Batch:
    blocks: torch.Tensor  # [B, L, N] input block ids
    attention_mask: torch.Tensor  # [B, L] 1 = real block
    targets: torch.Tensor  # [B, L, N+1] next block's ids + <eob>, IGNORE where no loss
    kinds: torch.Tensor  # [B, L] kind of the target block at each position (0 = no target)
    image_pos: torch.Tensor  # [B, L] image position of each input block, -1 for text and padding
    groups: torch.Tensor  # [B, L] attention group (0 = shared prefix)
    position_ids: torch.Tensor  # [B, L] RoPE positions (each group continues from the end of the prefix)

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return (self.blocks, self.attention_mask, self.targets, self.kinds, self.image_pos, self.groups,
                self.position_ids)

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in self._fields()))

    def buckets(self, count: int) -> list["Batch"]:
        """A right-padded batch as up to `count` batches of rows of similar length, shortest first, each cut to
        its own longest row: the same sequences with less padding to compute (a tiny stage-2 batch of 70-210
        blocks pads to about 1.9x its real blocks in one piece, 1.2x in four)."""
        lengths = self.attention_mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        out = []
        for rows in torch.tensor_split(order, min(count, len(order))):
            width = int(lengths[rows].max())
            out.append(Batch(*(t[rows, :width] for t in self._fields())))
        return out


class SequenceBuilder:
    def __init__(self, vocab: Vocab, text_tok: TextTokenizer, question_first: bool = False):
        self.vocab = vocab
        self.text_tok = text_tok
        # Understanding as `<und> question <boi> image <eoi> answer` instead of `<und> <boi> image <eoi> question
        # answer` (llm.question_first): the image's blocks then see the question, so each can mark itself as
        # the object a question names, and the answer needs one hop fewer through the LLM's layers.
        self.question_first = question_first
        self._encoded: dict[str, list[int]] = {}

    @classmethod
    def for_model(cls, llm, text_tok: TextTokenizer) -> "SequenceBuilder":
        """The sequence format `llm` was trained with."""
        return cls(llm.vocab, text_tok, question_first=llm.cfg.question_first)

    def encode(self, text: str) -> list[int]:
        if text not in self._encoded:
            self._encoded[text] = self.text_tok.encode(text)
        return self._encoded[text]

    def text(self, ids: list[int], loss: bool = False, group: int = 0) -> Segment:
        block = torch.full((len(ids), self.vocab.num_codebooks), EMPTY, dtype=torch.long)
        block[:, 0] = torch.tensor(ids, dtype=torch.long)
        return Segment(block, TEXT, loss, group)

    def image(self, codes: torch.Tensor, loss: bool = False, group: int = 0) -> Segment:
        return Segment(self.vocab.codes_to_ids(codes), IMAGE, loss, group)

    # ---- prompts (what inference feeds before decoding) ----

    def image_prefix(self, codes: torch.Tensor) -> list[Segment]:
        v = self.vocab
        return [self.text([v.und, v.boi]), self.image(codes), self.text([v.eoi])]

    def question_text(self, question: str) -> list[int]:
        """The text ids of a question's group before its answer: what the answer prior reads at the answer's first
        token, in training (`answer_prior.question_bags`) and in decoding alike."""
        v = self.vocab
        return self.encode(question) + ([v.boi, v.eoi] if self.question_first else [])

    def understanding_prompt(self, codes: torch.Tensor, question: str) -> list[Segment]:
        if self.question_first:
            return [self.text([self.vocab.und])] + self._question_image(codes, question, group=0)
        return self.image_prefix(codes) + [self.text(self.encode(question))]

    def _question_image(self, codes: torch.Tensor, question: str, group: int) -> list[Segment]:
        v = self.vocab
        return [self.text(self.encode(question) + [v.boi], group=group), self.image(codes, group=group),
                self.text([v.eoi], group=group)]

    def generation_prompt(self, text: str) -> list[Segment]:
        """<gen> text <boi>; an empty text is the unconditional prompt of classifier-free guidance."""
        v = self.vocab
        return [self.text([v.gen] + (self.encode(text) if text else []) + [v.boi])]

    # ---- training sequences ----

    def understanding(self, codes: torch.Tensor, qa: list[tuple[str, str]]) -> list[Segment]:
        """One image's questions, each answer seeing the image and its own question only (a group each):
        after a shared image prefix, or (question_first) each question with its own copy of the image."""
        segs = [self.text([self.vocab.und])] if self.question_first else self.image_prefix(codes)
        for group, (q, a) in enumerate(qa, start=1):
            asked = (self._question_image(codes, q, group) if self.question_first
                     else [self.text(self.encode(q), group=group)])
            segs += asked + [self.text(self.encode(a) + [self.text_tok.eos_id], loss=True, group=group)]
        return segs

    def captioning(self, codes: torch.Tensor, caption: str) -> list[Segment]:
        return self.image_prefix(codes) + [self.text(self.encode(caption) + [self.text_tok.eos_id], loss=True)]

    def generation(self, text: str, codes: torch.Tensor) -> list[Segment]:
        return self.generation_prompt(text) + [self.image(codes, loss=True)]

    def interleaved(self, items: list[tuple[torch.Tensor, str]]) -> list[Segment]:
        v, eos = self.vocab, self.text_tok.eos_id
        segs: list[Segment] = []
        for codes, caption in items:
            segs += [self.text([v.boi], loss=bool(segs)), self.image(codes, loss=True),
                     self.text([v.eoi] + self.encode(caption) + [eos], loss=True)]
        return segs


def _positions(segs: list[Segment]) -> torch.Tensor:
    """RoPE positions: the prefix counts up; every group continues from the end of the prefix before it."""
    out, base, used = [], 0, {}
    for s in segs:
        n = len(s.ids)
        start = base if s.group == 0 else base + used.get(s.group, 0)
        out.append(torch.arange(start, start + n))
        if s.group == 0:
            base += n
        else:
            used[s.group] = used.get(s.group, 0) + n
    return torch.cat(out)


def _flatten(segs: list[Segment], vocab: Vocab) -> tuple[torch.Tensor, ...]:
    """(ids [L, N], next-block targets [L, N+1], target kinds [L], image positions [L], groups [L],
    RoPE positions [L]) of one sequence."""
    ids = torch.cat([s.ids for s in segs])
    kinds = torch.cat([torch.full((len(s.ids),), s.kind if s.loss else 0, dtype=torch.long) for s in segs])
    n = vocab.num_codebooks
    block_targets = torch.full((len(ids), n + 1), IGNORE, dtype=torch.long)
    block_targets[:, :n] = ids.masked_fill(ids == EMPTY, IGNORE)
    # <eob> closes each block, right after its last real token.
    lengths = (ids != EMPTY).sum(1)
    block_targets[torch.arange(len(ids)), lengths] = vocab.eob
    targets = torch.full_like(block_targets, IGNORE)
    target_kinds = torch.zeros_like(kinds)
    targets[:-1] = torch.where(kinds[1:, None] > 0, block_targets[1:], IGNORE)
    target_kinds[:-1] = kinds[1:]
    groups = torch.cat([torch.full((len(s.ids),), s.group, dtype=torch.long) for s in segs])
    return ids, targets, target_kinds, torch.cat([s.positions for s in segs]), groups, _positions(segs)


def collate(sequences: list[list[Segment]], vocab: Vocab, left_pad: bool = False, max_blocks: int | None = None) -> Batch:
    """Pad sequences to one length: right padding for training, left padding for decoding (so every row's
    next block goes at the same column). Sequences longer than max_blocks keep their first max_blocks."""
    flat = [_flatten(s, vocab) for s in sequences]
    if max_blocks:
        flat = [tuple(t[:max_blocks] for t in f) for f in flat]
    length = max(len(f[0]) for f in flat)
    b, n = len(flat), vocab.num_codebooks
    blocks = torch.full((b, length, n), EMPTY, dtype=torch.long)
    blocks[..., 0] = vocab.pad
    mask = torch.zeros(b, length, dtype=torch.long)
    targets = torch.full((b, length, n + 1), IGNORE, dtype=torch.long)
    kinds = torch.zeros(b, length, dtype=torch.long)
    image_pos = torch.full((b, length), -1, dtype=torch.long)
    groups = torch.zeros(b, length, dtype=torch.long)
    position_ids = torch.zeros(b, length, dtype=torch.long)
    for i, (ids, tgt, kd, img, grp, pos) in enumerate(flat):
        cols = slice(length - len(ids), length) if left_pad else slice(0, len(ids))
        blocks[i, cols], targets[i, cols], kinds[i, cols], image_pos[i, cols] = ids, tgt, kd, img
        groups[i, cols], position_ids[i, cols] = grp, pos
        mask[i, cols] = 1
    return Batch(blocks, mask, targets, kinds, image_pos, groups, position_ids)
