"""`kelix plan`: size a cluster before submitting, from the models built on PyTorch's meta device.

Every model (Kelix-Tok + aux decoder, the unified LLM, the DiT and AE-DiT with their DC-AE) is built at the
preset's real size with no memory, so parameter counts are exact. FLOPs and memory are estimates with stated
assumptions (printed with the table):
- FLOPs per step = 2*P*T forward + 2*P*T activation gradients + 2*P_trainable*T weight gradients, plus
  attention's 4*L*S^2*d per sequence forward (x3 with backward); P counts the weights a token passes through.
- Memory per GPU under FSDP2 as the shared loop runs it (kelix/train/loop.py, distributed.wrap), fp32 weights:
  sharded state (16 bytes per trainable parameter: weight, gradient, two Adam moments; 4 per frozen) / GPUs
  + the loop's unsharded copy of the model (4 bytes per parameter), only in the stages that look at it while
    they train (the DiT stages' sample grids and EMA); the tokenizer and LLM stages park it in host memory,
    which the table gives per GPU process (a node of 8 GPUs needs 8 times that in RAM). Not in the table: at
    a stage's start, until the copy is sharded, the GPU briefly holds the whole model twice
  + gathered weights: the root unit whole (4 x its parameters) and two units in flight (the LLM's decoder
    layers are units; the other models are one root unit)
  + the root unit's unsharded gradients before their reduce-scatter (4 x its trainable parameters)
  + activations with per-layer checkpointing (~ 2 bytes x tokens per GPU x width x (layers + 10)).
- GPU-hours = steps x FLOPs per step / (GPUs x peak x MFU).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from kelix.config import KelixConfig


@dataclass
class Part:
    name: str
    params: int
    trainable: int
    tokens_per_example: int
    seq_len: int
    width: int
    layers: int
    # Parameters inside FSDP units of their own (the LLM's decoder layers); the rest is the root unit.
    unit_params: int = 0
    # Its weights are part of another part's (the Block Decoder's are the LLM's): only its activations count
    # towards memory.
    nested: bool = False


@dataclass
class StagePlan:
    stage: str
    steps: int
    batch: int
    flops_per_step: float
    memory_gb: float
    gpu_hours: float
    # Host memory per GPU process: the whole model parked there while the shards train (0 when kept on the GPU).
    host_gb: float = 0.0
    # GPUs the stage's Job runs on (its runtime resources: gpus x num_nodes, unless --gpus says otherwise).
    gpus: int = 1

    @property
    def wall_hours(self) -> float:
        return self.gpu_hours / max(1, self.gpus)


def _count(module: torch.nn.Module, frozen_prefixes: tuple[str, ...] = ()) -> tuple[int, int]:
    total = trainable = 0
    for name, p in module.named_parameters():
        total += p.numel()
        if not name.startswith(frozen_prefixes):
            trainable += p.numel()
    return total, trainable


def build_parts(cfg: KelixConfig) -> dict:
    """Every model of the pipeline at full size on the meta device."""
    from diffusers import AutoencoderDC

    from kelix.dit.model import KelixDiT
    from kelix.llm.model import KelixLLM
    from kelix.tokenizer.aux_decoder import AuxDecoder
    from kelix.tokenizer.model import KelixTokenizer

    tok_cfg = dataclasses.replace(cfg.tokenizer, vit_pretrained="")
    llm_cfg = dataclasses.replace(cfg.llm, pretrained="")
    t, ll, d = tok_cfg, llm_cfg, cfg.dit
    patches = (t.image_size // t.patch_size) ** 2
    with torch.device("meta"):
        tokenizer = KelixTokenizer(tok_cfg, load_pretrained=False)
        aux = AuxDecoder.from_tokenizer_config(tok_cfg, t.text_vocab_size)
        codebooks = torch.empty(t.num_codebooks, t.codebook_size, t.code_dim)
        llm = KelixLLM.from_config(llm_cfg, t.num_codebooks, t.codebook_size, t.text_vocab_size, codebooks, t.num_positions)
        autoencoder = AutoencoderDC() if d.latent == "dcae" else None  # diffusers' defaults are DC-AE f32c32
        dit = KelixDiT(d, ll.hidden_size, autoencoder)
    tok_total, _ = _count(tokenizer)
    aux_total, _ = _count(aux)
    llm_total, _ = _count(llm)
    dit_total, dit_train = _count(dit, ("autoencoder.",))
    dit_tokens = (dit.latent_shape[1] // d.patch_size) ** 2
    bd_params = sum(p.numel() for p in llm.block_decoder.parameters())
    return {
        "vit_params": sum(p.numel() for p in tokenizer.encoder.vit.parameters()),
        "tokenizer": Part("Kelix-Tok (ViT + quantizer)", tok_total, tok_total, patches, patches, t.vit_hidden_size, t.vit_num_layers),
        "aux": Part("aux decoder (Qwen3)", aux_total, aux_total, t.num_positions + t.max_text_len,
                    t.num_positions + t.max_text_len, t.aux_hidden_size, t.aux_num_layers),
        "llm": Part("unified LLM (Qwen3 + block enc/dec)", llm_total, llm_total, ll.max_blocks, ll.max_blocks,
                    ll.hidden_size, ll.num_layers, sum(p.numel() for m in llm.decoder_layers() for p in m.parameters())),
        "block_decoder": Part("block decoder", bd_params, bd_params, ll.max_blocks * (t.num_codebooks + 1),
                              t.num_codebooks + 1, ll.bd_hidden_size, ll.bd_num_layers, nested=True),
        "dit": Part("DiT (SANA)" + (" + frozen DC-AE" if autoencoder is not None else ""), dit_total, dit_train,
                    dit_tokens, dit_tokens, d.num_heads * d.head_dim, d.num_layers),
    }


def _flops(part: Part, batch: int, trainable: int | None = None) -> float:
    tokens = batch * part.tokens_per_example
    trainable = part.trainable if trainable is None else trainable
    dense = 4 * part.params * tokens + 2 * trainable * tokens
    sequences = tokens / max(1, part.seq_len)
    attention = 3 * 4 * part.layers * part.seq_len**2 * part.width * sequences
    return dense + attention


def _memory_gb(parts: list[tuple[Part, int]], batch: int, gpus: int, parked: bool) -> tuple[float, float]:
    """(GPU, host) GB per GPU process; `batch` is one micro-batch (TrainConfig.batch_size), spread over the GPUs."""
    total = host = 0.0
    for p, trainable in parts:
        root = p.params - p.unit_params
        in_flight = 2 * p.unit_params / max(1, p.layers)
        sharded = (16 * trainable + 4 * (p.params - trainable)) / gpus
        gathered = 4 * (root + in_flight) + 4 * trainable * root / max(1, p.params)
        acts = 2 * max(1, batch // gpus) * p.tokens_per_example * p.width * (p.layers + 10)
        copy = 4 * p.params
        if p.nested:
            sharded = gathered = copy = 0
        total += sharded + gathered + acts + (0 if parked else copy)
        host += copy if parked else 0
    return total / 1e9, host / 1e9


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "": 1}


def quantity_gb(text: str) -> float | None:
    """A Kubernetes memory quantity ("512Gi", "200G", "8589934592") in GB; None when it is not one."""
    digits = text.rstrip("KMGTi")
    try:
        return float(digits) * _UNITS[text[len(digits):]] / 1e9
    except (KeyError, ValueError):
        return None


def stage_gpus(cfg: KelixConfig, name: str) -> int:
    """GPUs one stage's Job asks for: its runtime resources (or the default), gpus x num_nodes."""
    from kelix.stages.catalogue import stage_resources

    res = stage_resources(cfg, name)
    return max(1, res.gpus) * max(1, res.num_nodes)


