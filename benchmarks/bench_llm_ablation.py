"""The unified LLM's ablations from the Kelix report, in miniature, as one table.

  baseline          Block Decoder (transformer), visual rows initialised from the tokenizer's codebooks
  parallel          --set llm.block_decoder=parallel     (N+1 independent heads; report: -2 to -3 points)
  random-embed      --set llm.visual_embed_init=random   (random visual rows; report: loses more)

Each variant runs the four LLM stage functions (kelix.llm.stages) against one frozen tokenizer: a finished
tokenizer-3 folder given with --tokenizer, or tokenizer-1..3 run through the stage runner (cached in
--artifacts). Variant outputs go to <artifacts>/llm-ablation/<variant>-<config hash>/llm-K; a finished stage is reused and an
interrupted one resumes from its checkpoints. Then each variant answers the test split's questions and is
scored on teacher-forced test losses.

    .venv/bin/python benchmarks/bench_llm_ablation.py --data /tmp/llmdata --artifacts /tmp/llmart
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kelix.config import config_hash, load_config  # noqa: E402
from kelix.env import apply_env_defaults  # noqa: E402
from kelix.llm import stages  # noqa: E402
from kelix.llm.corpus import encode_split  # noqa: E402
from kelix.llm.evaluate import teacher_forced_losses, vqa_accuracy  # noqa: E402
from kelix.llm.model import KelixLLM  # noqa: E402
from kelix.stages.catalogue import StageContext  # noqa: E402
from kelix.stages.run import resolve_device, run_stage  # noqa: E402
from kelix.text import TextTokenizer  # noqa: E402
from kelix.train.metrics import MetricLogger  # noqa: E402

VARIANTS = {
    "baseline": [],
    "parallel": ["llm.block_decoder=parallel"],
    "random-embed": ["llm.visual_embed_init=random"],
}
LLM_STAGES = (("llm-1", stages.align), ("llm-2", stages.unify), ("llm-3", stages.anneal), ("llm-4", stages.sft))


def tokenizer_dir(args) -> Path:
    if args.tokenizer:
        return Path(args.tokenizer)
    cfg = load_config(args.preset, args.params, args.overrides)
    for name in ("tokenizer-1", "tokenizer-2", "tokenizer-3"):
        result = run_stage(name, cfg, args.data, args.artifacts, progress=False)
    return result.out_dir


def run_variant(name: str, args, tok_dir: Path) -> tuple[Path, dict[str, float]]:
    """Train llm-1..4 of one variant (reusing finished stages); returns llm-4's folder and the summed seconds."""
    cfg = load_config(args.preset, args.params, args.overrides + VARIANTS[name])
    # The folder names what its outputs depend on, so a changed schedule or tokenizer never reuses stale stages.
    key = config_hash({"llm": cfg.llm, "tokenizer": str(tok_dir.resolve()), "data": str(Path(args.data).resolve())})
    root = Path(args.artifacts) / "llm-ablation" / f"{name}-{key}"
    inputs, seconds = {"tokenizer-3": tok_dir}, 0.0
    for stage_name, fn in LLM_STAGES:
        out = root / stage_name
        done = out / "metrics.json"
        if done.exists():
            metrics = json.loads(done.read_text())
        else:
            ctx = StageContext(name=stage_name, cfg=cfg, data_dir=Path(args.data), inputs=dict(inputs), out_dir=out,
                               device=resolve_device(cfg.runtime.device), logger=MetricLogger(out / "metrics.jsonl"),
                               progress=args.progress)
            metrics = fn(ctx)
            done.write_text(json.dumps(metrics, indent=1, sort_keys=True))
        seconds += metrics.get("train_seconds", 0.0)
        inputs[stage_name] = out
    return root / "llm-4", {"val_vqa": metrics.get("vqa_accuracy", float("nan")), "llm_train_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    apply_env_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset folder (e.g. a generated shapes set)")
    parser.add_argument("--artifacts", required=True, help="artifact store: tokenizer stages and the variants' outputs")
    parser.add_argument("--tokenizer", default=None, help="a finished tokenizer-3 output folder (default: run the stages)")
    parser.add_argument("--preset", default="tiny", help="config preset")
    parser.add_argument("--params", default=None, help="params.yaml applied to every variant")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every variant, e.g. llm.train2.num_steps=150 (repeatable)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--test-questions", type=int, default=1000, help="test questions answered per variant")
    parser.add_argument("--test-records", type=int, default=256, help="test records for teacher-forced losses")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, args.params, args.overrides)
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    device = resolve_device(cfg.runtime.device)

    from kelix.tokenizer.model import KelixTokenizer

    tok_dir = tokenizer_dir(args)
    test = encode_split(Path(args.data), "test", KelixTokenizer.from_pretrained(tok_dir / "model", map_location=device), device)
    rows = []
    for name in (v.strip() for v in args.variants.split(",")):
        llm_dir, row = run_variant(name, args, tok_dir)
        llm = KelixLLM.from_pretrained(llm_dir / "model", map_location=device).eval()
        text_tok = TextTokenizer.load(llm_dir)
        row = {"variant": name, **row, **vqa_accuracy(llm, text_tok, test, limit=args.test_questions),
               **teacher_forced_losses(llm, text_tok, test, limit=args.test_records, prefix="test_")}
        rows.append(row)
        print(f"finished {name}: test VQA {row['vqa_accuracy']:.3f}", flush=True)

    kinds = sorted({k[len("vqa_accuracy_"):] for r in rows for k in r if k.startswith("vqa_accuracy_")})
    head = ["variant", "val VQA", "test VQA", *kinds, "spatial axis", "seen / held-out pairs", "test text loss", "test code loss", "LLM train s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["variant"], f"{r['val_vqa']:.3f}", f"{r['vqa_accuracy']:.3f}",
                 *(f"{r.get('vqa_accuracy_' + k, float('nan')):.3f}" for k in kinds),
                 f"{r.get('vqa_spatial_axis_accuracy', float('nan')):.3f}",
                 f"{r.get('vqa_seen_accuracy', float('nan')):.3f} / {r.get('vqa_holdout_accuracy', float('nan')):.3f}",
                 f"{r.get('test_text_loss', float('nan')):.3f}", f"{r.get('test_code_loss', float('nan')):.3f}",
                 f"{r['llm_train_seconds']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
