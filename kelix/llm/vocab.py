"""The unified LLM's extended vocabulary and its block sequence format (Kelix report, the unified LLM).

Ids, in order:
    [0, T)                       the text tokenizer's vocabulary (kelix.text: 0-2 are <pad> <bos> <eos>)
    [T, T + N*S)                 visual codes: code j of sub-codebook i is `T + i*S + j`
    [T + N*S, T + N*S + 6)       <boi> <eoi> <eob> <gen> <und> <pad>

A sequence is a list of *blocks*; the LLM takes one step per block (the Block Encoder sums a block's token
embeddings into one input vector, <eob> excluded) and the Block Decoder decodes the next block's tokens:
    text block   {token, <eob>}                     one text id or one of <boi> <eoi> <gen> <und>
    image block  {c_0, ..., c_{N-1}, <eob>}         c_i always comes from sub-codebook i

    understanding   <und> <boi> [P image blocks] <eoi> question... answer... <eos> (question answer <eos>)*
    generation      <gen> caption... <boi> [P image blocks] <eoi>     (caption left out for CFG's unconditional)
    interleaved     <boi> [P image blocks] <eoi> caption... <eos> <boi> [P image blocks] <eoi> caption... <eos>

Because the format fixes every block's length (a text block holds one token, an image block N codes), <eob>
is trained as the block's last target but never has to be sampled: decoding appends it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SPECIALS = ("<boi>", "<eoi>", "<eob>", "<gen>", "<und>", "<pad>")
# Fill value of an unused slot in a block tensor [..., N] (a text block uses only slot 0).
EMPTY = -1
# Loss-ignore value of a target slot.
IGNORE = -100


@dataclass(frozen=True)
class Vocab:
    text_size: int
    num_codebooks: int
    codebook_size: int

    @property
    def visual_start(self) -> int:
        return self.text_size

    @property
    def special_start(self) -> int:
        return self.text_size + self.num_codebooks * self.codebook_size

    @property
    def size(self) -> int:
        return self.special_start + len(SPECIALS)

    def special(self, name: str) -> int:
        return self.special_start + SPECIALS.index(name)

    @property
    def boi(self) -> int:
        return self.special("<boi>")

    @property
    def eoi(self) -> int:
        return self.special("<eoi>")

    @property
    def eob(self) -> int:
        return self.special("<eob>")

    @property
    def gen(self) -> int:
        return self.special("<gen>")

    @property
    def und(self) -> int:
        return self.special("<und>")

    @property
    def pad(self) -> int:
        return self.special("<pad>")

    def codebook_range(self, i: int) -> tuple[int, int]:
        """[start, stop) of sub-codebook i's ids: the only ids allowed at slot i of an image block."""
        start = self.visual_start + i * self.codebook_size
        return start, start + self.codebook_size

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Tokenizer codes [..., N] (each in [0, S)) -> vocabulary ids [..., N]."""
        offsets = torch.arange(self.num_codebooks, device=codes.device) * self.codebook_size + self.visual_start
        return codes.long() + offsets

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.num_codebooks, device=ids.device) * self.codebook_size + self.visual_start
        return ids - offsets
