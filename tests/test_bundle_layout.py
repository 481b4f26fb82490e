"""KelixBundle: assembling from stage outputs, loading the real (untrained) parts, refusing bad folders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kelix.bundle import PART_STAGES, PARTS, BundleError, KelixBundle, assemble, check_bundle, check_safetensors, init_bundle
from kelix.config import load_config


def tiny_bundle(base: Path) -> Path:
    """A randomly initialised tiny-preset bundle under `base`, built once and shared by the test modules
    (2 sampling steps instead of 20: generation is what the serving tests spend their time on)."""
    path = base / "tiny-bundle"
    if not (path / "bundle.json").exists():
        init_bundle(path, load_config("tiny", overrides=["eval.sample_steps=2"]))
    return path


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp())


@pytest.fixture
def copy(bundle_dir, tmp_path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def test_init_bundle_loads_and_runs(bundle_dir):
    manifest = check_bundle(bundle_dir)
    assert {f.split("/")[0] for f in manifest["files"]} >= set(PARTS) | {"config.json", "text_tokenizer.json"}
    assert not list(bundle_dir.rglob("*.bin")) and list(bundle_dir.rglob("*.safetensors"))
    bundle = KelixBundle.load(bundle_dir, device="cpu")
    assert bundle.cfg.preset == "tiny"
    from kelix.registry.pyfunc import example_image

    codes = bundle.encode([example_image(), example_image()])
    assert codes.shape == (2, bundle.tokenizer.num_positions, bundle.tokenizer.num_codebooks)
    answers = bundle.answer([example_image()], ["What colour is the circle?"])
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_generation_settings_default_to_the_models_eval_config(bundle_dir, monkeypatch):
    import dataclasses

    import kelix.dit.pipeline

    bundle = KelixBundle.load(bundle_dir, device="cpu")
    bundle.cfg = dataclasses.replace(bundle.cfg, eval=dataclasses.replace(
        bundle.cfg.eval, cfg_scale=6.0, temperature=0.5, guidance_scale=4.0, sample_steps=3))
    seen = []
    monkeypatch.setattr(kelix.dit.pipeline, "generate_images", lambda *a, **kw: seen.append(kw) or [])
    bundle.generate(["a red circle"], seed=7)
    bundle.generate(["a red circle"], steps=5, guidance_scale=1.0, cfg_scale=2.0)
    assert {k: seen[0][k] for k in ("seed", "steps", "cfg_scale", "temperature", "guidance_scale")} == \
        {"seed": 7, "steps": 3, "cfg_scale": 6.0, "temperature": 0.5, "guidance_scale": 4.0}
    assert (seen[1]["steps"], seen[1]["guidance_scale"], seen[1]["cfg_scale"]) == (5, 1.0, 2.0)


def test_assemble_from_stage_outputs(bundle_dir, tmp_path):
    stages = {}
    for part, stage in PART_STAGES.items():
        stages[stage] = tmp_path / "artifacts" / stage
        shutil.copytree(bundle_dir / part, stages[stage] / "model")
    shutil.copy(bundle_dir / "text_tokenizer.json", stages["tokenizer-3"] / "text_tokenizer.json")  # llm-4 has none
    cfg = load_config("tiny", overrides=["eval.num_vqa=7"])
    out = assemble(tmp_path / "out" / "bundle", stages, cfg)
    check_bundle(out)
    assert json.loads((out / "config.json").read_text())["eval"]["num_vqa"] == 7
    assert (out / "llm" / "model.safetensors").read_bytes() == (bundle_dir / "llm" / "model.safetensors").read_bytes()
    assert not list((tmp_path / "out").glob(".*assembling"))

    shutil.rmtree(stages["dit-2"] / "model")
    with pytest.raises(BundleError, match=r"dit-2.*model is missing|model is missing.*dit-2"):
        assemble(tmp_path / "out2", stages, cfg)
    with pytest.raises(BundleError, match="aedit"):
        assemble(tmp_path / "out3", {k: v for k, v in stages.items() if k != "aedit"}, cfg)


def test_flipped_byte_is_named(copy):
    path = copy / "llm" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"llm/model\.safetensors is corrupt: its sha256"):
        KelixBundle.load(copy, device="cpu")


def test_truncated_and_missing_files_are_named(copy):
    path = copy / "dit" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"dit/model\.safetensors has 1000 bytes.*truncated"):
        check_bundle(copy)
    path.unlink()
    with pytest.raises(BundleError, match=r"dit.*no \.safetensors weights"):
        check_bundle(copy)
    (copy / "bundle.json").unlink()
    with pytest.raises(BundleError, match=r"bundle\.json is missing.*re-assemble"):
        check_bundle(copy)


def test_weights_the_manifest_does_not_list_are_refused(copy):
    """Dropping a part's weights from bundle.json must not let them load unchecked."""
    manifest = json.loads((copy / "bundle.json").read_text())
    del manifest["files"]["llm/model.safetensors"]
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"llm/model\.safetensors is not listed in bundle\.json"):
        check_bundle(copy)


def test_pickle_files_are_refused(copy):
    (copy / "tokenizer" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(BundleError, match=r"pytorch_model\.bin is a pickle-format file"):
        check_bundle(copy)


def test_safetensors_header_check_without_manifest(copy):
    path = copy / "aedit" / "model.safetensors"
    check_safetensors(path)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="truncated or padded"):
        check_safetensors(path)
    path.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(BundleError, match="bad header length"):
        check_safetensors(path)


def test_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(BundleError, match="no bundle folder.*models:/"):
        check_bundle(tmp_path / "nope")
