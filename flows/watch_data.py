"""Notice a new dataset version and announce it as a Prefect event that starts the pipeline.

Runs hourly (prefect.yaml). It reads the md5 that data.dvc records in the checkout it runs in (prefect.yaml
has no pull step: that checkout must be kept current, e.g. `git pull --ff-only` from cron, for a
`dvc add && dvc push && git push` of new data to show up here), compares it with the data
version of the last finished pipeline run in MLflow, and when they differ emits `kelix.data.changed`. The
`kelix-pipeline/on-data-change` deployment has an event trigger on that event, so the server's automation
starts the pipeline; anything else (CI after `dvc push`, `prefect event emit`) can emit it too.

Why an event and not `run_deployment` from here: it keeps "data changed" and "train" decoupled (another
consumer, e.g. a data-quality report, can subscribe to the same event), and Prefect 3 OSS serves deployment
triggers from `prefect.yaml`. Each version is announced once (a Prefect Variable remembers the last one),
so a failing pipeline is not restarted every hour.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import flows  # noqa: F401  - environment defaults before Prefect is imported
import yaml
from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.variables import Variable

from flows.common import PIPELINE_RUN

EVENT = "kelix.data.changed"
ANNOUNCED = "kelix_data_version_announced"


def dvc_version(dvc_file: str | Path) -> tuple[str, str]:
    """(path, md5) of the first output a .dvc file tracks."""
    meta = yaml.safe_load(Path(dvc_file).read_text()) or {}
    outs = meta.get("outs") or []
    if not outs or not outs[0].get("md5"):
        raise ValueError(f"{dvc_file} records no output md5: is it a `dvc add` file?")
    return str(outs[0].get("path", "")), str(outs[0]["md5"])


def last_trained_version(mlflow_uri: str | None = None) -> str | None:
    """The data version of the most recent finished *whole* pipeline run, if any.

    Phase flows run alone (a hand-run `evaluate` or `train-tokenizer`) open runs tagged `kelix.pipeline` too;
    they train nothing end to end and release nothing, so they must not count as having trained a version."""
    from kelix.tracking import Tracker

    tracker = Tracker(mlflow_uri)
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`kelix.pipeline` = 'true' and attributes.status = 'FINISHED' "
                                               f"and attributes.run_name = '{PIPELINE_RUN}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].data.tags.get("kelix.data_version") if runs else None


@flow(name="watch-data")
def watch_data(dvc_file: str = "data.dvc", mlflow_uri: str | None = None, announce: bool = True) -> dict[str, Any]:
    """Emit `kelix.data.changed` if data.dvc names a data version no finished pipeline has trained on."""
    log = get_run_logger()
    path, md5 = dvc_version(dvc_file)
    trained = last_trained_version(mlflow_uri)
    announced = Variable.get(ANNOUNCED, default=None)
    state = {"dvc_file": str(dvc_file), "path": path, "data_version": md5, "last_trained": trained,
             "last_announced": announced, "changed": md5 not in (trained, announced)}
    if not state["changed"]:
        log.info("data version %s already %s; nothing to do", md5, "trained" if md5 == trained else "announced")
        return state
    log.info("data version %s is new (last trained: %s)%s", md5, trained, "; announcing it" if announce else "")
    if announce:
        emit_event(event=EVENT, resource={"prefect.resource.id": f"kelix.dataset.{path or 'data'}",
                                          "prefect.resource.name": path or "data", "kelix.data_version": md5},
                   payload={"data_version": md5, "previous": trained, "dvc_file": str(dvc_file)})
        Variable.set(ANNOUNCED, md5, overwrite=True)
    return state
