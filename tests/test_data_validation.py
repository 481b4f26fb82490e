"""Validation: passes clean data, quarantines bad records (never deleting them), fails dirty datasets."""
from __future__ import annotations

import json
import shutil

import pytest

from kelix.data.config import DataConfig
from kelix.data.format import MANIFEST, QUARANTINE, DatasetError
from kelix.data.reader import iter_records
from kelix.data.shapes import generate_shapes
from kelix.data.validation import validate

CFG = DataConfig(num_train=160, num_val=20, num_test=20)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("val") / "shapes", num_train=160, num_val=20, num_test=20)


@pytest.fixture
def ds(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "shapes")


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_clean_dataset_passes_with_gx_expectations(ds, tmp_path):
    before = (ds / MANIFEST).read_bytes()
    report = validate(ds, CFG)
    assert report.passed and report.checked == 200 and not report.bad and not report.failures
    assert (ds / MANIFEST).read_bytes() == before and not (ds / QUARANTINE).exists()
    types = {e["type"] for e in report.expectations}
    assert {"expect_column_values_to_not_be_null", "expect_column_values_to_be_unique",
            "expect_column_value_lengths_to_be_between", "expect_column_values_to_be_between",
            "expect_column_values_to_be_in_set"} <= types
    assert all(e["success"] for e in report.expectations)
    md = report.to_markdown()
    assert md.startswith("# Data validation: PASSED") and "| split proportions |" in md
    data = json.loads(report.to_json())
    assert data["passed"] is True and data["checked"] == 200 and len(data["splits"]) == 3
    md_path, json_path = report.write(tmp_path / "report.md")
    assert md_path.read_text() == md and json.loads(json_path.read_text())["passed"]


def test_bad_records_are_quarantined_and_fail_over_the_limit(ds):
    recs = _lines(ds / MANIFEST)
    (ds / recs[0]["image"]).write_bytes(b"not a png")  # non-image bytes
    (ds / recs[1]["image"]).write_bytes((ds / recs[1]["image"]).read_bytes()[:60])  # truncated
    (ds / recs[2]["image"]).unlink()  # missing
    recs[3]["caption"] = ""  # empty caption
    recs[4]["qa"][0]["a"] = " "  # empty answer
    recs[5]["image"] = "../../etc/passwd"  # path leaving the dataset
    recs[6]["split"] = "dev"
    recs[8]["key"] = recs[7]["key"]  # duplicate key: both are suspect
    recs[9]["caption"] = "  \n\t  "  # only whitespace: as empty as ""
    lines = [json.dumps(r) for r in recs]
    lines.insert(10, "{broken json")
    (ds / MANIFEST).write_text("\n".join(lines) + "\n")

    report = validate(ds, CFG)
    assert not report.passed
    assert "over the 1.00% limit" in report.failures[0]
    reasons = {b["key"]: "; ".join(b["reasons"]) for b in report.bad if b["key"]}
    assert "does not decode" in reasons[recs[0]["key"]] and "does not decode" in reasons[recs[1]["key"]]
    assert "not found" in reasons[recs[2]["key"]]
    assert "caption length" in reasons[recs[3]["key"]] and "caption length" in reasons[recs[9]["key"]]
    assert "qa answers non-empty" in reasons[recs[4]["key"]]
    assert "'..'" in reasons[recs[5]["key"]]
    assert "split known" in reasons[recs[6]["key"]]
    assert "duplicate key" in reasons[recs[7]["key"]]
    assert any("line 11 is not a JSON object" in "; ".join(b["reasons"]) for b in report.bad)
    assert len(report.bad) == 11

    # Moved, not deleted: quarantine holds every bad record with its reason, the manifest the rest.
    quarantine = _lines(ds / QUARANTINE)
    manifest = _lines(ds / MANIFEST)
    assert len(quarantine) == 11 and len(manifest) == 190  # 200 records + 1 broken line - 11
    assert all(q["reason"] for q in quarantine)
    assert next(q for q in quarantine if q["line"] == 11)["raw"] == "{broken json"
    assert {r["key"] for r in manifest}.isdisjoint({q["key"] for q in quarantine if q["key"]})
    assert len(list(iter_records(ds))) == 190
    assert "## Bad records (11, moved to `quarantine.jsonl`)" in report.to_markdown()

    # Re-validating the cleaned manifest still counts what was quarantined: a dirty dataset stays failed.
    again = validate(ds, CFG)
    assert not again.bad and again.previously_quarantined == 11 and not again.passed
    assert len(_lines(ds / QUARANTINE)) == 11


