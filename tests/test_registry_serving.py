"""Using a registered model: load by alias (pyfunc and KelixBundle), `mlflow models predict`, damaged artifacts,
and the whole release path against a real `mlflow server` on loopback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from kelix.bundle import BundleError, KelixBundle
from kelix.config import load_config
from kelix.registry import load_bundle, promote, register_bundle, status
from kelix.registry.pyfunc import decode_image, encode_image, example_image
from kelix.registry.resolve import _cache_dir, bundle_path, resolve_version
from kelix.registry.store import configure
from services import mlflow_server
from test_bundle_layout import tiny_bundle

METRICS = {"vqa_accuracy": 0.8, "geneval_overall": 0.5, "recon_detector_agreement": 0.9}
MLFLOW = Path(sys.executable).with_name("mlflow")


def cfg_for(name: str):
    return load_config("tiny", overrides=[f"eval.model_name={name}"])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`kelix-serve` v1 registered from the untrained tiny bundle and promoted to champion."""
    root = tmp_path_factory.mktemp("serving")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("KELIX_CACHE", str(root / "cache"))
        bundle = tiny_bundle(tmp_path_factory.getbasetemp())
        version = register_bundle(bundle, cfg_for("kelix-serve"), METRICS, {"pipeline_run_id": "serve"})
        assert promote(version, cfg_for("kelix-serve"), "serving tests").promoted
        yield {"root": root, "bundle": bundle, "version": version, "uri": os.environ["MLFLOW_TRACKING_URI"]}


def frame() -> pd.DataFrame:
    img = encode_image(example_image())
    return pd.DataFrame([
        {"task": "ask", "image": img, "question": "What colour is the circle?", "prompt": None, "seed": None},
        {"task": "generate", "image": None, "question": None, "prompt": "a red circle left of a blue square", "seed": 3},
        {"task": "reconstruct", "image": img, "question": None, "prompt": None, "seed": 0},
    ])


def check_output(out: pd.DataFrame, size: int) -> None:
    assert list(out["task"]) == ["ask", "generate", "reconstruct"]
    assert isinstance(out["answer"][0], str) and pd.isna(out["image"][0])  # None, NaN after pyfunc, null in JSON
    for i in (1, 2):
        assert pd.isna(out["answer"][i])
        assert decode_image(out["image"][i], i).size == (size, size)


def test_load_by_alias_pyfunc_and_bundle(served):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/kelix-serve@champion")
    full = model.predict(frame())
    check_output(full, load_config("tiny").dit.output_size)
    with pytest.raises(Exception, match="unknown task 'fly'"):
        model.predict(pd.DataFrame([{"task": "fly"}]))
    with pytest.raises(Exception, match="row 0: task 'generate' needs a non-empty `prompt`"):
        model.predict(pd.DataFrame([{"task": "generate", "prompt": " "}]))

    assert resolve_version("models:/kelix-serve@champion") == ("kelix-serve", served["version"])
    bundle = load_bundle("models:/kelix-serve@champion", device="cpu")
    assert isinstance(bundle, KelixBundle) and bundle.root.is_relative_to(served["root"] / "cache")
    first = bundle.root.stat().st_mtime_ns
    assert load_bundle(f"models:/kelix-serve/{served['version']}", device="cpu").root.stat().st_mtime_ns == first
    # Same prompt and seed, same image: whatever else was in the frame.
    again = model.predict(frame().iloc[[1]].reset_index(drop=True))
    assert again["image"][0] == full["image"][1]
    # A Python caller's whole-number seeds arrive as an int64 column: accepted, and the same image.
    ints = model.predict(pd.DataFrame([{"task": "generate", "prompt": "a red circle left of a blue square", "seed": 3}]))
    assert ints["image"][0] == full["image"][1]


