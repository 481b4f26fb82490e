"""Where training metrics go: a JSONL file beside the stage's outputs, and MLflow when a run is active.

The stage runner (not the model code) opens the MLflow run; this only logs into it if one is open, so the
loop runs the same in a test, a shell, a flow or a pod. A tracking failure never stops training.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


class MetricLogger:
    def __init__(self, path: Path | None = None, prefix: str = ""):
        self.path = Path(path) if path else None
        self.prefix = prefix
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {f"{self.prefix}{k}": float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, **clean}) + "\n")
        _log_mlflow(clean, step)


# Runs this process stopped logging to because MLflow failed (the server went away, a locked database). Training
# goes on: metrics.jsonl keeps every point, and whoever owns the run replays it once MLflow is back.
MLFLOW_FAILED_RUNS: set[str] = set()


def _log_mlflow(metrics: dict[str, float], step: int) -> None:
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a hard dependency, but the loop does not need it
        return
    run = mlflow.active_run()
    if run is None or not metrics or run.info.run_id in MLFLOW_FAILED_RUNS:
        return
    try:
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step)
    except Exception as exc:  # noqa: BLE001 - any tracking failure: losing hours of training to it is worse
        MLFLOW_FAILED_RUNS.add(run.info.run_id)
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"warning: MLflow stopped taking metrics at step {step} ({type(exc).__name__}: {first}); training "
              "goes on and metrics.jsonl keeps them, to be replayed into the run afterwards", file=sys.stderr)
