"""The analytic detector: exact on clean images, graceful on noisy and blurry ones; GenEval-style checks."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from kelix.data.detector import (Detection, accuracy, colour_ok, count_ok, detect, match_objects, parse_prompt,
                                 position_ok, prompt_checks, relations)
from kelix.data.shapes import ShapesSettings, make_example


@pytest.fixture(scope="module")
def labelled():
    images, objects, prompts = [], [], []
    settings = ShapesSettings(seed=11)
    for i in range(300):
        rec, png = make_example(settings, "test", i)
        images.append(Image.open(io.BytesIO(png)).convert("RGB"))
        objects.append(rec["objects"])
        prompts.append(rec["prompt"])
    return images, objects, prompts


def test_clean_images_are_recovered_exactly(labelled):
    images, objects, _ = labelled
    acc = accuracy(images, objects)
    assert acc["images"] == 300 and acc["exact"] >= 0.99
    dets = detect(images[0])
    want = sorted(objects[0], key=lambda o: o["x"])
    assert [(d.colour, d.shape) for d in dets] == [(o["colour"], o["shape"]) for o in want]
    assert [list(d.box) for d in dets] == [o["box"] for o in want]  # exact boxes on clean images


@pytest.mark.slow
def test_noise_and_blur_degrade_gracefully(labelled):
    images, objects, _ = labelled
    rng = np.random.default_rng(0)
    sub_i, sub_o = images[:150], objects[:150]

    def noisy(im, sigma):
        return np.clip(np.asarray(im, np.float32) + rng.normal(0, sigma, (64, 64, 3)), 0, 255).astype(np.uint8)

    assert accuracy([noisy(im, 20) for im in sub_i], sub_o)["exact"] >= 0.97
    assert accuracy([im.filter(ImageFilter.GaussianBlur(1.0)) for im in sub_i], sub_o)["exact"] >= 0.95
    assert accuracy([im.filter(ImageFilter.GaussianBlur(1.5)) for im in sub_i], sub_o)["exact"] >= 0.9
    assert accuracy([noisy(im.filter(ImageFilter.GaussianBlur(1.0)), 15) for im in sub_i], sub_o)["exact"] >= 0.9
    heavy = accuracy([noisy(im.filter(ImageFilter.GaussianBlur(3.0)), 60) for im in sub_i[:40]], sub_o[:40])
    assert 0.0 <= heavy["exact"] < 0.9  # ruined images score low instead of crashing


def test_input_forms_and_empty_images(labelled):
    images, objects, _ = labelled
    im = images[1]
    ref = detect(im)
    assert detect(np.asarray(im)) == ref
    assert detect(np.asarray(im, np.float32) / 255.0) == ref
    chw = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0  # what the readers' tensors hold
    assert detect(chw) == ref
    assert detect(im.resize((256, 256), Image.BICUBIC))  # larger images work (min area scales)
    assert detect(Image.new("RGB", (64, 64), (250, 250, 250))) == []
    speck = np.full((64, 64, 3), 250, np.uint8)
    speck[10:12, 10:12] = (220, 38, 38)  # 4 pixels: below the minimum area
    assert detect(speck) == []


def test_match_objects_counts_missing_and_extra():
    d_red = Detection("circle", "red", (0, 0, 10, 10), 0.9)
    d_blue = Detection("star", "blue", (30, 30, 40, 40), 0.9)
    exp = [{"shape": "star", "colour": "blue", "box": [30, 30, 40, 40]}, {"shape": "circle", "colour": "red"}]
    assert match_objects(exp, [d_red, d_blue]).exact
    m = match_objects(exp, [d_blue])
    assert not m.exact and m.missing == [exp[1]] and not m.extra
    m = match_objects(exp[:1], [d_red, d_blue])
    assert m.pairs[0][1] is d_blue and m.extra == [d_red]
    wrong = match_objects([{"shape": "star", "colour": "red"}], [d_blue])
    assert not wrong.exact and wrong.pairs
    assert not match_objects([], [d_red]).exact and match_objects([], []).exact


def test_relations_and_checks():
    left = Detection("circle", "red", (2, 20, 12, 30), 1.0)
    right = Detection("square", "blue", (40, 22, 50, 32), 1.0)
    top = Detection("star", "green", (20, 1, 30, 11), 1.0)
    assert relations(left, right) == {"left of"} and relations(right, left) == {"right of"}
    assert "above" in relations(top, right)
    near = Detection("square", "blue", (3, 21, 13, 31), 1.0)
    assert relations(left, near) == set()  # within GenEval's 10% threshold: no relation
    dets = [left, right, top]
    assert position_ok(dets, ("red", "circle"), "left of", ("blue", "square"))
    assert not position_ok(dets, ("red", "circle"), "right of", ("blue", "square"))
    assert count_ok(dets, 3) and count_ok(dets, 1, colour="red") and not count_ok(dets, 2, shape="star")
    assert colour_ok(dets, "blue", "square") and not colour_ok(dets, "red", "square")
    with pytest.raises(ValueError):
        position_ok(dets, ("red", "circle"), "near", ("blue", "square"))


def test_prompts_parse_and_hold_on_their_own_images(labelled):
    images, objects, prompts = labelled
    forms = set()
    for im, objs, prompt in zip(images[:120], objects, prompts):
        named, relation = parse_prompt(prompt)
        assert [(o["colour"], o["shape"]) for o in named] == [(o["colour"], o["shape"]) for o in objs]
        forms.add((len(named), relation is not None))
        checks = prompt_checks(prompt, detect(im))
        assert checks["overall"], (prompt, checks)
    assert forms == {(1, False), (2, True), (3, False)}
    assert parse_prompt("a red circle above a blue star") == (
        [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "star"}], "above")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_prompt("a photo of a cat")
    wrong = prompt_checks(prompts[0], [])
    assert not wrong["overall"] and not wrong["objects"]
