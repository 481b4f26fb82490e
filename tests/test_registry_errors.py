"""Registry error paths against a real MLflow (SQLite in tmp): bad model references, registered versions whose
artifacts are not a kelix model, alias changes by a writer outside the lock, and a registry lock held too long.

The broken versions are real registered versions: a copy of the module's registered pyfunc model with a part
taken away, logged to a run and registered from it, so they come back through MLflow's own download.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from kelix.bundle import BundleError
from kelix.registry import (
    CHAMPION, PREVIOUS, RegistryConflict, RegistryError, load_bundle, local_bundle, promote, rollback, status,
)
from kelix.registry.resolve import parse_models_uri
from kelix.registry.store import configure, ensure_experiment, lock_path, registry_lock, tracking_uri
from test_registry_release import GOOD, add_version, aliases, cfg_for, champion_and_two_more, registry  # noqa: F401 - registry: fixture

# ---------------------------------------------------------------------------------------------- model references


@pytest.mark.parametrize("uri", [
    "", "kelix@champion", "models:/", "models:/kelix", "models:/kelix@", "models:/kelix/", "models:/kelix/v2",
    "models:/kelix/2/extra", "models:/kelix@champion/2", "models://kelix@champion", "runs:/0123abcd/model",
])
def test_parse_models_uri_rejects_what_is_not_a_model_reference(uri):
    with pytest.raises(RegistryError, match="is not a model reference: use a bundle folder, models:/NAME@ALIAS or "
                                            "models:/NAME/VERSION") as info:
        parse_models_uri(uri)
    assert repr(uri) in str(info.value)


def test_parse_models_uri_accepts_aliases_and_versions():
    assert parse_models_uri("models:/kelix@champion") == ("kelix", "champion", None)
    assert parse_models_uri("  models:/kelix-test/12\n") == ("kelix-test", None, "12")


def test_a_malformed_models_uri_fails_before_touching_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(RegistryError, match=r"'models:/kelix' is not a model reference"):
        load_bundle("models:/kelix")
    assert not (tmp_path / "mlflow.db").exists()


def test_local_bundle_of_a_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no-such-bundle"
    with pytest.raises(BundleError, match="does not exist: pass a bundle folder .*or a models:/ URI") as info:
        local_bundle(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(BundleError, match="no-such-bundle does not exist"):
        load_bundle(str(missing))


def test_an_alias_nobody_holds_is_a_registry_error(registry):
    with pytest.raises(RegistryError, match=r"no version of 'kelix-test' has alias 'canary' in sqlite:///.*"
                                            r"register and promote a model first"):
        local_bundle("models:/kelix-test@canary")


# ---------------------------------------------------------------------------------------------- broken versions


def _register_broken(registry, tmp_path: Path, name: str, damage) -> str:
    """A new registered version of `name` whose artifacts are the module's model, without its bundle folder,
    after `damage(model_dir)`: logged to a run and registered from it, as a foreign tool would."""
    client = configure()
    stored = Path(client.get_model_version_download_uri("kelix-test", registry["version"]).removeprefix("file://"))
    model = Path(shutil.copytree(stored, tmp_path / "model", ignore=shutil.ignore_patterns("artifacts")))
    damage(model)
    run = client.create_run(ensure_experiment(client, "kelix"), run_name=f"broken {name}")
    client.log_artifacts(run.info.run_id, str(model), "model")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except Exception:  # already exists
        pass
    return str(client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id).version)


def test_a_version_without_mlmodel_is_a_bundle_error(registry, tmp_path):
    version = _register_broken(registry, tmp_path, "broken-no-mlmodel", lambda m: (m / "MLmodel").unlink())
    with pytest.raises(BundleError, match=rf"the registered artifacts of broken-no-mlmodel v{version} are damaged: "
                                          r".*MLmodel is missing.*Register the model again"):
        local_bundle(f"models:/broken-no-mlmodel/{version}")


@pytest.mark.parametrize("uri", ["models:/kelix-test/99", "models:/no-such-model/1"])
def test_a_version_or_model_that_does_not_exist_is_a_registry_error(registry, uri):
    with pytest.raises(RegistryError, match=r"cannot fetch .* v\d+ from .*`kelix registry status` lists"):
        local_bundle(uri)


def test_a_version_naming_no_bundle_artifact_was_not_registered_by_kelix(registry, tmp_path):
    def drop_bundle_artifact(model: Path) -> None:
        mlmodel = yaml.safe_load((model / "MLmodel").read_text())
        del mlmodel["flavors"]["python_function"]["artifacts"]
        (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))

    version = _register_broken(registry, tmp_path, "broken-no-artifact", drop_bundle_artifact)
    with pytest.raises(BundleError, match=r"MLmodel names no `bundle` artifact: this model was not registered by kelix"):
        local_bundle(f"models:/broken-no-artifact/{version}")


def test_a_version_whose_bundle_folder_was_not_uploaded_names_the_version_and_folder(registry, tmp_path):
    version = _register_broken(registry, tmp_path, "broken-no-folder", lambda m: None)  # MLmodel intact
    with pytest.raises(BundleError, match=rf"the registered artifacts of broken-no-folder v{version} are damaged: "
                                          r"no bundle folder at .*/artifacts/tiny-bundle.*Register the model again"):
        local_bundle(f"models:/broken-no-folder/{version}")
    # A second load downloads again (the damaged cache copy is not trusted) and fails the same way.
    with pytest.raises(BundleError, match=rf"broken-no-folder v{version} are damaged: no bundle folder"):
        load_bundle(f"models:/broken-no-folder/{version}")


# ---------------------------------------------------------------------------------------------- compare-and-set


def _intruding_client(monkeypatch, intruder: dict[str, str]):
    """Make release.configure() return a real client after whose next write of an alias in `intruder`, a second
    client (another host, whose lock file is not ours) points that alias elsewhere, before the re-read."""
    from mlflow import MlflowClient

    import kelix.registry.release as release

    class Raced(MlflowClient):
        def set_registered_model_alias(self, name, alias, version):
            super().set_registered_model_alias(name, alias, version)
            if alias in intruder:
                other = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
                other.set_registered_model_alias(name, alias, intruder.pop(alias))

    monkeypatch.setattr(release, "configure", lambda: Raced(tracking_uri=tracking_uri(), registry_uri=tracking_uri()))


def test_promotion_whose_alias_moved_under_the_lock_is_a_conflict(registry, monkeypatch):
    name = "m-conflict-promote"
    cfg, start, mine, theirs = champion_and_two_more(registry, name)
    _intruding_client(monkeypatch, {CHAMPION: theirs})

    with pytest.raises(RegistryConflict) as info:
        promote(mine, cfg, "mine")
    message = str(info.value)
    assert f"aliases of {name!r} changed while the registry lock was held" in message
    assert f"expected {{'champion': '{mine}', 'previous-champion': '{start}'}}" in message
    assert f"found {{'champion': '{theirs}', 'previous-champion': '{start}'}}" in message
    assert f"another writer does not share the lock {lock_path()}" in message
    assert isinstance(info.value, RegistryError)
    # Nothing claims the promotion happened: no record, no promotion tags; and the lock was released.
    assert [h["action"] for h in status(cfg)["history"]] == ["promote"]
    assert "kelix.promoted_at" not in configure().get_model_version(name, mine).tags
    with registry_lock(timeout=1):
        pass


def test_a_champion_that_cannot_be_read_stops_the_promotion(registry, monkeypatch):
    """A registry read that fails (a locked database, a 503) is not "no champion": the gate would skip the
    regression check and promote a version that is worse than the champion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    import kelix.registry.release as release

    name = "m-unreadable-champion"
    cfg = cfg_for(name)
    start = add_version(registry, name, GOOD)
    assert promote(start, cfg, "baseline").promoted
    worse = add_version(registry, name, {**GOOD, "vqa_accuracy": 0.6})

    class Locked(MlflowClient):
        def get_model_version_by_alias(self, name, alias):
            if alias == CHAMPION:
                raise MlflowException("(sqlite3.OperationalError) database is locked")
            return super().get_model_version_by_alias(name, alias)

    monkeypatch.setattr(release, "configure", lambda: Locked(tracking_uri=tracking_uri(), registry_uri=tracking_uri()))
    with pytest.raises(RegistryError, match=r"could not read alias 'champion' of model 'm-unreadable-champion' .*"
                                            r"database is locked.*kelix registry status"):
        promote(worse, cfg, "looks fine")
    monkeypatch.undo()
    assert aliases(name)[CHAMPION] == start
    assert not promote(worse, cfg, "read again").promoted  # with the champion readable, the gate refuses it


