"""An analytic object detector for shapes images, and the GenEval-style checks built on it.

Why analytic: the shapes palette and geometry are known, so a few lines of colour segmentation, connected
components and template matching recover the objects of a clean image exactly, with no trained model whose
own errors would leak into the generation metrics. It is made tolerant for model outputs, which are blurry
and noisy: a pixel is assigned to a palette colour when it lies near the line between the background and
that colour (so a blurred edge stays the object's colour instead of looking like a third colour), tiny
blobs are dropped, components are cleaned, and shapes are classified by the best intersection-over-union
against each shape's template fitted to the component's box.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage, optimize

from kelix.data.shapes import COLOURS, SHAPES, unit_polygon

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_COLOUR_NAMES = list(COLOURS)
# GenEval's position rule: centres must differ by more than this share of the two boxes' sizes.
POSITION_THRESHOLD = 0.1
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # pixels [x0, y0, x1, y1), like the manifest's object boxes
    score: float  # IoU of the component with its best shape template, in [0, 1]

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW tensors from the readers
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an RGB image (HxWx3 or 3xHxW), got an array of shape {arr.shape}")
    arr = arr[..., :3] if arr.shape[-1] != 1 else np.repeat(arr, 3, axis=-1)
    arr = arr.astype(np.float32)
    if arr.size and arr.max() <= 1.0 and np.issubdtype(np.asarray(image).dtype, np.floating):
        arr = arr * 255.0
    return arr


def _background(arr: np.ndarray) -> np.ndarray:
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return np.median(border, axis=0)


def segment(arr: np.ndarray, max_colour_distance: float = 70.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel palette index (-1 = background) from the background-to-colour line test, and the
    background colour. A blurred edge pixel lies on the line between background and its object's colour,
    so it keeps that colour instead of matching whichever palette colour its blend happens to be near."""
    bg = _background(arr)
    v = arr.reshape(-1, 3) - bg  # [P, 3]
    d = _PALETTE - bg  # [K, 3]
    dd = np.maximum((d * d).sum(1), 1e-6)
    vd = v @ d.T  # [P, K]
    t = np.clip(vd / dd, 0.0, 1.0)
    resid = (v * v).sum(1, keepdims=True) - 2 * t * vd + t * t * dd
    resid = np.where(t >= 0.5, resid, np.inf)  # closer to the background than to the colour: background
    best = resid.argmin(1)
    ok = resid[np.arange(len(best)), best] <= max_colour_distance ** 2
    return np.where(ok, best, -1).reshape(arr.shape[:2]), bg


@functools.lru_cache(maxsize=None)
def _unit_geometry(shape: str) -> tuple[np.ndarray, float, np.ndarray]:
    """Vertices, area and centroid of a shape's unit polygon (shoelace formulas)."""
    pts = np.array(unit_polygon(shape), dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    centroid = np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)
    return pts, abs(area), centroid


_SS = 4  # template supersampling
_SIGMAS = (0.0, 0.6, 1.0, 1.4, 1.9)


def _template(shape: str, mass: float, cx: float, cy: float, h: int, w: int) -> np.ndarray:
    """Soft coverage of `shape` with area `mass` and centroid (cx, cy) on an h x w window."""
    pts, area, centroid = _unit_geometry(shape)
    k = (mass / area) ** 0.5
    xy = (np.array([cx, cy]) + k * (pts - centroid)) * _SS
    img = Image.new("L", (w * _SS, h * _SS), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in xy], fill=255)
    return np.asarray(img, dtype=np.float32).reshape(h, _SS, w, _SS).mean(axis=(1, 3)) / 255.0


def classify_shape(coverage: np.ndarray) -> tuple[str, float]:
    """Best shape for a window of object coverage in [0, 1] (binary for a clean image), and its soft IoU.

    Blur keeps an object's mass (area) and centroid, so each shape's template is placed from those two
    alone and compared after blurring it by a few candidate widths; the best (shape, blur) wins. A binary
    mask's box would not do: blur eats star points and diamond tips and the box shrinks with them.
    """
    c = np.clip(coverage.astype(np.float32), 0.0, 1.0)
    mass = float(c.sum())
    if mass <= 0:
        return SHAPES[0], 0.0
    ys, xs = np.indices(c.shape)
    cx, cy = float((c * (xs + 0.5)).sum() / mass), float((c * (ys + 0.5)).sum() / mass)
    # A crisp (unblurred) object has almost no partial pixels: trying blurred templates would only cost time.
    soft = float(((c > 0.1) & (c < 0.9)).sum()) / max(float((c > 0.5).sum()), 1.0)
    sigmas = _SIGMAS if soft > 0.05 else _SIGMAS[:1]
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        t0 = _template(shape, mass, cx, cy, *c.shape)
        for sigma in sigmas:
            t = ndimage.gaussian_filter(t0, sigma, mode="constant") if sigma else t0
            iou = float(np.minimum(c, t).sum() / max(np.maximum(c, t).sum(), 1e-6))
            if iou > best_iou:
                best, best_iou = shape, iou
    return best, best_iou


