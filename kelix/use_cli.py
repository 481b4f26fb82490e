"""Using the released model from a shell: `kelix ask`, `kelix generate`, `kelix reconstruct`, `kelix reproduce`.

    kelix ask photo.png "What colour is the circle?"          [--model URI]
    kelix generate "a red circle left of a blue square" -o out.png [--model URI --seed S]
    kelix reconstruct photo.png -o out.png                     [--model URI]
    kelix reproduce 3                                          (rerun version 3's pipeline, compare metrics)

`--model` is a bundle folder or `models:/NAME@ALIAS` / `models:/NAME/VERSION` (default models:/kelix@champion,
resolved with the MLflow client at MLFLOW_TRACKING_URI and downloaded once to ~/.cache/kelix/models).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kelix.registry.resolve import DEFAULT_MODEL


def _user_errors(fn):
    """Bad inputs, a missing model or a damaged bundle are printed as one line, not a traceback."""
    def run(args: argparse.Namespace) -> int:
        from kelix.bundle import BundleError
        from kelix.cli import UserError
        from kelix.registry.store import RegistryError

        try:
            return fn(args)
        except (BundleError, RegistryError, FileNotFoundError, ValueError) as exc:
            raise UserError(str(exc)) from exc
    return run


def _bundle(args: argparse.Namespace):
    from kelix.registry.resolve import load_bundle

    return load_bundle(args.model, device=args.device)


def _image(path: str):
    from PIL import Image, UnidentifiedImageError

    from kelix.data.images import to_rgb

    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except FileNotFoundError:
        raise
    # A truncated or damaged file opens (the header is fine) and fails in convert() with OSError/SyntaxError.
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path} is not an image PIL can read ({exc}); check the file or save it again") from exc


def _save(image, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(out)


@_user_errors
def _ask(args: argparse.Namespace) -> int:
    image = _image(args.image)
    print(_bundle(args).answer([image], [args.question])[0])
    return 0


@_user_errors
def _generate(args: argparse.Namespace) -> int:
    _save(_bundle(args).generate([args.prompt], seed=args.seed, steps=args.steps)[0], args.output)
    return 0


@_user_errors
def _reconstruct(args: argparse.Namespace) -> int:
    image = _image(args.image)
    _save(_bundle(args).reconstruct([image], seed=args.seed, steps=args.steps)[0], args.output)
    return 0


@_user_errors
def _reproduce(args: argparse.Namespace) -> int:
    from kelix.registry.reproduce import reproduce

    ok, rows = reproduce(args.name, args.version, tolerance=args.tolerance, artifacts=args.artifacts,
                         work_dir=args.work_dir, in_process=args.in_process)
    width = max((len(r.name) for r in rows), default=6)
    print(f"{'metric':{width}s}  recorded       new      diff   allowed")
    for r in rows:
        fmt = lambda v: f"{v:9.4f}" if v is not None else "  missing"  # noqa: E731
        print(f"{r.name:{width}s} {fmt(r.recorded)} {fmt(r.new)} {r.diff:+9.4f} {r.allowed:9.4f} "
              f"{'ok' if r.ok else 'DIFFERS'}")
    within = f"within {args.tolerance}" if args.tolerance is not None else "within each metric's tolerance"
    print(f"reproduced {within}" if ok else f"NOT reproduced {within}")
    return 0 if ok else 1


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"bundle folder or models:/ URI (default {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def register(sub) -> None:
    ask = sub.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", help="image file")
    ask.add_argument("question", help='e.g. "What colour is the circle?"')
    _model_args(ask)
    ask.set_defaults(func=_ask)

    gen = sub.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("prompt", help='e.g. "a red circle left of a blue square"')
    gen.add_argument("-o", "--output", required=True, help="output image file (.png)")
    gen.add_argument("--seed", type=int, default=0, help="same prompt and seed, same image")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's eval.sample_steps)")
    _model_args(gen)
    gen.set_defaults(func=_generate)

    rec = sub.add_parser("reconstruct", help="tokenize an image and decode it back with the AE-DiT")
    rec.add_argument("image", help="image file")
    rec.add_argument("-o", "--output", required=True, help="output image file (.png)")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--steps", type=int, default=None)
    _model_args(rec)
    rec.set_defaults(func=_reconstruct)

    rep = sub.add_parser("reproduce", help="rerun a registered version's pipeline from its lineage and compare metrics")
    rep.add_argument("version", help="model version number")
    rep.add_argument("--name", default="kelix", help="registered model name (default kelix)")
    rep.add_argument("--tolerance", type=float, default=None,
                     help="largest allowed |new - recorded| for every metric, relative above 1 (default: each "
                          "metric's release tolerance from the recorded config, eval.regression_tolerance / "
                          "eval.metric_tolerances)")
    rep.add_argument("--artifacts", default=None,
                     help="artifact store for the rerun (default: a fresh folder, so every stage runs again)")
    rep.add_argument("--work-dir", default=None, help="where data, artifacts and reproduce.json go "
                                                      "(default outputs/reproduce/NAME-vVERSION)")
    rep.add_argument("--in-process", action="store_true",
                     help="run the stages in this process instead of through the Prefect pipeline")
    rep.set_defaults(func=_reproduce)
