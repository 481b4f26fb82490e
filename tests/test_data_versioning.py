"""DVC versioning: snapshot -> push -> fresh clone -> pull gives the same bytes, on a local and an S3 remote.

Each test builds its own git repository under tmp_path; /work/main's own DVC setup is never touched.
"""
from __future__ import annotations

import subprocess

import pytest

from kelix.data.config import DataConfig
from kelix.data.shapes import generate_shapes
from kelix.data.versioning import VersioningError, data_version, pull, run_dvc, snapshot

CFG = DataConfig(num_train=24, num_val=4, num_test=4)


def _git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=kelix-test", "-c", "user.email=test@kelix.invalid", *args], cwd=cwd,
                   check=True, capture_output=True)


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "-q", cwd=repo)
    generate_shapes(repo / "data" / "shapes", num_train=24, num_val=4, num_test=4)
    return repo


def _snapshot_commit_clone(repo, tmp_path):
    md5 = snapshot(repo / "data" / "shapes", CFG)
    assert md5.endswith(".dir") and data_version(repo / "data.dvc") == md5
    assert "/shapes" in (repo / "data" / ".gitignore").read_text()  # the data itself stays out of git
    _git("add", "data.dvc", "data/.gitignore", ".dvc/config", ".dvcignore", ".dvc/.gitignore", cwd=repo)
    _git("commit", "-q", "-m", "dataset", cwd=repo)
    clone = tmp_path / "clone"
    _git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "data" / "shapes").exists()
    return md5, clone


@pytest.mark.slow
def test_local_remote_round_trip(repo, tmp_path):
    remote = tmp_path / "remote"
    run_dvc(["init", "-q"], repo)
    run_dvc(["remote", "add", "-d", "local", str(remote)], repo)
    md5, clone = _snapshot_commit_clone(repo, tmp_path)
    assert any(remote.rglob("*"))
    assert pull(clone / "data.dvc") == (clone / "data" / "shapes").resolve()
    assert _tree(clone / "data" / "shapes") == _tree(repo / "data" / "shapes")
    assert data_version(clone / "data.dvc") == md5

    # Same content, same version; changed content, new version, and the .dvc file follows it.
    assert snapshot(repo / "data" / "shapes", CFG, push=False) == md5
    generate_shapes(repo / "data" / "shapes", num_train=24, num_val=4, num_test=4, seed=1, overwrite=True)
    md5_new = snapshot(repo / "data" / "shapes", CFG)
    assert md5_new != md5 and data_version(repo / "data.dvc") == md5_new


@pytest.mark.slow
def test_s3_remote_round_trip_on_moto(repo, tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="kelix-data")
        run_dvc(["init", "-q"], repo)
        # The remote comes from the environment, as in the compose stack and on the cluster: nothing committed.
        monkeypatch.setenv("KELIX_DVC_REMOTE_URL", "s3://kelix-data/dvc")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        md5, clone = _snapshot_commit_clone(repo, tmp_path)
        assert "kelix-data" not in (repo / ".dvc" / "config").read_text()
        assert endpoint in (repo / ".dvc" / "config.local").read_text()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="kelix-data", Prefix="dvc/").get("Contents", [])]
        assert len(keys) >= 33  # 32 images + manifest + dataset.json + the .dir listing, minus identical files
        pull(clone / "data.dvc")
        assert _tree(clone / "data" / "shapes") == _tree(repo / "data" / "shapes")
        assert data_version(clone / "data.dvc") == md5
    finally:
        server.stop()


def test_refuses_invalid_data_and_non_git_folders(repo, tmp_path):
    manifest = repo / "data" / "shapes" / "manifest.jsonl"
    first = manifest.read_text().splitlines()[0]
    manifest.write_text("not json\n" * 5 + manifest.read_text())
    with pytest.raises(VersioningError, match="failed validation"):
        snapshot(repo / "data" / "shapes", CFG, push=False)
    assert not (repo / "data.dvc").exists() and not (repo / ".dvc").exists()
    assert first in manifest.read_text()  # quarantine kept the good records in place

    loose = generate_shapes(tmp_path / "loose" / "shapes", num_train=24, num_val=4, num_test=4)
    with pytest.raises(VersioningError, match="not inside a git repository"):
        snapshot(loose, CFG, push=False)
    with pytest.raises(VersioningError, match="does not exist"):
        data_version(tmp_path / "none.dvc")


@pytest.mark.slow
def test_cli_snapshot_prints_the_version(repo, capsys, monkeypatch):
    from kelix.cli import main

    monkeypatch.chdir(repo)
    args = ["--set", "data.num_train=24", "--set", "data.num_val=4", "--set", "data.num_test=4"]
    assert main(["data", "snapshot", "data/shapes", "--no-push", *args]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == data_version(repo / "data.dvc")
    assert main(["data", "snapshot", "data/shapes", *args]) == 2  # push without a remote: a clear error
    assert "remote" in capsys.readouterr().err
