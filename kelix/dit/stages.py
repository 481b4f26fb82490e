"""The detokenizer's stages: `aedit` (codes -> image), `dit-1` (pre-training) and `dit-2` (SFT).

- aedit: condition = the frozen tokenizer's quantized embeddings of the image's own codes.
- dit-1: condition = the frozen LLM's last hidden states at the image positions of `<gen> prompt <boi> codes`,
  teacher-forced over the image's own codes, on every training image (the paper pre-trains on inverted-caption
  data; the shapes prompts play that role).
- dit-2: dit-1's weights fine-tuned on a curated `sft_fraction` of the training pairs. Curation, the analogue of
  the paper's rejection-sampled SFT data: (1) a hard filter, the analytic detector must find exactly the
  manifest's objects in the image (on generated shapes every image passes; on imported data this drops images
  whose labels are wrong); (2) a rank by DiT-1's own flow-matching error on the pair at fixed noise, keeping the
  pairs whose condition best explains the image (a high error flags pairs whose LLM states do not determine the
  picture), taken per object count so the easy one-object images do not crowd out the three-object ones.

Conditions (and DC-AE latents) are computed once and cached in out_dir, so a resumed stage skips that work
and dit-2 reuses dit-1's cache. Each stage trains through the shared loop, saves `model/`, writes
`samples.png` (originals over samples) and returns flat metrics.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kelix.data.reader import load_split
from kelix.dit.config import DiTConfig
from kelix.dit.model import KelixDiT
from kelix.dit.pipeline import generate_images, psnr, same_objects, tokenizer_condition, to_tensor
from kelix.dit.trainer import DiTData, eval_loss, grid_image, per_example_loss, train_dit
from kelix.files import replace_atomically
from kelix.train.config import TrainConfig

CACHE = "cond_cache.safetensors"
PREVIEW = 8


# ---------------------------------------------------------------------------------------------- data


def _batched(n: int, size: int, desc: str, progress: bool):
    return tqdm(range(0, n, size), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def _cached(path: Path, keys: list[str], compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Tensors computed once per (stage output folder, example keys); written atomically."""
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            if (fh.metadata() or {}).get("keys") == digest:
                return load_file(path)
    tensors = {k: v.contiguous() for k, v in compute().items()}
    replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"keys": digest}))
    return tensors


@torch.no_grad()
def _tokenizer_conds(tokenizer, images: torch.Tensor, device, progress: bool, bs: int = 256) -> torch.Tensor:
    return torch.cat([tokenizer_condition(tokenizer, images[i:i + bs].to(device).float() / 255).float().cpu()
                      for i in _batched(len(images), bs, "codes -> embeddings", progress)])


