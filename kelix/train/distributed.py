"""Data parallelism for the shared loop under `torchrun`: DDP or FSDP2, and resharding-safe checkpoints.

How a model is sharded lives here, beside the loop, not inside the model (torchtitan's split). The loop asks
`current()` whether it runs in a process group; if so it wraps the model with `wrap()` and checkpoints with
`torch.distributed.checkpoint` (DCP), whose files can be loaded by any number of processes, one included:
a 2-GPU job killed mid-way resumes on 1 or 4.

The strategy comes from `KELIX_DISTRIBUTED` ("ddp" | "fsdp"), set by the stage entry point from
`runtime.distributed`. gloo on CPU, nccl on GPUs.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

ENV_STRATEGY = "KELIX_DISTRIBUTED"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    strategy: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistInfo | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op for a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return current()


def current() -> DistInfo | None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    strategy = os.environ.get(ENV_STRATEGY, "ddp")
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"{ENV_STRATEGY}={strategy!r}: choose ddp or fsdp")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), strategy)


def is_main_process() -> bool:
    info = current()
    return info is None or info.is_main


def wrap(model: torch.nn.Module, info: DistInfo, units: Iterable[torch.nn.Module] = ()) -> torch.nn.Module:
    """DDP replicates and all-reduces gradients; FSDP2 shards parameters, gradients and optimiser state.

    Under FSDP2 each module of `units` is its own unit (its weights are gathered only while it runs), the rest
    is one root unit (gathered once per step). A unit's all-gather runs when the unit is called, so units must
    be modules every rank calls equally often in a step, such as an LLM's decoder layers. The Block Decoder is
    not one: a rank whose batch holds no image target skips its image pass, the collectives no longer pair
    up, and the job hangs (seen on llm-1 when every ModuleList block was a unit).
    """
    if info.strategy == "ddp":
        device_ids = [info.local_rank] if torch.cuda.is_available() else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def gather_full(sharded: torch.nn.Module, whole: torch.nn.Module) -> None:
    """Copy the full weights and buffers of an FSDP2-sharded module into its unsharded twin, on every rank
    (a collective: every rank must call it, and does so tensor by tensor in the same order).

    One tensor is gathered at a time, so the accelerator holds at most one whole parameter beyond the shards,
    and `whole` may live elsewhere (host memory: see the loop's parking)."""
    from torch.distributed.tensor import DTensor

    targets = {**dict(whole.named_parameters()), **dict(whole.named_buffers())}
    for name, tensor in itertools.chain(sharded.named_parameters(), sharded.named_buffers()):
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        targets[name].copy_(full)


def world_size() -> int:
    info = current()
    return info.world_size if info else 1


def collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL (torchrun on GPUs) reduces only GPU tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over the ranks (the tensor itself on one process); every rank must call it. The result
    is on the input's device, whichever device the backend reduces on."""
    if current() is None:
        return tensor
    on = tensor.to(collective_device())
    dist.all_reduce(on)
    return on.to(tensor.device)


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks that report it. Ranks may report different metrics (a rank whose
    batch holds no image has no code loss), so keys travel with the values: a plain all_reduce of mismatched
    vectors would hang or mix metrics up."""
    if current() is None:
        return values
    gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    keys = sorted(set().union(*gathered))
    return {k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered) for k in keys}


def save_dcp(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             extra: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Every rank writes its shard into one folder (a shared filesystem); rank 0 finishes it atomically."""
    from kelix.files import file_sha256
    from kelix.train.checkpoint import PREFIX, prune_checkpoints

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{PREFIX}{step:07d}"
    tmp = ckpt_dir / f".tmp-{final.name}-dcp"
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"), no_dist=current() is None)
    if is_main_process():
        files = sorted(p for p in (tmp / "dcp").iterdir() if p.is_file())
        meta = {"step": step, "format": "dcp", "world_size": (current().world_size if current() else 1),
                "files": {f"dcp/{p.name}": file_sha256(p) for p in files}, **(extra or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(ckpt_dir, step, keep)
    barrier()
    return final


def load_dcp(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint into a model sharded for *this* run's world size (any number of processes)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(path) / "dcp"), no_dist=current() is None)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def from_main(obj):
    """The main process's `obj` on every rank (`obj` itself in a single process); every rank must call it."""
    if current() is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if current() is not None:
        dist.barrier()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights (a collective under FSDP: every rank must call it), on the CPU of rank 0 only (use
    them there)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if current() is None:
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap(model), options=options)
