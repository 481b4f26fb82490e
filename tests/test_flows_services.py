"""prefect.yaml against a real Prefect server: pools, `prefect deploy --all`, a worker running a deployment.

A `prefect server start` on loopback (own PREFECT_HOME and SQLite database), the two work pools, every
deployment of prefect.yaml deployed with the real CLI, then `watch-data/hourly` run to completion by a
`prefect worker start --pool kelix-process --run-once`. Its run announces a new data version, and the
server's automation for the `on-data-change` deployment trigger answers with a pipeline flow run.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import prefect_server

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect")) as api:
        yield api


def _cli(server, *args, timeout=300) -> str:
    proc = subprocess.run([PREFECT, *args], cwd=REPO, env=server["env"], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_deploy_prefect_yaml_and_run_a_deployment_through_a_worker(server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.variables import Variable

    from flows.pools import ensure_pools

    with temporary_settings({PREFECT_API_URL: server["url"]}):
        lines = ensure_pools()
        assert lines == ["created work pool kelix-process (process)", "created work pool kelix-k8s (kubernetes)"]
        assert ensure_pools()[0] == "work pool kelix-process (process) exists"

        _cli(server, "--no-prompt", "deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml"))
        with get_client(sync_client=True) as client:
            deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
            assert {"kelix-pipeline/weekly", "kelix-pipeline/on-data-change", "watch-data/hourly",
                    "evaluate/nightly-champion", "kelix-pipeline/weekly-tiny"} <= set(deployments)
            weekly = deployments["kelix-pipeline/weekly"]
            assert weekly.work_pool_name == "kelix-k8s" and weekly.parameters["runner"] == "kubernetes"
            assert weekly.schedules[0].schedule.cron == "0 3 * * 1"
            assert deployments["evaluate/nightly-champion"].parameters["model"] == "models:/kelix@champion"
            pool = client.read_work_pool("kelix-k8s")
            assert pool.base_job_template["variables"]["properties"]["gpus"]["default"] == 0

        # A dataset version no pipeline has trained on, and an empty MLflow store.
        dvc_file = tmp_path / "data.dvc"
        dvc_file.write_text("outs:\n- md5: 5eb63bbbe01eeed093cb22bb8f5acdc3.dir\n  size: 1\n  nfiles: 1\n  path: data\n")
        flow_run = run_deployment("watch-data/hourly", timeout=0, parameters={
            "dvc_file": str(dvc_file), "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})

        # Pick up due runs, run this one in a child process from the checkout, exit.
        _cli(server, "worker", "start", "--pool", "kelix-process", "--run-once", timeout=600)
        with get_client(sync_client=True) as client:
            finished = client.read_flow_run(flow_run.id)
            assert finished.state.is_completed(), f"{finished.state}"
            assert Variable.get("kelix_data_version_announced") == "5eb63bbbe01eeed093cb22bb8f5acdc3.dir"

            # The automation behind the on-data-change trigger starts the pipeline on the event.
            target = deployments["kelix-pipeline/on-data-change"].id
            deadline = time.monotonic() + 120
            runs = []
            while time.monotonic() < deadline and not runs:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[target])))
                time.sleep(2)
            assert runs, "the kelix.data.changed event started no pipeline run"
            assert runs[0].parameters["runner"] == "kubernetes"
