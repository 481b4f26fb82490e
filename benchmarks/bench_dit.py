"""Kelix-DiT: training step time, sampling time per image, and (given trained artifacts) what it produces.

Speed needs no training (random weights, random conditions of the preset's shapes). Wall time and process CPU
time are both reported: on a shared machine the wall time mostly measures the neighbours, while CPU seconds
(all threads together) stay close to what an idle machine would take.
  train_step_s       one optimiser step of each stage's schedule (batch, flow-matching loss, AdamW)
  sample_s_per_image 20 Euler steps, with CFG (conditional + null rows batched) and without, batch 1 and 16
Quality needs the stage outputs of a finished run (found by the config's stage keys under --artifacts):
  aedit   PSNR and detector agreement (same objects in original and reconstruction) on test images
  dit-2   text to image on test prompts: share where the detector finds every prompted object, per category
          (1, 2 and 3 objects), and GenEval-style overall (objects, count and relation)

    .venv/bin/python benchmarks/bench_dit.py
    .venv/bin/python benchmarks/bench_dit.py --data /tmp/ditdata --artifacts /tmp/ditart --num-images 100
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kelix.config import load_config  # noqa: E402
from kelix.dit.model import KelixDiT  # noqa: E402
from kelix.dit.trainer import DiTData, make_batches  # noqa: E402


def bench_train(cfg, cond_dim: int, positions: int, repeats: int) -> list[dict]:
    rows = []
    for name, tcfg in (("dit-1", cfg.dit.train1), ("dit-2", cfg.dit.train2), ("aedit", cfg.dit.train_ae)):
        torch.manual_seed(0)
        model = KelixDiT.from_config(cfg.dit, cond_dim)
        n = max(tcfg.batch_size * 2, 64)
        data = DiTData(torch.randint(0, 256, (n, 3, cfg.data.image_size, cfg.data.image_size), dtype=torch.uint8),
                       torch.randn(n, positions, cond_dim))
        get_batch, step_fn = make_batches(model, data, tcfg)
        opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr)
        times, cpu = [], []
        for i in range(repeats + 1):  # the first step warms up allocators
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _ = step_fn(model, get_batch(i))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        step = statistics.median(times[1:])
        rows.append({"stage": name, "batch": tcfg.batch_size, "train_step_s": step,
                     "train_step_cpu_s": statistics.median(cpu[1:]), "num_steps": tcfg.num_steps,
                     "est_train_s": step * tcfg.num_steps})
    return rows


@torch.no_grad()
def bench_sampling(cfg, cond_dim: int, positions: int, steps: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = KelixDiT.from_config(cfg.dit, cond_dim).eval()
    rows = []
    for batch in (1, 16):
        cond = torch.randn(batch, positions, cond_dim)
        for g in (1.0, cfg.dit.guidance_scale):
            model.sample(cond[:1], num_steps=2, guidance_scale=g)
            times, cpu = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                model.sample(cond, num_steps=steps, guidance_scale=g, seed=0)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            rows.append({"batch": batch, "steps": steps, "guidance_scale": g,
                         "sample_s_per_image": statistics.median(times) / batch,
                         "sample_cpu_s_per_image": statistics.median(cpu) / batch})
    return rows


def _stage_dirs(cfg, data: Path, artifacts: str) -> dict[str, Path]:
    from kelix.artifacts import ArtifactStore
    from kelix.stages.keys import data_fingerprint, stage_keys

    store = ArtifactStore(artifacts)
    keys = stage_keys(cfg, data_fingerprint(data))
    return {name: store.local_dir(name, key) for name, key in keys.items() if store.is_done(name, key)}


@torch.no_grad()
def bench_quality(cfg, data: Path, dirs: dict[str, Path], num_images: int, steps: int) -> dict:
    from kelix.data.detector import detect, parse_prompt, prompt_checks
    from kelix.data.reader import iter_records, open_image
    from kelix.dit.pipeline import generate_images, psnr, reconstruct, same_objects, to_tensor

    records = list(iter_records(data, "test"))[:num_images]
    originals = [open_image(data, r) for r in records]
    out: dict = {}
    if "tokenizer-3" in dirs and "aedit" in dirs:
        from kelix.tokenizer.model import KelixTokenizer

        tok = KelixTokenizer.from_pretrained(dirs["tokenizer-3"] / "model").eval()
        aedit = KelixDiT.from_pretrained(dirs["aedit"] / "model")
        t0 = time.perf_counter()
        recon = reconstruct(tok, aedit, originals, steps=steps, seed=0)
        ref = to_tensor(originals)
        out["aedit"] = {"images": len(recon), "psnr": float(psnr(ref, to_tensor(recon, ref.shape[-1])).mean()),
                        "detector_agreement": sum(map(same_objects, originals, recon)) / len(recon),
                        "seconds_per_image": (time.perf_counter() - t0) / len(recon)}
    if "llm-4" in dirs and "dit-2" in dirs:
        from kelix.llm.model import KelixLLM
        from kelix.text import TextTokenizer

        llm = KelixLLM.from_pretrained(dirs["llm-4"] / "model").eval()
        text_tok = TextTokenizer.load(dirs["llm-4"])
        dit = KelixDiT.from_pretrained(dirs["dit-2"] / "model")
        prompts = [r["prompt"] for r in records]
        t0 = time.perf_counter()
        # As the eval stage does: the LLM's default code guidance, the eval config's DiT guidance.
        images = generate_images(llm, text_tok, dit, prompts, seed=0, steps=steps, guidance_scale=cfg.eval.guidance_scale)
        per: dict[str, list] = defaultdict(list)
        for p, im in zip(prompts, images):
            checks = prompt_checks(p, detect(im))
            objs, relation = parse_prompt(p)
            per[f"{len(objs)}_object{'s' if len(objs) > 1 else ''}"].append(checks)
        out["text_to_image"] = {
            "prompts": len(prompts), "seconds_per_image": (time.perf_counter() - t0) / len(prompts),
            **{f"objects_{cat}": sum(c["objects"] for c in cs) / len(cs) for cat, cs in sorted(per.items())},
            **{f"overall_{cat}": sum(c["overall"] for c in cs) / len(cs) for cat, cs in sorted(per.items())},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="config preset (its DiT, tokenizer and LLM shapes)")
    parser.add_argument("--set", action="append", default=[], help="config override section.key=value (repeatable)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--data", default=None, help="dataset folder: with --artifacts, measure quality on its test split")
    parser.add_argument("--artifacts", default=None, help="artifact store of a finished run of this config")
    parser.add_argument("--num-images", type=int, default=64, help="test images / prompts for the quality numbers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--skip-speed", action="store_true", help="only the quality numbers")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                        help="also time the speed half with these overrides on top of --set, in the same run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, overrides=args.set)
    positions, results = cfg.tokenizer.num_positions, {}
    runs = [] if args.skip_speed else [("", cfg)]
    if runs and args.baseline:
        runs.append(("baseline", load_config(args.preset, overrides=args.set + args.baseline)))
    for name, rcfg in runs:
        prefix = f"{name}_" if name else ""
        results[prefix + "train"] = bench_train(rcfg, rcfg.llm.hidden_size, positions, args.repeats)
        results[prefix + "sampling"] = bench_sampling(rcfg, rcfg.llm.hidden_size, positions, args.steps, args.repeats)
        label = f"[{name}] " if name else ""
        for row in results[prefix + "train"]:
            print(f"{label}train {row['stage']:6s} batch {row['batch']:4d}: {row['train_step_s']:.3f} s/step "
                  f"({row['train_step_cpu_s']:.3f} CPU s), {row['num_steps']} steps ~ {row['est_train_s']:.0f} s")
        for row in results[prefix + "sampling"]:
            print(f"{label}sample batch {row['batch']:3d}, {row['steps']} steps, guidance {row['guidance_scale']}: "
                  f"{row['sample_s_per_image']:.3f} s/image ({row['sample_cpu_s_per_image']:.3f} CPU s)")
    if args.data and args.artifacts:
        dirs = _stage_dirs(cfg, Path(args.data), args.artifacts)
        results["quality"] = bench_quality(cfg, Path(args.data), dirs, args.num_images, args.steps)
        print(json.dumps(results["quality"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