def test_few_bad_records_pass_but_are_still_quarantined(ds):
    recs = _lines(ds / MANIFEST)
    (ds / recs[0]["image"]).write_bytes(b"")
    report = validate(ds, CFG)
    assert report.passed and len(report.bad) == 1 and report.bad_fraction == pytest.approx(1 / 200)
    assert _lines(ds / QUARANTINE)[0]["key"] == recs[0]["key"]
    assert recs[0]["key"] not in {r["key"] for r in iter_records(ds)}


def test_dry_run_moves_nothing(ds):
    recs = _lines(ds / MANIFEST)
    (ds / recs[0]["image"]).write_bytes(b"junk")
    before = (ds / MANIFEST).read_bytes()
    report = validate(ds, CFG, quarantine=False)
    assert len(report.bad) == 1 and not report.quarantined_now
    assert (ds / MANIFEST).read_bytes() == before and not (ds / QUARANTINE).exists()


def test_bounds_splits_and_duplicates_fail_the_dataset(ds):
    strict = DataConfig(num_train=160, num_val=20, num_test=20, min_image_size=128, allowed_modes=["RGB"])
    report = validate(ds, strict, quarantine=False)
    assert len(report.bad) == 200 and not report.passed
    assert all("width in bounds" in "; ".join(b["reasons"]) and "mode allowed" in "; ".join(b["reasons"])
               for b in report.bad)
    lenient = DataConfig(num_train=160, num_val=20, num_test=20, max_caption_chars=40, max_bad_fraction=1.0)
    report = validate(ds, lenient, quarantine=False)
    assert report.bad and report.passed  # the gate is the share of bad records, here allowed to be anything

    lopsided = DataConfig(num_train=100, num_val=50, num_test=50)
    report = validate(ds, lopsided, quarantine=False)
    assert not report.passed and "split proportions" in report.failures[0]

    recs = _lines(ds / MANIFEST)
    for r in recs[1:6]:
        shutil.copyfile(ds / recs[0]["image"], ds / r["image"])
    report = validate(ds, CFG, quarantine=False)
    assert not report.passed and report.duplicate_images["count"] == 5
    assert any("unique" in f for f in report.failures)

    with pytest.raises(DatasetError, match="dataset.json is missing"):
        validate(ds / "images", CFG)


def test_cli_validate_exit_codes_and_reports(ds, tmp_path, capsys):
    from kelix.cli import main

    args = ["--set", "data.num_train=160", "--set", "data.num_val=20", "--set", "data.num_test=20"]
    assert main(["data", "validate", str(ds), "--report", str(tmp_path / "rep"), *args]) == 0
    assert (tmp_path / "rep.md").read_text().startswith("# Data validation: PASSED")
    assert json.loads((tmp_path / "rep.json").read_text())["passed"]
    recs = _lines(ds / MANIFEST)
    for r in recs[:5]:
        (ds / r["image"]).write_bytes(b"junk")
    assert main(["data", "validate", str(ds), *args]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "quarantine.jsonl" in out
    # The bad records themselves, not only their count: each with its manifest line and reason.
    assert f"bad {recs[0]['key']} (manifest line 1): " in out and out.count("\n  bad ") == 5
    assert (ds.with_name(ds.name + "-validation.json")).exists()
    assert main(["data", "validate", str(tmp_path / "nothing")]) == 2


def test_empty_dataset_fails_once_with_a_clear_reason(tmp_path):
    root = generate_shapes(tmp_path / "empty", num_train=0, num_val=0, num_test=0)
    report = validate(root, CFG)
    assert not report.passed and report.failures == ["the manifest has no records"]
