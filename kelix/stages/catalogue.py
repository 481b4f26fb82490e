"""The stage catalogue: what each stage reads, which config it depends on, the function that runs it, and the
context that function is handed."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kelix.config import KelixConfig
from kelix.dit.config import AE_OVERRIDES
from kelix.runtime_config import Resources
from kelix.train.metrics import MetricLogger


@dataclass(frozen=True)
class Stage:
    name: str
    section: str
    entry: str  # "module:function"
    inputs: tuple[str, ...] = ()
    # The TrainConfig field of the section this stage trains with; the others are left out of its key.
    train_field: str | None = None
    description: str = ""
    # Other fields of the section this stage never reads, left out of its key so changing them does not rerun it.
    ignores: tuple[str, ...] = ()

    def function(self) -> Callable[["StageContext"], dict[str, float]]:
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("tokenizer-1", "tokenizer", "kelix.tokenizer.stages:align", (), "train1",
          "codebook alignment on captions: adapter + SimVQ projections train; ViT and aux LLM frozen"),
    Stage("tokenizer-2", "tokenizer", "kelix.tokenizer.stages:pretrain", ("tokenizer-1",), "train2",
          "multi-task pre-training (captions + VQA), everything unfrozen, ViT at a lower rate"),
    Stage("tokenizer-3", "tokenizer", "kelix.tokenizer.stages:anneal", ("tokenizer-2",), "train3",
          "annealing on instruction-style data (VQA) with a decaying rate"),
    Stage("llm-1", "llm", "kelix.llm.stages:align", ("tokenizer-3",), "train1",
          "cross-modal alignment: Block Decoder, LM head, visual projection; Qwen3 frozen"),
    Stage("llm-2", "llm", "kelix.llm.stages:unify", ("llm-1", "tokenizer-3"), "train2",
          "unified embedding table, all parameters, understanding + generation"),
    Stage("llm-3", "llm", "kelix.llm.stages:anneal", ("llm-2", "tokenizer-3"), "train3",
          "annealing on the cleanest subset"),
    Stage("llm-4", "llm", "kelix.llm.stages:sft", ("llm-3", "tokenizer-3"), "train4",
          "SFT on instruction-style data"),
    Stage("aedit", "dit", "kelix.dit.stages:aedit", ("tokenizer-3",), "train_ae",
          "AE-DiT: reconstruct images from the tokenizer's quantized embeddings",
          (*AE_OVERRIDES.values(), "sft_fraction")),
    Stage("dit-1", "dit", "kelix.dit.stages:pretrain", ("tokenizer-3", "llm-4"), "train1",
          "DiT pre-training conditioned on the LLM's hidden states (teacher forcing)",
          (*AE_OVERRIDES, "sft_fraction")),
    Stage("dit-2", "dit", "kelix.dit.stages:sft", ("dit-1", "tokenizer-3", "llm-4"), "train2",
          "DiT SFT on the detector-curated subset", tuple(AE_OVERRIDES)),
    Stage("eval", "eval", "kelix.eval.stage:evaluate", ("tokenizer-3", "llm-4", "dit-2", "aedit"), None,
          "understanding, generation, reconstruction and tokenizer metrics"),
)}

ORDER = tuple(STAGES)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(ORDER)}")
    return STAGES[name]


def upstream(name: str) -> list[str]:
    """Every stage `name` depends on, in catalogue order."""
    seen: set[str] = set()

    def visit(n: str) -> None:
        for dep in STAGES[n].inputs:
            if dep not in seen:
                seen.add(dep)
                visit(dep)

    visit(name)
    return [n for n in ORDER if n in seen]


def downstream(name: str) -> list[str]:
    return [n for n in ORDER if name in upstream(n)]


def stage_resources(cfg: KelixConfig, name: str) -> Resources:
    return cfg.runtime.resources.get(name, cfg.runtime.default_resources)


@dataclass
class StageContext:
    """Everything a stage function gets: config, data, its inputs' and its own folders."""

    name: str
    cfg: KelixConfig
    data_dir: Path
    inputs: dict[str, Path]
    out_dir: Path
    device: torch.device
    key: str = ""
    logger: MetricLogger = field(default_factory=MetricLogger)
    progress: bool = True
    # False on every torchrun rank but 0: only the main process writes final outputs.
    is_main: bool = True

    def input(self, name: str) -> Path:
        if name not in self.inputs:
            raise KeyError(f"stage {self.name} has no input {name!r}; it reads {sorted(self.inputs)}")
        return self.inputs[name]
