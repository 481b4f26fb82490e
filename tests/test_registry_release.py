"""Registry mechanics against a real MLflow (SQLite in tmp): register, gate, promote, roll back, race.

One bundle is registered through `register_bundle` (a real pyfunc model of the untrained tiny bundle); the
other versions a scenario needs are registered from the same logged model with their own metric tags,
which is all the gate reads, so each scenario costs a registry write instead of a model upload.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from kelix.config import load_config
from kelix.registry import (
    CHALLENGER, CHAMPION, PREVIOUS, RegistryError, check_gate, gate, promote, register_bundle, rollback, status,
)
from kelix.registry.lineage import complete_lineage, version_tags
from kelix.registry.store import configure
from test_bundle_layout import tiny_bundle

GOOD = {"vqa_accuracy": 0.8, "geneval_overall": 0.5, "recon_detector_agreement": 0.9, "recon_psnr": 20.0}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A fresh SQLite registry with one version of `kelix-test` registered by register_bundle."""
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("KELIX_CACHE", str(root / "cache"))
        mp.setenv("KELIX_ACTOR", "tester")
        bundle = tiny_bundle(tmp_path_factory.getbasetemp())
        cfg = cfg_for("kelix-test")
        version = register_bundle(bundle, cfg, GOOD, {"pipeline_run_id": "run-123", "stage_keys": '{"eval": "k"}'})
        yield {"root": root, "bundle": bundle, "version": version, "cfg": cfg}


def cfg_for(name: str, *overrides: str):
    return load_config("tiny", overrides=[f"eval.model_name={name}", *overrides])


def add_version(registry, name: str, metrics: dict[str, float]) -> str:
    """A new version of `name` backed by the module's logged model, with these metrics as its tags."""
    client = configure()
    base = client.get_model_version("kelix-test", registry["version"])
    try:
        client.create_registered_model(name)
    except Exception:  # already exists
        pass
    lineage = complete_lineage(cfg_for(name), {"pipeline_run_id": f"run-{len(metrics)}"})
    mv = client.create_model_version(name, base.source, run_id=base.run_id, tags=version_tags(lineage, metrics))
    return str(mv.version)


def aliases(name: str) -> dict[str, str | None]:
    client = configure()
    out = {}
    for alias in (CHAMPION, CHALLENGER, PREVIOUS):
        try:
            out[alias] = str(client.get_model_version_by_alias(name, alias).version)
        except Exception:
            out[alias] = None
    return out


def test_register_bundle_tags_lineage_and_sets_challenger(registry):
    client = configure()
    mv = client.get_model_version("kelix-test", registry["version"])
    tags = mv.tags
    for key in ("git_sha", "data_version", "data_fingerprint", "config_hash", "preset", "stage_keys", "pipeline_run_id"):
        assert tags[f"lineage.{key}"], key
    assert tags["lineage.pipeline_run_id"] == "run-123" and tags["lineage.preset"] == "tiny"
    assert tags["lineage.stage_keys"] == '{"eval": "k"}'
    assert float(tags["metric.vqa_accuracy"]) == 0.8 and float(tags["metric.recon_psnr"]) == 20.0
    assert aliases("kelix-test")[CHALLENGER] == registry["version"]
    run = client.get_run(tags["kelix.run_id"])
    assert run.data.metrics["vqa_accuracy"] == 0.8 and run.data.tags["lineage.config_hash"] == tags["lineage.config_hash"]
    history = status(registry["cfg"])["history"]
    assert history[0]["action"] == "register" and history[0]["to"] == registry["version"]


def test_gate_pass_promotes_and_records(registry):
    name = "m-pass"
    cfg = cfg_for(name)
    v = add_version(registry, name, GOOD)
    decision = gate(v, cfg)
    assert decision.passed and decision.failures == []
    result = promote(v, cfg, reason="first release")
    assert result.promoted and result.previous is None
    assert aliases(name)[CHAMPION] == v
    tags = configure().get_model_version(name, v).tags
    assert tags["kelix.promoted_by"] == "tester" and tags["kelix.promotion_reason"] == "first release"
    assert tags["kelix.gate"] == "passed"
    events = [json.loads(t) for k, t in tags.items() if k.startswith("kelix.event.")]
    assert [e["action"] for e in events] == ["promote"] and events[0]["to"] == v
    run = configure().get_run(result.record_run_id)
    assert run.data.params["actor"] == "tester" and run.data.params["to"] == v and run.data.params["from"] == ""
    assert promote(v, cfg, reason="again").message.endswith("already the champion")


