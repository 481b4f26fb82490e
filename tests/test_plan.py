"""`kelix plan`: the paper preset builds on the meta device; counts match real models at tiny size."""
from __future__ import annotations

import pytest
import torch

from kelix.config import load_config
from kelix.plan import build_parts, format_plan, plan


def test_paper_preset_on_meta_device():
    cfg = load_config("paper")
    parts, stages = plan(cfg, gpus=None, peak_tflops=989.0, mfu=0.4)
    llm = parts["llm"].params
    # Each stage on the GPUs its Job asks for: the preset's 4 nodes x 8.
    assert {s.gpus for s in stages} == {32}
    assert {s.gpus for s in plan(cfg, gpus=64, peak_tflops=989.0, mfu=0.4)[1]} == {64}
    # Qwen3-8B (8.19 B) plus 8 x 8192 visual rows in the input and output tables of width 4096.
    assert 8.5e9 < llm < 9.0e9
    assert parts["block_decoder"].params < 20e6  # 1 layer, width 512
    assert [s.stage for s in stages][:3] == ["tokenizer-1", "tokenizer-2", "tokenizer-3"]
    assert all(s.gpu_hours > 0 and s.memory_gb > 0 for s in stages)
    # The Qwen3 decoder layers are FSDP units of their own. The loop's unsharded fp32 copy of the LLM is parked
    # in host memory (4 bytes per parameter per process), so an LLM stage fits an 80 GB GPU; the DiT stages,
    # which look at their copy while training, keep it on the GPU.
    assert 0.7 * llm < parts["llm"].unit_params < llm
    by_name = {s.stage: s for s in stages}
    assert by_name["llm-2"].host_gb == pytest.approx(4 * llm / 1e9) and by_name["llm-2"].memory_gb < 80
    assert by_name["dit-1"].host_gb == 0 and by_name["dit-1"].memory_gb > 4 * parts["dit"].params / 1e9
    # stage 2 trains the ViT too, so it costs more per step than stage 1
    assert stages[1].flops_per_step > stages[0].flops_per_step
    # llm-2/3 take their 512 sequences as 2 micro-batches of 256: FLOPs count both, memory one.
    assert by_name["llm-2"].batch == 512 and by_name["llm-2"].flops_per_step > by_name["llm-4"].flops_per_step * 1.9
    assert sum(s.wall_hours for s in stages) == pytest.approx(sum(s.gpu_hours for s in stages) / 32)
    text = format_plan(cfg, parts, stages, 989.0, 0.4)
    assert "GPU-hours" in text and "llm-2" in text
    assert "does not fit" not in text  # 80 GB GPUs hold every stage
    assert "up to 280 GB for parked model copies" in text  # 8 processes per node x 35 GB
    assert "is below" not in text  # the paper preset's pods ask for 512Gi
    low = load_config("paper", overrides=["runtime.default_resources.memory=200Gi"])
    assert "runtime.default_resources.memory (200Gi) is below the 280 GB" in format_plan(low, parts, stages, 989.0, 0.4)
    # 40 GB GPUs: the LLM's pre-training stage is flagged with what to do.
    small_gpus = format_plan(cfg, parts, stages, 989.0, 0.4, gpu_memory_gb=40)
    assert "llm-2 |" in small_gpus and "(does not fit)" in small_gpus and "use larger GPUs" in small_gpus


def test_quantity_gb():
    from kelix.plan import quantity_gb

    assert quantity_gb("512Gi") == pytest.approx(549.76, abs=0.01)
    assert quantity_gb("200G") == 200.0 and quantity_gb("8589934592") == pytest.approx(8.59, abs=0.01)
    assert quantity_gb("lots") is None and quantity_gb("12Xi") is None


def test_meta_counts_equal_real_tiny_models():
    from kelix.llm.model import KelixLLM
    from kelix.tokenizer.model import KelixTokenizer

    cfg = load_config("tiny")
    parts = build_parts(cfg)
    tokenizer = KelixTokenizer(cfg.tokenizer, load_pretrained=False)
    assert parts["tokenizer"].params == sum(p.numel() for p in tokenizer.parameters())
    t = cfg.tokenizer
    llm = KelixLLM.from_config(cfg.llm, t.num_codebooks, t.codebook_size, t.text_vocab_size,
                               torch.randn(t.num_codebooks, t.codebook_size, t.code_dim), t.num_positions)
    assert parts["llm"].params == sum(p.numel() for p in llm.parameters())


@pytest.mark.parametrize("flag", ["--gpus", "--mfu", "--peak-tflops", "--gpu-memory-gb"])
def test_plan_refuses_a_count_that_is_not_positive(flag, capsys):
    from kelix.cli import main

    with pytest.raises(SystemExit) as info:
        main(["plan", flag, "0"])
    assert info.value.code == 2 and "must be positive, got 0" in capsys.readouterr().err
