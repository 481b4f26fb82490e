"""Real stages under torchrun (gloo, CPU): a tokenizer, an LLM and a DiT stage on 2 processes, under DDP and
under FSDP2, follow the single-process loss curve and end at the same weights; a 2-process LLM stage killed
mid-way resumes on 1.

Each stage runs through its pod entry point, `python -m kelix.stages run NAME`, on the shrunken tiny config of
the end-to-end tests. The token losses are normalised by the global batch's token counts and random draws are
made per slot of the global batch, so 2 processes match 1 up to float summation order.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from small_config import SMALL, schedules

pytestmark = pytest.mark.slow

OVERRIDES = [*SMALL, *schedules("num_steps=6", "batch_size=8", "checkpoint_every=2", "log_every=1",
                                 sections=("tokenizer.train1", "llm.train1", "llm.train2", "dit.train_ae"))]


def _cmd(name: str, nproc: int, data: Path, store: Path, overrides: list[str]) -> list[str]:
    args = ["-m", "kelix.stages", "run", name, "--preset", "tiny", "--data", str(data), "--artifacts", str(store)]
    args += [a for o in overrides for a in ("--set", o)]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def _env(strategy: str = "ddp") -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "KELIX_DISTRIBUTED": strategy, "MLFLOW_TRACKING_URI": ""}


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant. torchrun starts each worker in a session of its own, so killing
    torchrun's process group would leave the workers running (and finishing the stage on their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:  # the whole tree was listed first: killing a parent re-parents its children
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run(name: str, nproc: int, data: Path, store: Path, cwd: Path, overrides: list[str] = OVERRIDES,
         strategy: str = "ddp") -> None:
    proc = subprocess.Popen(_cmd(name, nproc, data, store, overrides), cwd=cwd, env=_env(strategy), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)  # torchrun's workers too: a hung collective outlives its parent
        out, err = proc.communicate()
        raise AssertionError(f"{name} on {nproc} process(es) {strategy} hung for 600 s:\n{err[-4000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{name} on {nproc} process(es) failed:\n{out[-2000:]}\n{err[-4000:]}")


def _out_dir(store: Path, name: str) -> Path:
    (out,) = [p for p in (store / name).iterdir() if p.is_dir()]
    return out


def _losses(out: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r and "step" in r]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for f in sorted((out / "model").rglob("*.safetensors")):
        found.update({f"{f.relative_to(out)}:{k}": v for k, v in load_file(f).items()})
    return found


def _distance(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a) ** 0.5


def _assert_lands_together(start: dict, one: dict, two: dict, share: float) -> None:
    """`two` ends much nearer to `one` than training moved `one` from `start`. Per-element tolerances do not
    work here: Adam's first steps move every weight by about the learning rate whatever the gradient's size,
    so a slightly different gradient flips small updates. A run whose gradients were not all-reduced drifts
    about as far from `one` as training moves it."""
    moved, apart = _distance(start, one), _distance(one, two)
    print(f"final weights apart / moved: {apart:.4f} / {moved:.4f}")  # shown with pytest -s (docs/benchmarks.md)
    assert moved > 0 and apart < share * moved, f"training moved the weights {moved:.4f}, the runs end {apart:.4f} apart"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Data and the single-process tokenizer stages and llm-1 that the tested stages read."""
    from kelix.config import load_config
    from kelix.data.shapes import generate_shapes
    from kelix.stages.run import run_stage

    root = tmp_path_factory.mktemp("dist")
    generate_shapes(root / "data", num_train=128, num_val=32, num_test=32, seed=0, image_size=64)
    cfg = load_config("tiny", overrides=OVERRIDES)
    for name in ("tokenizer-1", "tokenizer-2", "tokenizer-3", "llm-1"):
        run_stage(name, cfg, root / "data", str(root / "base"), progress=False)
    return root


def _store(base: Path, tmp: Path, name: str, keep: tuple[str, ...]) -> Path:
    """A fresh artifact store holding only the finished input stages `keep`."""
    store = tmp / name
    for stage in keep:
        shutil.copytree(base / "base" / stage, store / stage)
    return store