def test_gate_failure_leaves_aliases_and_says_by_how_much(registry):
    name = "m-fail"
    cfg = cfg_for(name)
    good = add_version(registry, name, GOOD)
    assert promote(good, cfg, "baseline").promoted
    bad = add_version(registry, name, {**GOOD, "vqa_accuracy": 0.41})
    before = aliases(name)
    result = promote(bad, cfg, "should not pass")
    assert not result.promoted
    assert result.decision.failures == [
        "vqa_accuracy = 0.4100 is below its threshold 0.5000 by 0.0900",
        f"vqa_accuracy = 0.4100 regresses 0.3900 below champion v{good} (0.8000), more than the tolerance 0.0200"]
    assert "aliases unchanged" in result.message
    assert aliases(name) == before
    assert configure().get_model_version(name, bad).tags["kelix.gate"] == "failed"


def test_the_gate_refuses_thresholds_of_another_preset_than_the_versions(registry):
    """A bare `kelix registry promote` gates with the tiny preset's thresholds: a small-preset version must not
    pass them by accident."""
    name = "m-preset"
    version = add_version(registry, name, GOOD)
    configure().set_model_version_tag(name, version, "lineage.preset", "small")
    result = promote(version, cfg_for(name), "bare promote")
    assert not result.promoted and aliases(name)[CHAMPION] is None
    assert result.decision.failures == [f"version {version} was trained with the small preset but the gate has the "
                                        "tiny preset's thresholds: pass --preset small (and the run's --params/--set)"]


def test_a_promotion_killed_before_its_tags_is_completed_by_the_rerun(registry):
    """Killed after the aliases moved: the champion had no promotion tags, the rerun said "already the champion"
    and left them missing, and rollback (which walks back by those tags) lost track of it."""
    from kelix.registry.release import complete_promotion

    name = "m-interrupted"
    cfg = cfg_for(name)
    first = add_version(registry, name, GOOD)
    assert promote(first, cfg, "baseline").promoted
    second = add_version(registry, name, GOOD)
    client = configure()
    client.set_registered_model_alias(name, PREVIOUS, first)  # what promote() did before it was killed
    client.set_registered_model_alias(name, CHAMPION, second)
    assert "kelix.promoted_at" not in client.get_model_version(name, second).tags

    result = promote(second, cfg, "rerun")
    assert not result.promoted and result.message.endswith("the record of its interrupted promotion was completed")
    tags = client.get_model_version(name, second).tags
    assert tags["kelix.promoted_from"] == first and "completing an interrupted promotion" in tags["kelix.promotion_reason"]
    assert client.get_model_version(name, first).tags["kelix.demoted_for"] == second
    assert complete_promotion(second, cfg, "again") == ""  # nothing missing any more
    assert rollback(cfg, "regression").message and aliases(name)[CHAMPION] == first


def test_a_registration_killed_before_its_alias_is_completed_by_the_rerun(registry):
    """Killed after register_model: the rerun reuses the version (same eval run), which had no alias."""
    from kelix.registry.release import complete_registration

    name = "m-unaliased"
    cfg = cfg_for(name)
    version = add_version(registry, name, GOOD)  # registered, then killed before the alias and the record
    assert aliases(name)[CHALLENGER] is None
    assert complete_registration(version, cfg) == "; its interrupted registration was completed (alias challenger)"
    assert aliases(name)[CHALLENGER] == version
    assert complete_registration(version, cfg) == ""  # finished now: nothing more
    assert promote(version, cfg, "baseline").promoted
    assert complete_registration(version, cfg) == "" and aliases(name)[CHAMPION] == version
    # A registration that finished the first time is left as it is.
    assert complete_registration(registry["version"], registry["cfg"]) == ""


