"""The three Kelix-Tok training stages (catalogue: tokenizer-1..3 in kelix/stages/catalogue.py).

Each stage loads the train split into memory once, builds or loads the tokenizer and aux decoder, trains with
the shared loop (checkpoints in out_dir/checkpoints, so a crashed stage resumes), saves `model/`, `aux/` and
`text_tokenizer.json` into out_dir and returns validation metrics (kelix/tokenizer/evaluate.py).

    kelix stage run tokenizer-1 --data data/shapes --artifacts artifacts --set tokenizer.train1.num_steps=5
"""
from __future__ import annotations

import dataclasses
import time

import torch

from kelix.text import TextTokenizer, dataset_texts, train_text_tokenizer
from kelix.tokenizer import grounding
from kelix.tokenizer.aux_decoder import AuxDecoder
from kelix.tokenizer.config import TokenizerConfig
from kelix.data.reader import load_split
from kelix.tokenizer.encoder import feature_dim
from kelix.tokenizer.evaluate import evaluate
from kelix.tokenizer.kmeans import init_codebooks
from kelix.tokenizer.model import KelixTokenizer
from kelix.tokenizer.objective import TokenizerTrainer, make_step_fn, param_groups, text_kinds, warmup_step_fn
from kelix.tokenizer.text_rows import TextRows
from kelix.train.loop import train
from kelix.train.metrics import MetricLogger
from kelix.train.sampler import StepSampler

# task -> (its TrainConfig field, the stage whose outputs it starts from)
PLAN = {"align": ("train1", None), "pretrain": ("train2", "tokenizer-1"), "anneal": ("train3", "tokenizer-2")}


def align(ctx) -> dict[str, float]:
    """Stage 1: codebook alignment on captions (adapters + SimVQ projections; ViT and aux LLM frozen)."""
    return run_task(ctx, "align")


def pretrain(ctx) -> dict[str, float]:
    """Stage 2: captions + VQA, everything unfrozen, the ViT at encoder_lr."""
    return run_task(ctx, "pretrain")


def anneal(ctx) -> dict[str, float]:
    """Stage 3: VQA with a decaying rate from stage 2's weights."""
    return run_task(ctx, "anneal")


