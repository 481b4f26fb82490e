"""Typed configs: presets, params file + --set overrides, strict errors, stable hashes."""
from __future__ import annotations

import pytest

from kelix.config import PRESETS, ConfigError, config_from_dict, config_hash, load_config, preset_config
from kelix.stages.catalogue import STAGES
from kelix.stages.keys import config_view, stage_keys


def test_presets_resolve_and_differ():
    hashes = {p: config_hash(preset_config(p)) for p in PRESETS}
    assert len(set(hashes.values())) == 3
    paper = preset_config("paper")
    assert (paper.tokenizer.num_codebooks, paper.tokenizer.codebook_size, paper.tokenizer.code_dim) == (8, 8192, 128)
    assert (paper.tokenizer.patch_size, paper.tokenizer.merge, paper.tokenizer.num_positions) == (14, 2, 324)
    assert (paper.llm.bd_num_layers, paper.llm.bd_hidden_size, paper.llm.bd_num_heads, paper.llm.bd_intermediate_size) == (1, 512, 4, 2048)
    assert paper.dit.latent == "dcae" and paper.dit.output_size == 504


def test_params_file_then_overrides(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("preset: small\ntokenizer:\n  num_codebooks: 6\n  train1:\n    lr: 0.001\nllm:\n  num_layers: 2\n")
    cfg = load_config(None, params, ["llm.num_layers=5", "dit.guidance_scale=2"])
    assert cfg.preset == "small"
    assert cfg.tokenizer.num_codebooks == 6
    assert cfg.tokenizer.train1.lr == 0.001
    assert cfg.llm.num_layers == 5  # --set wins over the file
    assert cfg.dit.guidance_scale == 2.0 and isinstance(cfg.dit.guidance_scale, float)
    # YAML 1.1 reads 1e-3 as a string; a float field takes it as the number people mean.
    assert load_config("tiny", None, ["tokenizer.train2.encoder_lr=1e-3"]).tokenizer.train2.encoder_lr == 0.001
    # explicit preset wins over the file's
    assert load_config("tiny", params).preset == "tiny"


@pytest.mark.parametrize("override, message", [
    ("tokenizer.nope=1", "unknown config key 'tokenizer.nope'"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("tokenizer.num_codebooks=eight", "must be an integer"),
    ("tokenizer.num_codebooks=1.5", "must be an integer"),
    ("tokenizer.train1.lr=fast", "must be a number"),
    ("eval.thresholds=3", "must be a mapping"),
    ("tokenizer.train1=5", "is a section"),
    ("runtime.deterministic=yes please", "must be true or false"),
    ("just-a-word", "must look like section.field=value"),
    ("runtime.distributed=bogus", "runtime.distributed must be one of 'none', 'ddp', 'fsdp'"),
    ("tokenizer.quantizer=rvq", "must be one of 'multi', 'single', 'shared', 'continuous'"),
    ("llm.train2.precision=fp16", "must be one of 'fp32', 'bf16'"),
    ("dit.latent=vae", "must be one of 'pixel', 'dcae'"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", None, [override])


def test_bad_params_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config("tiny", bad)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    bad.write_text("a: [\n")
    with pytest.raises(ConfigError, match="bad.yaml is not readable YAML: while parsing"):
        load_config("tiny", bad)
    with pytest.raises(ConfigError, match="is not a file"):
        load_config("tiny", tmp_path)
    with pytest.raises(ConfigError, match=r"override 'eval.model_name=\[a': the value is not valid YAML.*quote it"):
        load_config("tiny", None, ["eval.model_name=[a"])
    with pytest.raises(ConfigError, match="the value is not valid YAML"):  # a control character: a ReaderError
        load_config("tiny", None, ["eval.model_name=a\x07b"])


def test_nested_dataclass_values_in_dicts():
    cfg = load_config("tiny", None, ['runtime.resources={"llm-2": {"gpus": 4, "num_nodes": 2}}'])
    assert cfg.runtime.resources["llm-2"].gpus == 4 and cfg.runtime.resources["llm-2"].num_nodes == 2
    with pytest.raises(ConfigError, match="gpus"):
        load_config("tiny", None, ['runtime.resources={"llm-2": {"gpus": "four"}}'])


def test_round_trip_through_dict():
    cfg = load_config("tiny", None, ["llm.num_layers=7"])
    again = config_from_dict(cfg.to_dict())
    assert config_hash(again) == config_hash(cfg)


def test_stage_keys_follow_only_their_inputs():
    base = load_config("tiny")
    keys = stage_keys(base, "data-v1")
    # A DiT change moves only the DiT stages and what reads them.
    dit_changed = stage_keys(load_config("tiny", None, ["dit.train2.num_steps=7"]), "data-v1")
    changed = {n for n in keys if keys[n] != dit_changed[n]}
    assert changed == {"dit-2", "eval"}
    # The AE-DiT's own settings move only aedit; the text-to-image DiT's move only dit-1/dit-2; the SFT share
    # only dit-2 (each stage reads only its side of the dit section).
    for override, moved in (("dit.ae_prediction=velocity", {"aedit", "eval"}),
                            ("dit.ae_logit_mean=0.3", {"aedit", "eval"}),
                            ("dit.prediction=sample", {"dit-1", "dit-2", "eval"}),
                            ("dit.guidance_scale=2.0", {"dit-1", "dit-2", "eval"}),
                            ("dit.sft_fraction=0.3", {"dit-2", "eval"}),
                            ("dit.num_layers=3", {"aedit", "dit-1", "dit-2", "eval"})):
        other = stage_keys(load_config("tiny", None, [override]), "data-v1")
        assert {n for n in keys if keys[n] != other[n]} == moved, override
    # Another stage's schedule is not part of a stage's key.
    view = config_view(base, STAGES["tokenizer-2"])
    assert "train2" in view and "train1" not in view and "train3" not in view
    # Gate thresholds decide promotion, not what evaluation computes.
    assert stage_keys(load_config("tiny", None, ["eval.regression_tolerance=0.5"]), "data-v1") == keys
    # New data moves everything.
    assert all(stage_keys(base, "data-v2")[n] != k for n, k in keys.items())


def test_a_device_torch_does_not_have_is_a_clear_error():
    import torch

    from kelix.stages.run import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu': use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"device 'cuda:99' asked for, but torch sees \d+ CUDA device"):
        resolve_device("cuda:99")


def test_schedules_no_run_could_use_are_refused_naming_every_bad_key(tmp_path):
    """A negative step count trained nothing and still marked the stage finished; a zero batch failed deep inside
    collate. Ranges are checked after the preset, the params file and the overrides, all bad keys at once."""
    with pytest.raises(ConfigError, match=r"llm.train4.num_steps must be at least 0, got -5; "
                                          r"llm.train4.batch_size must be at least 1, got 0"):
        load_config("tiny", overrides=["llm.train4.num_steps=-5", "llm.train4.batch_size=0"])
    params = tmp_path / "params.yaml"
    params.write_text("dit:\n  train_ae:\n    min_lr_ratio: 1.5\n")
    with pytest.raises(ConfigError, match=r"dit.train_ae.min_lr_ratio must be between 0 and 1, got 1.5"):
        load_config(None, params)
    with pytest.raises(ConfigError, match=r"tokenizer.vit_warmup.grad_accum_steps must be at least 1.*"
                                          r"llm.train1.lr must be at least 0, got nan"):
        load_config("tiny", overrides=["tokenizer.vit_warmup.grad_accum_steps=0", "llm.train1.lr=.nan"])
    # A recorded config (a registered model's) still loads: ranges are the user's input, checked where it is given.
    assert config_from_dict({"preset": "tiny", "llm": {"train4": {"num_steps": -1}}}).llm.train4.num_steps == -1
    # Zero steps is a schedule: the tiny tokenizer's ViT warm-up is off that way.
    assert load_config("tiny", overrides=["llm.train1.num_steps=0"]).llm.train1.num_steps == 0