def test_rollback_whose_alias_moved_under_the_lock_is_a_conflict(registry, monkeypatch):
    name = "m-conflict-rollback"
    cfg = cfg_for(name)
    v1, v2, v3 = (add_version(registry, name, GOOD) for _ in range(3))
    for v in (v1, v2):
        assert promote(v, cfg, f"release {v}").promoted
    _intruding_client(monkeypatch, {CHAMPION: v3})

    with pytest.raises(RegistryConflict, match=rf"aliases of '{name}' changed while the registry lock was held "
                                               rf"\(expected {{'champion': '{v1}', 'previous-champion': None}}, "
                                               rf"found {{'champion': '{v3}', 'previous-champion': None}}\)"):
        rollback(cfg, "v2 misbehaves")
    assert aliases(name)[CHAMPION] == v3 and aliases(name)[PREVIOUS] is None
    assert [h["action"] for h in status(cfg)["history"]] == ["promote", "promote"]


# ---------------------------------------------------------------------------------------------- the lock


def test_registry_lock_held_by_another_process_times_out_naming_the_holder(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from kelix.registry.store import registry_lock
        with registry_lock(uri={uri!r}):
            print("held", flush=True)
            sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(RegistryError, match=r"registry lock .*mlflow\.db\.kelix-registry\.lock is still held after "
                                                r"1 s by .*; retry when it is released") as info:
            with registry_lock(timeout=1, uri=uri):
                pytest.fail("acquired a lock another process holds")
        assert 1 <= time.monotonic() - start < 10
        assert f'"pid": {holder.pid}' in str(info.value)
    finally:
        holder.communicate("release\n", timeout=30)
    assert holder.returncode == 0
    with registry_lock(timeout=5, uri=uri) as path:  # the holder's exit released it
        assert path == tmp_path / "mlflow.db.kelix-registry.lock"


def test_registry_lock_excludes_a_second_holder_in_the_same_process(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with registry_lock(uri=uri):
        with pytest.raises(RegistryError, match=r"is still held after [\d.]+ s by \{\"pid\""):
            with registry_lock(timeout=0.2, uri=uri):
                pytest.fail("acquired a lock this thread already holds")


def test_status_of_a_registry_that_cannot_be_read_is_an_error_not_an_empty_registry(registry, monkeypatch):
    """A tracking server that is down answered `kelix registry status` with "not registered yet: run the
    pipeline", after MLflow's retries: advice that would retrain a model that exists."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    import kelix.registry.release as release

    class Down(MlflowClient):
        def get_registered_model(self, name):
            raise MlflowException("API request to endpoint /api/2.0/mlflow/registered-models/get failed: "
                                  "Max retries exceeded (Connection refused)")

    assert status(cfg_for("m-never-registered"))["exists"] is False  # a readable registry without the model
    monkeypatch.setattr(release, "configure", lambda: Down(tracking_uri=tracking_uri(), registry_uri=tracking_uri()))
    with pytest.raises(RegistryError, match=r"could not read model 'm-down' from .*Connection refused.*check the "
                                            r"tracking server and retry"):
        status(cfg_for("m-down"))
