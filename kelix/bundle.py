"""KelixBundle: the four trained parts, the text tokenizer and the resolved config, loaded from one folder.

    <bundle>/tokenizer/   KelixTokenizer.save_pretrained   (from stage tokenizer-3)
             llm/         KelixLLM.save_pretrained         (llm-4)
             dit/         KelixDiT.save_pretrained         (dit-2)
             aedit/       KelixDiT.save_pretrained         (aedit, the reconstruction detokenizer)
             text_tokenizer.json, config.json
             bundle.json  size and sha256 of every file above

This folder is what the eval stage assembles, what the registry logs as one model version and what
`kelix ask/generate/reconstruct` load. Weights are safetensors only: a pickle-format file anywhere in the
bundle is refused (unpickling runs code), and `bundle.json` lets a load catch a truncated or altered file
before any model code reads it, with an error naming the file and what to do about it.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from kelix.config import KelixConfig, config_from_dict, config_hash
from kelix.files import file_sha256

PARTS = ("tokenizer", "llm", "dit", "aedit")
# The stage whose `model/` output becomes each part (kelix/stages/catalogue.py; the eval stage's inputs).
PART_STAGES = {"tokenizer": "tokenizer-3", "llm": "llm-4", "dit": "dit-2", "aedit": "aedit"}
PART_CLASSES = {
    "tokenizer": ("kelix.tokenizer.model", "KelixTokenizer"),
    "llm": ("kelix.llm.model", "KelixLLM"),
    "dit": ("kelix.dit.model", "KelixDiT"),
    "aedit": ("kelix.dit.model", "KelixDiT"),
}
TEXT_TOKENIZER = "text_tokenizer.json"
CONFIG = "config.json"
MANIFEST = "bundle.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FIX_HINT = ("re-assemble it from the stage outputs (`kelix stage run eval --force`) or, for a registered "
            "model, delete the downloaded copy and load it again")


class BundleError(RuntimeError):
    """A bundle folder that is missing, incomplete, corrupt or unsafe; the message names the file."""


# ------------------------------------------------------------------------------------------- checking



def check_safetensors(path: Path) -> None:
    """Parse a safetensors header and check the file holds exactly the bytes it declares (no tensors read)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise BundleError(f"{path} is not a valid safetensors file (bad header length): {FIX_HINT}")
        try:
            header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise BundleError(f"{path} is not a valid safetensors file (unreadable header): {FIX_HINT}") from exc
    if 8 + n + end != size:
        raise BundleError(f"{path} is truncated or padded: the header declares {8 + n + end} bytes, the file has "
                          f"{size}: {FIX_HINT}")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path, cfg: KelixConfig) -> dict:
    files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in _files(root)}
    from kelix.tracking import git_sha

    # The code that wrote the weights: a load that fails on a mismatch can say which commit fits them.
    manifest = {"format_version": FORMAT_VERSION, "config_hash": config_hash(cfg), "preset": cfg.preset,
                "parts": list(PARTS), "git_sha": git_sha(), "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def check_bundle(root: str | Path, verify_hashes: bool = True) -> dict:
    """Validate a bundle folder without loading models; returns its manifest or raises BundleError."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"no bundle folder at {root}: pass the eval stage's `bundle/` folder or a models:/ URI")
    mpath = root / MANIFEST
    if not mpath.exists():
        raise BundleError(f"{mpath} is missing, so {root} is not a Kelix bundle: {FIX_HINT}")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise BundleError(f"{mpath} is corrupt ({exc}): {FIX_HINT}") from exc
    for path in _files(root):
        if path.suffix == ".safetensors" and path.relative_to(root).as_posix() not in files:
            # Weights the manifest does not vouch for (size, sha256) are not loaded on trust.
            raise BundleError(f"{path} is not listed in {MANIFEST}: {FIX_HINT}")
        if path.suffix in PICKLE_SUFFIXES:
            raise BundleError(f"{path} is a pickle-format file; bundles hold safetensors only (unpickling runs "
                              f"arbitrary code): save the model with save_pretrained(safe_serialization) and "
                              f"re-assemble the bundle")
    for part in PARTS:
        folder = root / part
        if not folder.is_dir() or not any(folder.rglob("*.safetensors")):
            raise BundleError(f"{folder} is missing or holds no .safetensors weights: {FIX_HINT}")
    for name in (CONFIG, TEXT_TOKENIZER):
        if name not in files:
            raise BundleError(f"{root / name} is not listed in {MANIFEST}: {FIX_HINT}")
    for rel, meta in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle: {FIX_HINT}")
        if path.stat().st_size != meta["size"]:
            raise BundleError(f"{path} has {path.stat().st_size} bytes, {MANIFEST} records {meta['size']} "
                              f"(truncated or replaced): {FIX_HINT}")
        if verify_hashes and file_sha256(path) != meta["sha256"]:
            raise BundleError(f"{path} is corrupt: its sha256 differs from the one in {MANIFEST}: {FIX_HINT}")
        if path.suffix == ".safetensors":
            check_safetensors(path)
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except ValueError as exc:
                raise BundleError(f"{path} is not valid JSON ({exc}): {FIX_HINT}") from exc
    return manifest


def read_config(root: str | Path) -> KelixConfig:
    path = Path(root) / CONFIG
    try:
        return config_from_dict(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise BundleError(f"{path} is missing: {FIX_HINT}") from exc
    except ValueError as exc:
        raise BundleError(f"{path} does not hold a valid Kelix config ({exc}): {FIX_HINT}") from exc


# ------------------------------------------------------------------------------------------- assembling


def assemble(out_dir: str | Path, stage_dirs: dict[str, Path], cfg: KelixConfig) -> Path:
    """Copy each stage's `model/` into the bundle layout, add the text tokenizer, config and manifest.

    `stage_dirs` maps part names ("tokenizer", "llm", "dit", "aedit") or their stage names ("tokenizer-3",
    "llm-4", "dit-2", "aedit") to stage output folders. The bundle is built beside `out_dir` and moved into
    place at the end, so a crash never leaves half a bundle that looks complete.
    """
    by_part = {part: stage_dirs.get(part, stage_dirs.get(stage)) for part, stage in PART_STAGES.items()}
    missing = [f"{p} ({PART_STAGES[p]})" for p, d in by_part.items() if d is None]
    if missing:
        raise BundleError(f"assemble needs the outputs of {', '.join(missing)}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.assembling")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for part, src in by_part.items():
        model = Path(src) / "model"
        if not model.is_dir():
            raise BundleError(f"{model} is missing: stage {PART_STAGES[part]} has not saved its model there")
        shutil.copytree(model, tmp / part)
    text = next((Path(by_part[p]) / TEXT_TOKENIZER for p in ("llm", "tokenizer")
                 if (Path(by_part[p]) / TEXT_TOKENIZER).exists()), None)
    if text is None:
        raise BundleError(f"no {TEXT_TOKENIZER} in {by_part['llm']} or {by_part['tokenizer']}")
    shutil.copy2(text, tmp / TEXT_TOKENIZER)
    (tmp / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
    write_manifest(tmp, cfg)
    check_bundle(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------- loading


def _images_tensor(images: Sequence, size: int) -> torch.Tensor:
    """PIL images / HxWx3 arrays / a [B,3,H,W] tensor -> float [B,3,size,size] in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            arr = np.asarray(im)
            im = Image.fromarray(arr if arr.dtype == np.uint8 else (np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def _load_part(part: str, folder: Path, device: torch.device, written_by: str) -> Any:
    from kelix.tracking import git_sha

    module, name = PART_CLASSES[part]
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise BundleError(f"cannot load the {part}: {module}.{name} is not available ({exc})") from exc
    try:
        model = cls.from_pretrained(folder)
    except Exception as exc:  # the files passed the integrity checks, so the code and the weights disagree
        raise BundleError(
            f"could not load the {part} from {folder}: {type(exc).__name__}: {str(exc).strip()[:600]}\n"
            f"The files are intact, so they do not fit this code: the bundle was written at git {written_by}, this "
            f"code is at git {git_sha()}. Load it with the code it was written by, or retrain and re-assemble.") from exc
    return model.to(device).eval()


@dataclass
class KelixBundle:
    root: Path
    cfg: KelixConfig
    tokenizer: Any
    llm: Any
    dit: Any
    aedit: Any
    text_tok: Any
    device: torch.device

    @classmethod
    def load(cls, root: str | Path, device: str | torch.device | None = None, verify: bool = True) -> "KelixBundle":
        """Check the folder (sizes, hashes, safetensors headers), then load every part onto `device`."""
        from kelix.stages.run import resolve_device
        from kelix.text import TextTokenizer

        root = Path(root)
        manifest = check_bundle(root, verify_hashes=verify)
        cfg = read_config(root)
        dev = resolve_device("auto" if device is None else device)
        parts = {part: _load_part(part, root / part, dev, manifest.get("git_sha", "unknown")) for part in PARTS}
        return cls(root=root, cfg=cfg, text_tok=TextTokenizer.load(root), device=dev, **parts)

    @torch.inference_mode()
    def answer(self, images: Sequence, questions: Sequence[str], batch_size: int = 32) -> list[str]:
        """One answer per (image, question) pair."""
        from kelix.llm.inference import answer

        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        out: list[str] = []
        for i in range(0, len(questions), batch_size):
            batch = _images_tensor(images[i:i + batch_size], self.cfg.tokenizer.image_size).to(self.device)
            out.extend(answer(self.llm, self.tokenizer, self.text_tok, batch, list(questions[i:i + batch_size])))
        return out

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], seed: int = 0, steps: int | None = None,
                 guidance_scale: float | None = None, cfg_scale: float | None = None) -> list[Image.Image]:
        """Images for prompts: NBP codes from the LLM, then the DiT on its hidden states. Same prompts and
        seed, same images. Unset settings come from the model's `eval` config."""
        from kelix.dit.pipeline import generate_images

        ecfg = self.cfg.eval
        return generate_images(self.llm, self.text_tok, self.dit, list(prompts), seed=seed,
                               steps=steps or ecfg.sample_steps, temperature=ecfg.temperature,
                               guidance_scale=ecfg.guidance_scale if guidance_scale is None else guidance_scale,
                               cfg_scale=ecfg.cfg_scale if cfg_scale is None else cfg_scale)

    @torch.inference_mode()
    def reconstruct(self, images: Sequence, seed: int = 0, steps: int | None = None) -> list[Image.Image]:
        """Images -> tokenizer codes -> AE-DiT -> images: what the discrete tokens keep."""
        from kelix.dit.pipeline import reconstruct

        batch = _images_tensor(images, self.cfg.tokenizer.image_size).to(self.device)
        return reconstruct(self.tokenizer, self.aedit, batch, steps=steps or self.cfg.eval.sample_steps, seed=seed)

    @torch.inference_mode()
    def encode(self, images: Sequence) -> torch.Tensor:
        """Tokenizer codes [B, P, N] of images."""
        return self.tokenizer.encode(_images_tensor(images, self.cfg.tokenizer.image_size).to(self.device))


# ------------------------------------------------------------------------------------------- untrained


def _palette_texts() -> list[str]:
    """Captions, questions and answers over the shapes palette: enough to train a text tokenizer offline."""
    from kelix.data.shapes import COLOURS, NUMBER_WORDS, SHAPES

    texts = [f"a {size} {c} {s}" for c in COLOURS for s in SHAPES for size in ("small", "large")]
    texts += [f"What colour is the {s}?" for s in SHAPES] + [f"What shape is the {c} object?" for c in COLOURS]
    texts += ["How many objects are there?", "yes", "no", "left", "right", "above", "below", *NUMBER_WORDS]
    texts += [f"Where is the {c} {s} relative to the {c2} {s2}?" for c, s, c2, s2 in
              zip(COLOURS, SHAPES, list(COLOURS)[1:], SHAPES[1:])]
    return texts


def init_bundle(out_dir: str | Path, cfg: KelixConfig) -> Path:
    """A bundle of randomly initialised parts built from `cfg`: nothing it says is right, but it loads, serves
    and registers like a trained one, so the release and serving paths can be exercised without training."""
    from kelix.dit.model import KelixDiT
    from kelix.llm.model import KelixLLM
    from kelix.text import train_text_tokenizer
    from kelix.tokenizer.model import KelixTokenizer

    out_dir = Path(out_dir)
    work = out_dir.with_name(f".{out_dir.name}.init")
    if work.exists():
        shutil.rmtree(work)
    try:
        tok = KelixTokenizer.from_config(cfg.tokenizer)
        tok.save_pretrained(work / "tokenizer" / "model")
        text_tok = train_text_tokenizer(_palette_texts(), cfg.tokenizer.text_vocab_size)
        text_tok.save(work / "llm")
        llm = KelixLLM.from_config(cfg.llm, tok.num_codebooks, tok.codebook_size, text_tok.vocab_size,
                                   tok.codebook_vectors(), tok.num_positions)
        llm.save_pretrained(work / "llm" / "model")
        # The DiT reads the LLM's hidden states, the AE-DiT the tokenizer's pooled code embeddings.
        KelixDiT.from_config(cfg.dit, cond_dim=cfg.llm.hidden_size).save_pretrained(work / "dit" / "model")
        KelixDiT.from_config(cfg.dit.for_autoencoder(), cond_dim=tok.embed_dim).save_pretrained(work / "aedit" / "model")
        return assemble(out_dir, {part: work / part for part in PARTS}, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