SCHEDULE = {"tokenizer-1": "tokenizer.train1", "llm-1": "llm.train1", "llm-2": "llm.train2", "aedit": "dit.train_ae"}


def _start(base: Path, tmp: Path, name: str, inputs: tuple[str, ...], overrides: list[str] = OVERRIDES) -> dict:
    """The weights the stage starts training from: the same stage run for 0 steps."""
    store = _store(base, tmp, "start", inputs)
    _run(name, 1, base / "data", store, tmp, [*overrides, f"{SCHEDULE[name]}.num_steps=0"])
    return _weights(_out_dir(store, name))


TOKENIZER_STAGES = ("tokenizer-1", "tokenizer-2", "tokenizer-3")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name, inputs", [
    ("tokenizer-1", ()),
    ("llm-1", TOKENIZER_STAGES),  # Qwen3 frozen; under FSDP2 its decoder layers are units of their own
    ("llm-2", (*TOKENIZER_STAGES, "llm-1")),  # every LLM weight trains
    ("aedit", TOKENIZER_STAGES),
])
def test_two_process_stage_follows_the_single_process_run(base, tmp_path, name, inputs, strategy):
    one, two = _store(base, tmp_path, "one", inputs), _store(base, tmp_path, "two", inputs)
    _run(name, 1, base / "data", one, tmp_path)
    _run(name, 2, base / "data", two, tmp_path, strategy=strategy)
    out1, out2 = _out_dir(one, name), _out_dir(two, name)
    l1, l2 = _losses(out1), _losses(out2)
    assert len(l1) == len(l2) == 6
    print(f"{name} {strategy}: loss curves within {max(abs(a - b) / abs(a) for a, b in zip(l1, l2)):.1e} relative")
    assert l2 == pytest.approx(l1, rel=1e-3)
    if name.startswith("tokenizer"):  # counted over the global batch's codes, not averaged over ranks' counts
        assert _losses(out2, "batch_util_min") == _losses(out1, "batch_util_min")
    _assert_lands_together(_start(base, tmp_path, name, inputs), _weights(out1), _weights(out2), 1e-3)
    # Rank 0 alone wrote the outputs; the checkpoints are DCP folders any world size can load.
    assert json.loads((out2 / "_STATUS.json").read_text())["status"] == "SUCCESS"
    assert json.loads((out2 / "checkpoints" / "step_0000006" / "meta.json").read_text())["format"] == "dcp"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_killed_two_process_llm_stage_resumes_on_one_process(base, tmp_path, strategy):
    inputs = TOKENIZER_STAGES
    steps = [o for o in OVERRIDES if not o.startswith("llm.train1.num_steps")] + ["llm.train1.num_steps=40"]
    ref, killed = _store(base, tmp_path, "ref", inputs), _store(base, tmp_path, "killed", inputs)
    _run("llm-1", 1, base / "data", ref, tmp_path, steps)

    proc = subprocess.Popen(_cmd("llm-1", 2, base / "data", killed, steps), cwd=tmp_path, env=_env(strategy),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    ckpts = killed / "llm-1"
    while not any(ckpts.glob("*/checkpoints/step_0000004")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    _kill_tree(proc.pid)  # the node goes away: no handler runs, no cleanup, no worker survives
    proc.wait()
    time.sleep(1)  # the workers' SIGKILL is delivered; nothing of theirs writes after this
    out = _out_dir(killed, "llm-1")
    done = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert done and done[-1] < 40, f"the run was not killed mid-way (checkpoints {done})"
    assert json.loads((out / "_STATUS.json").read_text())["status"] == "RUNNING"

    _run("llm-1", 1, base / "data", killed, tmp_path, steps)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40
    assert metrics["resumed_from_step"] == done[-1]  # picked up the killed run's last checkpoint, not step 0
    assert json.loads((out / "_STATUS.json").read_text())["status"] == "SUCCESS"
    _assert_lands_together(_start(base, tmp_path, "llm-1", inputs, steps), _weights(_out_dir(ref, "llm-1")), _weights(out), 1e-3)
