"""Stage Job manifests are valid Kubernetes objects (offline schemas, strict) and ask for the right things."""
from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from kelix.config import load_config
from kelix.runners.kubernetes import KubernetesRunner
from kelix.runners.manifests import PARAMS_ENV, job_name

KEY = "0123456789abcdef"
VERSIONS = ("1.31", "1.37")  # the oldest with podFailurePolicy GA, and the newest the package ships


def _objs(preset: str, stage: str, overrides: tuple[str, ...] = (), **runner_kw):
    cfg = load_config(preset, overrides=list(overrides))
    return cfg, KubernetesRunner(**runner_kw).manifests(stage, cfg, KEY, "s3://kelix-artifacts/run", data_key="fp1234")


def _container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


def _env(job):
    return {e["name"]: e["value"] for e in _container(job)["env"]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("preset,stage", [("tiny", "tokenizer-1"), ("small", "llm-2"), ("paper", "dit-1")])
def test_manifests_validate_strictly(preset, stage, version):
    _, objs = _objs(preset, stage)
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)


def test_cpu_stage_runs_the_stage_entry_point_with_the_resolved_config():
    cfg, objs = _objs("tiny", "tokenizer-1", ("tokenizer.num_codebooks=8",))
    assert len(objs) == 1
    job = objs[0]
    assert job["metadata"]["name"] == job_name("tokenizer-1", KEY) and job["metadata"]["namespace"] == "kelix"
    script = _container(job)["command"][2]
    assert "exec python -m kelix.stages run tokenizer-1 --preset tiny --params /tmp/kelix-params.yaml" in script
    assert "--artifacts s3://kelix-artifacts/run" in script
    assert "python -m kelix.artifacts pull s3://kelix-artifacts/run _data fp1234" in script
    # The pod resolves exactly this config from the params in its environment.
    params = yaml.safe_load(_env(job)[PARAMS_ENV])
    assert params["tokenizer"]["num_codebooks"] == 8 and params["preset"] == "tiny"
    limits = _container(job)["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits and limits["memory"] == "8Gi"
    spec = job["spec"]
    assert spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] == 86400
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in \
        spec["podFailurePolicy"]["rules"]
    assert "completionMode" not in spec


