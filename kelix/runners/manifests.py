"""Kubernetes manifests for one training stage, as plain dicts (validated offline in tests).

A stage becomes a `Job` running the project image with `python -m kelix.stages run NAME`, or `torchrun` for
several GPUs; a multi-node stage is an Indexed Job (one pod per node, its index the node rank) plus a
headless Service whose DNS name reaches pod 0 for the rendezvous. The pod gets the resolved config as YAML
in an environment variable (the worker's Role may create Jobs and Services but not ConfigMaps), the S3 and
MLflow credentials from the Secrets of infra/k8s, a scratch emptyDir and the shared `kelix-checkpoints`
volume, where the artifact mirror (and so every checkpoint) lives, so a stage rescheduled onto another node
resumes where it stopped. The security context and volumes follow infra/k8s/job-template.json. The Job's
annotations name its work (a hash, plus the artifact store, image, data and who started it), since its name,
from the stage and key only, is shared by runs writing to other stores.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from kelix.rerun import force_args
from kelix.runtime_config import Resources

PART_OF = {"app.kubernetes.io/part-of": "kelix", "app.kubernetes.io/component": "stage"}
LABEL_STAGE, LABEL_KEY, LABEL_JOB = "kelix.dev/stage", "kelix.dev/key", "kelix.dev/job"
# On the Job: the hash of its work (`work_id`), and what a person needs to tell whose Job it is.
ANNOTATION_WORK, ANNOTATION_STARTED_BY = "kelix.dev/work", "kelix.dev/started-by"
ANNOTATION_ARTIFACTS, ANNOTATION_IMAGE, ANNOTATION_DATA = "kelix.dev/artifacts", "kelix.dev/image", "kelix.dev/data"
CONTAINER = "stage"
RDZV_PORT = 29500
PARAMS_ENV = "KELIX_PARAMS_YAML"
PARAMS_PATH = "/tmp/kelix-params.yaml"
SHARED_MOUNT, SCRATCH_MOUNT = "/checkpoints", "/scratch"
DATA_STAGE = "_data"  # the dataset, published into the artifact store under its content fingerprint


@dataclass
class JobOptions:
    """Cluster settings of stage Jobs that do not belong in the model config."""

    env_from: list[dict[str, Any]] = field(default_factory=lambda: [
        {"configMapRef": {"name": "kelix-config"}},
        {"secretRef": {"name": "kelix-s3"}},
        {"secretRef": {"name": "kelix-mlflow"}},
    ])
    checkpoints_claim: str = "kelix-checkpoints"
    # A day: time to read a failed stage's logs; the Service of a multi-node stage goes with its Job.
    ttl_seconds_after_finished: int = 86400
    # 0: Prefect owns retries; evictions and preemptions do not count (podFailurePolicy below).
    backoff_limit: int = 0
    active_deadline_seconds: int | None = None
    # None: Always for a mutable tag (":latest" or none), so a node never runs a stale cached image under a
    # reused tag; IfNotPresent for a pinned tag or digest, which cannot change under it.
    image_pull_policy: str | None = None
    shm_size: str = "8Gi"
    scratch_size: str | None = None
    service_account: str | None = None  # stage pods need no API access, so the token is not mounted
    extra_env: dict[str, str] = field(default_factory=dict)


def job_name(stage: str, key: str) -> str:
    """DNS-1123 name, stable per stage key, so a restarted orchestrator finds the Job it started."""
    return f"kelix-{stage}-{key[:10]}".lower()


def work_id(stage: str, key: str, *, artifacts: str, image: str, data: str, resources: Resources) -> str:
    """What makes a stage Job's work distinct beyond its name (stage and key[:10]): where it writes, what it
    runs, which data and on what. A run attaches to a live Job of its name only when this matches; the pod's
    env is left out, as it names the MLflow run, which differs for a restarted orchestrator's same work."""
    payload = {"stage": stage, "key": key, "artifacts": artifacts, "image": image, "data": data,
               "resources": dataclasses.asdict(resources)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def pull_policy(image: str, policy: str | None = None) -> str:
    """The imagePullPolicy for `image`: `policy` if given, else Always for a mutable tag, else IfNotPresent."""
    if policy:
        return policy
    if "@" in image:  # a digest: immutable
        return "IfNotPresent"
    name = image.rsplit("/", 1)[-1]  # not the registry's host:port
    tag = name.partition(":")[2]
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def labels(stage: str, key: str) -> dict[str, str]:
    return {**PART_OF, LABEL_STAGE: stage, LABEL_KEY: key[:63], LABEL_JOB: job_name(stage, key)}


def stage_script(stage: str, preset: str, artifacts: str, resources: Resources, *, data_dir: str | None,
                 data_key: str | None, force: bool | float, rdzv_host: str | None) -> str:
    """The pod's shell command: write the params file, fetch the dataset if published, start the stage."""
    lines = ["set -eu", f'printf "%s" "${PARAMS_ENV}" > {PARAMS_PATH}']
    if data_dir is None:
        # Pulled into the pod's scratch: each node of a multi-node stage gets its own copy.
        lines.append(f"DATA=$(python -m kelix.artifacts pull {shlex.quote(artifacts)} {DATA_STAGE} "
                     f"{shlex.quote(data_key or '')} --cache {SCRATCH_MOUNT}/cache)")
        data_arg = '"$DATA"'
    else:
        data_arg = shlex.quote(data_dir)
    args = (f"-m kelix.stages run {shlex.quote(stage)} --preset {shlex.quote(preset)} --params {PARAMS_PATH} "
            f"--data {data_arg} --artifacts {shlex.quote(artifacts)}" + "".join(f" {a}" for a in force_args(force)))
    if resources.num_nodes > 1:
        nproc = max(1, resources.gpus)
        launcher = (f"torchrun --nnodes={resources.num_nodes} --nproc-per-node={nproc} "
                    f'--node-rank="$JOB_COMPLETION_INDEX" --rdzv-endpoint={rdzv_host}:{RDZV_PORT} ')
    elif resources.gpus > 1:
        launcher = f"torchrun --standalone --nnodes=1 --nproc-per-node={resources.gpus} "
    else:
        launcher = "python "
    lines.append(f"exec {launcher}{args}")
    return "\n".join(lines)


def stage_job(
    stage: str,
    key: str,
    *,
    namespace: str,
    image: str,
    preset: str,
    params_yaml: str,
    artifacts: str,
    resources: Resources,
    node_selector: dict[str, str],
    tolerations: list[dict[str, Any]],
    env: dict[str, str],
    options: JobOptions,
    data_dir: str | None = None,
    data_key: str | None = None,
    force: bool | float = False,
    started_by: str | None = None,
) -> dict[str, Any]:
    """The Job for one stage (an Indexed Job when `resources.num_nodes > 1`)."""
    name = job_name(stage, key)
    lab = labels(stage, key)
    data = data_dir or data_key or ""
    annotations = {ANNOTATION_WORK: work_id(stage, key, artifacts=artifacts, image=image, data=data,
                                            resources=resources),
                   ANNOTATION_ARTIFACTS: artifacts, ANNOTATION_IMAGE: image, ANNOTATION_DATA: data}
    if started_by:
        annotations[ANNOTATION_STARTED_BY] = started_by
    multi_node = resources.num_nodes > 1
    rdzv_host = f"{name}-0.{name}.{namespace}.svc.cluster.local" if multi_node else None
    script = stage_script(stage, preset, artifacts, resources, data_dir=data_dir, data_key=data_key,
                          force=force, rdzv_host=rdzv_host)
    container_env = {
        PARAMS_ENV: params_yaml,
        # The artifact mirror on the shared volume: checkpoints survive the pod, so a rerun resumes.
        "KELIX_CACHE": f"{SHARED_MOUNT}/cache",
        "KELIX_STAGE": stage,
        "KELIX_STAGE_KEY": key,
        "PYTHONUNBUFFERED": "1",
        "TQDM_MININTERVAL": "30",  # progress bars every 30 s, not a log line per step
        "HOME": "/home/kelix",
        **options.extra_env,
        **env,
    }
    limits: dict[str, str] = {"memory": resources.memory}
    if resources.gpus > 0:
        limits["nvidia.com/gpu"] = str(resources.gpus)
    scratch: dict[str, Any] = {"sizeLimit": options.scratch_size} if options.scratch_size else {}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": options.service_account is not None,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": CONTAINER,
            "image": image,
            "imagePullPolicy": pull_policy(image, options.image_pull_policy),
            "command": ["/bin/sh", "-c", script],
            "env": [{"name": k, "value": str(v)} for k, v in container_env.items()],
            "envFrom": options.env_from,
            "resources": {"requests": {"cpu": resources.cpu, "memory": resources.memory}, "limits": limits},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "home", "mountPath": "/home/kelix"},
                {"name": "scratch", "mountPath": SCRATCH_MOUNT},
                {"name": "shm", "mountPath": "/dev/shm"},
                {"name": "checkpoints", "mountPath": SHARED_MOUNT},
            ],
        }],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "home", "emptyDir": {}},
            {"name": "scratch", "emptyDir": scratch},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}},
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": options.checkpoints_claim}},
        ],
    }
    if options.service_account:
        pod_spec["serviceAccountName"] = options.service_account
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    if multi_node:
        # Pods of an Indexed Job are named <job>-<index>; with this subdomain they resolve as
        # <job>-<index>.<service>.<namespace>.svc through the headless Service.
        pod_spec["subdomain"] = name
    spec: dict[str, Any] = {
        "backoffLimit": options.backoff_limit,
        "ttlSecondsAfterFinished": options.ttl_seconds_after_finished,
        # Evicted or preempted pods are replaced without using up the backoff limit (the stage resumes from
        # its checkpoint); exit code 2 is a rejected config: fail at once.
        "podFailurePolicy": {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [2]}},
        ]},
        "template": {"metadata": {"labels": dict(lab)}, "spec": pod_spec},
    }
    if options.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = options.active_deadline_seconds
    if multi_node:
        spec.update({"completionMode": "Indexed", "completions": resources.num_nodes,
                     "parallelism": resources.num_nodes})
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(lab), "annotations": annotations},
            "spec": spec}


def job_owner(name: str, uid: str) -> dict[str, Any]:
    """The ownerReference that hands an object to the Job's garbage collection without blocking its deletion."""
    return {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid, "controller": False,
            "blockOwnerDeletion": False}


def rendezvous_service(stage: str, key: str, *, namespace: str, owner_uid: str | None = None) -> dict[str, Any]:
    """Headless Service giving the pods of a multi-node stage stable DNS names (pod 0 hosts the rendezvous).

    Owned by the Job when its uid is known, so Kubernetes' garbage collector deletes it after the Job. Not
    before: blockOwnerDeletion is False (True needs update on jobs/finalizers), so a Foreground deletion of
    the Job does not wait for it, and a stale one may outlive its Job for a moment.
    """
    name = job_name(stage, key)
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels(stage, key)}
    if owner_uid:
        meta["ownerReferences"] = [job_owner(name, owner_uid)]
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {
            "clusterIP": "None",
            # Resolve pod 0 before it is Ready: the other nodes connect while it is still starting.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: name},
            "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
        },
    }
