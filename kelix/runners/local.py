"""The in-process runner: `kelix.stages.run.run_stage` in this process, with the stage's MLflow run active.

The cheapest way to run a stage (no interpreter start, no config round trip) and the default of the
embedded pipeline. The stage's MetricLogger sees the active MLflow run and logs every step into it.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kelix.config import KelixConfig
    from kelix.stages.run import StageResult
    from kelix.tracking import StageRun


class LocalRunner:
    kind = "local"

    def __init__(self, progress: bool = True):
        self.progress = progress

    def run(self, name: str, cfg: "KelixConfig", data_dir: str | Path, artifacts: str, *, force: bool = False,
            tracking: "StageRun | None" = None) -> "StageResult":
        from kelix.stages.run import run_stage

        with tracking.active() if tracking is not None else nullcontext():
            return run_stage(name, cfg, data_dir, artifacts, force=force, progress=self.progress)
