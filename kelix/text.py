"""The text tokenizer shared by the aux decoder and the unified LLM: a byte-level BPE trained on the data.

No hub download: it is trained (deterministically, in about a second) on the dataset's captions, questions,
answers and prompts, saved as `text_tokenizer.json` beside the model that uses it. Ids 0-2 are <pad>, <bos>,
<eos>; the unified LLM appends its visual and block tokens after `vocab_size`. A unified LLM started from a
pretrained Qwen3 (`llm.pretrained`) uses that checkpoint's own `tokenizer.json` instead, so each text id keeps
the embedding row it was trained with.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = [PAD, BOS, EOS]
FILENAME = "text_tokenizer.json"
# A pretrained LLM's own tokenizer (`llm.pretrained`: its ids index its embedding rows) names its special tokens
# differently; they are found by these names, first match wins (Qwen3: <|endoftext|>, <|im_start|>, <|im_end|>).
# pad and eos must differ: decoding bans pad, so a pad that is also eos would never let an answer end.
SPECIAL_NAMES = {"pad": (PAD, "<|endoftext|>"), "bos": (BOS, "<|im_start|>"), "eos": (EOS, "<|im_end|>")}
CHECKPOINT_FILE = "tokenizer.json"


class TextTokenizer:
    def __init__(self, tok: Tokenizer):
        self.tok = tok
        ids = {}
        for role, names in SPECIAL_NAMES.items():
            found = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
            if not found:
                raise ValueError(f"the text tokenizer has no {role} token (looked for {', '.join(names)})")
            ids[role] = found[0]
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> "TextTokenizer":
        """The tokenizer a pretrained LLM folder ships (`tokenizer.json`, the `tokenizers` format)."""
        path = Path(folder) / CHECKPOINT_FILE
        if not path.exists():
            raise FileNotFoundError(f"{folder} has no {CHECKPOINT_FILE}: a pretrained LLM needs its own tokenizer "
                                    "(its text ids index the checkpoint's embedding rows)")
        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        keep = [i for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id)]
        return self.tok.decode(keep).strip()

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "TextTokenizer":
        path = Path(folder) / FILENAME
        if not path.exists():
            raise FileNotFoundError(f"no text tokenizer at {path}")
        return cls(Tokenizer.from_file(str(path)))


def train_text_tokenizer(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return TextTokenizer(tok)


def dataset_texts(records: Iterable[dict]) -> list[str]:
    """Every piece of text a record carries, in manifest order (deterministic training input)."""
    out: list[str] = []
    for rec in records:
        out.append(rec.get("caption", ""))
        out.append(rec.get("prompt", ""))
        for qa in rec.get("qa", []):
            out.extend([qa["q"], qa["a"]])
    return [t for t in out if t]