def test_regression_against_champion(registry):
    name = "m-regress"
    cfg = cfg_for(name)
    champ = add_version(registry, name, GOOD)
    assert promote(champ, cfg, "baseline").promoted
    # Above 0.2, but 0.06 below the champion: more than the tiny preset's GenEval tolerance (0.05).
    worse = add_version(registry, name, {**GOOD, "geneval_overall": 0.44})
    decision = gate(worse, cfg)
    assert not decision.passed and decision.champion == champ
    assert decision.failures == [f"geneval_overall = 0.4400 regresses 0.0600 below champion v{champ} (0.5000), "
                                 f"more than the tolerance 0.0500"]
    assert not gate(add_version(registry, name, {**GOOD, "vqa_accuracy": GOOD["vqa_accuracy"] - 0.03}), cfg).passed
    within = add_version(registry, name, {**GOOD, "geneval_overall": 0.49})
    assert gate(within, cfg).passed
    assert promote(within, cfg, "within tolerance").promoted
    assert aliases(name) == {CHAMPION: within, CHALLENGER: None, PREVIOUS: champ}


def test_rollback_chain_and_blocked_repromotion(registry):
    name = "m-rollback"
    cfg = cfg_for(name)
    v1, v2, v3 = (add_version(registry, name, GOOD) for _ in range(3))
    for v in (v1, v2, v3):
        assert promote(v, cfg, f"release {v}").promoted
    assert aliases(name)[CHAMPION] == v3 and aliases(name)[PREVIOUS] == v2

    result = rollback(cfg, "v3 misbehaves in production")
    assert (result.version, result.previous) == (v2, v3)
    assert aliases(name)[CHAMPION] == v2 and aliases(name)[PREVIOUS] == v1  # one step further back
    tags = configure().get_model_version(name, v3).tags
    assert tags["kelix.rollback_reason"] == "v3 misbehaves in production" and tags["kelix.rolled_back_by"] == "tester"

    blocked = promote(v3, cfg, "try again")
    assert not blocked.promoted and any("was rolled back" in f for f in blocked.decision.failures)
    assert rollback(cfg, "v2 too").version == v1 and aliases(name)[PREVIOUS] is None
    with pytest.raises(RegistryError, match="no previous-champion"):
        rollback(cfg, "nothing left")
    forced = promote(v3, cfg, "fixed upstream, known good", force=True)
    assert forced.promoted and "forced" in forced.message
    history = status(cfg)["history"]
    assert [(h["action"], h["from"], h["to"]) for h in history[:4]] == [
        ("promote", v1, v3), ("rollback", v2, v1), ("rollback", v3, v2), ("promote", v2, v3)]
    assert history[0]["forced"] == "true" and "rolled back" in history[0]["gate_failures"]


def test_a_rollback_never_restores_a_release_that_was_rolled_back(registry):
    """Z, X, Z again; Z rolled back (X champion); Y promoted over X; rolling Y back restores X, and X's
    predecessor is Z, which was rolled back since its last promotion: it must not become previous-champion."""
    name = "m-rollback-twice"
    cfg = cfg_for(name)
    z, x, y = (add_version(registry, name, GOOD) for _ in range(3))
    for v in (z, x, z):
        assert promote(v, cfg, f"release {v}").promoted
    assert rollback(cfg, "z is bad").version == x and aliases(name)[PREVIOUS] is None
    assert promote(y, cfg, "release y").promoted and aliases(name)[PREVIOUS] == x
    assert rollback(cfg, "y is bad").version == x
    assert aliases(name)[CHAMPION] == x and aliases(name)[PREVIOUS] is None
    with pytest.raises(RegistryError, match="no previous-champion"):
        rollback(cfg, "would restore z")
    # Force-promoted again after the fix, z is a release like any other: a later rollback may restore it.
    assert promote(z, cfg, "z fixed", force=True).promoted
    assert promote(y, cfg, "release y again", force=True).promoted
    assert rollback(cfg, "y still bad").version == z and aliases(name)[PREVIOUS] == x


