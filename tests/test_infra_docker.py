"""infra/docker: the images run as uid 10001, pin the same torch/mlflow/boto3 as pyproject.toml,
and start the stage entry point. No Docker engine here, so the Dockerfiles are parsed, not built."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "infra" / "docker"
PINS = dict(re.fullmatch(r"([\w\[\].-]+)==(\S+)", dep).groups()
            for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if "==" in dep)
PROJECT_IMAGES = ("Dockerfile", "Dockerfile.cpu")


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in (DOCKER / name).read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"(?m)^\s*(\w+)\s+(.*)$", joined)]


def last(name: str, instruction: str) -> str:
    return [args for ins, args in instructions(name) if ins == instruction][-1]


def runs(name: str) -> str:
    return "\n".join(args for ins, args in instructions(name) if ins == "RUN")


@pytest.mark.parametrize("name", PROJECT_IMAGES + ("Dockerfile.mlflow",))
def test_runs_as_non_root_uid_10001(name):
    assert last(name, "USER") == "10001:10001"
    assert "useradd --uid 10001 --gid 10001" in runs(name)


@pytest.mark.parametrize("name", PROJECT_IMAGES)
def test_stage_entry_point(name):
    assert last(name, "WORKDIR") == "/app"
    assert json.loads(last(name, "ENTRYPOINT")) == ["python", "-m", "kelix.stages", "run"]
    assert json.loads(last(name, "CMD")) == ["--help"]
    # No .git in the image: the build passes the commit for MLflow's run tags.
    assert "KELIX_GIT_SHA=" in [a for i, a in instructions(name) if i == "ARG"]
    assert "KELIX_GIT_SHA=${KELIX_GIT_SHA}" in [a for i, a in instructions(name) if i == "ENV"]


@pytest.mark.parametrize("name", PROJECT_IMAGES)
def test_installs_pinned_torch_then_the_project(name):
    run = runs(name)
    torch = re.findall(r"pip install torch==(\S+)", run)
    assert torch == [PINS["torch"]]
    # The project itself, from pyproject.toml's pins, after torch so the pin is already met.
    assert run.index("pip install torch==") < run.index("pip install . ")
    assert "pip install --no-deps ." in run
    # The Kubernetes worker plugin is pinned identically in both images.
    assert re.findall(r"prefect-kubernetes==(\S+)", run) == ["0.8.0"]


def test_cpu_image_takes_torch_from_the_cpu_index():
    assert last("Dockerfile.cpu", "FROM") == "python:3.11-slim"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs("Dockerfile.cpu")


def test_cuda_image_has_python_311_on_a_cuda_base():
    assert [a for i, a in instructions("Dockerfile") if i == "ARG"][0].startswith("CUDA_IMAGE=nvidia/cuda:")
    assert last("Dockerfile", "FROM") == "${CUDA_IMAGE}"
    assert "python3.11 -m venv /opt/venv" in runs("Dockerfile")


def test_mlflow_image_matches_the_project_pins():
    run = runs("Dockerfile.mlflow")
    for package in ("mlflow", "boto3"):
        assert f"{package}=={PINS[package]}" in run
    assert "psycopg2-binary==" in run
    assert json.loads(last("Dockerfile.mlflow", "ENTRYPOINT")) == ["mlflow", "server"]


def test_dockerignore_keeps_secrets_and_local_state_out():
    ignored = set((ROOT / ".dockerignore").read_text().splitlines())
    assert {".env", ".git", ".venv", "artifacts/", "mlruns/", "data/"} <= ignored
    assert "README.md" not in ignored and "pyproject.toml" not in ignored   # `pip install .` needs both
