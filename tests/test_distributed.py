"""torchrun with gloo on the CPU: 2 processes match 1, and a killed 2-process run resumes on 1 or 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("dist_toy.py")


def _run(out: Path, nproc: int, strategy: str = "ddp", *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "KELIX_DISTRIBUTED": strategy, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent.parent)}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(SCRIPT), str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-4000:])
    return proc


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, strategy):
    _run(tmp_path / "one", 1)
    _run(tmp_path / "two", 2, strategy)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 10
    assert one == pytest.approx(two, rel=1e-4, abs=1e-6)
    w1 = load_file(tmp_path / "one" / "final_world1.safetensors")
    w2 = load_file(tmp_path / "two" / "final_world2.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


def test_killed_two_process_run_resumes_on_one_and_on_two(tmp_path):
    _run(tmp_path / "ref", 1)
    for name, resume_nproc in (("on1", 1), ("on2", 2)):
        out = tmp_path / name
        crashed = _run(out, 2, "ddp", "--crash-at", "6", check=False)
        assert crashed.returncode != 0 and "killed at micro-batch 6" in crashed.stdout + crashed.stderr
        ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
        assert ckpts == ["step_0000004"]
        assert json.loads((out / "checkpoints" / "step_0000004" / "meta.json").read_text())["format"] == "dcp"
        _run(out, resume_nproc, "ddp")
        assert json.loads((out / "done.json").read_text())["resumed_from"] == 4  # not a fresh start
        ref = load_file(tmp_path / "ref" / "final_world1.safetensors")
        got = load_file(out / f"final_world{resume_nproc}.safetensors")
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
