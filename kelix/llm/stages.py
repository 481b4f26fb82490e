"""The four LLM stages of the Kelix report (catalogue entries llm-1..4 in kelix/stages/catalogue.py).

  llm-1 align    cross-modal alignment: only the Block Decoder, the LM head and the visual embedding
                 projection (with the image position embedding) train; Qwen3 (layers, text embeddings) is frozen.
  llm-2 unify    the projected visual rows are folded into Qwen3's one embedding table and every parameter
                 trains on understanding (VQA, captioning) + generation + interleaved sequences.
  llm-3 anneal   the cleanest subset, the rate decaying from its peak (train3: no warmup, cosine).
  llm-4 sft      instruction-style data: VQA answers, prompt -> image.

The tokenizer is frozen throughout: images are encoded once (corpus.py). Each stage trains with the shared
loop (checkpoints under out_dir, so a crash resumes), saves `model/` and the text tokenizer it used, and
returns validation metrics (evaluate.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kelix.llm.corpus import Mixture, Split, load_splits, min_gap_cells
from kelix.llm.evaluate import teacher_forced_losses, vqa_accuracy
from kelix.llm.loss import bucketed_nbp_loss
from kelix.llm.model import KelixLLM
from kelix.llm.sequences import SequenceBuilder
from kelix.text import TextTokenizer
from kelix.train import distributed
from kelix.train.loop import train

TOKENIZER_STAGE = "tokenizer-3"


def set_trainable(llm: KelixLLM, stage: int) -> list[nn.Parameter]:
    """Freeze what `stage` keeps fixed; returns the parameters it trains."""
    if stage == 1:
        if llm.block_encoder.folded:
            raise ValueError("stage 1 trains the visual projection, but this model's visual rows are already folded")
        llm.requires_grad_(False)
        # The block encoder holds the visual projection (and the image position embedding, also new); the
        # answer prior (llm.answer_prior: on in tiny, off in small and paper) is new too.
        for part in (llm.block_decoder, llm.lm.lm_head, llm.block_encoder, llm.answer_prior):
            if part is not None:
                part.requires_grad_(True)
    else:
        llm.requires_grad_(True)
    return [p for p in llm.parameters() if p.requires_grad]


def build_model(ctx, stage: int, tokenizer, text_tok: TextTokenizer) -> KelixLLM:
    cfg = ctx.cfg.llm
    if stage == 1:
        # Frozen weights are not in stage checkpoints: their random init must be a function of the seed.
        torch.manual_seed(cfg.train1.seed)
        llm = KelixLLM.from_config(cfg, tokenizer.num_codebooks, tokenizer.codebook_size, text_tok.vocab_size,
                                   tokenizer.codebook_vectors().cpu(), num_positions=tokenizer.num_positions)
    else:
        llm = KelixLLM.from_pretrained(ctx.input(f"llm-{stage - 1}") / "model")
        llm.fold_visual_embeddings()  # stage 2 folds; later stages load already-folded models
    return llm.to(ctx.device)


def clean_subset(split: Split, min_gap: float, cell: float) -> Split:
    """Records whose objects stay `min_gap` token cells apart: no two objects crowd one position's codes."""
    keep = [i for i, rec in enumerate(split.records) if min_gap_cells(rec, cell) >= min_gap]
    return split.subset(keep) if keep else split


def text_tokenizer(cfg, tok_dir: Path) -> TextTokenizer:
    """The LLM's text tokenizer: a pretrained Qwen3's own (its ids index the checkpoint's embedding rows), else
    the BPE the tokenizer stage trained on the dataset."""
    return TextTokenizer.from_checkpoint(cfg.pretrained) if cfg.pretrained else TextTokenizer.load(tok_dir)


def run(ctx, stage: int) -> dict[str, float]:
    from kelix.tokenizer.model import KelixTokenizer

    cfg = ctx.cfg.llm
    tcfg = getattr(cfg, f"train{stage}")
    tok_dir = ctx.input(TOKENIZER_STAGE)
    tokenizer = KelixTokenizer.from_pretrained(tok_dir / "model", map_location=ctx.device)
    text_tok = text_tokenizer(cfg, tok_dir)
    reuse = (ctx.input(f"llm-{stage - 1}"),) if stage > 1 else ()
    splits = load_splits(ctx.data_dir, tokenizer, tok_dir / "model", ctx.out_dir, ctx.device, reuse_from=reuse)
    llm = build_model(ctx, stage, tokenizer, text_tok)
    params = set_trainable(llm, stage)

    train_split = splits["train"]
    if stage == 3:
        grid = int(round(tokenizer.num_positions ** 0.5))
        train_split = clean_subset(train_split, cfg.anneal_min_gap, tokenizer.cfg.image_size / grid)
    g = cfg.generation_fraction
    inter = cfg.interleaved_fraction if stage == 2 else 0.0
    cap = (1.0 - g - inter) * (cfg.caption_fraction if stage < 4 else 0.0)
    mixture = Mixture(SequenceBuilder.for_model(llm, text_tok), train_split, tcfg.batch_size, tcfg.seed,
                      understanding=1.0 - g - inter - cap, captioning=cap, generation=g, interleaved=inter,
                      caption_dropout=cfg.caption_dropout, prompt_only=stage == 4, max_blocks=cfg.max_blocks,
                      questions=cfg.questions_per_sequence, extra_spatial=cfg.extra_spatial_questions,
                      extra_attributes=cfg.extra_attribute_questions, extra_positions=cfg.extra_position_questions)
    if llm.answer_prior is not None:
        llm.answer_prior.set_kinds(mixture.question_answers(), mixture.builder.encode)
    device = ctx.device
    # Terms normalised by the global batch's token counts: the same gradient on any number of processes.
    world = distributed.world_size()

    def step_fn(model, batch):
        return bucketed_nbp_loss(model, batch.to(device), cfg.length_buckets, distributed.sum_across_ranks, world)

    # Under FSDP2 each Qwen3 decoder layer is its own unit: an 8B backbone is never gathered whole.
    result = train(llm, [{"params": params}], mixture, step_fn, tcfg, ctx.out_dir, desc=ctx.name,
                   logger=ctx.logger, progress=ctx.progress, fsdp_units=lambda m: m.decoder_layers(),
                   compile_units=(lambda m: m.repeated_blocks()) if ctx.cfg.runtime.compile else None)

    if ctx.is_main:  # under torchrun every rank holds the same weights; one writes them
        llm.save_pretrained(ctx.out_dir / "model")
        text_tok.save(ctx.out_dir)  # the one the model's text ids mean (the BPE's, or the checkpoint's)
    metrics = {f"train_{k}": v for k, v in result.metrics.items()}
    metrics.update(teacher_forced_losses(llm, text_tok, splits["val"], limit=cfg.val_records))
    metrics.update(vqa_accuracy(llm, text_tok, splits["val"], limit=cfg.val_questions))
    metrics.update({"steps": float(result.step), "resumed_from_step": float(result.resumed_from),
                    "train_seconds": result.seconds,
                    "train_examples": float(len(train_split.records)),
                    "trainable_parameters": float(sum(p.numel() for p in params))})
    ctx.logger.log(metrics, result.step)
    return metrics


def align(ctx) -> dict[str, float]:
    return run(ctx, 1)


def unify(ctx) -> dict[str, float]:
    return run(ctx, 2)


def anneal(ctx) -> dict[str, float]:
    return run(ctx, 3)


def sft(ctx) -> dict[str, float]:
    return run(ctx, 4)
