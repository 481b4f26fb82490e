"""What every runner shares: the `Runner` interface, stage failure types and the transient-failure test.

A runner executes one stage of `kelix.stages` somewhere (this process, a child process, a Kubernetes Job)
and returns its `StageResult`. Failures are sorted into two kinds because the flow's retry policy needs to
know: a transient one (node lost, pod evicted or preempted, network blip) is worth running again, and the
stage resumes from its last checkpoint; a permanent one (bad config, OOM with the same settings, missing
image, a bug) fails fast so nobody waits through retries that cannot succeed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kelix.files import disk_full

if TYPE_CHECKING:  # the runners import no heavy module at import time
    from kelix.config import KelixConfig
    from kelix.stages.run import StageResult
    from kelix.tracking import StageRun


class StageError(RuntimeError):
    """A stage did not finish. `retryable` says whether running it again may help."""

    retryable = False

    def __init__(self, message: str, *, stage: str = "", logs: str = ""):
        super().__init__(message)
        self.stage = stage
        self.logs = logs


class TransientStageError(StageError):
    """The stage was interrupted from outside (eviction, preemption, node loss, a kill signal): rerun it."""

    retryable = True


class StageFailed(StageError):
    """The stage itself failed; the same inputs would fail again."""


class StageOOMKilled(StageFailed):
    """The container ran out of memory: raise the stage's memory (runtime.resources) or shrink its batch."""


class ImagePullError(StageFailed):
    """The node cannot pull the stage's image: check runtime.image and the registry credentials."""


class StageDeadlineExceeded(StageFailed):
    """The Job ran past its activeDeadlineSeconds."""


class StageConfigError(StageFailed):
    """The stage process rejected its configuration or arguments (exit code 2)."""


# OSError subclasses that are mistakes, not weather: retrying a missing file does not create it.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_transient(exc: BaseException | None) -> bool:
    """True for failures worth retrying: interruptions, network and I/O trouble, API server hiccups."""
    if exc is None:
        return False
    if isinstance(exc, StageError):
        return exc.retryable
    from kelix.config import ConfigError
    from kelix.stages.run import StageInputMissing

    if isinstance(exc, (ConfigError, StageInputMissing)):
        return False
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    if disk_full(exc):
        return False  # a full disk stays full for the retry: someone has to free space
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    try:
        from kubernetes.client.exceptions import ApiException
    except ImportError:  # pragma: no cover - kubernetes is a hard dependency
        ApiException = ()  # type: ignore[assignment]
    if ApiException and isinstance(exc, ApiException):
        # 0 = no HTTP answer at all; 429/5xx = an overloaded or restarting API server.
        return exc.status in (0, 408, 429, 500, 502, 503, 504)
    try:
        import urllib3.exceptions
        if isinstance(exc, urllib3.exceptions.HTTPError):
            return True
    except ImportError:  # pragma: no cover
        pass
    # botocore/aiobotocore connection errors do not derive from the builtins; match them by name. So is
    # kelix.stages.run.StageBusy (another process runs the stage: a later try finds it finished), which the runners
    # must not import.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                         "ConnectionClosedError", "ServerDisconnectedError", "ClientConnectorError", "StageBusy"})


class Runner(Protocol):
    """Runs one stage and returns its result; raises a `StageError` (or the stage's own error)."""

    kind: str

    def run(
        self,
        name: str,
        cfg: "KelixConfig",
        data_dir: str | Path,
        artifacts: str,
        *,
        force: bool = False,
        tracking: "StageRun | None" = None,
    ) -> "StageResult":
        ...


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run (so lines show in the UI), else plain logging."""
    try:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError
    except ImportError:  # pragma: no cover - prefect is a hard dependency
        return logging.getLogger("kelix.runners")
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("kelix.runners")


# ---- helpers the out-of-process runners share ----

# Exception names (as the stage's FAILED marker records them) that mean "interrupted", not "wrong".
_TRANSIENT_NAMES = {
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError",
    "BrokenPipeError", "TimeoutError", "OSError", "IOError", "EndpointConnectionError", "ConnectTimeoutError",
    "ReadTimeoutError", "ConnectionClosedError", "ServerDisconnectedError", "ClientConnectorError",
    "TransientStageError", "KeyboardInterrupt",
}


def params_yaml(cfg: "KelixConfig") -> str:
    """The fully resolved config as a params file: `load_config(params=...)` rebuilds the same config."""
    import json

    import yaml

    from kelix.config import canonical_json

    # Through JSON so tuples become lists (safe_dump refuses tuples; the typed loader turns them back).
    return yaml.safe_dump(json.loads(canonical_json(cfg)), sort_keys=False)


def check_inputs(name: str, store, keys: dict[str, str]) -> None:
    from kelix.stages.catalogue import get_stage
    from kelix.stages.run import StageInputMissing

    for dep in get_stage(name).inputs:
        if not store.is_done(dep, keys[dep]):
            raise StageInputMissing(
                f"stage {name} needs {dep} (key {keys[dep]}) which has not finished in {store.uri}: "
                f"run `kelix stage run {dep}` first, or `kelix pipeline run`")


def skipped_result(store, name: str, key: str, seconds: float = 0.0) -> "StageResult":
    from kelix.stages.run import StageResult

    status = store.status(name, key) or {}
    return StageResult(name, key, store.local_dir(name, key), dict(status.get("metrics") or {}), True, seconds)


def finished_result(store, name: str, key: str, seconds: float) -> "StageResult":
    """The result of a stage another process ran, read from its SUCCESS marker (outputs are not pulled)."""
    from kelix.stages.run import StageResult

    status = store.status(name, key) or {}
    if status.get("status") != "SUCCESS":
        raise StageFailed(
            f"stage {name} exited cleanly but {store.uri}/{name}/{key} is {status.get('status', 'missing')}: "
            "the process resolved a different key (another config or dataset?)", stage=name)
    metrics = status.get("metrics")
    if metrics is None:
        import json

        text = store.read_text(name, key, "metrics.json")
        metrics = json.loads(text) if text else {}
    return StageResult(name, key, store.local_dir(name, key), dict(metrics), False, seconds)


def marker_error(store, name: str, key: str) -> tuple[str, bool | None]:
    """The error a failed stage recorded in its marker, and whether it looks transient (None: no record)."""
    status = store.status(name, key) or {}
    if status.get("status") != "FAILED" or not status.get("error"):
        return "", None
    error = str(status["error"])
    if isinstance(status.get("transient"), bool):  # judged by is_transient where it failed
        return error, status["transient"]
    exc_name = error.split(":", 1)[0].strip().rsplit(".", 1)[-1]
    return error, exc_name in _TRANSIENT_NAMES
