"""The two Prefect work pools prefect.yaml deploys to, created idempotently.

  kelix-process  a `process` pool: a worker on any machine with the repo runs flow runs as local processes
                 (stages then run in-process or as subprocesses, or are sent to Kubernetes by the runner).
  kelix-k8s      a `kubernetes` pool whose base job template is infra/k8s/job-template.json (the worker needs
                 prefect-kubernetes, installed in the project image): each flow run is a pod in the cluster.

prefect.yaml cannot declare pools, so `kelix pipeline pools` (or `prefect work-pool create ... --base-job-template`)
creates them once per Prefect server.
"""
from __future__ import annotations

import json
from pathlib import Path

import flows  # noqa: F401  - environment defaults before Prefect is imported
import yaml

from kelix.tracking import repo_root

PROCESS_POOL, K8S_POOL = "kelix-process", "kelix-k8s"


def k8s_template_path() -> Path:
    for name in ("job-template.json", "job-template.yaml"):
        path = repo_root() / "infra" / "k8s" / name
        if path.exists():
            return path
    return repo_root() / "infra" / "k8s" / "job-template.json"


def load_template(path: str | Path) -> dict:
    text = Path(path).read_text()
    return json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)


def ensure_pools(k8s_template: str | Path | None = None, include_k8s: bool = True) -> list[str]:
    """Create the pools that do not exist yet; returns one line per pool saying what happened."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    pools = [(PROCESS_POOL, "process", ProcessWorker.get_default_base_job_template())]
    if include_k8s:
        path = Path(k8s_template) if k8s_template else k8s_template_path()
        pools.append((K8S_POOL, "kubernetes", load_template(path)))
    lines = []
    with get_client(sync_client=True) as client:
        for name, kind, template in pools:
            try:
                client.read_work_pool(name)
                lines.append(f"work pool {name} ({kind}) exists")
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template))
                lines.append(f"created work pool {name} ({kind})")
    return lines
