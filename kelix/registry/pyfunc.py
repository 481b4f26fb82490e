"""The registered model as an `mlflow.pyfunc` model: one DataFrame in, one DataFrame out, three tasks.

Input columns: `task` (ask | generate | reconstruct), `image` (base64 PNG; ask, reconstruct), `question`
(ask), `prompt` (generate), `seed` (generate, reconstruct; a whole number, default 0). Output columns: `task`, `answer`
(ask) and `image` (base64 PNG; generate, reconstruct). Rows are independent: each generation runs on its
own with its own seed, so a (prompt, seed) row gives the same image whatever else is in the frame.

The artifact is the bundle folder (safetensors only); the code is the installed `kelix` package, so
`mlflow models predict --env-manager local` and `mlflow.pyfunc.load_model` work wherever kelix is installed.
"""
from __future__ import annotations

import base64
import io
import math
import os
from importlib import metadata

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType
from PIL import Image

from kelix.data.images import to_rgb

TASKS = ("ask", "generate", "reconstruct")

SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec("string", "task"),
        ColSpec("string", "image", required=False),
        ColSpec("string", "question", required=False),
        ColSpec("string", "prompt", required=False),
        # Any, not long or double: a frame mixing ask rows (no seed) with generate rows turns the column's nulls
        # into NaN, which a long column rejects, and MLflow will not cast a Python caller's int64 column to
        # double; _seed() insists on a whole number.
        ColSpec(AnyType(), "seed", required=False),
    ]),
    outputs=Schema([
        ColSpec("string", "task"),
        ColSpec("string", "answer", required=False),
        ColSpec("string", "image", required=False),
    ]),
)

# Pinned from the running environment so a rebuilt environment matches the one that logged the model.
_REQUIREMENTS = ("kelix-platform", "mlflow", "torch", "transformers", "diffusers", "safetensors", "tokenizers",
                 "pillow", "numpy", "pandas", "scipy", "pyyaml")


def pip_requirements() -> list[str]:
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def encode_image(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: str, row: int) -> Image.Image:
    """base64 PNG/JPEG/...; a `data:image/...;base64,` prefix and line breaks (`base64`'s default output) are
    accepted."""
    try:
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        with Image.open(io.BytesIO(base64.b64decode("".join(text.split()), validate=True))) as im:
            return to_rgb(im)  # as `kelix ask` and training read images: transparency on white
    except Exception as exc:
        raise ValueError(f"row {row}: `image` is not a base64-encoded image ({type(exc).__name__}: {exc})") from exc


def example_image() -> Image.Image:
    """A red circle on a light background: a valid input for every task, small enough to embed."""
    from PIL import ImageDraw

    img = Image.new("RGB", (64, 64), (250, 250, 250))
    ImageDraw.Draw(img).ellipse([20, 20, 44, 44], fill=(220, 38, 38))
    return img


def input_example() -> pd.DataFrame:
    return pd.DataFrame([{"task": "ask", "image": encode_image(example_image()),
                          "question": "What colour is the circle?", "prompt": "", "seed": 0}])


def _cell(row: pd.Series, name: str) -> str | None:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def _seed(row: pd.Series, index: int) -> int:
    value = row.get("seed")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0
    try:
        seed = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"row {index}: seed must be an integer, got {value!r}") from exc
    if not seed.is_integer():
        raise ValueError(f"row {index}: seed must be an integer, got {value!r}")
    return int(seed)


def _require(row: pd.Series, name: str, index: int, task: str) -> str:
    value = _cell(row, name)
    if value is None:
        raise ValueError(f"row {index}: task {task!r} needs a non-empty `{name}` column")
    return value


def predict_frame(bundle, frame: pd.DataFrame) -> pd.DataFrame:
    """Run each row's task on a loaded KelixBundle; questions are answered in one batch."""
    if "task" not in frame.columns:
        raise ValueError(f"input needs a `task` column ({' | '.join(TASKS)}); got columns {list(frame.columns)}")
    rows = [(i, r) for i, (_, r) in enumerate(frame.iterrows())]
    out: list[dict] = [{"task": str(r["task"]), "answer": None, "image": None} for _, r in rows]
    asks = []
    for i, row in rows:
        task = str(row["task"]).strip().lower()
        if task == "ask":
            asks.append((i, decode_image(_require(row, "image", i, task), i), _require(row, "question", i, task)))
        elif task == "generate":
            image = bundle.generate([_require(row, "prompt", i, task)], seed=_seed(row, i))[0]
            out[i]["image"] = encode_image(image)
        elif task == "reconstruct":
            image = bundle.reconstruct([decode_image(_require(row, "image", i, task), i)], seed=_seed(row, i))[0]
            out[i]["image"] = encode_image(image)
        else:
            raise ValueError(f"row {i}: unknown task {row['task']!r}; tasks are {', '.join(TASKS)}")
    if asks:
        answers = bundle.answer([a[1] for a in asks], [a[2] for a in asks])
        for (i, _, _), answer in zip(asks, answers):
            out[i]["answer"] = answer
    return pd.DataFrame(out, columns=["task", "answer", "image"])


class KelixPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the bundle artifact once; `KELIX_DEVICE` picks the device (default: cuda when available)."""

    def load_context(self, context) -> None:
        from kelix.bundle import KelixBundle

        self.bundle = KelixBundle.load(context.artifacts["bundle"], device=os.environ.get("KELIX_DEVICE") or None)

    # A DataFrame hint: MLflow validates the input against SIGNATURE instead of inferring a schema.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return predict_frame(self.bundle, model_input)