def plan(cfg: KelixConfig, gpus: int | None, peak_tflops: float, mfu: float) -> tuple[dict, list[StagePlan]]:
    """Per stage: FLOPs, memory per GPU and GPU-hours. `gpus` None: each stage on the GPUs its resources ask
    for; a number: every stage on that many."""
    parts = build_parts(cfg)
    tok, aux, llm, bd, dit = (parts[k] for k in ("tokenizer", "aux", "llm", "block_decoder", "dit"))
    # Stage 1 trains only the adapter, SimVQ projections and up-projections: everything but the ViT.
    adapters = tok.params - parts["vit_params"]
    stages = []

    def add(name: str, train, members: list[tuple[Part, int]], parked: bool = True) -> None:
        # An optimiser step takes grad_accum_steps micro-batches of batch_size: FLOPs count them all, memory one.
        batch = train.batch_size * max(1, train.grad_accum_steps)
        flops = sum(_flops(p, batch, t) for p, t in members)
        hours = train.num_steps * flops / (peak_tflops * 1e12 * mfu) / 3600
        n = gpus or stage_gpus(cfg, name)
        gpu_gb, host_gb = _memory_gb(members, train.batch_size, n, parked)
        stages.append(StagePlan(name, train.num_steps, batch, flops, gpu_gb, hours, host_gb, n))

    t, ll, d = cfg.tokenizer, cfg.llm, cfg.dit
    add("tokenizer-1", t.train1, [(tok, adapters), (aux, 0)])
    add("tokenizer-2", t.train2, [(tok, tok.params), (aux, aux.params)])
    add("tokenizer-3", t.train3, [(tok, tok.params), (aux, aux.params)])
    add("llm-1", ll.train1, [(llm, bd.params), (bd, bd.params)])
    for name, train in (("llm-2", ll.train2), ("llm-3", ll.train3), ("llm-4", ll.train4)):
        add(name, train, [(llm, llm.params), (bd, bd.params)])
    # The DiT stages draw sample grids and keep an EMA during training: their whole copy stays on the GPU.
    add("aedit", d.train_ae, [(dit, dit.trainable)], parked=False)
    # The DiT's condition (the frozen LLM's hidden states) is computed once per image and cached by the stage.
    add("dit-1", d.train1, [(dit, dit.trainable)], parked=False)
    add("dit-2", d.train2, [(dit, dit.trainable)], parked=False)
    return parts, stages


