"""What the LLM stages train on: each split's records with its images' codes, and the task mixtures.

The tokenizer is frozen in all four stages, so every image is encoded once: codes go to `codes.safetensors`
in the stage's out_dir (a resumed stage reads them back) and a later stage reuses its input stage's file when
it was made by the same tokenizer weights from the same data. Batches are pure functions of the step
(StepSampler + a generator seeded by (seed, step)), so a resumed run reads exactly the batches it would have.
"""
from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kelix.data.reader import iter_records, load_images
from kelix.data.shapes import attribute_questions, pair_questions, position_questions
from kelix.files import file_sha256, replace_atomically
from kelix.llm.sequences import Batch, SequenceBuilder, collate
from kelix.train.sampler import StepSampler

CODES_FILE = "codes.safetensors"


@dataclass
class Split:
    records: list[dict]
    codes: torch.Tensor  # [R, P, N] tokenizer codes of each record's image

    def subset(self, keep: list[int]) -> "Split":
        return Split([self.records[i] for i in keep], self.codes[keep])


def tokenizer_fingerprint(model_dir: Path) -> str:
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    return hashlib.sha256("".join(p.name + file_sha256(p) for p in files).encode()).hexdigest()[:16]


@torch.no_grad()
def encode_images(tokenizer, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """uint8 [R, 3, H, W] -> codes [R, P, N] (long, on CPU)."""
    tokenizer.eval()
    out = [tokenizer.encode(images[i: i + batch_size].to(device).float().div_(255.0)).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def _read_cache(path: Path, fingerprint: str, splits: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as fh:
        if (fh.metadata() or {}).get("fingerprint") != fingerprint or not set(splits) <= set(fh.keys()):
            return None
        return {s: fh.get_tensor(s) for s in splits}


def encode_split(data_dir: Path, split: str, tokenizer, device: torch.device) -> Split:
    """Records of one split in manifest order and their images' codes."""
    records = list(iter_records(data_dir, split))
    keys, images = load_images(data_dir, split, image_size=tokenizer.cfg.image_size)
    order = {k: i for i, k in enumerate(keys)}
    return Split(records, encode_images(tokenizer, images[[order[r["key"]] for r in records]], device))


def load_splits(data_dir: Path, tokenizer, tokenizer_dir: Path, out_dir: Path, device: torch.device,
                splits: tuple[str, ...] = ("train", "val"), reuse_from: tuple[Path, ...] = ()) -> dict[str, Split]:
    """Records and codes of `splits`, encoding only when no cache (own or an input stage's) holds them."""
    from kelix.stages.keys import data_fingerprint

    fingerprint = f"{tokenizer_fingerprint(tokenizer_dir)}-{data_fingerprint(data_dir)}"
    for folder in (out_dir, *reuse_from):
        codes = _read_cache(Path(folder) / CODES_FILE, fingerprint, splits)
        if codes is not None:
            out = {s: Split(list(iter_records(data_dir, s)), codes[s].long()) for s in splits}
            if folder == out_dir:
                return out
            break
    else:
        out = {s: encode_split(data_dir, s, tokenizer, device) for s in splits}
    out_dir.mkdir(parents=True, exist_ok=True)
    # torchrun ranks encode the same codes side by side: each writes its own temporary file and renames it.
    codes = {s: sp.codes.to(torch.int32).contiguous() for s, sp in out.items()}
    replace_atomically(out_dir / CODES_FILE, lambda tmp: save_file(codes, tmp, metadata={"fingerprint": fingerprint}))
    return out


def min_gap_cells(record: dict, cell: float) -> float:
    """Smallest free space between two objects' boxes, in token cells (inf for a single object)."""
    gaps = [max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3])
            for a, b in itertools.combinations([o["box"] for o in record.get("objects", []) if "box" in o], 2)]
    return min(gaps) / cell if gaps else float("inf")


@dataclass
class Mixture:
    """Training batches of one stage: each example is understanding, generation, interleaved or captioning."""

    builder: SequenceBuilder
    split: Split
    batch_size: int
    seed: int
    understanding: float
    generation: float
    interleaved: float = 0.0
    captioning: float = 0.0
    caption_dropout: float = 0.1
    # Generation text: the short prompt only (SFT), or prompt and caption half and half.
    prompt_only: bool = False
    max_blocks: int | None = None
    # Questions per understanding sequence (0 = all of the record's), drawn in a random order.
    questions: int = 0
    # Spatial questions about other ordered pairs of the record's objects added to each understanding sequence.
    extra_spatial: int = 0
    # Colour and shape questions about other objects of the record, likewise.
    extra_attributes: int = 0
    # Questions on where each object lies (above/below, left/right of the centre), likewise.
    extra_positions: int = 0

    def __post_init__(self):
        self.sampler = StepSampler(len(self.split.records), self.batch_size, self.seed)
        w = np.array([self.understanding, self.generation, self.interleaved, self.captioning], dtype=float)
        self.weights = w / w.sum()

    def example(self, index: int, rng: np.random.Generator):
        rec, codes = self.split.records[index], self.split.codes[index]
        task = rng.choice(4, p=self.weights)
        if task == 0 and not rec.get("qa"):
            task = 3  # no questions (imported data): still image-to-text, not a generation example in disguise
        if task == 3:
            return self.builder.captioning(codes, rec["caption"])
        if task == 0:
            qa = [(x["q"], x["a"]) for x in rec["qa"]]
            order = rng.permutation(len(qa))[: self.questions or None]
            return self.builder.understanding(codes, [qa[i] for i in order] + self.extra_questions(rec, qa, rng))
        if task == 2:
            j = int(rng.integers(len(self.split.records)))
            return self.builder.interleaved([(codes, rec["caption"]), (self.split.codes[j], self.split.records[j]["caption"])])
        use_caption = not self.prompt_only and rng.random() < 0.5
        text = rec["caption"] if use_caption else rec["prompt"]
        if rng.random() < self.caption_dropout:
            text = ""
        return self.builder.generation(text, codes)

    def extra_questions(self, rec: dict, qa: list[tuple[str, str]], rng: np.random.Generator) -> list[tuple[str, str]]:
        """Up to `extra_spatial` questions on pairs of the record's objects and `extra_attributes` on their colours
        and shapes, none that the record's own questions ask. The data asks one question of each kind per image,
        and the relation is the kind a tiny LLM learns last."""
        objects = rec.get("objects") or []
        asked = {q for q, _ in qa}
        out = []
        for count, make in self._extra_makers():
            if count and objects:
                pool = [(x["q"], x["a"]) for x in make(objects) if x["q"] not in asked]
                out += [pool[i] for i in rng.permutation(len(pool))[:count]]
        return out

    def question_answers(self) -> Iterator[tuple[str, str]]:
        """Every (question, answer) this mixture can train on: the records' own and all their extra ones."""
        for rec in self.split.records:
            qa = [(x["q"], x["a"]) for x in rec.get("qa") or []]
            yield from qa
            objects = rec.get("objects") or []
            for count, make in self._extra_makers():
                if count and objects:
                    yield from ((x["q"], x["a"]) for x in make(objects))

    def _extra_makers(self):
        return ((self.extra_spatial, pair_questions), (self.extra_attributes, attribute_questions),
                (self.extra_positions, position_questions))

    def __call__(self, step: int) -> Batch:
        # One generator per slot of the global batch: an example is built the same on any number of processes.
        first = self.sampler.rank_slice.start
        seqs = [self.example(int(i), np.random.default_rng([self.seed, step, first + k]))
                for k, i in enumerate(self.sampler.indices(step))]
        return collate(seqs, self.builder.vocab, max_blocks=self.max_blocks)