def _coverage(arr: np.ndarray, bg: np.ndarray, k: int, region: np.ndarray) -> np.ndarray:
    """How much of colour k (vs the background) each pixel of `region` holds, 0 outside it."""
    d = _PALETTE[k] - bg
    t = ((arr - bg) @ d) / max(float(d @ d), 1e-6)
    return np.where(region, np.clip(t, 0.0, 1.0), 0.0)


def detect(image, *, max_colour_distance: float = 70.0, min_area: int | None = None,
           min_score: float = 0.3) -> list[Detection]:
    """Objects in a shapes image (PIL image, HxWx3 uint8 array, or float array in [0, 1]), left to right.

    `min_area` defaults to 0.3% of the image (12 px at 64x64): smaller blobs are noise, not objects.
    """
    arr = _to_array(image)
    h, w = arr.shape[:2]
    min_area = max(4, int(0.003 * h * w)) if min_area is None else min_area
    labels, bg = segment(arr, max_colour_distance)
    eight = np.ones((3, 3), bool)
    comps, _ = ndimage.label(labels >= 0, structure=eight)
    dets: list[Detection] = []
    for idx, sl in enumerate(ndimage.find_objects(comps), start=1):
        comp = comps[sl] == idx
        area = int(comp.sum())
        if area < min_area:
            continue
        counts = np.bincount(labels[sl][comp], minlength=len(_COLOUR_NAMES))
        # Touching objects of different colours merge into one component; split them when a second colour
        # holds a real share of it, otherwise the minority pixels are edge noise of the majority colour.
        colours = [int(k) for k in np.argsort(-counts) if counts[k] >= max(min_area, 0.2 * area)]
        colours = colours or [int(counts.argmax())]
        for k in colours:
            part = comp & (labels[sl] == k) if len(colours) > 1 else comp
            sub, _ = ndimage.label(part, structure=eight)
            for j, ssl in enumerate(ndimage.find_objects(sub), start=1):
                piece = ndimage.binary_fill_holes(sub[ssl] == j)
                if piece.sum() < min_area:
                    continue
                y0, x0 = sl[0].start + ssl[0].start, sl[1].start + ssl[1].start
                y1, x1 = y0 + piece.shape[0], x0 + piece.shape[1]
                # A window a few pixels wider than the piece holds the blurred fringe that carries its mass.
                pad = 3
                wy0, wx0, wy1, wx1 = max(0, y0 - pad), max(0, x0 - pad), min(h, y1 + pad), min(w, x1 + pad)
                own = np.zeros((wy1 - wy0, wx1 - wx0), bool)
                own[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0] = piece
                region = ndimage.binary_dilation(own, eight, iterations=2)
                # Pixels of other objects never count toward this one.
                region &= (labels[wy0:wy1, wx0:wx1] == k) | (labels[wy0:wy1, wx0:wx1] < 0)
                region |= own
                cov = _coverage(arr[wy0:wy1, wx0:wx1], bg, k, region)
                shape, score = classify_shape(cov)
                if score < min_score:
                    continue
                dets.append(Detection(shape, _COLOUR_NAMES[k], (int(x0), int(y0), int(x1), int(y1)), round(score, 4)))
    dets.sort(key=lambda d: (d.centre[0], d.centre[1]))
    return dets


# ---------------------------------------------------------------------------------------------- matching


@dataclass
class Match:
    """Expected objects paired with detections; `exact` means same count and every pair agrees."""

    pairs: list[tuple[dict, Detection]]
    missing: list[dict]
    extra: list[Detection]

    @property
    def exact(self) -> bool:
        return not self.missing and not self.extra and all(
            e["shape"] == d.shape and e["colour"] == d.colour for e, d in self.pairs)


def _centre_of(obj: dict, size: float | None) -> tuple[float, float] | None:
    if obj.get("box"):
        b = obj["box"]
        return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    if size and "x" in obj and "y" in obj:
        return obj["x"] * size, obj["y"] * size
    return None


