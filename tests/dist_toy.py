"""A tiny training run for the distributed tests: `torchrun --nproc-per-node 2 tests/dist_toy.py OUT ...`.

Run as a script (1 process) or under torchrun; writes the logged loss curve and the final weights to OUT.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from kelix.train import distributed
from kelix.train.config import TrainConfig
from kelix.train.loop import train
from kelix.train.sampler import StepSampler


class Crash(RuntimeError):
    pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--crash-at", type=int, default=0, help="raise at this micro-batch index (simulated kill)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = distributed.init_from_env()
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    y = torch.sin(x.sum(1, keepdim=True))
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    sampler = StepSampler(len(x), 16, seed=1)

    def get_batch(i: int):
        if args.crash_at and i == args.crash_at:
            raise Crash(f"killed at micro-batch {i}")
        idx = torch.from_numpy(sampler.indices(i))
        return x[idx], y[idx]

    def step_fn(m, batch):
        loss = torch.nn.functional.mse_loss(m(batch[0]), batch[1])
        return loss, {}

    cfg = TrainConfig(num_steps=args.steps, batch_size=16, lr=1e-2, warmup_steps=2, checkpoint_every=4, log_every=1)
    out = Path(args.out)
    result = train(model, [{"params": model.parameters()}], get_batch, step_fn, cfg, out, progress=False)
    full = distributed.full_state_dict(model)
    if info is None or info.is_main:
        save_file({k: v.clone() for k, v in full.items()}, out / f"final_world{info.world_size if info else 1}.safetensors")
        (out / "done.json").write_text(json.dumps({"world": info.world_size if info else 1, "pid": os.getpid(),
                                                    "resumed_from": result.resumed_from}))
    if info is not None:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