def format_plan(cfg: KelixConfig, parts: dict, stages: list[StagePlan], peak: float, mfu: float,
                gpu_memory_gb: float = 80.0) -> str:
    counts = sorted({s.gpus for s in stages})
    where = f"{counts[0]} GPUs per stage" if len(counts) == 1 else "each stage on its own resources' GPUs"
    lines = [f"# kelix plan: preset {cfg.preset}, {where} at {peak:g} TFLOP/s bf16 peak, MFU {mfu:.0%}, "
             f"{gpu_memory_gb:g} GB each", "",
             "| model | parameters | trainable | tokens/example |", "|---|---:|---:|---:|"]
    for part in (p for p in parts.values() if isinstance(p, Part)):
        lines.append(f"| {part.name} | {part.params / 1e6:,.1f} M | {part.trainable / 1e6:,.1f} M | {part.tokens_per_example:,} |")
    too_big = [s.stage for s in stages if s.memory_gb > gpu_memory_gb]
    lines += ["", "| stage | steps | batch | GPUs | TFLOPs/step | memory/GPU (FSDP) | host memory/GPU | GPU-hours | wall hours |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in stages:
        fits = " (does not fit)" if s.stage in too_big else ""
        lines.append(f"| {s.stage} | {s.steps:,} | {s.batch:,} | {s.gpus} | {s.flops_per_step / 1e12:,.1f} "
                     f"| {s.memory_gb:,.1f} GB{fits} | {s.host_gb:,.1f} GB | {s.gpu_hours:,.1f} | {s.wall_hours:,.1f} |")
    total, wall = sum(s.gpu_hours for s in stages), sum(s.wall_hours for s in stages)
    per_node = max(1, cfg.runtime.default_resources.gpus)
    host = max(s.host_gb for s in stages) * per_node
    asked = cfg.runtime.default_resources.memory
    fsdp = cfg.runtime.distributed == "fsdp"  # only the FSDP loop parks a copy in host memory
    lines += ["", f"Total: {total:,.0f} GPU-hours, {wall:,.1f} hours of wall time with the stages one after another."]
    if fsdp:
        lines.append(f"Host memory per node ({per_node} GPU processes): up to {host:,.0f} GB for parked model copies "
                     f"(runtime.default_resources.memory asks for {asked}).")
    lines.append("Estimates: see `kelix/plan.py` for the FLOP and memory model.")
    if fsdp and (quantity_gb(asked) or 0.0) < host:
        lines.append(f"runtime.default_resources.memory ({asked}) is below the {host:,.0f} GB the parked copies need: "
                     f"raise it (e.g. --set runtime.default_resources.memory={int(host * 1.5 / 1.074)}Gi) or pods will be "
                     "OOM-killed while the tokenizer and LLM stages train.")
    if too_big:
        lines.append(f"{', '.join(too_big)} need more than {gpu_memory_gb:g} GB per GPU: use larger GPUs "
                     "(--gpu-memory-gb says what you have; an H200 has 141), more of them (runtime.resources), or "
                     "fewer examples per micro-batch (the stage's grad_accum_steps).")
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    from kelix.config_cli import config_from_args

    cfg = config_from_args(args)
    parts, stages = plan(cfg, args.gpus, args.peak_tflops, args.mfu)
    print(format_plan(cfg, parts, stages, args.peak_tflops, args.mfu, args.gpu_memory_gb))
    return 0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def register(sub) -> None:
    from kelix.config_cli import add_config_args

    p = sub.add_parser("plan", help="count parameters, FLOPs, memory and GPU-hours per stage (no memory used)")
    add_config_args(p)
    p.add_argument("--gpus", type=_positive(int), default=None,
                   help="GPUs every stage runs on (default: each stage's runtime resources, gpus x num_nodes)")
    p.add_argument("--peak-tflops", type=_positive(float), default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=_positive(float), default=0.4, help="expected model FLOPs utilisation (default 0.4)")
    p.add_argument("--gpu-memory-gb", type=_positive(float), default=80.0,
                   help="memory per GPU; stages above it are flagged (H100: 80)")
    p.set_defaults(func=_cmd)