def match_objects(expected: Sequence[dict], detected: Sequence[Detection], image_size: float | None = None) -> Match:
    """Pair expected objects ({shape, colour[, box | x, y]}) with detections, minimising mismatches.

    Attribute agreement dominates the cost; positions, when the expected objects have them, break ties so
    two half-right detections are assigned to the objects they sit on.
    """
    if not expected or not detected:
        return Match([], list(expected), list(detected))
    scale = float(image_size or max(max(d.box[2], d.box[3]) for d in detected))
    cost = np.zeros((len(expected), len(detected)))
    for i, e in enumerate(expected):
        c = _centre_of(e, image_size)
        for j, d in enumerate(detected):
            cost[i, j] = (e.get("shape") != d.shape) + (e.get("colour") != d.colour)
            if c is not None:
                dx, dy = c[0] - d.centre[0], c[1] - d.centre[1]
                cost[i, j] += 0.5 * min(1.0, (dx * dx + dy * dy) ** 0.5 / scale)
    rows, cols = optimize.linear_sum_assignment(cost)
    pairs = [(expected[i], detected[j]) for i, j in zip(rows, cols)]
    missing = [e for i, e in enumerate(expected) if i not in set(rows)]
    extra = [d for j, d in enumerate(detected) if j not in set(cols)]
    return Match(pairs, missing, extra)


def find(detections: Iterable[Detection], colour: str | None = None, shape: str | None = None) -> list[Detection]:
    return [d for d in detections if (colour is None or d.colour == colour) and (shape is None or d.shape == shape)]


def count_ok(detections: Sequence[Detection], n: int, colour: str | None = None, shape: str | None = None) -> bool:
    return len(find(detections, colour, shape)) == n


def colour_ok(detections: Sequence[Detection], colour: str, shape: str) -> bool:
    """Colour attribution: the object of this shape has this colour (not merely both present somewhere)."""
    return bool(find(detections, colour, shape))


def relations(a: Detection, b: Detection) -> set[str]:
    """Where a is relative to b, GenEval's rule: centre offset beyond 10% of the boxes' sizes, per axis."""
    (ax, ay), (bx, by) = a.centre, b.centre
    off = np.array([ax - bx, ay - by], dtype=float)
    dims = np.array([(a.box[2] - a.box[0]) + (b.box[2] - b.box[0]), (a.box[3] - a.box[1]) + (b.box[3] - b.box[1])])
    revised = np.maximum(np.abs(off) - POSITION_THRESHOLD * dims, 0) * np.sign(off)
    norm = np.linalg.norm(off)
    if norm == 0 or np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def position_ok(detections: Sequence[Detection], a: tuple[str, str], relation: str, b: tuple[str, str]) -> bool:
    """Some detected (colour, shape) `a` stands in `relation` to some detected `b`."""
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    return any(relation in relations(da, db) for da in find(detections, *a) for db in find(detections, *b) if da is not db)


_OBJ = rf"a (?:(?:small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"


def parse_prompt(prompt: str) -> tuple[list[dict], str | None]:
    """The objects and the relation (if any) named by a shapes generation prompt (see shapes.describe)."""
    text = prompt.strip().lower().rstrip(".")
    m = re.fullmatch(rf"{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}", text)
    if m:
        return [{"colour": m[1], "shape": m[2]}, {"colour": m[4], "shape": m[5]}], m[3]
    objs = re.findall(_OBJ, text)
    rest = re.sub(_OBJ, "", text).replace(",", " ").replace(" and ", " ").strip()
    if not objs or rest:
        raise ValueError(f"cannot parse generation prompt {prompt!r}")
    return [{"colour": c, "shape": s} for c, s in objs], None


def prompt_checks(prompt: str, detections: Sequence[Detection]) -> dict[str, bool]:
    """GenEval-style verdicts for one generated image: every named object present with its colour, the
    object count exact, the relation (when the prompt has one) holding; `overall` needs all of them."""
    objs, relation = parse_prompt(prompt)
    checks = {
        "objects": all(colour_ok(detections, o["colour"], o["shape"]) for o in objs),
        "count": len(detections) == len(objs),
    }
    if relation:
        a, b = objs
        checks["position"] = position_ok(detections, (a["colour"], a["shape"]), relation, (b["colour"], b["shape"]))
    checks["overall"] = all(checks.values())
    return checks


def accuracy(images: Iterable, expected: Iterable[Sequence[dict]], **detect_kwargs) -> dict[str, float]:
    """Exact-match rate (count, shape and colour of every object) of the detector over labelled images."""
    n = exact = count = objects = attrs = 0
    for image, objs in zip(images, expected):
        dets = detect(image, **detect_kwargs)
        m = match_objects(objs, dets)
        n += 1
        exact += m.exact
        count += len(dets) == len(objs)
        objects += len(objs)
        attrs += sum(e["shape"] == d.shape and e["colour"] == d.colour for e, d in m.pairs)
    return {"images": n, "exact": exact / max(n, 1), "count": count / max(n, 1),
            "object_attributes": attrs / max(objects, 1)}
