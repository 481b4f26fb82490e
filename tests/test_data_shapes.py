"""The shapes generator: deterministic by seed, holdout combinations only in test, well-formed records."""
from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from kelix.data.config import DataConfig
from kelix.data.format import DATASET_JSON, MANIFEST, SPLITS
from kelix.data.shapes import COLOURS, SHAPES, ShapesSettings, generate, generate_shapes, make_example


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(root):
    return [json.loads(line) for line in (root / MANIFEST).read_text().splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "ds", num_train=300, num_val=40, num_test=200, seed=3)


def test_same_seed_same_bytes_and_any_worker_split(small, tmp_path):
    again = generate_shapes(tmp_path / "again", num_train=300, num_val=40, num_test=200, seed=3, workers=2)
    assert _tree(again) == _tree(small)  # also byte-identical when two worker processes share the work
    other = generate_shapes(tmp_path / "other", num_train=300, num_val=40, num_test=200, seed=4)
    assert _tree(other)[MANIFEST] != _tree(small)[MANIFEST]


def test_prefix_of_a_bigger_set_is_the_same(small):
    # Per-image seeds: image i of a split does not depend on how many images the split has.
    rec, png = make_example(ShapesSettings(seed=3), "train", 17)
    assert (small / rec["image"]).read_bytes() == png
    assert _records(small)[17] == rec


def test_holdout_combinations_only_in_test(small):
    held = {("red", "triangle"), ("blue", "star")}
    by_split = {s: [r for r in _records(small) if r["split"] == s] for s in SPLITS}
    for split in ("train", "val"):
        for r in by_split[split]:
            combos = {(o["colour"], o["shape"]) for o in r["objects"]}
            assert not combos & held and not r["holdout"]
            text = " ".join([r["caption"], r["prompt"], *(q["q"] + " " + q["a"] for q in r["qa"])])
            assert "red triangle" not in text and "blue star" not in text
    test_held = [r for r in by_split["test"] if r["holdout"]]
    assert len(test_held) >= 0.2 * len(by_split["test"])  # holdout_fraction 0.25 forces enough of them
    for r in test_held:
        assert {(o["colour"], o["shape"]) for o in r["objects"]} & held


def test_records_are_complete_and_consistent(small):
    meta = json.loads((small / DATASET_JSON).read_text())
    assert meta["counts"] == {"train": 300, "val": 40, "test": 200} and meta["image_size"] == 64
    assert meta["generator"]["seed"] == 3
    records = _records(small)
    assert len({r["key"] for r in records}) == len(records) == 540
    types = set()
    for r in records:
        assert re.fullmatch(rf"{r['split']}-\d{{6}}", r["key"])
        assert r["image"] == f"images/{r['split']}/{r['key'].split('-')[1]}.png"
        objs = r["objects"]
        assert 1 <= len(objs) <= 3
        assert len({o["colour"] for o in objs}) == len(objs) == len({o["shape"] for o in objs})
        for o in objs:
            assert f"{o['colour']} {o['shape']}" in r["caption"]
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert abs(o["x"] * 64 - (x0 + x1) / 2) < 0.01
        for a, b in zip(objs, objs[1:]):  # boxes never overlap
            ax0, ay0, ax1, ay1 = a["box"]
            bx0, by0, bx1, by1 = b["box"]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
        for q in r["qa"]:
            assert q["q"] and q["a"] and q["type"] in {"colour", "shape", "count", "spatial", "exists"}
            types.add(q["type"])
        assert r["prompt"].startswith("a ")
    assert types == {"colour", "shape", "count", "spatial", "exists"}


def test_answers_are_right(small):
    from kelix.data.shapes import NUMBER_WORDS

    for r in _records(small)[:200]:
        objs = r["objects"]
        for q in r["qa"]:
            if q["type"] == "count":
                assert q["a"] == NUMBER_WORDS[len(objs)]
            elif q["type"] == "colour":
                shape = q["q"].split()[-1].rstrip("?")
                assert q["a"] == next(o["colour"] for o in objs if o["shape"] == shape)
            elif q["type"] == "shape":
                colour = q["q"].split()[-2]
                assert q["a"] == next(o["shape"] for o in objs if o["colour"] == colour)
            elif q["type"] == "exists":
                m = re.fullmatch(r"Is there a (\w+) (\w+)\?", q["q"])
                present = any(o["colour"] == m[1] and o["shape"] == m[2] for o in objs)
                assert q["a"] == ("yes" if present else "no")
            elif q["type"] == "spatial":
                m = re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", q["q"])
                a = next(o for o in objs if o["colour"] == m[1])
                b = next(o for o in objs if o["colour"] == m[3])
                dx, dy = a["x"] - b["x"], a["y"] - b["y"]
                want = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
                assert q["a"] == want


def test_images_are_small_palette_pngs(small):
    sizes = [p.stat().st_size for p in (small / "images").rglob("*.png")]
    assert sum(sizes) / len(sizes) < 400  # keeps the default 7000-image set near 1.5 MB of pixels
    with Image.open(next((small / "images" / "train").glob("*.png"))) as im:
        assert im.size == (64, 64) and im.mode == "P"
        colours = {c for _, c in im.convert("RGB").getcolors()}
    assert colours - {tuple(v) for v in COLOURS.values()}  # the background
    assert len(colours) <= 4


def test_image_size_and_bad_settings(tmp_path):
    root = generate_shapes(tmp_path / "big", num_train=3, num_val=1, num_test=1, image_size=128)
    with Image.open(next((root / "images" / "train").glob("*.png"))) as im:
        assert im.size == (128, 128)
    with pytest.raises(ValueError, match="holdout combination 'pink blob'"):
        generate(tmp_path / "x", DataConfig(holdout_combinations=["pink blob"]))
    with pytest.raises(ValueError, match="max_objects"):
        generate(tmp_path / "x", DataConfig(max_objects=len(SHAPES) + 1))
    with pytest.raises(ValueError, match="image_size must be at least 48, got 32; generate at 64"):
        generate(tmp_path / "x", DataConfig(image_size=32))  # objects would touch: captions would lie
    with pytest.raises(FileExistsError):
        generate(root, DataConfig(num_train=1, num_val=1, num_test=1))
    generate(root, DataConfig(num_train=1, num_val=1, num_test=1), overwrite=True)
    assert len(_records(root)) == 3 and not list(tmp_path.glob(".*generating"))


def test_cli_generate(tmp_path, capsys):
    from kelix.cli import main

    out = tmp_path / "cli"
    argv = ["data", "generate", "shapes", "--out", str(out), "--num-train", "12", "--num-val", "2", "--num-test", "2",
            "--seed", "5", "--set", "data.max_objects=2"]
    assert main(argv) == 0
    assert "wrote 16 shapes images" in capsys.readouterr().out
    records = _records(out)
    assert len(records) == 16 and max(len(r["objects"]) for r in records) <= 2
    assert json.loads((out / DATASET_JSON).read_text())["generator"]["seed"] == 5
    assert main(argv) == 2  # exists: a one-line error, not a traceback
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force", "--set", "data.holdout_combinations=[pink blob]"]) == 2


def test_pair_questions_ask_every_ordered_pair_as_the_data_does(small):
    from kelix.data.shapes import pair_questions

    records = _records(small)
    asked = 0
    for r in records:
        pairs = {q["q"]: q for q in pair_questions(r["objects"])}
        n = len(r["objects"])
        assert len(pairs) == n * (n - 1)
        for q in r["qa"]:
            if q["type"] == "spatial":  # the record's own question is one of them, with the same answer
                assert pairs[q["q"]] == q
                asked += 1
    assert asked > 200
