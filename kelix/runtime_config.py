"""Where and how stages run: artifact store, device, threads, distributed strategy, per-stage resources."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Resources:
    """What one stage asks of a Kubernetes node (ignored by the local runner)."""

    gpus: int = 0
    num_nodes: int = 1
    cpu: str = "2"
    memory: str = "8Gi"


@dataclass
class RuntimeConfig:
    # Artifact store URI: a local folder or s3://bucket/prefix.
    artifacts: str = "artifacts"
    # "auto" picks cuda when available, else cpu.
    device: str = "auto"
    num_threads: int = 0
    # "none" | "ddp" | "fsdp": how the shared training loop shards under torchrun ("none" = ddp when
    # torchrun starts several processes). fsdp shards weights, gradients and optimiser state (kelix/train/loop.py).
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    # Deterministic torch kernels in every stage (kelix.stages.run.apply_determinism): a rerun of one config on one
    # machine, with the same thread count, trains the same weights. Off on small and paper, whose GPU stages keep
    # the faster kernels.
    deterministic: bool = True
    # torch.compile the LLM's repeated blocks (Qwen3 decoder layers, Block Decoder) while a stage trains: fuses
    # the elementwise work that dominates an eager step on a GPU. Off in every preset until a GPU run measures it
    # (benchmarks/gpu_checks.sh). On 2 CPU cores a tiny llm-2 step is 1.2x faster compiled, after about a minute
    # of compiling: 30 s net over 1,500 steps, a loss on the short stages (docs/benchmarks.md, "Compiling").
    compile: bool = False
    # Stage name -> resources; stages not listed get `default_resources`.
    default_resources: Resources = field(default_factory=Resources)
    resources: dict[str, Resources] = field(default_factory=dict)
    image: str = "ghcr.io/kelix-platform/kelix:latest"
    namespace: str = "kelix"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)


def runtime_preset(preset: str) -> RuntimeConfig:
    if preset == "tiny":
        return RuntimeConfig()
    gpus = 1 if preset == "small" else 8
    nodes = 1 if preset == "small" else 4
    return RuntimeConfig(
        distributed="ddp" if preset == "small" else "fsdp", deterministic=False,
        # Paper: each of a node's 8 processes parks a whole fp32 copy of the 8.7 B LLM in RAM while its shards
        # train (35 GB each, `kelix plan`'s host column), so a node needs ~300 GB for that alone.
        default_resources=Resources(gpus=gpus, num_nodes=nodes, cpu="16", memory="200Gi" if preset == "small" else "512Gi"),
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
