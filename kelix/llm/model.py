"""KelixLLM: a Qwen3 causal LM over blocks, with the Block Encoder in front and the Block Decoder behind.

The backbone is `transformers`' Qwen3ForCausalLM built from a Qwen3Config (random init for the tiny preset,
`from_pretrained(cfg.pretrained)` for real weights, resized to the extended vocabulary of vocab.py). It never
sees token ids: `inputs_embeds` are the Block Encoder's sums, one per block, and its last hidden state h_i
feeds the Block Decoder, whose outputs go through Qwen3's LM head. So the model depends only on
(N, S, the codebook vectors, the text vocabulary size), never on the tokenizer object.

Saved as `model.safetensors` + `kelix_llm.json` (the LLMConfig, the vocabulary shape, whether the visual
rows are folded into the embedding table, the number of image positions).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from kelix.llm.answer_prior import AnswerPrior
from kelix.llm.block_decoder import build_block_decoder
from kelix.llm.block_encoder import BlockEncoder
from kelix.llm.config import LLMConfig
from kelix.llm.vocab import Vocab

CONFIG_NAME = "kelix_llm.json"
WEIGHTS_NAME = "model.safetensors"
# Code width used when no codebook vectors are given (random visual init only).
DEFAULT_CODE_DIM = 32


def qwen3_config(cfg: LLMConfig, vocab_size: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=max(cfg.max_blocks, 2048),
        # Untied: stage 1 trains the LM head while the (Qwen3) embedding table stays frozen.
        tie_word_embeddings=False, use_cache=True,
    )


def group_mask(attention_mask: torch.Tensor | None, groups: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: causal, padding masked, and a block of group k > 0 sees only group 0 and
    group k (sequences.py: question-answer pairs that share one image prefix but never each other)."""
    b, length = groups.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=groups.device).tril()
    visible = (groups[:, None, :] == 0) | (groups[:, None, :] == groups[:, :, None])
    keep = causal & visible
    if attention_mask is not None:
        keep &= attention_mask.bool()[:, None, :]
    keep |= torch.eye(length, dtype=torch.bool, device=groups.device)  # no row without a key (padding)
    return torch.zeros(b, 1, length, length, dtype=dtype, device=groups.device).masked_fill(
        ~keep[:, None], torch.finfo(dtype).min)


