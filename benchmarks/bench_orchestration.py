"""What orchestration costs: per-stage overhead of the Prefect flow vs calling the stage directly, and the
wall time of a pipeline rerun with nothing changed.

    python benchmarks/bench_orchestration.py                      # trivial stages, embedded services
    python benchmarks/bench_orchestration.py --real --data D --artifacts A --set k=v ...
                                                                  # rerun a real pipeline that already ran

Trivial mode swaps every catalogue entry for a stage that writes one file (same names, inputs and keys),
then measures, each in a fresh artifact store:
  direct    `kelix.stages.run.run_stage` for the 11 stages in order (the floor: keys, markers, metrics file)
  flow      the same 11 stages as Prefect tasks through `flows.common.run_stages` (task runs, MLflow runs,
            the runner), inside one flow; overhead per stage = (flow - direct) / 11
  rerun     `kelix_pipeline` a second time with nothing changed (release off: no model in trivial mode)
Startup (Prefect's ephemeral server, imports) is measured once and reported apart.
Targets: <= 2 s overhead per stage, rerun <= 15 s beyond startup.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flows  # noqa: E402,F401  - environment defaults before Prefect

import kelix.stages.catalogue as catalogue  # noqa: E402
from kelix.stages.run import run_stage  # noqa: E402


def trivial_stage(ctx) -> dict[str, float]:
    (ctx.out_dir / "model").mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "model" / "weights.txt").write_text(ctx.key)
    ctx.logger.log({"loss": 1.0}, step=0)
    return {"loss": 1.0}


def _dataset(root: Path) -> Path:
    from kelix.data.config import DataConfig
    from kelix.data.shapes import generate

    return generate(root / "shapes", DataConfig(num_train=64, num_val=16, num_test=16))


OVERRIDES = ["data.num_train=64", "data.num_val=16", "data.num_test=16"]


def bench_trivial(work: Path, repeats: int) -> dict:
    from prefect import flow

    from flows.common import Context, RunSettings, run_stages
    from flows.pipeline import kelix_pipeline
    from kelix.config import load_config

    catalogue.STAGES = {n: dataclasses.replace(s, entry=f"{__name__}:trivial_stage") for n, s in catalogue.STAGES.items()}
    names = list(catalogue.STAGES)
    data = _dataset(work)
    cfg = load_config("tiny", overrides=OVERRIDES)
    mlflow_uri = f"sqlite:///{work / 'mlflow.db'}"

    @flow(name="bench-noop")
    def noop() -> int:
        return 1

    t0 = time.perf_counter()
    noop()  # starts the ephemeral API server
    startup = time.perf_counter() - t0

    @flow(name="bench-stages")
    def stages_flow(artifacts: str) -> None:
        ctx = Context(RunSettings(preset="tiny", overrides=OVERRIDES, data=str(data), artifacts=artifacts,
                                  mlflow_uri=mlflow_uri, retry_delay=0, progress=False))
        with ctx.parent_run("bench") as parent:
            run_stages(ctx, names, parent)

    stages_flow(str(work / "warm"))  # MLflow database creation and first imports out of the measurement
    direct, flowed = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        for name in names:
            run_stage(name, cfg, data, str(work / f"direct-{i}"), progress=False)
        direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stages_flow(str(work / f"flow-{i}"))
        flowed.append(time.perf_counter() - t0)

    args = dict(preset="tiny", overrides=OVERRIDES, data=str(data), artifacts=str(work / "pipeline"),
                mlflow_uri=mlflow_uri, retry_delay=0, progress=False, release=False)
    t0 = time.perf_counter()
    kelix_pipeline(**args)
    first = time.perf_counter() - t0
    reruns = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kelix_pipeline(**args)
        reruns.append(time.perf_counter() - t0)
    d, f = min(direct), min(flowed)
    return {"mode": "trivial", "stages": len(names), "startup_s": round(startup, 2),
            "direct_s": round(d, 2), "flow_s": round(f, 2),
            "overhead_per_stage_s": round((f - d) / len(names), 3),
            "pipeline_first_s": round(first, 2), "pipeline_rerun_s": round(min(reruns), 2),
            "all_runs": {"direct": [round(x, 2) for x in direct], "flow": [round(x, 2) for x in flowed],
                         "rerun": [round(x, 2) for x in reruns]}}


def bench_real(args: argparse.Namespace) -> dict:
    from prefect import flow

    from flows.pipeline import kelix_pipeline

    @flow(name="bench-noop")
    def noop() -> int:
        return 1

    t0 = time.perf_counter()
    noop()
    startup = time.perf_counter() - t0
    reruns = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        summary = kelix_pipeline(preset=args.preset, overrides=args.overrides, data=args.data,
                                 artifacts=args.artifacts, mlflow_uri=args.mlflow_uri, progress=False)
        reruns.append(time.perf_counter() - t0)
        ran = [r["name"] for r in summary["stages"].values() if not r["skipped"]]
        if ran:
            print(f"note: stages ran (their keys changed): {ran}", file=sys.stderr)
    return {"mode": "real", "startup_s": round(startup, 2), "pipeline_rerun_s": round(min(reruns), 2),
            "all_reruns": [round(x, 2) for x in reruns]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="time a no-change rerun of a real pipeline")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data", default=None)
    parser.add_argument("--artifacts", default=None)
    parser.add_argument("--mlflow-uri", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.real:
        result = bench_real(args)
    else:
        with tempfile.TemporaryDirectory(prefix="kelix-bench-") as tmp:
            result = bench_trivial(Path(tmp), args.repeats)
    print(json.dumps(result, indent=1))
    if "overhead_per_stage_s" in result:
        print(f"per-stage overhead {result['overhead_per_stage_s']:.2f}s (target <= 2s); "
              f"no-change rerun {result['pipeline_rerun_s']:.1f}s beyond {result['startup_s']:.1f}s startup "
              f"(target <= 15s)")
    else:
        print(f"no-change rerun {result['pipeline_rerun_s']:.1f}s beyond {result['startup_s']:.1f}s startup (target <= 15s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
