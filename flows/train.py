"""The training phases: Kelix-Tok (tokenizer-1..3), the unified LLM (llm-1..4) and the DiT (aedit, dit-1, dit-2).

Each is a flow over the catalogue's stages of one config section, so one phase can be run (or deployed) on its
own; stages that are already finished for their key are skipped, so running a phase again is cheap.
"""
from __future__ import annotations

from typing import Any

import flows  # noqa: F401  - environment defaults before Prefect is imported
from prefect import flow

from flows.common import Context, RunSettings, run_stages, section_stages


def _train(section: str, settings: RunSettings) -> dict[str, dict[str, Any]]:
    ctx = Context(settings)
    with ctx.parent_run(f"train-{section}") as parent:
        return run_stages(ctx, section_stages(section), parent)


@flow(name="train-tokenizer")
def train_tokenizer(settings: RunSettings = RunSettings()) -> dict[str, dict[str, Any]]:
    """Kelix-Tok: codebook alignment, multi-task pre-training, annealing."""
    return _train("tokenizer", settings)


@flow(name="train-llm")
def train_llm(settings: RunSettings = RunSettings()) -> dict[str, dict[str, Any]]:
    """The unified NBP LLM: alignment, unification, annealing, SFT (needs the tokenizer)."""
    return _train("llm", settings)


@flow(name="train-dit")
def train_dit(settings: RunSettings = RunSettings()) -> dict[str, dict[str, Any]]:
    """The diffusion detokenizer: AE-DiT reconstruction, DiT pre-training and SFT (needs tokenizer and LLM)."""
    return _train("dit", settings)
