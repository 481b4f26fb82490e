"""The whole pipeline against real services on loopback, the way a user runs it against the compose stack.

moto's S3 server stands in for MinIO (buckets for the artifact store, the DVC remote and MLflow's artifacts),
beside a `prefect server` and an `mlflow server` whose artifacts go to that S3. The dataset is versioned into
the S3 DVC remote with `kelix data snapshot`; then `kelix pipeline run` runs in a child process configured only
by the env vars .env.example documents, on the shrunken tiny config (3 steps a stage).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from services import S3_CREDENTIALS, mlflow_server, prefect_server, s3_server
from small_config import SMALL

pytestmark = [pytest.mark.services, pytest.mark.slow]
KELIX = str(Path(sys.executable).with_name("kelix"))


def _kelix(args: list[str], env: dict, cwd: Path, timeout: int) -> str:
    proc = subprocess.run([KELIX, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"kelix {' '.join(args[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_pipeline_against_prefect_mlflow_and_s3(tmp_path):
    import boto3
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    sets = [a for o in SMALL for a in ("--set", o)]
    with s3_server("kelix-artifacts", "kelix-dvc", "kelix-mlflow") as endpoint:
        s3_env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}
        with prefect_server(tmp_path) as prefect, mlflow_server(tmp_path, "s3://kelix-mlflow", s3_env) as mlflow_url:
            env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_", "MLFLOW_"))},
                   **s3_env, "PREFECT_API_URL": prefect["url"], "PREFECT_HOME": str(tmp_path / "client-home"),
                   "MLFLOW_TRACKING_URI": mlflow_url, "KELIX_ARTIFACTS": "s3://kelix-artifacts/runs",
                   "KELIX_DVC_REMOTE_URL": "s3://kelix-dvc/shapes", "KELIX_CACHE": str(tmp_path / "cache")}

            # Data: generated, validated, committed to DVC and pushed to the S3 remote.
            data = repo / "data" / "shapes"
            _kelix(["data", "generate", "shapes", "--out", str(data), "--preset", "tiny", *sets], env, repo, 300)
            md5 = _kelix(["data", "snapshot", str(data), "--preset", "tiny", *sets], env, repo, 300).split()[-1]
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing")
            dvc_keys = [o["Key"] for o in s3.list_objects_v2(Bucket="kelix-dvc").get("Contents", [])]
            assert len(dvc_keys) > 190, "the dataset's files reached the DVC remote"

            out = _kelix(["pipeline", "run", "--preset", "tiny", "--data", str(data), *sets], env, repo, 1800)
            assert "Kelix pipeline finished" in out

            # Every stage finished into the S3 artifact store.
            def status(key: str) -> dict:
                return json.loads(s3.get_object(Bucket="kelix-artifacts", Key=key)["Body"].read())

            markers = [o["Key"] for o in s3.list_objects_v2(Bucket="kelix-artifacts", Prefix="runs/").get("Contents", [])
                       if o["Key"].endswith("_STATUS.json")]
            stages = {k.split("/")[1] for k in markers if not k.split("/")[1].startswith("_")}
            assert {"tokenizer-1", "tokenizer-2", "tokenizer-3", "llm-1", "llm-2", "llm-3", "llm-4", "aedit",
                    "dit-1", "dit-2", "eval"} <= stages
            assert all(status(k)["status"] == "SUCCESS" for k in markers)

            # MLflow: the pipeline run with one nested run per stage, and a registered version whose files are in S3.
            # Both URIs explicit: earlier tests in this process may have set a global registry URI.
            client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "kelix.stage" not in r.data.tags]
            nested = [r for r in runs if r.data.tags.get("kelix.stage")]
            assert parents and {r.data.tags["kelix.stage"] for r in nested} >= stages
            version = client.get_model_version("kelix", "1")
            assert version.tags["lineage.pipeline_run_id"] in {r.info.run_id for r in parents}
            mlflow_keys = [o["Key"] for o in s3.list_objects_v2(Bucket="kelix-mlflow").get("Contents", [])]
            assert any(k.endswith("model.safetensors") for k in mlflow_keys), "model files went to S3 via the server"

            # Prefect: the flow run is recorded, completed, on the server.
            with temporary_settings({PREFECT_API_URL: prefect["url"]}):
                with get_client(sync_client=True) as pc:
                    flow_runs = pc.read_flow_runs()
                    pipeline = [r for r in flow_runs if pc.read_flow(r.flow_id).name == "kelix-pipeline"]
                    assert pipeline and pipeline[0].state.is_completed()
    assert md5.endswith(".dir")
