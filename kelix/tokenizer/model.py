"""KelixTokenizer: images -> N discrete codes per position -> one LLM-width embedding per position.

encoder (SigLIP + 2x2 merge + adapter) -> SimVQ sub-codebooks -> N up-projections -> sum (or mean) pool.
The pooled embedding keeps the LLM sequence at one position per merged patch however large N is (report:
sum pooling beat mean). `quantizer="continuous"` skips quantization (the ablation's upper bound) and so
has no codes: `encode` raises for it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kelix.tokenizer.config import QUANTIZERS, TokenizerConfig
from kelix.tokenizer.encoder import VisionEncoder
from kelix.tokenizer.simvq import SimVQ, layout, normalize
from kelix.train.config import TrainConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def config_from_dict(tree: dict) -> TokenizerConfig:
    names = {f.name for f in dataclasses.fields(TokenizerConfig)}
    unknown = set(tree) - names
    if unknown:
        raise ValueError(f"tokenizer config has unknown keys {sorted(unknown)}")
    # The only mapping-valued fields are schedules (train1..3, aux_warmup, vit_warmup).
    tree = {k: (TrainConfig(**v) if isinstance(v, dict) else v) for k, v in tree.items()}
    return TokenizerConfig(**tree)


class KelixTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig, load_pretrained: bool = True):
        super().__init__()
        if cfg.quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {cfg.quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
        if cfg.pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {cfg.pooling!r}")
        self.cfg = cfg
        self.encoder = VisionEncoder(cfg, load_pretrained)
        kind = "multi" if cfg.quantizer == "continuous" else cfg.quantizer
        self.quantizer = None if cfg.quantizer == "continuous" else SimVQ(
            cfg.quantizer, cfg.num_codebooks, cfg.codebook_size, cfg.code_dim, cfg.base_dim, cfg.beta)
        # One up-projection per part to the LLM width (continuous: same N parts, so only quantization differs).
        _, parts, _, dim = layout(kind, cfg.num_codebooks, cfg.codebook_size, cfg.code_dim)
        self.up = nn.ModuleList(nn.Linear(dim, cfg.embed_dim) for _ in range(parts))

    # ---- construction and persistence ----
    @classmethod
    def from_config(cls, cfg: TokenizerConfig) -> "KelixTokenizer":
        torch.manual_seed(cfg.seed)  # random init is a pure function of the config
        return cls(cfg)

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=1, sort_keys=True))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> "KelixTokenizer":
        folder = Path(folder)
        if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"no Kelix tokenizer at {folder} (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        cfg = config_from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        model = cls(cfg, load_pretrained=False)  # every weight, ViT included, comes from the file
        model.load_state_dict(load_file(folder / WEIGHTS_FILE, device=str(map_location)))
        return model.to(map_location).eval()

    # ---- properties other areas rely on ----
    @property
    def num_codebooks(self) -> int:
        """Codes per position: N for multi/shared, 1 for single (continuous: its N unquantized parts)."""
        return self.quantizer.parts if self.quantizer is not None else self.cfg.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.quantizer.size if self.quantizer else 0

    @property
    def num_positions(self) -> int:
        return self.cfg.num_positions

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    # ---- the model ----
    def _pool(self, parts: torch.Tensor) -> torch.Tensor:
        """[B,P,parts,dim] -> [B,P,embed_dim]: each part up-projected by its own linear, then summed/averaged."""
        out = sum(up(parts[..., i, :]) for i, up in enumerate(self.up))
        return out / len(self.up) if self.cfg.pooling == "mean" else out

    def forward(self, images: torch.Tensor):
        """Training pass -> (embeddings [B,P,E], codes [B,P,N] or None, quant_loss, stats)."""
        z = self.encoder(images)
        if self.quantizer is None:
            parts = normalize(z.view(*z.shape[:-1], self.cfg.num_codebooks, self.cfg.code_dim))
            return self._pool(parts), None, z.new_zeros(()), {}
        quant, codes, loss, stats = self.quantizer(z)
        return self._pool(quant), codes, loss, stats

    def _require_codes(self) -> SimVQ:
        if self.quantizer is None:
            raise ValueError("this tokenizer uses quantizer='continuous' (the ablation's continuous baseline): "
                             "it has no discrete codes; use forward() for its embeddings")
        return self.quantizer

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] float in [0,1] -> LongTensor [B,P,N]; deterministic (eval mode, no grad)."""
        quantizer = self._require_codes()
        was_training = self.training
        self.eval()
        try:
            z = self.encoder(images.to(self.quantizer.proj.device))
            return quantizer.match(quantizer.split(z), quantizer.codes())
        finally:
            self.train(was_training)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B,P,N] -> embeddings [B,P,embed_dim] (what the LLM reads for an image)."""
        quantizer = self._require_codes()
        return self._pool(quantizer.lookup(codes.long().to(quantizer.proj.device)))

    def codebook_vectors(self) -> torch.Tensor:
        """Projected codes [N, S, code_dim] (shared: the one codebook once per part; single: [1, N*S, N*dim])."""
        quantizer = self._require_codes()
        return quantizer._per_part_codes(quantizer.codes()).detach().contiguous()

    def vit_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.vit.parameters())

    def adapter_parameters(self) -> list[nn.Parameter]:
        """What stage 1 trains on the tokenizer side: merge + MLP, SimVQ projections, up-projections."""
        quant = [self.quantizer.proj] if self.quantizer is not None else []
        return [*self.encoder.adapter_parameters(), *quant, *self.up.parameters()]