class KelixLLM(nn.Module):
    def __init__(self, cfg: LLMConfig, num_codebooks: int, codebook_size: int, text_vocab_size: int,
                 codebook_vectors: torch.Tensor, num_positions: int | None = None,
                 qwen: Qwen3Config | None = None):
        super().__init__()
        self.cfg = cfg
        self.vocab = Vocab(text_vocab_size, num_codebooks, codebook_size)
        self.num_positions = num_positions
        if qwen is not None:
            # Rebuilding a saved model: its weights (pretrained or not) are loaded by the caller.
            self.lm = Qwen3ForCausalLM(qwen)
        elif cfg.pretrained:
            # float32 master weights like every other part (transformers keeps a checkpoint's bf16 otherwise, and
            # the fp32 Block Encoder/Decoder would then meet bf16 tensors outside autocast).
            self.lm = Qwen3ForCausalLM.from_pretrained(cfg.pretrained, dtype=torch.float32)
            if self.lm.config.vocab_size < text_vocab_size:
                raise ValueError(f"{cfg.pretrained} has {self.lm.config.vocab_size} rows, the text tokenizer {text_vocab_size}")
            # Untie before resizing, and give the head a parameter of its own: the small Qwen3s tie lm_head to
            # embed_tokens, and a shared Parameter would let stage 1 train the frozen embeddings through the head
            # (and reload untied, so a resumed run would differ from the one in memory).
            self.lm.config.tie_word_embeddings = False
            self.lm.resize_token_embeddings(self.vocab.size)
            head = self.lm.get_output_embeddings()
            if head.weight is self.lm.get_input_embeddings().weight:
                head.weight = torch.nn.Parameter(head.weight.detach().clone())
        else:
            self.lm = Qwen3ForCausalLM(qwen3_config(cfg, self.vocab.size))
        hidden = self.lm.config.hidden_size
        self.block_encoder = BlockEncoder(self.vocab, hidden, codebook_vectors, init_std=self.lm.config.initializer_range,
                                          num_positions=num_positions if cfg.image_position_embed else None)
        self.block_decoder = build_block_decoder(
            cfg.block_decoder, hidden, cfg.bd_hidden_size, cfg.bd_num_layers, cfg.bd_num_heads,
            cfg.bd_intermediate_size, block_len=num_codebooks + 1)
        # A second expert on answers (answer_prior.py): trained beside the LLM; decoding reads its kind of answer.
        self.answer_prior = AnswerPrior(self.vocab.size) if cfg.answer_prior else None

    # ---- construction and persistence ----

    @classmethod
    def from_config(cls, llm_cfg: LLMConfig, num_codebooks: int, codebook_size: int, text_vocab_size: int,
                    codebook_vectors: torch.Tensor | None = None, num_positions: int | None = None) -> "KelixLLM":
        """A fresh model. `codebook_vectors` [N, S, code_dim] are the tokenizer's (projected) codes; with
        `visual_embed_init=random` they only give the shape and random vectors of that shape are used."""
        if llm_cfg.visual_embed_init not in ("codebook", "random"):
            raise ValueError(f"llm.visual_embed_init must be 'codebook' or 'random', got {llm_cfg.visual_embed_init!r}")
        if codebook_vectors is None and llm_cfg.visual_embed_init == "codebook":
            raise ValueError("visual_embed_init=codebook needs the tokenizer's codebook_vectors()")
        if llm_cfg.visual_embed_init == "random":
            dim = codebook_vectors.shape[-1] if codebook_vectors is not None else DEFAULT_CODE_DIM
            codebook_vectors = torch.randn(num_codebooks, codebook_size, dim)
        return cls(llm_cfg, num_codebooks, codebook_size, text_vocab_size, codebook_vectors, num_positions)

    def meta(self) -> dict:
        v = self.vocab
        return {"llm": dataclasses.asdict(self.cfg), "num_codebooks": v.num_codebooks, "codebook_size": v.codebook_size,
                "text_vocab_size": v.text_size, "num_positions": self.num_positions,
                "folded": self.block_encoder.folded, "code_dim": self._code_dim, "qwen3": self.lm.config.to_dict()}

    @property
    def _code_dim(self) -> int | None:
        return None if self.block_encoder.folded else int(self.block_encoder.codebook.shape[-1])

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # Independent contiguous copies: safetensors refuses shared storage.
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps(self.meta(), indent=1))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> "KelixLLM":
        from kelix.config import coerce

        folder = Path(folder)
        if not (folder / CONFIG_NAME).exists():
            raise FileNotFoundError(f"no KelixLLM at {folder} ({CONFIG_NAME} missing)")
        meta = json.loads((folder / CONFIG_NAME).read_text())
        # Saved before the answer prior existed: such a model has none (the field's default is on now).
        cfg = coerce({"answer_prior": False, **meta["llm"]}, LLMConfig, "llm")
        n, s = meta["num_codebooks"], meta["codebook_size"]
        placeholder = torch.zeros(n, s, meta["code_dim"] or DEFAULT_CODE_DIM)
        qwen = Qwen3Config.from_dict(meta["qwen3"])
        model = cls(cfg, n, s, meta["text_vocab_size"], placeholder, meta.get("num_positions"), qwen=qwen)
        if meta["folded"]:
            model.fold_visual_embeddings()
        state = load_file(folder / WEIGHTS_NAME, device=str(map_location))
        if model.answer_prior is not None:  # saved before answer kinds existed: none, decoding reads the whole prior
            state.setdefault("answer_prior.kind", model.answer_prior.kind)
        model.load_state_dict(state)
        return model.to(map_location)

    # ---- the pieces inference and training use ----

    @property
    def device(self) -> torch.device:
        return self.lm.lm_head.weight.device

    def fold_visual_embeddings(self) -> None:
        """Stage 2: one embedding table; the visual projection is gone from here on."""
        self.block_encoder.fold(self.lm.model.embed_tokens)

    def decoder_layers(self) -> list[nn.Module]:
        """Qwen3's decoder layers: every forward runs each exactly once (a sharding unit for data parallelism)."""
        return list(self.lm.model.layers)

    def repeated_blocks(self) -> list[nn.Module]:
        """What torch.compile gets while training (runtime.compile): every decoder layer and the Block Decoder."""
        return [*self.decoder_layers(), self.block_decoder]

    def embedding_table(self) -> torch.Tensor:
        return self.block_encoder.table(self.lm.model.embed_tokens.weight)

    def hidden_states(self, blocks: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache=None, table: torch.Tensor | None = None,
                      image_pos: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> torch.Tensor:
        """blocks [B, L, N] (EMPTY-filled ids), image_pos [B, L], groups [B, L] (sequences.py)
        -> Qwen3's last hidden states [B, L, hidden]; one step per block."""
        table = self.embedding_table() if table is None else table
        embeds = self.block_encoder(blocks, table, image_pos)
        if groups is not None and bool((groups > 0).any()):
            attention_mask = {"full_attention": group_mask(attention_mask, groups, embeds.dtype)}
        out = self.lm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def logits(self, out: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The shared LM head restricted to vocabulary ids [start, stop)."""
        return F.linear(out, self.lm.lm_head.weight[start:stop])