@torch.no_grad()
def _llm_conds(tokenizer, llm, text_tok, records: list[dict], images: torch.Tensor, device, progress: bool,
               bs: int = 128) -> torch.Tensor:
    from kelix.llm.inference import image_hidden_states

    out = []
    for i in _batched(len(images), bs, "LLM hidden states", progress):
        codes = tokenizer.encode(images[i:i + bs].to(device).float() / 255)
        prompts = [r.get("prompt") or r.get("caption", "") for r in records[i:i + bs]]
        out.append(image_hidden_states(llm, text_tok, prompts, codes).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def _targets(model: KelixDiT, images: torch.Tensor, progress: bool, bs: int = 64) -> torch.Tensor:
    """Pixel: the uint8 images themselves (encoded per batch, free). DC-AE: latents computed once."""
    if model.autoencoder is None:
        return images
    return torch.cat([model.encode_images(images[i:i + bs].float() / 255).cpu()
                      for i in _batched(len(images), bs, "DC-AE latents", progress)])


def _load_tokenizer(ctx):
    from kelix.tokenizer.model import KelixTokenizer

    return KelixTokenizer.from_pretrained(ctx.input("tokenizer-3") / "model", map_location=ctx.device).to(ctx.device).eval()


def _load_llm(ctx):
    from kelix.llm.model import KelixLLM
    from kelix.text import TextTokenizer

    llm_dir = ctx.input("llm-4")
    return KelixLLM.from_pretrained(llm_dir / "model", map_location=ctx.device).to(ctx.device).eval(), TextTokenizer.load(llm_dir)


def _new_model(ctx, cond_dim: int, schedule: TrainConfig, dcfg: DiTConfig | None = None) -> KelixDiT:
    # The initial weights are part of the stage's result: seeded by the stage's own schedule, which its key
    # covers (aedit's key leaves out train1, so seeding it from train1 reused a stale aedit on a change).
    torch.manual_seed(schedule.seed)
    return KelixDiT.from_config(dcfg or ctx.cfg.dit, cond_dim).to(ctx.device)


# ---------------------------------------------------------------------------------------------- evaluation


def _reconstruction_metrics(model: KelixDiT, cond: torch.Tensor, originals: torch.Tensor, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """PSNR and detector agreement of samples for `cond` against `originals` (uint8 [n,3,H,W])."""
    out = model.sample(cond.to(model.device), seed=seed).cpu()
    ref = originals.float() / 255
    agree = [same_objects(o, r) for o, r in zip(ref, to_tensor(out, ref.shape[-1]))]
    return {"psnr": float(psnr(ref, out).mean()), "detector_agreement": sum(agree) / max(len(agree), 1)}, out


def _finish(ctx, model: KelixDiT, result, val: DiTData, val_images: torch.Tensor, t0: float,
            extra_rows: list[torch.Tensor] = ()) -> dict[str, float]:
    model.eval()
    if ctx.is_main:  # under torchrun every rank holds the same weights; one writes them
        model.save_pretrained(ctx.out_dir / "model")
    train_seconds = time.perf_counter() - t0
    rec, samples = _reconstruction_metrics(model, val.conds, val_images)
    size = ctx.cfg.dit.output_size
    if ctx.is_main:
        grid_image([to_tensor(val_images[:PREVIEW].float() / 255, size), samples[:PREVIEW], *extra_rows]).save(
            ctx.out_dir / "samples.png")
    metrics = {"flow_loss": float(result.metrics.get("loss", float("nan"))), "val_flow_loss": eval_loss(model, val),
               "steps": float(result.step), "resumed_from_step": float(result.resumed_from),
               "train_seconds": train_seconds, "stopped_by_budget": float(result.stopped_by_budget), **rec}
    metrics["eval_seconds"] = time.perf_counter() - t0 - train_seconds
    ctx.logger.log({f"final_{k}": v for k, v in metrics.items()}, result.step)
    return metrics


def _preview(model: KelixDiT, val: DiTData, val_images: torch.Tensor):
    def grid():
        out = model.sample(val.conds[:PREVIEW].to(model.device), seed=0).cpu()
        return grid_image([to_tensor(val_images[:PREVIEW].float() / 255, out.shape[-1]), out])
    return grid


# ---------------------------------------------------------------------------------------------- stages


def aedit(ctx) -> dict[str, float]:
    """AE-DiT: learn to turn an image's tokenizer codes back into the image."""
    t0 = time.perf_counter()
    dcfg, size = ctx.cfg.dit, ctx.cfg.tokenizer.image_size
    records, images = load_split(ctx.data_dir, "train", size)
    val_records, val_images = load_split(ctx.data_dir, "val", size, limit=dcfg.num_eval_images)
    tokenizer = _load_tokenizer(ctx)
    model = _new_model(ctx, tokenizer.embed_dim, dcfg.train_ae, dcfg.for_autoencoder())
    keys = [r["key"] for r in records + val_records]
    cache = _cached(ctx.out_dir / CACHE, keys, lambda: {
        "train": _tokenizer_conds(tokenizer, images, ctx.device, ctx.progress),
        "val": _tokenizer_conds(tokenizer, val_images, ctx.device, ctx.progress),
        "targets": _targets(model, images, ctx.progress)})
    data, val = DiTData(cache["targets"], cache["train"]), DiTData(_targets(model, val_images, False), cache["val"])
    result = train_dit(model, data, dcfg.train_ae, ctx.out_dir, ctx.name, _preview(model, val, val_images),
                       dcfg.grid_every, ctx.logger, ctx.progress)
    return _finish(ctx, model, result, val, val_images, t0)


def _llm_data(ctx, tokenizer, llm, text_tok, cache_path: Path, model: KelixDiT):
    dcfg, size = ctx.cfg.dit, ctx.cfg.tokenizer.image_size
    records, images = load_split(ctx.data_dir, "train", size)
    val_records, val_images = load_split(ctx.data_dir, "val", size, limit=dcfg.num_eval_images)
    keys = [r["key"] for r in records + val_records]
    cache = _cached(cache_path, keys, lambda: {
        "train": _llm_conds(tokenizer, llm, text_tok, records, images, ctx.device, ctx.progress),
        "val": _llm_conds(tokenizer, llm, text_tok, val_records, val_images, ctx.device, ctx.progress),
        "targets": _targets(model, images, ctx.progress)})
    return (records, images, DiTData(cache["targets"], cache["train"]),
            val_records, val_images, DiTData(_targets(model, val_images, False), cache["val"]))


def pretrain(ctx) -> dict[str, float]:
    """DiT-1: every training image, conditioned on the frozen LLM's teacher-forced hidden states."""
    t0 = time.perf_counter()
    tokenizer = _load_tokenizer(ctx)
    llm, text_tok = _load_llm(ctx)
    model = _new_model(ctx, llm.lm.config.hidden_size, ctx.cfg.dit.train1)
    _, _, data, _, val_images, val = _llm_data(ctx, tokenizer, llm, text_tok, ctx.out_dir / CACHE, model)
    result = train_dit(model, data, ctx.cfg.dit.train1, ctx.out_dir, ctx.name, _preview(model, val, val_images),
                       ctx.cfg.dit.grid_every, ctx.logger, ctx.progress)
    return _finish(ctx, model, result, val, val_images, t0)


def select_sft(records: list[dict], images: torch.Tensor, errors: torch.Tensor, fraction: float) -> list[int]:
    """Indices kept for SFT: per object count, the lowest-DiT-1-error `fraction` among the images where the
    detector finds exactly the manifest's objects. Detection runs lazily in error order (it costs ~5 ms an image),
    so only about the kept share of the set is ever looked at."""
    from kelix.data.detector import detect, match_objects

    groups: dict[int, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        groups[len(rec.get("objects") or [])].append(i)
    keep: list[int] = []
    for members in groups.values():
        quota = max(1, round(fraction * len(members)))
        kept = 0
        for i in sorted(members, key=lambda j: float(errors[j])):
            if kept == quota:
                break
            objects = records[i].get("objects")
            if objects and not match_objects(objects, detect(images[i])).exact:
                continue  # the label does not describe the picture
            keep.append(i)
            kept += 1
    return sorted(keep)


def sft(ctx) -> dict[str, float]:
    """DiT-2: DiT-1 fine-tuned on the curated subset (see the module docstring for the quality score)."""
    t0 = time.perf_counter()
    dcfg = ctx.cfg.dit
    tokenizer = _load_tokenizer(ctx)
    llm, text_tok = _load_llm(ctx)
    model = KelixDiT.from_pretrained(ctx.input("dit-1") / "model", device=ctx.device)
    model.cfg = dataclasses.replace(model.cfg, **_sampling_fields(dcfg))
    # dit-1's cache holds the same conditions (same LLM, data and keys): reuse it instead of recomputing.
    upstream_cache = ctx.input("dit-1") / CACHE
    cache_path = ctx.out_dir / CACHE
    if upstream_cache.exists() and not cache_path.exists():
        replace_atomically(cache_path, lambda tmp: shutil.copyfile(upstream_cache, tmp))  # ranks copy side by side
    records, images, data, val_records, val_images, val = _llm_data(ctx, tokenizer, llm, text_tok, cache_path, model)
    errors = per_example_loss(model, data)
    keep = torch.tensor(select_sft(records, images, errors, dcfg.sft_fraction))
    subset = DiTData(data.targets[keep], data.conds[keep])
    result = train_dit(model, subset, dcfg.train2, ctx.out_dir, ctx.name, _preview(model, val, val_images),
                       dcfg.grid_every, ctx.logger, ctx.progress)
    prompts = [r["prompt"] for r in val_records if r.get("prompt")]
    generated = to_tensor(generate_images(llm, text_tok, model, prompts, seed=0), dcfg.output_size) if prompts else None
    metrics = _finish(ctx, model, result, val, val_images, t0,
                      extra_rows=[generated[:PREVIEW]] if generated is not None else [])
    dropped = torch.ones(len(errors), dtype=torch.bool)
    dropped[keep] = False
    metrics.update(sft_examples=float(len(keep)), sft_mean_error=float(errors[keep].mean()))
    if dropped.any():
        metrics["dropped_mean_error"] = float(errors[dropped].mean())
    if generated is not None:
        metrics.update(_prompt_scores(prompts, generated))
    return metrics


def _sampling_fields(dcfg) -> dict:
    """Settings dit-2 may change on top of dit-1's saved architecture (how it samples, not what it is)."""
    return {k: getattr(dcfg, k) for k in ("sample_steps", "sample_shift", "guidance_scale")}


def _prompt_scores(prompts: list[str], images: torch.Tensor) -> dict[str, float]:
    """Share of generated images where the detector finds every prompted object (GenEval's object check)."""
    from kelix.data.detector import detect, prompt_checks

    checks = [prompt_checks(p, detect(im)) for p, im in zip(prompts, images)]
    return {"gen_objects": sum(c["objects"] for c in checks) / len(checks),
            "gen_overall": sum(c["overall"] for c in checks) / len(checks)}