def _assert_consistent(name: str, start: str, contenders: set[str]) -> None:
    """Exactly one champion, and the promotion records form one chain start -> first -> second."""
    client = configure()
    holders = [mv.version for mv in client.search_model_versions(f"name='{name}'")
               if CHAMPION in (client.get_model_version(name, mv.version).aliases or [])]
    assert len(holders) == 1
    promos = [h for h in reversed(status(cfg_for(name))["history"]) if h["action"] == "promote"][-2:]
    assert promos[0]["from"] == start and promos[1]["from"] == promos[0]["to"]
    assert {promos[0]["to"], promos[1]["to"]} == contenders
    assert aliases(name)[CHAMPION] == promos[1]["to"] and aliases(name)[PREVIOUS] == promos[0]["to"]


def champion_and_two_more(registry, name: str) -> tuple:
    """A model whose first version is champion, plus two newer good versions: (cfg, champion, a, b)."""
    cfg = cfg_for(name)
    start = add_version(registry, name, GOOD)
    assert promote(start, cfg, "baseline").promoted
    return cfg, start, add_version(registry, name, GOOD), add_version(registry, name, GOOD)


def test_racing_promotions_threads(registry):
    name = "m-race-threads"
    cfg, start, a, b = champion_and_two_more(registry, name)
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def go(v):
        try:
            barrier.wait()
            results[v] = promote(v, cfg, f"race {v}", actor=f"thread-{v}")
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(v,)) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and all(r.promoted for r in results.values())
    _assert_consistent(name, start, {a, b})