def test_gpu_stage_gets_limits_selector_tolerations_secrets_and_volumes():
    cfg, objs = _objs("small", "llm-2", ('runtime.resources={"llm-2": {"gpus": 4, "cpu": "32", "memory": "300Gi"}}',))
    job = objs[0]
    c = _container(job)
    assert c["resources"]["limits"] == {"memory": "300Gi", "nvidia.com/gpu": "4"}
    assert c["resources"]["requests"] == {"cpu": "32", "memory": "300Gi"}
    assert "exec torchrun --standalone --nnodes=1 --nproc-per-node=4 -m kelix.stages run llm-2" in c["command"][2]
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"secretRef": {"name": "kelix-s3"}} in c["envFrom"] and {"secretRef": {"name": "kelix-mlflow"}} in c["envFrom"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "kelix-checkpoints"
    assert "emptyDir" in volumes["scratch"] and volumes["shm"]["emptyDir"]["medium"] == "Memory"
    # The artifact mirror, and so every checkpoint, is on the shared volume: a rescheduled pod resumes.
    assert _env(job)["KELIX_CACHE"] == "/checkpoints/cache"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and pod["automountServiceAccountToken"] is False


def test_multi_node_stage_is_an_indexed_job_with_a_headless_service():
    cfg, objs = _objs("paper", "llm-2")  # paper: 4 nodes x 8 GPUs
    job, service = objs
    name = job["metadata"]["name"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    assert spec["template"]["spec"]["subdomain"] == name == service["metadata"]["name"]
    script = _container(job)["command"][2]
    assert "torchrun --nnodes=4 --nproc-per-node=8" in script
    assert '--node-rank="$JOB_COMPLETION_INDEX"' in script
    assert f"--rdzv-endpoint={name}-0.{name}.kelix.svc.cluster.local:29500" in script
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"kelix.dev/job": name}
    assert spec["template"]["metadata"]["labels"]["kelix.dev/job"] == name


def test_a_dataset_path_in_the_pod_replaces_the_published_copy():
    _, objs = _objs("tiny", "eval", pod_data_dir="/datasets/shapes", namespace="ml")
    script = _container(objs[0])["command"][2]
    assert "kelix.artifacts pull" not in script and "--data /datasets/shapes" in script
    assert objs[0]["metadata"]["namespace"] == "ml"


@pytest.mark.parametrize("image,policy", [
    ("ghcr.io/kelix-platform/kelix:latest", "Always"),
    ("ghcr.io/kelix-platform/kelix", "Always"),  # no tag: latest
    ("registry.local:5000/kelix", "Always"),  # a registry port is not a tag
    ("ghcr.io/kelix-platform/kelix:1.4.2", "IfNotPresent"),
    ("registry.local:5000/kelix:1.4.2", "IfNotPresent"),
    ("ghcr.io/kelix-platform/kelix@sha256:" + "a" * 64, "IfNotPresent"),
])
def test_a_mutable_image_tag_is_always_pulled(image, policy):
    # A GPU node that cached an earlier ":latest" would otherwise run stale code.
    _, objs = _objs("tiny", "tokenizer-1", (f"runtime.image={image}",))
    assert _container(objs[0])["image"] == image and _container(objs[0])["imagePullPolicy"] == policy


def test_an_explicit_image_pull_policy_wins():
    from kelix.runners.manifests import JobOptions

    _, objs = _objs("tiny", "tokenizer-1", options=JobOptions(image_pull_policy="IfNotPresent"))
    assert _container(objs[0])["imagePullPolicy"] == "IfNotPresent"  # the default image is ":latest"


def test_the_job_names_its_work_so_a_run_attaches_only_to_its_own():
    """The name is only stage + key[:10]; the annotation tells apart Jobs of one name doing different work."""
    from kelix.runners.manifests import ANNOTATION_ARTIFACTS, ANNOTATION_STARTED_BY, ANNOTATION_WORK

    cfg = load_config("tiny")
    runner = KubernetesRunner()

    def work(artifacts="s3://a/run", data_key="fp1", image=None, env=None):
        c = load_config("tiny", overrides=[f"runtime.image={image}"]) if image else cfg
        job = runner.manifests("tokenizer-1", c, KEY, artifacts, data_key=data_key, env=env)[0]
        return job["metadata"]["annotations"]

    same = work()
    assert same[ANNOTATION_WORK] == work()[ANNOTATION_WORK] and same[ANNOTATION_ARTIFACTS] == "s3://a/run"
    assert "@" in same[ANNOTATION_STARTED_BY]  # user@host: whom to ask about a Job found running
    # A restarted orchestrator's run logs to another MLflow run: the same work, so it attaches.
    assert work(env={"MLFLOW_RUN_ID": "r2"})[ANNOTATION_WORK] == same[ANNOTATION_WORK]
    others = [work(artifacts="s3://b/run"), work(data_key="fp2"), work(image="registry.local/kelix:2")]
    assert len({same[ANNOTATION_WORK], *(o[ANNOTATION_WORK] for o in others)}) == 4


@pytest.mark.parametrize("force, flags", [(False, ""), (True, " --force"), (1767225600.25, " --force-before 1767225600.25")])
def test_force_reaches_the_pod_as_the_moment_the_run_started(force, flags):
    """A replaced pod runs the same command again: `--force-before T` keeps what a forced run already finished,
    where a bare `--force` would wipe it and train again."""
    cfg = load_config("tiny")
    job = KubernetesRunner().manifests("tokenizer-1", cfg, KEY, "s3://kelix-artifacts/run", data_key="fp1234",
                                       force=force)[0]
    assert _container(job)["command"][2].rstrip().endswith("--artifacts s3://kelix-artifacts/run" + flags)
