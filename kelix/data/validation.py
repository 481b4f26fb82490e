"""Dataset validation with Great Expectations 1.x: find bad records, quarantine them, gate the dataset.

Each record is checked once in plain Python (image decodes, size, mode, content hash, text lengths), giving
one row of a pandas table; Great Expectations (an ephemeral context: no files, no project folder) then runs
the suite over that table, so the rules are declared as real expectations and their results are what the
report shows. Records failing a record-level expectation are appended to `quarantine.jsonl` (fsynced) and only
then removed from `manifest.jsonl`; nothing is deleted. The dataset fails when bad records, counting those
quarantined earlier (so re-running validation cannot wash a dirty dataset clean), exceed `max_bad_fraction`,
or when a dataset-level expectation (split proportions, duplicate images, non-empty) fails.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from kelix.data.config import DataConfig
from kelix.data.format import (MANIFEST, QUARANTINE, SPLITS, DatasetError, append_jsonl, iter_manifest_lines,
                               read_dataset_json, resolve_inside, write_jsonl_atomic)

# Share of records that may repeat another record's image bytes before the dataset fails.
MAX_DUPLICATE_FRACTION = 0.01


@dataclass
class ValidationReport:
    root: str
    passed: bool
    total: int  # records checked now plus records quarantined before
    checked: int
    bad: list[dict]  # {"key", "line", "reasons"} found in this run
    previously_quarantined: int
    bad_fraction: float
    max_bad_fraction: float
    expectations: list[dict]  # one per GX expectation: check, type, column, success, unexpected_count, observed
    splits: list[dict]  # split, count, share, expected, deviation
    duplicate_images: dict  # count (records whose bytes repeat an earlier one) and example key groups
    quarantined_now: bool
    seconds: float
    failures: list[str] = field(default_factory=list)  # why the dataset failed, in words

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"# Data validation: {verdict}", "",
                 f"- dataset: `{self.root}`",
                 f"- records checked: {self.checked} ({self.checked / max(self.seconds, 1e-9):.0f} records/s)",
                 f"- bad records: {len(self.bad)} now + {self.previously_quarantined} quarantined before = "
                 f"{self.bad_fraction:.2%} of {self.total} (limit {self.max_bad_fraction:.2%})",
                 f"- duplicate images (same bytes): {self.duplicate_images['count']}"]
        if self.failures:
            lines += ["", "## Why it failed", ""] + [f"- {f}" for f in self.failures]
        lines += ["", "## Expectations", "", "| check | expectation | column | result | unexpected | observed |",
                  "|---|---|---|---|---|---|"]
        for e in self.expectations:
            lines.append(f"| {e['check']} | `{e['type']}` | {e.get('column') or ''} | {'pass' if e['success'] else 'FAIL'} "
                         f"| {e.get('unexpected_count', '')} | {_short(e.get('observed'))} |")
        lines += ["", "## Splits", "", "| split | records | share | expected | deviation |", "|---|---|---|---|---|"]
        for s in self.splits:
            exp = "" if s["expected"] is None else f"{s['expected']:.3f}"
            dev = "" if s["deviation"] is None else f"{s['deviation']:.3f}"
            lines.append(f"| {s['split']} | {s['count']} | {s['share']:.3f} | {exp} | {dev} |")
        if self.bad:
            where = f"moved to `{QUARANTINE}`" if self.quarantined_now else "not moved (dry run)"
            lines += ["", f"## Bad records ({len(self.bad)}, {where})", "", "| key | line | reasons |", "|---|---|---|"]
            for b in self.bad[:200]:
                lines.append(f"| {b['key']} | {b['line']} | {'; '.join(b['reasons'])} |".replace("\n", " "))
            if len(self.bad) > 200:
                lines.append(f"| ... | | {len(self.bad) - 200} more in the JSON report |")
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> tuple[Path, Path]:
        """Write `<path>.md` and `<path>.json` (any suffix of `path` is replaced)."""
        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".md", ".json") else base
        base.parent.mkdir(parents=True, exist_ok=True)
        md, js = base.with_name(base.name + ".md"), base.with_name(base.name + ".json")
        md.write_text(self.to_markdown())
        js.write_text(self.to_json() + "\n")
        return md, js


def _short(value) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_record(root: Path, rec: dict, cfg: DataConfig) -> dict:
    """One table row for a record; `problems` holds what plain Python found (unreadable image, bad fields)."""
    problems: list[str] = []
    row = {"key": rec.get("key"), "split": rec.get("split"), "caption": rec.get("caption"),
           "image_ok": False, "width": None, "height": None, "mode": None, "content_hash": None,
           "qa_count": 0, "qa_empty_answers": 0}
    if not isinstance(row["key"], str) or not row["key"]:
        row["key"] = None
    if not isinstance(row["caption"], str):
        problems.append("caption is missing or not a string")
        row["caption"] = ""
    row["caption"] = row["caption"].strip()  # the length check counts text, not whitespace ("   " is empty)
    qa = rec.get("qa", [])
    if not isinstance(qa, list) or not all(isinstance(p, dict) for p in qa):
        problems.append("qa is not a list of objects")
    else:
        row["qa_count"] = len(qa)
        row["qa_empty_answers"] = sum(not (isinstance(p.get("a"), str) and p["a"].strip()) for p in qa)
    if not isinstance(rec.get("objects", []), list):
        problems.append("objects is not a list")
    try:
        path = resolve_inside(root, rec.get("image"), "image path")
        data = path.read_bytes()
        row["content_hash"] = hashlib.sha1(data).hexdigest()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                row["width"], row["height"], row["mode"] = im.size[0], im.size[1], im.mode
                if im.size[0] * im.size[1] > cfg.max_image_pixels:
                    raise ValueError(f"{im.size[0]}x{im.size[1]} is over the {cfg.max_image_pixels} pixel limit")
                im.load()
        row["image_ok"] = True
    except DatasetError as exc:
        problems.append(str(exc))
    except FileNotFoundError:
        problems.append(f"image file {rec.get('image')} not found")
    except Exception as exc:  # any decoder failure is a property of this record, not of the validator
        problems.append(f"image does not decode: {type(exc).__name__}: {exc}")
    row["problems"] = problems
    return row


def _suite_for(cfg: DataConfig):
    """(check name, expectation, record-level?) triples; record-level failures quarantine their rows."""
    import great_expectations as gx

    E = gx.expectations
    return [
        ("non-empty", E.ExpectTableRowCountToBeBetween(min_value=1), False),
        ("key present", E.ExpectColumnValuesToNotBeNull(column="key"), True),
        ("key unique", E.ExpectColumnValuesToBeUnique(column="key"), True),
        ("split known", E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)), True),
        ("image decodes", E.ExpectColumnValuesToBeInSet(column="image_ok", value_set=[True]), True),
        ("width in bounds", E.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_image_size,
                                                             max_value=cfg.max_image_size), True),
        ("height in bounds", E.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_image_size,
                                                              max_value=cfg.max_image_size), True),
        ("mode allowed", E.ExpectColumnValuesToBeInSet(column="mode", value_set=list(cfg.allowed_modes)), True),
        ("caption length", E.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=cfg.min_caption_chars,
                                                                 max_value=cfg.max_caption_chars), True),
        ("qa answers non-empty", E.ExpectColumnValuesToBeBetween(column="qa_empty_answers", min_value=0, max_value=0), True),
        ("duplicate images", E.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column="content_hash", min_value=1.0 - MAX_DUPLICATE_FRACTION), False),
    ]


def _run_gx(df, suites: list, split_df=None, split_tol: float = 0.0):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = ctx.data_sources.add_pandas("kelix")
    fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": ["row"], "return_unexpected_index_query": False}
    results = []
    tables = [("manifest", df, suites)]
    if split_df is not None:
        tables.append(("splits", split_df, [("split proportions", gx.expectations.ExpectColumnValuesToBeBetween(
            column="deviation", min_value=0.0, max_value=split_tol), False)]))
    for name, frame, items in tables:
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame})
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"kelix-{name}"))
        for check, exp, record_level in items:
            exp.meta = {"check": check, "record_level": record_level}
            suite.add_expectation(exp)
        results.extend(batch.validate(suite, result_format=fmt).results)
    return results


def validate(root: str | Path, cfg: DataConfig | None = None, *, quarantine: bool = True,
             progress: bool = False) -> ValidationReport:
    """Validate the dataset at `root`; with `quarantine`, bad records are moved to quarantine.jsonl."""
    import pandas as pd

    cfg = cfg or DataConfig()
    root = Path(root)
    start = time.perf_counter()
    read_dataset_json(root)
    manifest = root / MANIFEST
    if not manifest.exists():
        raise DatasetError(f"{root} is not a dataset folder: {MANIFEST} is missing")
    qpath = root / QUARANTINE
    before = sum(1 for _ in iter_manifest_lines(qpath)) if qpath.exists() else 0

    records: list[tuple[int, dict]] = []
    broken: list[dict] = []  # manifest lines that are not JSON objects: quarantined raw, with their line
    with open(manifest, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError(f"a JSON {type(rec).__name__}, not an object")
                records.append((lineno, rec))
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                broken.append({"key": None, "line": lineno, "reasons": [f"manifest line {lineno} is not a JSON object: {exc}"],
                               "raw": raw.decode("utf-8", errors="replace").rstrip("\n")})

    rows = []
    iterator = records
    if progress and len(records) >= 2000:
        from tqdm import tqdm

        iterator = tqdm(records, desc="validate", unit="img")
    for i, (lineno, rec) in enumerate(iterator):
        row = check_record(root, rec, cfg)
        row["row"], row["line"] = i, lineno
        rows.append(row)
    df = pd.DataFrame(rows, columns=["row", "line", "key", "split", "caption", "image_ok", "width", "height", "mode",
                                     "content_hash", "qa_count", "qa_empty_answers", "problems"])
    df["image_ok"] = df["image_ok"].astype(object)  # GX's value-set check compares Python bools

    counts = df["split"].value_counts().to_dict() if len(df) else {}
    wanted = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
    wanted_total = sum(wanted.values())
    split_rows = []
    for s in SPLITS:
        share = counts.get(s, 0) / max(len(df), 1)
        expected = wanted[s] / wanted_total if wanted_total else None
        split_rows.append({"split": s, "count": int(counts.get(s, 0)), "share": share, "expected": expected,
                           "deviation": None if expected is None else abs(share - expected)})
    split_df = pd.DataFrame(split_rows) if wanted_total and len(df) else None

    results = _run_gx(df, _suite_for(cfg), split_df, cfg.split_tolerance)

    reasons: dict[int, list[str]] = {int(r["row"]): list(r["problems"]) for r in rows}
    expectations, failures = [], []
    for res in results:
        conf = res.expectation_config
        meta = conf.meta or {}
        info = {"check": meta.get("check", conf.type), "type": conf.type, "column": conf.kwargs.get("column"),
                "success": bool(res.success), "unexpected_count": res.result.get("unexpected_count"),
                "observed": res.result.get("observed_value")}
        if res.exception_info and res.exception_info.get("raised_exception"):
            info["success"] = False
            info["error"] = res.exception_info.get("exception_message")
        expectations.append(info)
        if meta.get("record_level"):
            for hit in res.result.get("unexpected_index_list") or []:
                row = int(hit["row"])
                if conf.type == "expect_column_values_to_be_in_set" and info["column"] == "image_ok":
                    continue  # the decoder's own message, already in problems, says more
                value = hit.get(info["column"]) if info["column"] else None
                reasons[row].append(_reason(info["check"], info["column"], value, conf.kwargs))
        elif not info["success"] and (len(df) or info["check"] == "non-empty"):  # an empty table fails once
            failures.append(_dataset_failure(info, split_rows, cfg))
    order = {check: i for i, (check, _, _) in enumerate(_suite_for(cfg))}
    expectations.sort(key=lambda e: order.get(e["check"], len(order)))

    bad = [{"key": rows[i]["key"], "line": rows[i]["line"], "reasons": rs} for i, rs in sorted(reasons.items()) if rs]
    bad += [{"key": b["key"], "line": b["line"], "reasons": b["reasons"]} for b in broken]
    total = len(records) + len(broken) + before
    bad_fraction = (len(bad) + before) / max(total, 1)
    if bad_fraction > cfg.max_bad_fraction:
        failures.insert(0, f"{bad_fraction:.2%} of records are bad ({len(bad)} now, {before} quarantined before), "
                           f"over the {cfg.max_bad_fraction:.2%} limit")

    if quarantine and bad:
        _quarantine(root, records, broken, {b["line"]: b["reasons"] for b in bad})

    dup = df[df["content_hash"].notna() & df.duplicated("content_hash", keep=False)]
    groups = [list(g["key"]) for _, g in dup.groupby("content_hash")][:10]
    duplicates = {"count": int(df["content_hash"].dropna().duplicated().sum()), "examples": groups}
    return ValidationReport(
        root=str(root), passed=not failures, total=total, checked=len(records) + len(broken), bad=bad,
        previously_quarantined=before, bad_fraction=bad_fraction, max_bad_fraction=cfg.max_bad_fraction,
        expectations=expectations, splits=split_rows, duplicate_images=duplicates,
        quarantined_now=bool(quarantine and bad), seconds=time.perf_counter() - start, failures=failures)


def _reason(check: str, column: str | None, value, kwargs: dict) -> str:
    if check == "key unique":
        return f"duplicate key {value!r}"
    if check == "key present":
        return "key is missing"
    if "min_value" in kwargs or "max_value" in kwargs:
        shown = len(value) if check == "caption length" and isinstance(value, str) else value
        return f"{check}: {column} = {shown!r} outside [{kwargs.get('min_value')}, {kwargs.get('max_value')}]"
    if "value_set" in kwargs:
        return f"{check}: {column} = {value!r} not in {kwargs['value_set']}"
    return f"{check} failed"


def _dataset_failure(info: dict, split_rows: list[dict], cfg: DataConfig) -> str:
    if info["check"] == "split proportions":
        off = ", ".join(f"{s['split']} {s['share']:.3f} (expected {s['expected']:.3f})" for s in split_rows
                        if s["deviation"] is not None and s["deviation"] > cfg.split_tolerance)
        return f"split proportions off by more than {cfg.split_tolerance}: {off}"
    if info["check"] == "duplicate images":
        return f"only {info['observed']:.2%} of images are unique (at most {MAX_DUPLICATE_FRACTION:.0%} may repeat)"
    if info["check"] == "non-empty":
        return "the manifest has no records"
    return f"{info['check']} failed (observed {info['observed']}){': ' + info['error'] if info.get('error') else ''}"


def _quarantine(root: Path, records: list[tuple[int, dict]], broken: list[dict], reasons: dict[int, list[str]]) -> None:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    moved = [{**rec, "reason": "; ".join(reasons[line]), "line": line, "quarantined_at": stamp, "quarantined_from": MANIFEST}
             for line, rec in records if line in reasons]
    moved += [{"key": None, "line": b["line"], "raw": b["raw"], "reason": "; ".join(b["reasons"]),
               "quarantined_at": stamp, "quarantined_from": MANIFEST} for b in broken]
    # Quarantine first (durable), manifest second: a crash in between leaves records in both places, and
    # the readers skip quarantined keys, so nothing is ever lost or read twice.
    append_jsonl(root / QUARANTINE, moved)
    write_jsonl_atomic(root / MANIFEST, [rec for line, rec in records if line not in reasons])