@pytest.mark.slow
def test_racing_promotions_processes(registry, tmp_path):
    name = "m-race-procs"
    cfg, start, a, b = champion_and_two_more(registry, name)
    go = tmp_path / "go"
    script = (
        "import sys, time, pathlib\n"
        "from kelix.config import load_config\n"
        "from kelix.registry import promote\n"
        f"cfg = load_config('tiny', overrides=['eval.model_name={name}'])\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        "r = promote(sys.argv[1], cfg, 'race', actor='proc-' + sys.argv[1])\n"
        "sys.exit(0 if r.promoted else 3)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, v], stderr=subprocess.PIPE, text=True) for v in (a, b)]
    import time

    time.sleep(3)  # both have imported and are spinning on the start file
    go.touch()
    for p in procs:
        assert p.wait(300) == 0, p.stderr.read()[-2000:]
    _assert_consistent(name, start, {a, b})


def test_check_gate_reports_missing_metrics():
    failures = check_gate({"vqa_accuracy": 0.9}, {"vqa_accuracy": 0.5, "geneval_overall": 0.2}, lambda _: 0.02)
    assert failures == ["geneval_overall is missing from the evaluation metrics (threshold 0.2000)"]


def test_check_gate_takes_a_tolerance_per_metric():
    """GenEval on the tiny preset's evaluation moves more with the seed than VQA: it can have its own tolerance."""
    from kelix.eval.config import EvalConfig

    ecfg = EvalConfig(regression_tolerance=0.02, metric_tolerances={"geneval_overall": 0.06})
    assert (ecfg.tolerance("geneval_overall"), ecfg.tolerance("vqa_accuracy")) == (0.06, 0.02)
    thresholds = {"vqa_accuracy": 0.5, "geneval_overall": 0.2}
    champion = {"vqa_accuracy": 0.90, "geneval_overall": 0.30}
    within = {"vqa_accuracy": 0.89, "geneval_overall": 0.25}  # 0.01 and 0.05 below the champion
    assert check_gate(within, thresholds, ecfg.tolerance, champion, "1") == []
    assert check_gate(within, thresholds, lambda _: 0.02, champion, "1") == [
        "geneval_overall = 0.2500 regresses 0.0500 below champion v1 (0.3000), more than the tolerance 0.0200"]
    beyond = {"vqa_accuracy": 0.87, "geneval_overall": 0.23}
    assert check_gate(beyond, thresholds, ecfg.tolerance, champion, "1") == [
        "geneval_overall = 0.2300 regresses 0.0700 below champion v1 (0.3000), more than the tolerance 0.0600",
        "vqa_accuracy = 0.8700 regresses 0.0300 below champion v1 (0.9000), more than the tolerance 0.0200"]


def test_status_and_registry_cli(registry, capsys):
    from kelix.cli import main

    name = "m-cli"
    good = add_version(registry, name, GOOD)
    bad = add_version(registry, name, {**GOOD, "recon_detector_agreement": 0.1})
    assert main(["registry", "promote", good, "--set", f"eval.model_name={name}", "--reason", "cli"]) == 0
    assert main(["registry", "promote", bad, "--set", f"eval.model_name={name}"]) == 1
    out = capsys.readouterr().out
    assert "recon_detector_agreement = 0.1000 is below its threshold 0.5000 by 0.4000" in out
    assert main(["registry", "promote", bad, "--force", "--reason", "hotfix", "--set", f"eval.model_name={name}"]) == 0
    assert main(["registry", "rollback", "--reason", "bad hotfix", "--set", f"eval.model_name={name}"]) == 0
    assert main(["registry", "status", "--set", f"eval.model_name={name}"]) == 0
    out = capsys.readouterr().out
    assert f"@champion           v{good}" in out and "rollback  v" in out and "bad hotfix" in out
    assert main(["registry", "promote", "999", "--set", f"eval.model_name={name}"]) == 2
    assert "no version 999" in capsys.readouterr().err
    info = status(cfg_for(name))
    assert info["aliases"][CHAMPION]["metrics"]["vqa_accuracy"] == 0.8
    assert {v["version"]: v["aliases"] for v in info["versions"]}[good] == [CHAMPION]
    assert status(cfg_for("never-registered"))["exists"] is False


def test_lineage_reads_dvc_md5_and_fingerprint(tmp_path, monkeypatch):
    import kelix.tracking as tracking
    from kelix.data.config import DataConfig
    from kelix.data.shapes import generate
    from kelix.stages.keys import data_fingerprint

    data = generate(tmp_path / "data" / "shapes", DataConfig(num_train=2, num_val=1, num_test=1))
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef.dir\n  path: data/shapes\n")
    monkeypatch.setattr(tracking, "repo_root", lambda: tmp_path)
    cfg = load_config("tiny", overrides=[f"data.root={data}"])
    lineage = complete_lineage(cfg, {"pipeline_run_id": "p"})
    assert lineage["data_version"] == "0123456789abcdef.dir"
    assert lineage["data_fingerprint"] == data_fingerprint(data)
    assert json.loads(lineage["stage_keys"])["eval"]
    (tmp_path / "data.dvc").unlink()
    assert complete_lineage(cfg)["data_version"] == f"content:{data_fingerprint(data)}"
    missing = complete_lineage(load_config("tiny", overrides=[f"data.root={tmp_path / 'nope'}"]))
    assert missing["data_fingerprint"] == "unknown" and missing["stage_keys"] == "unknown"


def test_reproduce_reads_the_recorded_config_and_lineage(registry):
    from kelix.config import config_hash
    from kelix.registry.reproduce import ReproduceError, recorded

    rec = recorded("kelix-test", registry["version"])
    assert config_hash(rec.cfg) == config_hash(registry["cfg"]) == rec.lineage["config_hash"]
    assert rec.metrics == GOOD and rec.lineage["pipeline_run_id"] == "run-123"
    with pytest.raises(ReproduceError, match="no version 99"):
        recorded("kelix-test", "99")


def test_the_release_flow_reuses_a_version_only_for_the_same_eval_run(registry):
    """Registered from the same eval key and run: reused. Same key, later run (forced re-evaluation): not.
    A version registered before the run was recorded matches on the key alone."""
    from types import SimpleNamespace

    from flows.promote import registered_version

    name = "m-reuse"
    ctx = SimpleNamespace(cfg=cfg_for(name))
    client = configure()
    old, new = add_version(registry, name, GOOD), add_version(registry, name, GOOD)
    client.set_model_version_tag(name, old, "lineage.eval_key", "k-old")
    client.set_model_version_tag(name, new, "lineage.eval_key", "k-new")
    client.set_model_version_tag(name, new, "lineage.eval_done_at", "100.5")
    assert registered_version(ctx, "k-new", "100.5") == new
    assert registered_version(ctx, "k-new", "200.0") is None  # forced re-evaluation: register its bundle
    assert registered_version(ctx, "k-old", "300.0") == old  # registered before eval_done_at existed
    assert registered_version(ctx, "k-other", "100.5") is None
