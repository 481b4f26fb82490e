"""Dataset versions with DVC: validate, commit the dataset folder to the DVC cache, push it to the remote.

The version of a dataset is the md5 DVC records in its .dvc file (`data.dvc` for the default `data/shapes`);
lineage tags record it (stage keys use `kelix.stages.keys.data_fingerprint`, a content hash of the folder). DVC
runs as a subprocess of the `dvc` executable beside the running Python: its CLI is its stable interface, and a
subprocess keeps DVC's global state out of training code.
A new dataset gets a minimal .dvc file naming its path, then `dvc commit` fills in the hash; the same command
updates it later, so one code path serves the first snapshot and every one after (`dvc add` would refuse an
output an existing .dvc file already tracks).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from kelix.data.config import DataConfig
from kelix.env import apply_env_defaults


ENV_REMOTE_URL = "KELIX_DVC_REMOTE_URL"
ENV_REMOTE = "kelix-env"


class VersioningError(RuntimeError):
    """A DVC step that failed, with DVC's own message."""


def dvc_command() -> list[str]:
    exe = Path(sys.executable).parent / "dvc"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("dvc")
    return [found] if found else [sys.executable, "-m", "dvc"]


def run_dvc(args: list[str], cwd: str | Path, env: dict | None = None) -> str:
    """Run one dvc command in `cwd`; raise VersioningError with its output when it fails."""
    apply_env_defaults()
    full_env = {**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})}
    proc = subprocess.run([*dvc_command(), *args], cwd=cwd, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}")
        raise VersioningError(f"`dvc {' '.join(args)}` failed in {cwd}: {msg}")
    return proc.stdout


def find_repo(path: str | Path) -> Path:
    """The git repository that holds `path` (DVC versions live in git)."""
    p = Path(path).resolve()
    for candidate in [p, *p.parents]:
        if (candidate / ".git").exists():
            return candidate
    raise VersioningError(f"{path} is not inside a git repository; DVC versions need one (run `git init`)")


def ensure_dvc(repo: str | Path) -> None:
    if not (Path(repo) / ".dvc").is_dir():
        run_dvc(["init", "-q"], repo)


def remote_args(repo: str | Path, remote: str | None = None) -> list[str]:
    """`-r NAME` for a pull or push: the named remote, the env's remote URL, or nothing (DVC's default)."""
    if remote:
        return ["-r", remote]
    url = os.environ.get(ENV_REMOTE_URL, "").strip()
    if not url:
        return []
    run_dvc(["remote", "add", "--local", "--force", ENV_REMOTE, url], repo)
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    if url.startswith("s3://") and endpoint:
        run_dvc(["remote", "modify", "--local", ENV_REMOTE, "endpointurl", endpoint], repo)
    return ["-r", ENV_REMOTE]


def default_dvc_file(root: str | Path, repo: str | Path) -> Path:
    """`data.dvc` at the repo root for the default dataset folder, `<folder>.dvc` beside any other."""
    root, repo = Path(root).resolve(), Path(repo).resolve()
    if root == (repo / DataConfig().root).resolve():
        return repo / "data.dvc"
    return root.with_name(root.name + ".dvc")


def _tracked_path(dvc_file: Path) -> Path:
    meta = yaml.safe_load(dvc_file.read_text()) or {}
    outs = meta.get("outs") or []
    if len(outs) != 1 or "path" not in outs[0]:
        raise VersioningError(f"{dvc_file} must track exactly one output")
    return (dvc_file.parent / outs[0]["path"]).resolve()


def snapshot(root: str | Path, cfg: DataConfig | None = None, *, dvc_file: str | Path | None = None,
             remote: str | None = None, push: bool = True) -> str:
    """Validate the dataset at `root`, commit it to DVC and push it; return its md5 (the data version).

    Validation quarantines bad records first, so the version pushed is the cleaned dataset. A failed
    validation raises VersioningError and nothing is committed.
    """
    from kelix.data.validation import validate

    root = Path(root).resolve()
    report = validate(root, cfg)
    if not report.passed:
        raise VersioningError(f"{root} failed validation, not versioned: " + "; ".join(report.failures))
    repo = find_repo(root)
    ensure_dvc(repo)
    target = Path(dvc_file).resolve() if dvc_file else default_dvc_file(root, repo)
    if target.exists():
        if _tracked_path(target) != root:
            raise VersioningError(f"{target} tracks {_tracked_path(target)}, not {root}")
    else:
        rel = os.path.relpath(root, target.parent).replace(os.sep, "/")
        target.write_text(yaml.safe_dump({"outs": [{"path": rel}]}, sort_keys=False))
    run_dvc(["commit", "-f", "-q", str(target)], repo)
    if push:
        try:
            run_dvc(["push", "-q", *remote_args(repo, remote), str(target)], repo)
        except VersioningError as exc:
            raise VersioningError(f"{exc}\n(is a remote configured? `dvc remote add -d NAME URL`)") from exc
    return data_version(target)


def data_version(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 recorded in a .dvc file: the dataset version stage keys are built from."""
    path = Path(dvc_file)
    if not path.exists():
        raise VersioningError(f"{path} does not exist; run `kelix data snapshot` to version the dataset")
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    md5 = outs[0].get("md5") if outs else None
    if not md5:
        raise VersioningError(f"{path} has no md5 yet; run `kelix data snapshot` to version the dataset")
    return str(md5)


def pull(dvc_file: str | Path = "data.dvc", remote: str | None = None) -> Path:
    """Fetch the dataset version a .dvc file names from the remote into the workspace; return its folder."""
    path = Path(dvc_file).resolve()
    repo = find_repo(path)
    run_dvc(["pull", "-q", *remote_args(repo, remote), str(path)], repo)
    return _tracked_path(path)
