"""The artifact store's remote mirror, on fsspec's in-memory filesystem: push, mark, pull, and pulls that die."""
from __future__ import annotations

import json
import uuid

import fsspec
import pytest

from kelix.artifacts import FAILED, LOCK_FILE, STATUS_FILE, SUCCESS, ArtifactStore


@pytest.fixture
def stores(tmp_path):
    """(writer, reader): two processes' views of one memory:// store, each with its own local mirror."""
    uri = f"memory://kelix-{uuid.uuid4().hex[:8]}"
    writer = ArtifactStore(uri, cache_dir=tmp_path / "writer")
    local = writer.local_dir("llm-1", "k1")
    (local / "model").mkdir(parents=True)
    (local / "model" / "weights.bin").write_bytes(b"w" * 1000)
    (local / "metrics.json").write_text('{"loss": 0.5}')
    writer.push("llm-1", "k1")
    writer.mark("llm-1", "k1", SUCCESS)
    yield writer, ArtifactStore(uri, cache_dir=tmp_path / "reader")
    fsspec.filesystem("memory").rm(writer.root, recursive=True)


def test_a_pull_brings_every_file_then_the_marker(stores):
    _, reader = stores
    local = reader.pull("llm-1", "k1")
    assert (local / "model" / "weights.bin").read_bytes() == b"w" * 1000
    assert json.loads((local / "metrics.json").read_text()) == {"loss": 0.5}
    assert json.loads((local / STATUS_FILE).read_text())["status"] == SUCCESS
    assert sorted(p.name for p in local.rglob("*")) == [STATUS_FILE, "metrics.json", "model", "weights.bin"]


