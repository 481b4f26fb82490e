"""Readers: record streams, the map-style and streaming datasets, collate, and the cached image tensor."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from kelix.data.format import MANIFEST, QUARANTINE, DatasetError
from kelix.data.reader import ImageTextDataset, ShapesStreamingDataset, collate, iter_records, load_images
from kelix.data.shapes import generate_shapes


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("reader") / "shapes", num_train=40, num_val=10, num_test=10)


def test_iter_records_filters_splits_and_skips_quarantine(ds, tmp_path):
    assert len(list(iter_records(ds))) == 60
    assert {r["split"] for r in iter_records(ds, "val")} == {"val"} and len(list(iter_records(ds, "val"))) == 10
    with pytest.raises(DatasetError, match="split"):
        list(iter_records(ds, "dev"))
    with pytest.raises(DatasetError, match="manifest.jsonl is missing"):
        list(iter_records(tmp_path))
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / MANIFEST).write_text((ds / MANIFEST).read_text())
    (copy / QUARANTINE).write_text(json.dumps({"key": "train-000003", "reason": "test"}) + "\n")
    assert "train-000003" not in {r["key"] for r in iter_records(copy, "train")}
    assert len(list(iter_records(copy))) == 59


def test_map_dataset_items_and_collate(ds):
    data = ImageTextDataset(ds, "train")
    assert len(data) == 40
    item = data[0]
    assert set(item) == {"key", "image", "caption", "qa", "prompt", "objects", "split"}
    img = item["image"]
    assert img.dtype == torch.float32 and img.shape == (3, 64, 64)
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() > 0.5
    assert item["caption"] and item["qa"] and item["objects"] and item["split"] == "train"
    small = ImageTextDataset(ds, "test", image_size=32)
    assert small[0]["image"].shape == (3, 32, 32)
    batch = next(iter(DataLoader(data, batch_size=8, collate_fn=collate)))
    assert batch["image"].shape == (8, 3, 64, 64)
    assert isinstance(batch["caption"], list) and len(batch["qa"]) == 8 and len(batch["key"]) == 8
    with pytest.raises(ValueError):
        collate([])


def test_streaming_dataset_shards_without_overlap(ds):
    keys = [r["key"] for r in iter_records(ds, "train")]
    parts = [[it["key"] for it in ShapesStreamingDataset(ds, "train", rank=r, world_size=3)] for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(keys) and all(parts)
    loader = DataLoader(ShapesStreamingDataset(ds, "val", rank=0, world_size=1), batch_size=4, num_workers=2,
                        collate_fn=collate)
    seen = [k for b in loader for k in b["key"]]
    assert sorted(seen) == sorted(r["key"] for r in iter_records(ds, "val"))


def test_load_images_matches_dataset_and_caches(ds):
    keys, images = load_images(ds, "train")
    assert images.dtype == torch.uint8 and images.shape == (40, 3, 64, 64)
    data = ImageTextDataset(ds, "train")
    assert keys == [r["key"] for r in data.records]
    assert torch.equal(images[5].float() / 255.0, data[5]["image"])
    cache = ds.with_name(ds.name + ".cache")
    assert len(list(cache.glob("train-*.npy"))) == 1
    keys2, images2 = load_images(ds, "train")
    assert keys2 == keys and torch.equal(images2, images)
    # A changed manifest (e.g. validation quarantined a record) must not be served from the old cache.
    lines = (ds / MANIFEST).read_text().splitlines(keepends=True)
    (ds / MANIFEST).write_text("".join(lines[1:]))
    try:
        keys3, images3 = load_images(ds, "train")
        assert keys3 == keys[1:] and torch.equal(images3, images[1:])
        assert len(list(cache.glob("train-*.npy"))) == 1
    finally:
        (ds / MANIFEST).write_text("".join(lines))
    _, resized = load_images(ds, "val", image_size=32)
    assert resized.shape == (10, 3, 32, 32)


def test_a_rewritten_image_under_an_unchanged_manifest_is_decoded_again(tmp_path):
    """A re-import can replace an image file and leave manifest.jsonl byte-identical."""
    from PIL import Image

    ds = generate_shapes(tmp_path / "shapes", num_train=6, num_val=2, num_test=2)
    keys, before = load_images(ds, "val")
    rec = next(iter_records(ds, "val"))
    Image.new("RGB", (64, 64), (255, 0, 0)).save(ds / rec["image"])
    keys2, after = load_images(ds, "val")
    assert keys2 == keys and not torch.equal(after[0], before[0])
    assert after[0, :, 0, 0].tolist() == [255, 0, 0] and torch.equal(after[1], before[1])
    assert len(list(ds.with_name(ds.name + ".cache").glob("val-*"))) == 2  # one .npy and its keys, nothing stale


def test_transparent_pixels_read_as_white_as_at_import(tmp_path):
    """A palette image whose transparent index holds a colour: plain convert("RGB") would show that colour."""
    from PIL import Image

    ds = generate_shapes(tmp_path / "shapes", num_train=4, num_val=2, num_test=2)
    rec = next(iter_records(ds, "val"))
    im = Image.new("P", (64, 64), 1)
    im.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # index 0 blue, index 1 red
    im.info["transparency"] = 1
    im.paste(0, (0, 0, 8, 8))
    im.save(ds / rec["image"], transparency=1)
    _, images = load_images(ds, "val")
    assert images[0, :, 32, 32].tolist() == [255, 255, 255]  # transparent red: the white it is composited on
    assert images[0, :, 2, 2].tolist() == [0, 0, 255]


def test_an_unreadable_or_missing_image_names_its_record_and_says_to_validate(tmp_path):
    """A dataset that skipped validation reaches the readers with a cut-short PNG: the error names the record and
    the next step, not PIL's bare 'image file is truncated'."""
    import shutil

    from kelix.data.reader import open_image

    root = generate_shapes(tmp_path / "shapes", num_train=3, num_val=1, num_test=1)
    recs = list(iter_records(root, "train"))
    png = root / recs[1]["image"]
    png.write_bytes(png.read_bytes()[:100])
    with pytest.raises(DatasetError, match=rf"record 'train-000001': image .* cannot be read .*kelix data validate "
                                           rf"{root}"):
        open_image(root, recs[1])
    with pytest.raises(DatasetError, match="record 'train-000001'"):
        load_images(root, "train", cache_dir=tmp_path / "cache")
    shutil.rmtree(root / "images")
    with pytest.raises(DatasetError, match=r"record 'train-000000': image .* is missing"):
        open_image(root, recs[0])


def test_a_storage_error_reading_an_image_stays_an_oserror(tmp_path, monkeypatch):
    """EIO from a network volume is not the record's fault: it must stay retryable (the runners retry OSError) and
    must not come with advice to quarantine a good record."""
    import errno

    import kelix.data.reader as reader

    root = generate_shapes(tmp_path / "shapes", num_train=1, num_val=1, num_test=1)

    def flaky(path, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(reader.Image, "open", flaky)
    with pytest.raises(OSError, match="Input/output error") as caught:
        reader.open_image(root, next(iter_records(root, "train")))
    assert not isinstance(caught.value, DatasetError)
