"""`kelix data ...`: generate, import, validate and snapshot (DVC) datasets.

Every command resolves the data config like the rest of the CLI (--preset/--params/--set), and explicit
flags win over it. Problems the user can fix (bad input folder, failed DVC step) are UserErrors: one line,
exit code 2; `validate` exits 1 when the dataset fails, so scripts and CI can gate on it.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from kelix.config_cli import add_config_args, config_from_args


def _user_error(exc: Exception):
    from kelix.cli import UserError

    return UserError(str(exc))


def _data_cfg(args: argparse.Namespace, **flags):
    cfg = config_from_args(args).data
    changes = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(cfg, **changes)


def _generate(args: argparse.Namespace) -> int:
    from kelix.data.shapes import generate

    cfg = _data_cfg(args, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test, seed=args.seed,
                    image_size=args.image_size, workers=args.workers)
    out = Path(args.out or cfg.root)
    try:
        generate(out, cfg, overwrite=args.force, progress=True)
    except (ValueError, FileExistsError) as exc:
        raise _user_error(exc) from exc
    total = cfg.num_train + cfg.num_val + cfg.num_test
    print(f"wrote {total} shapes images ({cfg.num_train}/{cfg.num_val}/{cfg.num_test}) at {cfg.image_size}px to {out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from kelix.data.format import DatasetError
    from kelix.data.importer import import_folder

    cfg = _data_cfg(args)
    try:
        report = import_folder(args.src, args.out, image_size=args.image_size, cfg=cfg, overwrite=args.force)
    except DatasetError as exc:
        raise _user_error(exc) from exc
    print(report.summary())
    return 0


def _validate(args: argparse.Namespace) -> int:
    from kelix.data.format import DatasetError
    from kelix.data.validation import validate

    cfg = _data_cfg(args)
    root = Path(args.dir or cfg.root)
    try:
        report = validate(root, cfg, quarantine=not args.dry_run, progress=True)
    except DatasetError as exc:
        raise _user_error(exc) from exc
    md, js = report.write(args.report or root.with_name(root.name + "-validation"))
    verdict = "PASSED" if report.passed else "FAILED"
    print(f"{verdict}: {report.checked} records, {len(report.bad)} bad"
          + (f" (moved to {root / 'quarantine.jsonl'})" if report.quarantined_now else ""))
    for reason in report.failures:
        print(f"  - {reason}")
    # The first bad records here, so a typical problem is visible without opening the report.
    shown = 5
    for rec in report.bad[:shown]:
        print(f"  bad {rec['key'] or '(no key)'} (manifest line {rec['line']}): {'; '.join(rec['reasons'])}")
    if len(report.bad) > shown:
        print(f"  ... and {len(report.bad) - shown} more in the report")
    print(f"report: {md} and {js}")
    return 0 if report.passed else 1


def _snapshot(args: argparse.Namespace) -> int:
    from kelix.data.format import DatasetError
    from kelix.data.versioning import VersioningError, snapshot

    cfg = _data_cfg(args)
    try:
        md5 = snapshot(args.dir or cfg.root, cfg, dvc_file=args.dvc_file, remote=args.remote, push=not args.no_push)
    except (DatasetError, VersioningError) as exc:
        raise _user_error(exc) from exc
    print(md5)
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="generate, import, validate and version datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True

    gen = data_sub.add_parser("generate", help="generate a synthetic dataset")
    gen.add_argument("kind", choices=["shapes"], help="which generator")
    gen.add_argument("--out", default=None, help="dataset folder (default: data.root of the config)")
    gen.add_argument("--num-train", type=int, default=None)
    gen.add_argument("--num-val", type=int, default=None)
    gen.add_argument("--num-test", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--image-size", type=int, default=None, metavar="PX")
    gen.add_argument("--workers", type=int, default=None, help="worker processes (default: data.workers)")
    gen.add_argument("--force", action="store_true", help="replace an existing dataset at --out")
    add_config_args(gen)
    gen.set_defaults(func=_generate)

    imp = data_sub.add_parser("import", help="import an image folder with captions.jsonl")
    imp.add_argument("src", help="folder with captions.jsonl and the images it names")
    imp.add_argument("--out", required=True, help="dataset folder to write")
    imp.add_argument("--image-size", type=int, default=None, metavar="PX",
                     help="resize and centre-crop every image to PX x PX (default: keep sizes)")
    imp.add_argument("--force", action="store_true", help="replace an existing dataset at --out")
    add_config_args(imp)
    imp.set_defaults(func=_import)

    val = data_sub.add_parser("validate", help="validate a dataset (exit 0 pass, 1 fail) and quarantine bad records")
    val.add_argument("dir", nargs="?", default=None, help="dataset folder (default: data.root of the config)")
    val.add_argument("--report", default=None, help="report path without suffix; writes .md and .json "
                                                     "(default: DIR-validation beside the dataset)")
    val.add_argument("--dry-run", action="store_true", help="report bad records without moving them to quarantine")
    add_config_args(val)
    val.set_defaults(func=_validate)

    snap = data_sub.add_parser("snapshot", help="validate, dvc commit and dvc push a dataset; prints its md5")
    snap.add_argument("dir", nargs="?", default=None, help="dataset folder (default: data.root of the config)")
    snap.add_argument("--dvc-file", default=None, help="the .dvc file (default: data.dvc for data/shapes, else DIR.dvc)")
    snap.add_argument("--remote", default=None, help="DVC remote (default: the repo's default remote)")
    snap.add_argument("--no-push", action="store_true", help="commit to the local DVC cache only")
    add_config_args(snap)
    snap.set_defaults(func=_snapshot)
