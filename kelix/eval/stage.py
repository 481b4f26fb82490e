"""The `eval` stage: assemble the trained parts into a bundle, load it, score it on the test split.

Its outputs are `bundle/` (what the registry logs as one model version), `eval.json`, `eval.md` and
`grid.png`; it returns the flat metrics the gate reads (see kelix/eval/metrics.py for their definitions).
"""
from __future__ import annotations

from kelix.bundle import PART_STAGES, KelixBundle, assemble
from kelix.eval.run import evaluate_bundle


def evaluate(ctx) -> dict[str, float]:
    bundle_dir = assemble(ctx.out_dir / "bundle", {stage: ctx.input(stage) for stage in PART_STAGES.values()}, ctx.cfg)
    bundle = KelixBundle.load(bundle_dir, device=ctx.device)
    metrics = evaluate_bundle(bundle, ctx.data_dir, ctx.out_dir, model_name=f"eval/{ctx.key}")
    ctx.logger.log(metrics, step=0)
    return metrics