def test_a_pull_killed_half_way_is_redone_by_the_next(stores, monkeypatch):
    """The marker sorts first in a listing and used to arrive with the first files: a pull killed after it
    left a folder that every later pull took as complete."""
    _, reader = stores
    real_get, fetched = reader.fs.get_file, []

    def dies_after_one_file(src, dst, *args, **kwargs):
        if fetched:
            raise KeyboardInterrupt("pod evicted")
        fetched.append(src)
        return real_get(src, dst, *args, **kwargs)

    monkeypatch.setattr(reader.fs, "get_file", dies_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        reader.pull("llm-1", "k1")
    local = reader.local_dir("llm-1", "k1")
    assert not (local / STATUS_FILE).exists()
    # What arrived under its real name is whole; the file being fetched when it died is not there at all.
    assert (local / "metrics.json").read_text() == '{"loss": 0.5}' and not (local / "model" / "weights.bin").exists()
    monkeypatch.undo()
    reader.pull("llm-1", "k1")
    assert (local / "model" / "weights.bin").read_bytes() == b"w" * 1000 and (local / "metrics.json").exists()


def test_a_mirror_left_failed_by_a_local_run_pulls_the_finished_outputs(stores):
    writer, reader = stores
    reader.mark("llm-1", "k1", FAILED)  # this machine ran the stage and failed; another finished it since
    writer.mark("llm-1", "k1", SUCCESS)
    local = reader.pull("llm-1", "k1")
    assert (local / "model" / "weights.bin").exists()
    assert json.loads((local / STATUS_FILE).read_text())["status"] == SUCCESS


def test_the_store_is_the_one_given_then_the_environments_then_the_configs(monkeypatch):
    from kelix.artifacts import store_uri

    monkeypatch.delenv("KELIX_ARTIFACTS", raising=False)
    assert store_uri(None, "artifacts") == "artifacts"
    monkeypatch.setenv("KELIX_ARTIFACTS", "s3://team/runs")  # what a pod or the compose worker sets
    assert store_uri(None, "artifacts") == "s3://team/runs"
    assert store_uri("/tmp/mine", "artifacts") == "/tmp/mine"


def test_a_rerun_in_the_store_replaces_the_mirrors_copy(stores):
    """A forced rerun re-marks the store: a mirror holding the earlier run's marker must not be taken as current
    (the release flow would register the old bundle under the new metrics)."""
    writer, reader = stores
    assert (reader.pull("llm-1", "k1") / "metrics.json").read_text() == '{"loss": 0.5}'
    local = writer.local_dir("llm-1", "k1")
    (local / "metrics.json").write_text('{"loss": 0.25}')
    writer.push("llm-1", "k1")
    writer.mark("llm-1", "k1", SUCCESS, note="forced rerun")
    assert (reader.pull("llm-1", "k1") / "metrics.json").read_text() == '{"loss": 0.25}'


def test_a_forced_rerun_clears_the_store_and_the_mirrors_drop_what_it_no_longer_holds(stores):
    """A forced rerun that writes fewer files (say, no preview any more) must not leave the earlier run's extra
    files in the store or in a reader's mirror, where they sit beside the new outputs as if they were theirs."""
    writer, reader = stores
    local = writer.local_dir("llm-1", "k1")
    (local / "checkpoints" / "step_0000010").mkdir(parents=True)
    (local / "checkpoints" / "step_0000010" / "state.pt").write_bytes(b"c")
    first = reader.pull("llm-1", "k1")
    in_flight = first / "model" / "other.bin.tmp-7-abc"  # another process's download, not yet renamed
    in_flight.write_bytes(b"partial")

    writer.mark("llm-1", "k1", "RUNNING")
    (local / LOCK_FILE).write_text("{}")  # held by the process running the stage: never cleared nor uploaded
    writer.clear("llm-1", "k1")
    assert sorted(p.name for p in local.rglob("*")) == sorted([LOCK_FILE, STATUS_FILE])
    assert sorted(writer.fs.find(f"{writer.root}/llm-1/k1")) == [f"{writer.root}/llm-1/k1/{STATUS_FILE}"]

    (local / "metrics.json").write_text('{"loss": 0.25}')
    writer.push("llm-1", "k1")
    writer.mark("llm-1", "k1", SUCCESS, note="forced rerun")
    second = reader.pull("llm-1", "k1")
    assert sorted(p.name for p in second.rglob("*") if p.is_file()) == sorted([STATUS_FILE, in_flight.name, "metrics.json"])
    assert (second / "metrics.json").read_text() == '{"loss": 0.25}'


def test_clearing_a_local_store_keeps_only_the_marker(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    local = store.local_dir("dit-1", "k")
    (local / "checkpoints" / "step_0000002").mkdir(parents=True)
    (local / "model.safetensors").write_bytes(b"w")
    store.mark("dit-1", "k", "RUNNING")
    store.clear("dit-1", "k")
    assert [p.name for p in local.iterdir()] == [STATUS_FILE]
    assert store.status("dit-1", "k")["status"] == "RUNNING"


def test_a_clear_killed_half_way_has_already_removed_the_checkpoints(tmp_path, monkeypatch):
    """Killed mid-clear, the stage is unfinished, so the next try resumes: from nothing, not from the old run's
    last checkpoint (which would hand back the old weights under "force")."""
    import shutil

    store = ArtifactStore(tmp_path / "store")
    local = store.local_dir("llm-2", "k")
    for folder in ("aux", "checkpoints/step_0000450", "model"):
        (local / folder).mkdir(parents=True)
    store.mark("llm-2", "k", "RUNNING")
    real_rmtree, calls = shutil.rmtree, []

    def killed_on_the_second(path, *args, **kwargs):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        store.clear("llm-2", "k")
    assert calls[0] == "checkpoints" and not (local / "checkpoints").exists()


def test_pulling_what_the_store_does_not_hold_says_so(stores):
    _, reader = stores
    with pytest.raises(FileNotFoundError, match="has no outputs for llm-2/nope: run the stage first"):
        reader.pull("llm-2", "nope")


def test_a_failed_atomic_write_leaves_neither_a_file_nor_its_temporary(tmp_path):
    from kelix.files import replace_atomically

    target = tmp_path / "cache.npy"

    def dies(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(target, dies)
    assert list(tmp_path.iterdir()) == []
    replace_atomically(target, lambda tmp: tmp.write_bytes(b"whole"))
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_a_marker_from_before_input_runs_counts_an_input_finished_after_it_as_rerun(tmp_path):
    import time

    store = ArtifactStore(tmp_path / "store")
    store.mark("tokenizer-3", "t", SUCCESS)
    store.mark("llm-1", "l", SUCCESS, inputs={"tokenizer-3": "t"})  # the old marker format: keys only
    assert store.is_current("llm-1", "l")
    time.sleep(0.01)
    store.mark("tokenizer-3", "t", SUCCESS, note="forced rerun")
    assert store.stale_inputs("llm-1", "l") == ["tokenizer-3"] and not store.is_current("llm-1", "l")


def test_staleness_reads_each_marker_once_however_many_paths_lead_to_it(tmp_path, monkeypatch):
    """A diamond (a feeds b and c, both feed d): on S3 every marker read is a request."""
    store = ArtifactStore(tmp_path / "store")
    store.mark("a", "k", SUCCESS)
    runs = {"a": store.input_run("a", "k")}
    for mid in ("b", "c"):
        store.mark(mid, "k", SUCCESS, inputs={"a": "k"}, input_runs=runs)
    store.mark("d", "k", SUCCESS, inputs={"b": "k", "c": "k"},
               input_runs={m: store.input_run(m, "k") for m in ("b", "c")})
    reads = []
    real = store.status
    monkeypatch.setattr(store, "status", lambda s, k: reads.append(s) or real(s, k))
    assert store.stale_inputs("d", "k") == []
    assert sorted(reads) == ["a", "b", "c", "d"]
