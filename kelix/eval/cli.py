"""`kelix eval MODEL_URI [--data DIR] [--out DIR]`: score a bundle folder or a registered model.

The model's own config (its `config.json`) sets the evaluation sizes, so re-evaluating a registered version
asks it exactly what the pipeline asked; `--set eval.num_vqa=...` style overrides are not offered on purpose.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from kelix.bundle import BundleError, KelixBundle
    from kelix.cli import UserError
    from kelix.data.format import DatasetError
    from kelix.eval.run import evaluate_bundle
    from kelix.registry.resolve import local_bundle
    from kelix.registry.store import RegistryError

    try:
        bundle = KelixBundle.load(local_bundle(args.model_uri), device=args.device)
        data = Path(args.data or bundle.cfg.data.root)
        out = Path(args.out or Path("outputs") / "eval" / args.model_uri.replace("models:/", "").replace("/", "_").replace("@", "_"))
        metrics = evaluate_bundle(bundle, data, out, model_name=args.model_uri)
    except (BundleError, RegistryError, DatasetError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    width = max(len(k) for k in metrics)
    for key, value in sorted(metrics.items()):
        print(f"  {key:{width}s} {value:.4f}")
    print(f"reports: {out / 'eval.md'}, {out / 'grid.png'}, {out / 'eval.json'}")
    return 0


def register(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a bundle folder or a registered model (models:/kelix@champion)")
    ev.add_argument("model_uri", metavar="MODEL_URI", help="bundle folder, models:/NAME@ALIAS or models:/NAME/VERSION")
    ev.add_argument("--data", default=None, help="dataset folder (default: the model config's data.root)")
    ev.add_argument("--out", default=None, help="report folder (default: outputs/eval/<model>)")
    ev.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    ev.set_defaults(func=_run)
