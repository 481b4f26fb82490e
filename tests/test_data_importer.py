"""The importer: every bad input becomes a clear error or a quarantined record with a reason; nothing lost."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kelix.data.config import DataConfig
from kelix.data.format import MANIFEST, QUARANTINE, DatasetError
from kelix.data.importer import import_folder
from kelix.data.reader import ImageTextDataset, iter_records
from kelix.data.validation import validate


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels but holds no pixel data: a decompression-bomb stand-in."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _save(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def messy(tmp_path):
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    files = {
        "img/good.png": _save(noise, "PNG"),
        "img/gray.png": _save(noise.convert("L"), "PNG"),
        "img/cmyk.jpg": _save(noise.convert("CMYK"), "JPEG"),
        "img/alpha.png": _save(Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG"),
        "img/deep.png": _save(Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 20).astype(np.uint16)), "PNG"),
        "img/zero.png": b"",
        "img/fake.png": b"this is not an image, just text with a .png name\n",
        "img/truncated.png": _save(noise, "PNG")[:600],
        "img/bomb.png": _png_header_only(100_000, 100_000),
        "img/wide.png": _png_header_only(8_000, 8_000),
    }
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    (tmp_path / "outside.png").write_bytes(files["img/good.png"])
    os.symlink(tmp_path / "outside.png", src / "img" / "link.png")

    def e(image, caption="a picture of something", **kw):
        return json.dumps({"image": image, "caption": caption, "qa": [{"q": "what?", "a": "something"}], **kw})

    lines = [
        e("img/good.png", split="train", key="good"),
        e("img/gray.png"),
        e("img/cmyk.jpg"),
        e("img/alpha.png"),
        e("img/deep.png"),
        e("img/zero.png"),
        e("img/fake.png"),
        e("img/truncated.png"),
        e("img/bomb.png"),
        e("img/wide.png"),
        e("img/good.png", caption=""),
        e("img/good.png", caption="x" * 5000),
        e("../outside.png"),
        e(str(tmp_path / "outside.png")),
        e("img/link.png"),
        e("img/good.png", key="../../etc"),
        e("img/good.png", split="train", key="good"),  # duplicate key
        "{this is not json",
        "",
        e("img/missing.png"),
        json.dumps({"image": "img/good.png", "caption": "fine caption", "qa": [{"q": "x", "a": ""}]}),
        e("img/good.png", split="dev", key="good-dev"),
        '{"image": "img/good.png", "caption": "big", "n": ' + "9" * 5000 + "}",  # over Python's int-digit limit
        "[" * 100_000,  # nested past the recursion limit
    ]
    (src / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return src


EXPECTED_REASONS = {
    6: "empty (0 bytes)",
    7: "not an image file",
    8: "truncated or corrupt",
    9: "decompression bomb",
    10: "pixel limit (decompression bomb guard)",
    11: "caption is missing or empty",
    12: "over the 2000 limit",
    13: "contains '..'",
    14: "is absolute",
    15: "resolves outside",
    16: "key '../../etc'",
    17: "duplicate key 'good'",
    18: "line 18 is not valid JSON",
    20: "image file not found",
    21: "qa[0] must have non-empty",
    22: "split 'dev'",
    23: "line 23 is not JSON this importer can read (ValueError)",
    24: "line 24 is not JSON this importer can read (RecursionError)",
}


def test_every_bad_entry_is_quarantined_with_its_reason(messy, tmp_path):
    out = tmp_path / "out"
    report = import_folder(messy, out)
    quarantine = [json.loads(line) for line in (out / QUARANTINE).read_text().splitlines()]
    assert report.quarantined == quarantine
    got = {q["line"]: q["reason"] for q in quarantine}
    assert set(got) == set(EXPECTED_REASONS)
    for line, needle in EXPECTED_REASONS.items():
        assert needle in got[line], (line, got[line])
    # Nothing lost: every non-blank input line is either a record or a quarantine entry, raw input kept.
    records = list(iter_records(out))
    assert len(records) + len(quarantine) == 23 == report.imported + len(report.quarantined)
    assert next(q for q in quarantine if q["line"] == 18)["raw"] == "{this is not json"
    assert next(q for q in quarantine if q["line"] == 12)["entry"]["caption"] == "x" * 5000
    assert "line 18" in report.summary()


def test_a_captions_file_saved_with_a_bom_keeps_its_first_record(messy, tmp_path):
    src = tmp_path / "bom"
    shutil.copytree(messy, src, symlinks=True)
    first = (messy / "captions.jsonl").read_text().splitlines()[0]
    (src / "captions.jsonl").write_bytes("\ufeff".encode() + (first + "\n").encode())
    report = import_folder(src, tmp_path / "out")
    assert report.imported == 1 and not report.quarantined


def test_converted_images_are_rgb_pngs_with_their_source_mode(messy, tmp_path):
    out = tmp_path / "out"
    report = import_folder(messy, out)
    records = {r["source"]["image"]: r for r in iter_records(out)}
    assert set(records) == {"img/good.png", "img/gray.png", "img/cmyk.jpg", "img/alpha.png", "img/deep.png"}
    assert report.converted == {records[p]["key"]: m for p, m in
                                [("img/gray.png", "L"), ("img/cmyk.jpg", "CMYK"), ("img/alpha.png", "RGBA"),
                                 ("img/deep.png", "I;16")]}
    for rec in records.values():
        with Image.open(out / rec["image"]) as im:
            assert im.format == "PNG" and im.mode == "RGB"
        assert rec["split"] in ("train", "val", "test") and rec["prompt"] == rec["caption"] and rec["objects"] == []
    with Image.open(out / records["img/alpha.png"]["image"]) as im:
        assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent pixels composite to white, not to red
    with Image.open(out / records["img/deep.png"]["image"]) as im:
        assert len(np.unique(np.asarray(im))) > 50  # 16-bit values scaled to 8 bits, not clipped to white
    assert records["img/good.png"]["key"] == "good" and records["img/good.png"]["split"] == "train"
    items = ImageTextDataset(out, image_size=32)
    assert len(items) == 5 and items[0]["image"].shape == (3, 32, 32)


def test_split_and_key_assignment_is_deterministic(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = []
    for i in range(200):
        (src / f"{i}.png").write_bytes(_save(Image.new("RGB", (20, 20), (i, 200, 30)), "PNG"))
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"green square number {i}"}))
    (src / "captions.jsonl").write_text("\n".join(lines))
    a = list(iter_records(import_folder(src, tmp_path / "a", image_size=16).out))
    b = list(iter_records(import_folder(src, tmp_path / "b", image_size=16).out))
    assert [(r["key"], r["split"]) for r in a] == [(r["key"], r["split"]) for r in b]
    shares = {s: sum(r["split"] == s for r in a) / 200 for s in ("train", "val", "test")}
    assert shares["train"] > 0.75 and shares["val"] > 0.02 and shares["test"] > 0.02
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["image_size"] == 16
    assert validate(tmp_path / "a", DataConfig(split_tolerance=0.1)).passed


def test_images_no_captions_line_names_are_counted_and_shown(tmp_path):
    """A folder with more images than caption lines imports what is named; the rest is said, not silently lost."""
    src = tmp_path / "src"
    (src / "more").mkdir(parents=True)
    for name in ("a.png", "b.png", "more/c.jpg", "more/d.PNG"):
        Image.new("RGB", (20, 20), (200, 30, 30)).save(src / name, format="PNG")
    (src / "notes.txt").write_text("not an image")
    (src / "captions.jsonl").write_text("\n".join([
        json.dumps({"image": "a.png", "caption": "a red square"}),
        json.dumps({"image": "./more/c.jpg", "caption": ""}),  # quarantined, but named: not "unreferenced"
    ]))
    report = import_folder(src, tmp_path / "out")
    assert report.imported == 1 and len(report.quarantined) == 1
    assert report.unreferenced == ["b.png", "more/d.PNG"]
    assert "2 images in the source are named by no line of captions.jsonl and were not imported: b.png, more/d.PNG" \
        in report.summary()
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["generator"]["unreferenced"] == 2
    # An output inside the source (and its staging folder) is the import's own, not unreferenced input.
    inside = import_folder(src, src / "imported")
    assert inside.unreferenced == ["b.png", "more/d.PNG"]
    assert import_folder(src, src / "imported", overwrite=True).unreferenced == ["b.png", "more/d.PNG"]


def test_whole_input_problems_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        import_folder(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "src").mkdir()
    with pytest.raises(DatasetError, match="no captions.jsonl"):
        import_folder(tmp_path / "src", tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    (tmp_path / "src" / "captions.jsonl").write_text("")
    with pytest.raises(DatasetError, match="not empty"):
        import_folder(tmp_path / "src", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_dirty_import_fails_validation_and_cli(messy, tmp_path, capsys):
    from kelix.cli import main

    out = tmp_path / "cli-out"
    assert main(["data", "import", str(messy), "--out", str(out)]) == 0
    assert "quarantined 18" in capsys.readouterr().out
    # 18 of 23 entries were bad: far over max_bad_fraction, so the dataset fails even though the manifest is clean.
    report = validate(out, DataConfig(split_tolerance=1.0))
    assert not report.passed and report.previously_quarantined == 18 and not report.bad
    assert main(["data", "import", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert len((out / MANIFEST).read_text().splitlines()) == 5
