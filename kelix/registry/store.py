"""Where the registry lives and how writers to it are serialised.

Tracking URI: `MLFLOW_TRACKING_URI`, else `sqlite:///<repo>/mlflow.db`; for a local store the artifacts go to
`mlartifacts/` beside the database (or `MLFLOW_ARTIFACTS_DESTINATION`), for a server the server decides.

Why a lock: MLflow's registry keeps aliases but no compare-and-set and no alias history, so two promotions
racing each other could interleave "read champion, move previous-champion, move champion" and leave
previous-champion pointing at the wrong version and two records claiming the same predecessor. Every
alias change takes `registry_lock`, an exclusive `flock` on a lock file: beside the database for SQLite,
in `~/.cache/kelix/locks/` (one per tracking URI) for servers. flock excludes other processes and other
threads alike (each acquisition opens its own file description) and is released by the kernel if the
holder dies. Inside the lock, the writer re-reads the aliases after setting them (compare-and-set
check): a mismatch means a writer that does not share this lock file (another host against the same
server) interfered, and raises `RegistryConflict` instead of recording a promotion that did not stick.
Cross-host promotions against one server should therefore run from one place (the release flow) or
share the lock folder (`KELIX_LOCK_DIR` on a shared filesystem).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from kelix.files import LockHeld, exclusive_lock

REGISTRY_EXPERIMENT = "kelix-registry"
MODEL_EXPERIMENT = "kelix"


# MLflow's answers to "no such alias" and "no such model": the only read failures that mean "nobody holds it".
NOT_FOUND_CODES = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed; the message says why and what to do."""


class RegistryConflict(RegistryError):
    """Aliases changed under us while we held the lock: another writer does not share our lock file."""


def repo_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() else Path.cwd()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go for a local store; None lets a server use its own default."""
    dest = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION")
    if dest:
        return dest if "://" in dest else Path(dest).resolve().as_uri()
    db = _sqlite_path(uri)
    return (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None


def configure():
    """Point the fluent API and a client at the tracking URI; returns the MlflowClient."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client, name: str) -> str:
    """The experiment's id, creating it (with the local artifact folder) if needed; safe under races."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    base = artifact_location(tracking_uri())
    try:
        return client.create_experiment(name, artifact_location=f"{base}/{name}" if base else None)
    except MlflowException:
        exp = client.get_experiment_by_name(name)  # created by a concurrent caller between our read and write
        if exp is None:
            raise
        return exp.experiment_id


def lock_path(uri: str | None = None) -> Path:
    uri = uri or tracking_uri()
    db = _sqlite_path(uri)
    if db is not None and not os.environ.get("KELIX_LOCK_DIR"):
        return db.resolve().with_name(db.name + ".kelix-registry.lock")
    folder = Path(os.environ.get("KELIX_LOCK_DIR") or Path.home() / ".cache" / "kelix" / "locks")
    return folder / f"registry-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def registry_lock(timeout: float = 300.0, uri: str | None = None):
    """Hold the registry's exclusive lock; the file records the holder for the timeout message."""
    path = lock_path(uri)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(path, timeout))
        except LockHeld as held:
            raise RegistryError(f"registry lock {path} is still held after {timeout:g} s by {held}; "
                                "retry when it is released") from None
        yield path
