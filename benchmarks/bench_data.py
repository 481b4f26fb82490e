"""Throughput of the data tools at 64 px: generation, validation, the cached loader and the detector.

Run: `.venv/bin/python benchmarks/bench_data.py` (default 6000/500/500 set; `--scale 0.2` for a quick look).
Prints a markdown table. Wall-clock numbers depend on what else runs on the machine, so the load average
is printed with them and per-process CPU throughput is shown beside wall throughput where it applies.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kelix.env import apply_env_defaults  # noqa: E402

apply_env_defaults()


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the default 6000/500/500 set")
    parser.add_argument("--workers", type=int, default=2, help="generation worker processes for the parallel row")
    # File creation speed differs a lot between mounts (on the dev VM /tmp is ~30x slower than /work),
    # so the scratch sets go where datasets live: the git-ignored data/ folder of the repo.
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parents[1] / "data"),
                        help="parent folder for the scratch datasets (removed afterwards)")
    args = parser.parse_args()

    from kelix.data.config import DataConfig
    from kelix.data.shapes import generate

    base = DataConfig()
    cfg = dataclasses.replace(base, num_train=int(base.num_train * args.scale), num_val=int(base.num_val * args.scale),
                              num_test=int(base.num_test * args.scale))
    n = cfg.num_train + cfg.num_val + cfg.num_test
    rows = []
    load_before = os.getloadavg()[0]
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kelix-bench-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        _, wall, cpu = _timed(lambda: generate(tmp / "serial", dataclasses.replace(cfg, workers=1)))
        rows.append(("generate, 1 process", n, wall, cpu))
        _, wall, _ = _timed(lambda: generate(tmp / "shapes", dataclasses.replace(cfg, workers=args.workers)))
        rows.append((f"generate, {args.workers} worker processes", n, wall, None))
        files = list((tmp / "shapes").rglob("*"))
        payload = sum(p.stat().st_size for p in files if p.is_file())

        _, wall, cpu = _timed(lambda: __import__("great_expectations"))
        rows.append(("import great_expectations (once per process)", 0, wall, cpu))
        from kelix.data.validation import check_record, validate
        from kelix.data.reader import iter_records

        records = list(iter_records(tmp / "shapes"))
        _, wall, cpu = _timed(lambda: [check_record(tmp / "shapes", r, cfg) for r in records])
        rows.append(("validate: per-record checks (decode, hash, fields)", n, wall, cpu))
        report, wall, cpu = _timed(lambda: validate(tmp / "shapes", cfg))
        assert report.passed, report.failures
        rows.append(("validate: end to end (checks + GX suite + report)", n, wall, cpu))

        from kelix.data.reader import load_images

        _, wall, cpu = _timed(lambda: load_images(tmp / "shapes", "train"))
        rows.append(("load_images train: decode + write cache", cfg.num_train, wall, cpu))
        _, wall, cpu = _timed(lambda: load_images(tmp / "shapes", "train"))
        rows.append(("load_images train: from cache", cfg.num_train, wall, cpu))

        from PIL import Image
        from kelix.data.detector import detect

        sample = [Image.open(tmp / "shapes" / r["image"]).convert("RGB") for r in records[:300]]
        _, wall, cpu = _timed(lambda: [detect(im) for im in sample])
        rows.append(("detect (analytic detector)", len(sample), wall, cpu))

    print(f"# kelix data benchmark: {n} images at {cfg.image_size}px, {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    print(f"# dataset size: {payload / 1e6:.1f} MB in {len(files)} files (apparent size)\n")
    print("| step | items | wall s | items/s (wall) | items/s (CPU of this process) |")
    print("|---|---|---|---|---|")
    for name, items, wall, cpu in rows:
        per_wall = f"{items / wall:,.0f}" if items else ""
        per_cpu = f"{items / cpu:,.0f}" if items and cpu else ""
        print(f"| {name} | {items} | {wall:.2f} | {per_wall} | {per_cpu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