def _architecture(cfg: TokenizerConfig) -> dict:
    """The config fields that shape the weights (schedules and eval settings excluded)."""
    skip = {"train1", "train2", "train3", "aux_warmup", "vit_warmup", "eval_images", "max_answer_len", "kmeans_iters",
            "kmeans_max_samples", "kmeans_images", "codebook_init", "vit_pretrained", "seed", "beta",
            "adapter_lr_scale"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


@torch.no_grad()
def encoder_features(tokenizer: KelixTokenizer, images: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    """Encoder + adapter features [N, P, D] (on the CPU) of uint8 images, in batches."""
    return torch.cat([tokenizer.encoder(images[i:i + batch].to(device).float().div_(255)).cpu()
                      for i in range(0, images.shape[0], batch)])


@torch.no_grad()
def kmeans_init(tokenizer: KelixTokenizer, images: torch.Tensor, cfg: TokenizerConfig, device) -> None:
    """K-means the base codebooks on encoder+adapter features of a seeded subset of training images."""
    gen = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(images.shape[0], generator=gen)[: cfg.kmeans_images]
    feats = encoder_features(tokenizer, images[pick], device)
    init_codebooks(tokenizer.quantizer, feats, cfg.kmeans_iters, cfg.kmeans_max_samples, cfg.seed)


def warmup_aux(ctx, model: TokenizerTrainer, rows: TextRows, images: torch.Tensor) -> None:
    """Warm up the aux decoder (LM + input projection) on captions and QA read through the frozen tokenizer.

    Stands in for the report's pretrained aux LLM (see TokenizerConfig.aux_warmup). Its own run folder keeps
    its checkpoints apart from the alignment's, so a crash in either phase resumes.
    """
    wcfg = ctx.cfg.tokenizer.aux_warmup
    if wcfg.num_steps <= 0:
        return
    model.requires_grad_(False)
    model.aux.requires_grad_(True)
    sampler = StepSampler(images.shape[0], wcfg.batch_size, seed=wcfg.seed)

    def get_batch(i: int):
        idx = sampler.indices(i)
        return images[idx].to(ctx.device).float().div_(255), rows.packed(idx).to(ctx.device)

    run_dir = ctx.out_dir / "aux_warmup"
    train(model, [{"params": list(model.aux.parameters()), "lr": wcfg.lr}], get_batch, warmup_step_fn, wcfg,
          run_dir, desc=f"{ctx.name} aux warm-up", logger=MetricLogger(run_dir / "metrics.jsonl", prefix="aux_warmup_"),
          progress=ctx.progress)


def warmup_vit(ctx, tokenizer: KelixTokenizer, records: list[dict], images: torch.Tensor) -> dict[str, float]:
    """Grounded warm-up of a randomly initialised tower (see TokenizerConfig.vit_warmup and grounding.py).

    Returns the head's val accuracy per attribute on object positions ({} when skipped). Its own run folder
    keeps its checkpoints apart, so a crash here resumes here."""
    cfg = ctx.cfg.tokenizer
    wcfg = cfg.vit_warmup
    if wcfg.num_steps <= 0 or cfg.vit_pretrained:
        return {}
    vocab = grounding.attribute_vocab(records)
    if any(len(v) < 2 for v in vocab.values()):
        print(f"warning: {ctx.name}: the training records carry no object boxes, so the ViT's grounded warm-up is "
              "skipped; set tokenizer.vit_warmup.num_steps=0 to silence this")
        return {}
    labels = grounding.position_labels(records, vocab, cfg.grid, cfg.image_size)
    torch.manual_seed(cfg.seed + 2)
    factorise = cfg.vit_warmup_factorise and cfg.quantizer == "multi" and cfg.num_codebooks >= 2
    head = grounding.GroundingHead(feature_dim(cfg), vocab, parts=cfg.num_codebooks if factorise else 1)
    model = grounding.GroundingTrainer(tokenizer.encoder, head).to(ctx.device)
    model.requires_grad_(True)
    sampler = StepSampler(images.shape[0], wcfg.batch_size, seed=wcfg.seed)

    def get_batch(i: int):
        idx = sampler.indices(i)
        x, y = images[idx].to(ctx.device).float().div_(255), labels[idx].to(ctx.device)
        if not factorise:
            return x, y
        # Drawn for the global batch and seeded by the step: a resumed warm-up, and any number of processes,
        # draw the same recolourings.
        draws = torch.rand(wcfg.batch_size, 3, generator=torch.Generator().manual_seed(wcfg.seed * 1_000_003 + i))
        return grounding.with_recolourings(x, y, draws[sampler.rank_slice])

    run_dir = ctx.out_dir / "vit_warmup"
    train(model, [{"params": list(model.parameters()), "lr": wcfg.lr}], get_batch, grounding.grounding_step_fn,
          wcfg, run_dir, desc=f"{ctx.name} ViT grounded warm-up",
          logger=MetricLogger(run_dir / "metrics.jsonl", prefix="vit_warmup_"), progress=ctx.progress)
    val_records, val_images = load_split(ctx.data_dir, "val", cfg.image_size, limit=cfg.eval_images or 500)
    val_labels = grounding.position_labels(val_records, vocab, cfg.grid, cfg.image_size)
    feats = encoder_features(tokenizer, val_images, ctx.device).to(ctx.device)
    return {f"vit_warmup_{a}_acc": v for a, v in model.head.accuracy(feats, val_labels.to(ctx.device)).items()}


def build_models(ctx, task: str, records: list[dict], images: torch.Tensor):
    """(tokenizer, aux decoder, text tokenizer, training text rows, metrics of stage 1's ViT warm-up).

    Stage 1 builds them fresh (seeded, K-means-initialised codebooks, warmed-up aux decoder); later stages load
    the previous stage's outputs and check that they were built with this config's architecture.
    """
    cfg = ctx.cfg.tokenizer
    _, source = PLAN[task]
    if source is None:
        text_tok = train_text_tokenizer(dataset_texts(records), cfg.text_vocab_size)
        rows = TextRows(records, text_tok, cfg.max_text_len)
        tokenizer = KelixTokenizer.from_config(cfg).to(ctx.device)
        warm = warmup_vit(ctx, tokenizer, records, images)
        torch.manual_seed(cfg.seed + 1)
        aux = AuxDecoder.from_tokenizer_config(cfg, text_tok.vocab_size).to(ctx.device)
        if cfg.codebook_init not in ("kmeans", "random"):
            raise ValueError(f"tokenizer.codebook_init must be 'kmeans' or 'random', got {cfg.codebook_init!r}")
        if tokenizer.quantizer is not None and cfg.codebook_init == "kmeans":
            kmeans_init(tokenizer, images, cfg, ctx.device)
        warmup_aux(ctx, TokenizerTrainer(tokenizer, aux), rows, images)
        return tokenizer, aux, text_tok, rows, warm
    src = ctx.input(source)
    text_tok = TextTokenizer.load(src)
    tokenizer = KelixTokenizer.from_pretrained(src / "model", map_location=ctx.device)
    if _architecture(tokenizer.cfg) != _architecture(cfg):
        diff = sorted(k for k, v in _architecture(cfg).items() if _architecture(tokenizer.cfg).get(k) != v)
        raise ValueError(f"{source}'s tokenizer was built with different {', '.join(diff)} than this config")
    tokenizer.cfg = cfg
    rows = TextRows(records, text_tok, cfg.max_text_len)
    return tokenizer, AuxDecoder.from_pretrained(src / "aux"), text_tok, rows, {}


def run_task(ctx, task: str) -> dict[str, float]:
    t0 = time.perf_counter()
    cfg = ctx.cfg.tokenizer
    tcfg = getattr(cfg, PLAN[task][0])
    records, images = load_split(ctx.data_dir, "train", cfg.image_size)
    tokenizer, aux, text_tok, rows, warm = build_models(ctx, task, records, images)
    model = TokenizerTrainer(tokenizer, aux).to(ctx.device)
    groups = param_groups(model, task, tcfg)
    sampler = StepSampler(len(records), tcfg.batch_size, seed=tcfg.seed)
    device = ctx.device
    kinds = text_kinds(task)

    def get_batch(i: int):
        idx = sampler.indices(i)
        return images[idx].to(device).float().div_(255), rows.packed(idx, **kinds).to(device)

    result = train(model, groups, get_batch, make_step_fn(task), tcfg, ctx.out_dir, desc=ctx.name,
                   logger=ctx.logger, progress=ctx.progress)
    if ctx.is_main:  # under torchrun every rank holds the same weights; one writes them
        tokenizer.save_pretrained(ctx.out_dir / "model")
        aux.save_pretrained(ctx.out_dir / "aux")
        text_tok.save(ctx.out_dir)
    train_seconds = time.perf_counter() - t0
    val_records, val_images = load_split(ctx.data_dir, "val", cfg.image_size, limit=cfg.eval_images)
    metrics = evaluate(model, TextRows(val_records, text_tok, cfg.max_text_len), val_images,
                       max_answer_len=cfg.max_answer_len)
    metrics.update(steps=float(result.step), resumed_from_step=float(result.resumed_from), train_seconds=train_seconds,
                   eval_seconds=time.perf_counter() - t0 - train_seconds,
                   stopped_by_budget=float(result.stopped_by_budget), **warm)
    ctx.logger.log({f"val_{k}": v for k, v in metrics.items()}, result.step)
    return metrics
