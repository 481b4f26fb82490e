"""Where a stage runs: in this process, in a child process, or as a Kubernetes Job.

All three take the same call, `runner.run(name, cfg, data_dir, artifacts, force=, tracking=)`, return a
`kelix.stages.run.StageResult`, skip a stage whose outputs for its key exist, and raise `StageError`s that say
whether a retry can help (`is_transient`). The flows pick one per pipeline run (`--runner`).
"""
from __future__ import annotations

from typing import Any

from kelix.runners.base import (ImagePullError, Runner, StageConfigError, StageDeadlineExceeded, StageError,
                                StageFailed, StageOOMKilled, TransientStageError, is_transient)

RUNNERS = ("local", "subprocess", "kubernetes")


def get_runner(kind: str, **options: Any) -> Runner:
    """A runner by name; `options` go to its constructor (e.g. `poll_interval` for kubernetes)."""
    if kind == "local":
        from kelix.runners.local import LocalRunner

        return LocalRunner(**options)
    if kind == "subprocess":
        from kelix.runners.process import SubprocessRunner

        return SubprocessRunner(**options)
    if kind == "kubernetes":
        from kelix.runners.kubernetes import KubernetesRunner

        return KubernetesRunner(**options)
    from kelix.config import ConfigError

    raise ConfigError(f"unknown runner {kind!r}; choose one of {', '.join(RUNNERS)}")


__all__ = ["RUNNERS", "get_runner", "Runner", "StageError", "StageFailed", "TransientStageError", "StageOOMKilled",
           "ImagePullError", "StageDeadlineExceeded", "StageConfigError", "is_transient"]
