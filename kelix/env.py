"""Environment defaults that keep every tool offline and quiet (shared/DESIGN.md, known traps).

Applied by the CLI, the stage entry point, the flows and the tests, so users never have to export them.
`setdefault` keeps any value the user did set.
"""
from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def apply_env_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def user_at_host() -> str:
    """user@host of this process, for the records others read (who started a Job, who moved an alias). Best
    effort: a container may have no USER variable and no passwd entry."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
