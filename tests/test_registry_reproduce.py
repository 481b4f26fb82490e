"""`kelix reproduce` building blocks: metric comparison, code-version warnings and fetching the recorded data
version with real git and DVC in a scratch repository."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kelix.config import load_config
from kelix.data.config import DataConfig
from kelix.registry.reproduce import Recorded, ReproduceError, check_code, compare_metrics, prepare_data
from kelix.stages.keys import data_fingerprint

DVC = str(Path(sys.executable).with_name("dvc"))
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def sh(*cmd: str, cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=GIT_ENV)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_compare_metrics():
    rows = compare_metrics({"a": 0.5, "b": 0.7, "gone": 1.0}, {"a": 0.51, "b": 0.75, "new": 2.0}, lambda _: 0.02)
    assert [(r.name, r.ok) for r in rows] == [("a", True), ("b", False), ("gone", False), ("new", False)]
    assert rows[0].diff == pytest.approx(0.01) and rows[1].diff == pytest.approx(0.05)


def test_compare_metrics_uses_each_metrics_tolerance_relative_above_one():
    """GenEval keeps its own tolerance; PSNR (dB) moves relative to its size, not by 0.02 dB."""
    from kelix.eval.config import EvalConfig

    ecfg = EvalConfig(regression_tolerance=0.02, metric_tolerances={"geneval_overall": 0.05})
    recorded = {"geneval_overall": 0.25, "vqa_accuracy": 0.90, "recon_psnr": 22.0}
    rows = compare_metrics(recorded, {"geneval_overall": 0.29, "vqa_accuracy": 0.89, "recon_psnr": 21.7}, ecfg.tolerance)
    assert [(r.name, r.allowed, r.ok) for r in rows] == [
        ("geneval_overall", 0.05, True), ("recon_psnr", pytest.approx(0.44), True), ("vqa_accuracy", 0.02, True)]
    rows = compare_metrics(recorded, {"geneval_overall": 0.19, "vqa_accuracy": 0.87, "recon_psnr": 21.5}, ecfg.tolerance)
    assert [r.ok for r in rows] == [False, False, False]


def test_check_code_warns_on_other_commit(monkeypatch):
    import kelix.tracking as tracking

    monkeypatch.setattr(tracking, "git_sha", lambda: "abc")
    warnings: list[str] = []
    check_code({"git_sha": "abc"}, warnings.append)
    assert warnings == []
    check_code({"git_sha": "def+dirty"}, warnings.append)
    assert "git checkout def" in warnings[0]
    check_code({"git_sha": "abc+dirty"}, warnings.append)
    assert "uncommitted" in warnings[1]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git + DVC repository whose data.dvc tracks data/ (the shapes set under data/shapes), at version 1."""
    import kelix.registry.reproduce as reproduce
    import kelix.tracking as tracking
    from kelix.data.shapes import generate

    root = tmp_path / "repo"
    root.mkdir()
    sh("git", "init", "-q", cwd=root)
    sh(DVC, "init", "-q", cwd=root)
    generate(root / "data" / "shapes", DataConfig(num_train=4, num_val=2, num_test=2, seed=0))
    sh(DVC, "add", "-q", "data", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "data v1", cwd=root)
    monkeypatch.setattr(reproduce, "repo_root", lambda: root)
    monkeypatch.setattr(tracking, "repo_root", lambda: root)
    data = root / "data" / "shapes"
    return {"root": root, "data": data, "sha": sh("git", "rev-parse", "HEAD", cwd=root),
            "fp": data_fingerprint(data), "version": tracking.dvc_md5(data)}


def recorded(repo: dict, **lineage: str) -> Recorded:
    cfg = load_config("tiny", overrides=[f"data.root={repo['data']}"])
    base = {"git_sha": repo["sha"], "data_fingerprint": repo["fp"], "data_version": repo["version"]}
    return Recorded("kelix", "1", {**base, **lineage}, {}, cfg)


def test_data_already_at_the_recorded_version(repo, tmp_path):
    assert prepare_data(recorded(repo), tmp_path / "work", lambda _: None) == repo["data"]


def test_missing_workspace_data_is_checked_out(repo, tmp_path):
    shutil.rmtree(repo["data"])
    logs: list[str] = []
    assert prepare_data(recorded(repo), tmp_path / "work", logs.append) == repo["data"]
    assert data_fingerprint(repo["data"]) == repo["fp"] and "dvc checkout" in logs[0]


def test_local_changes_are_not_discarded(repo, tmp_path):
    manifest = repo["data"] / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + "\n")
    with pytest.raises(ReproduceError, match="(?s)checkout.*--force"):
        prepare_data(recorded(repo), tmp_path / "work", lambda _: None)
    assert manifest.read_text().endswith("\n\n")  # still the user's edit


def test_older_data_version_is_fetched_beside_the_workspace(repo, tmp_path):
    from kelix.data.shapes import generate

    generate(repo["data"], DataConfig(num_train=4, num_val=2, num_test=2, seed=1), overwrite=True)
    sh(DVC, "add", "-q", "data", cwd=repo["root"])
    sh("git", "commit", "-qam", "data v2", cwd=repo["root"])
    v2 = data_fingerprint(repo["data"])
    got = prepare_data(recorded(repo), tmp_path / "work", lambda _: None)
    assert got == tmp_path / "work" / "data" and data_fingerprint(got) == repo["fp"] != v2
    assert data_fingerprint(repo["data"]) == v2  # the workspace keeps the current version


def test_untracked_data_mismatch_says_what_to_do(repo, tmp_path):
    with pytest.raises(ReproduceError, match="DVC did not track it: regenerate"):
        prepare_data(recorded(repo, data_fingerprint="0" * 16, data_version="content:0"), tmp_path, lambda _: None)