def test_mlflow_models_predict_cli(served, tmp_path):
    (tmp_path / "in.json").write_text(json.dumps({"dataframe_split": json.loads(frame().to_json(orient="split", index=False))}))
    proc = subprocess.run(
        [str(MLFLOW), "models", "predict", "-m", "models:/kelix-serve@champion", "--env-manager", "local",
         "-i", str(tmp_path / "in.json"), "-t", "json", "-o", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": served["uri"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions = json.loads((tmp_path / "out.json").read_text())["predictions"]
    check_output(pd.DataFrame(predictions), load_config("tiny").dit.output_size)


def _stored_bundle(version: str, name: str) -> Path:
    """The bundle folder inside the registry's own artifact store (a local file store here)."""
    location = configure().get_model_version_download_uri(name, version)
    return bundle_path(Path(location.removeprefix("file://")))


def test_damaged_artifacts_give_clear_errors(served, tmp_path):
    import mlflow

    name = "kelix-damaged"
    version = register_bundle(served["bundle"], cfg_for(name), METRICS, {"pipeline_run_id": "damaged"})
    uri = f"models:/{name}/{version}"
    cached = load_bundle(uri, device="cpu").root
    # A damaged downloaded copy is replaced by a fresh download.
    (cached / "tokenizer" / "model.safetensors").write_bytes(b"garbage")
    assert load_bundle(uri, device="cpu").root == cached
    # A damaged registry copy names the file and says what to do.
    stored = _stored_bundle(version, name) / "llm" / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    shutil.rmtree(_cache_dir(name, version))
    with pytest.raises(BundleError, match=r"artifacts of kelix-damaged v\d+ are damaged: .*llm/model\.safetensors is corrupt"):
        load_bundle(uri)
    with pytest.raises(BundleError, match=r"llm/model\.safetensors is corrupt"):
        mlflow.pyfunc.load_model(uri)
    stored.unlink()
    shutil.rmtree(_cache_dir(name, version), ignore_errors=True)
    with pytest.raises(BundleError, match=r"llm/model\.safetensors is missing|llm.*no \.safetensors"):
        load_bundle(uri)


def test_use_cli_ask_generate_reconstruct(served, tmp_path, capsys):
    from kelix.cli import main

    example_image().save(tmp_path / "in.png")
    assert main(["ask", str(tmp_path / "in.png"), "What colour is the circle?", "--model", "models:/kelix-serve@champion"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["generate", "a red circle", "-o", str(tmp_path / "gen.png"), "--seed", "1", "--steps", "2",
                 "--model", str(served["bundle"])]) == 0
    assert main(["reconstruct", str(tmp_path / "in.png"), "-o", str(tmp_path / "rec.png"), "--steps", "2",
                 "--model", str(served["bundle"])]) == 0
    for name in ("gen.png", "rec.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (64, 64)
    assert main(["ask", str(tmp_path / "in.png"), "q", "--model", "models:/kelix-serve@nope"]) == 2
    assert "no version of 'kelix-serve' has alias 'nope'" in capsys.readouterr().err
    assert main(["ask", str(tmp_path / "missing.png"), "q", "--model", str(served["bundle"])]) == 2
    assert "missing.png" in capsys.readouterr().err
    # A truncated PNG opens (its header is intact) and fails when decoded: one line, not a traceback.
    whole = (tmp_path / "in.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    assert main(["ask", str(tmp_path / "cut.png"), "q", "--model", str(served["bundle"])]) == 2
    assert "cut.png is not an image PIL can read" in capsys.readouterr().err
    assert main(["reconstruct", str(tmp_path / "cut.png"), "-o", str(tmp_path / "x.png"), "--model", str(served["bundle"])]) == 2
    assert not (tmp_path / "x.png").exists()


@pytest.mark.services
def test_release_against_mlflow_server(tmp_path, monkeypatch, tmp_path_factory):
    import mlflow

    with mlflow_server(tmp_path) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("KELIX_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("KELIX_LOCK_DIR", str(tmp_path / "locks"))
        cfg = cfg_for("kelix-remote")
        bundle = tiny_bundle(tmp_path_factory.getbasetemp())
        v1 = register_bundle(bundle, cfg, METRICS, {"pipeline_run_id": "remote"})
        assert promote(v1, cfg, "remote release").promoted
        info = status(cfg)
        assert info["aliases"]["champion"]["version"] == v1 and info["history"][0]["action"] == "promote"
        assert list((tmp_path / "locks").glob("registry-*.lock"))  # a server store is locked in KELIX_LOCK_DIR
        # Artifacts went through the server's proxy into --artifacts-destination.
        assert list((tmp_path / "mlflow-artifacts").rglob("llm/model.safetensors"))
        model = mlflow.pyfunc.load_model("models:/kelix-remote@champion")
        out = model.predict(frame().iloc[[0]].reset_index(drop=True))
        assert isinstance(out["answer"][0], str)


class _RecordingBundle:
    """Stands in for a KelixBundle in `predict_frame`'s row bookkeeping: answers echo the question, generated
    images encode their seed, reconstructions return the input; every call is recorded."""

    def __init__(self):
        self.calls: list[tuple] = []

    def answer(self, images, questions):
        self.calls.append(("answer", len(images)))
        return [f"answer to {q} ({im.size[0]}px)" for im, q in zip(images, questions)]

    def generate(self, prompts, seed=0):
        self.calls.append(("generate", prompts[0], seed))
        return [Image.new("RGB", (8, 8), (seed, 0, 0))]

    def reconstruct(self, images, seed=0):
        self.calls.append(("reconstruct", seed))
        return [images[0]]


def test_predict_frame_maps_mixed_rows_back_in_order():
    from kelix.registry.pyfunc import predict_frame

    image = encode_image(example_image())
    frame = pd.DataFrame([
        {"task": "ask", "image": image, "question": "What colour is it?", "prompt": None, "seed": None},
        {"task": "generate", "image": None, "question": None, "prompt": "a red circle", "seed": 7.0},
        {"task": "ask", "image": image, "question": "How many?", "prompt": None, "seed": None},
        {"task": "reconstruct", "image": image, "question": None, "prompt": None, "seed": 3.0},
    ])
    bundle = _RecordingBundle()
    out = predict_frame(bundle, frame)
    assert list(out["task"]) == ["ask", "generate", "ask", "reconstruct"]
    assert out["answer"][0] == "answer to What colour is it? (64px)" and out["answer"][2] == "answer to How many? (64px)"
    assert pd.isna(out["answer"][1]) and pd.isna(out["image"][0])
    assert decode_image(out["image"][1], 1).getpixel((0, 0)) == (7, 0, 0)  # row 1's own seed
    assert decode_image(out["image"][3], 3).size == (64, 64)
    # Both questions in one batched call; generate and reconstruct got their rows' seeds.
    assert bundle.calls == [("generate", "a red circle", 7), ("reconstruct", 3), ("answer", 2)]


@pytest.mark.parametrize("row, message", [
    ({"task": "ask", "image": "not base64!", "question": "q"}, r"row 0: `image` is not a base64-encoded image"),
    ({"task": "generate", "prompt": "a red circle", "seed": 1.5}, r"row 0: seed must be an integer, got 1.5"),
    ({"task": "generate", "prompt": "  "}, r"row 0: task 'generate' needs a non-empty `prompt` column"),
    ({"task": "paint", "prompt": "x"}, r"row 0: unknown task 'paint'; tasks are"),
])
def test_predict_frame_rejects_bad_rows_naming_them(row, message):
    from kelix.registry.pyfunc import predict_frame

    with pytest.raises(ValueError, match=message):
        predict_frame(_RecordingBundle(), pd.DataFrame([row]))


def test_served_images_decode_like_the_cli_reads_them():
    import base64
    import io

    from PIL import Image

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode("ascii")
    decoded = decode_image(text, 0)
    assert decoded.mode == "RGB" and decoded.getpixel((1, 1)) == (255, 255, 255)
    # What people paste: a data URL, or the `base64` tool's output wrapped at 76 characters.
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    for variant in (f"data:image/png;base64,{text}", wrapped):
        assert decode_image(variant, 0).tobytes() == decoded.tobytes()
    with pytest.raises(ValueError, match="row 3: `image` is not a base64-encoded image"):
        decode_image("not base64!", 3)
