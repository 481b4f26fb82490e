"""Where training metrics go: a JSONL file beside the stage's outputs, and MLflow when a run is active.

The stage runner (not the model code) opens the MLflow run; this only logs into it if one is open, so the
loop runs the same in a test, a shell, a flow or a pod.
"""
from __future__ import annotations

import json
import math
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


def _log_mlflow(metrics: dict[str, float], step: int) -> None:
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a hard dependency, but the loop does not need it
        return
    if mlflow.active_run() is not None and metrics:
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step)
