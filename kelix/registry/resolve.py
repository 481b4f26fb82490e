"""Turn a model reference into a local bundle folder: a folder path, `models:/NAME@ALIAS` or `models:/NAME/VERSION`.

A registered version is downloaded once into `~/.cache/kelix/models/` (or `$KELIX_CACHE/models/`), keyed by
tracking URI, name and version (a version's artifacts never change, an alias is resolved to its version
first). The cached copy is checked against its `bundle.json` on every load; a damaged copy is
downloaded again once, and if the registry's own copy is damaged the error names the file.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

import yaml

from kelix.bundle import BundleError, KelixBundle, check_bundle
from kelix.registry.store import NOT_FOUND_CODES, RegistryError, configure, tracking_uri

DEFAULT_MODEL = "models:/kelix@champion"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    m = _URI.match(uri.strip())
    if not m:
        raise RegistryError(f"{uri!r} is not a model reference: use a bundle folder, models:/NAME@ALIAS or "
                            f"models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]


def resolve_version(uri: str) -> tuple[str, str]:
    """(name, version) a models:/ URI points at now."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_models_uri(uri)
    if version:
        return name, version
    try:
        return name, str(configure().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND_CODES:
            raise RegistryError(f"could not read alias {alias!r} of {name!r} from {tracking_uri()} ({exc}): check the "
                                "tracking server and retry") from exc
        raise RegistryError(f"no version of {name!r} has alias {alias!r} in {tracking_uri()}: register and promote "
                            f"a model first (`kelix registry status` shows what exists)") from exc


def _cache_dir(name: str, version: str) -> Path:
    base = Path(os.environ.get("KELIX_CACHE") or Path.home() / ".cache" / "kelix")
    store = hashlib.sha256(tracking_uri().encode()).hexdigest()[:12]
    return base / "models" / store / name / version


def bundle_path(model_dir: Path) -> Path:
    """The bundle folder inside a downloaded pyfunc model (from its MLmodel file)."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.exists():
        raise BundleError(f"{mlmodel} is missing: {model_dir} is not an MLflow model; delete it and load again")
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    rel = (flavor.get("artifacts") or {}).get("bundle", {}).get("path")
    if not rel:
        raise BundleError(f"{mlmodel} names no `bundle` artifact: this model was not registered by kelix")
    return model_dir / rel


def _download(name: str, version: str, dest: Path) -> Path:
    import mlflow

    configure()
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.download")
    tmp.mkdir(parents=True)
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def download_bundle(uri: str) -> Path:
    """A verified local bundle folder for a models:/ URI (downloaded on first use)."""
    name, version = resolve_version(uri)
    dest = _cache_dir(name, version)
    if dest.exists():
        try:
            path = bundle_path(dest)
            check_bundle(path)
            return path
        except BundleError:
            shutil.rmtree(dest)  # a damaged cached copy: fetch it again below
    from mlflow.exceptions import MlflowException

    try:
        downloaded = _download(name, version, dest)
    except MlflowException as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegistryError(f"cannot fetch {name} v{version} from {tracking_uri()}: {reason}. "
                            f"`kelix registry status` lists the registered versions") from exc
    try:
        path = bundle_path(downloaded)
        check_bundle(path)
    except BundleError as exc:
        raise BundleError(f"the registered artifacts of {name} v{version} are damaged: {exc}. Register the model "
                          f"again from the eval stage's bundle/ folder") from exc
    return path


def local_bundle(ref: str | Path) -> Path:
    """A bundle folder for a folder path or a models:/ URI."""
    text = str(ref)
    if text.startswith("models:/"):
        return download_bundle(text)
    path = Path(text)
    if not path.exists():
        raise BundleError(f"{path} does not exist: pass a bundle folder (the eval stage's bundle/) or a models:/ URI")
    return path


def load_bundle(ref: str | Path = DEFAULT_MODEL, device: str | None = None) -> KelixBundle:
    return KelixBundle.load(local_bundle(ref), device=device)
