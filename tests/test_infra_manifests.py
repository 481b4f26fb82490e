"""infra/k8s: schema-valid manifests, least-privilege RBAC, non-root pods, and a Prefect work-pool
job template that renders to a valid Job for the tiny and the paper-scale presets.

kustomize can't be installed here, so `render` implements the subset our kustomizations use
(resources, images, strategic-merge patches matched by kind and name) and fails on anything else.
Objects are checked against the official schemas offline with kubernetes-validate, in strict mode
(unknown fields are errors), for the oldest Kubernetes we support and the newest it ships.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from prefect.utilities.templating import apply_values, find_placeholders

from kelix.runtime_config import RuntimeConfig, runtime_preset

K8S = Path(__file__).resolve().parents[1] / "infra" / "k8s"
VERSIONS = ("1.31", latest_version())
KUSTOMIZATIONS = ("base", "mlflow", "overlays/dev", "overlays/prod")
NAMESPACE = "kelix"
UID = 10001
# The Role, exactly: adding a permission must be a deliberate change to this test too.
EXPECTED_RULES = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("", "services"): {"get", "list", "create"},
}


def load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def merge(base: dict, patch: dict) -> None:
    """Strategic merge as kustomize does it for our fields: maps merge, lists of named maps
    (containers, env, volumes) merge by name, any other list is replaced."""
    for k, value in patch.items():
        current = base.get(k)
        if isinstance(current, dict) and isinstance(value, dict):
            merge(current, value)
        elif (isinstance(current, list) and isinstance(value, list)
              and all(isinstance(v, dict) and "name" in v for v in current + value)):
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    merge(by_name[item["name"]], item)
                else:
                    current.append(item)
        else:
            base[k] = value


def pod_specs(objects: list[dict]) -> list[dict]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "Job")]


def containers(objects: list[dict]) -> list[dict]:
    return [c for spec in pod_specs(objects) for c in spec["containers"] + spec.get("initContainers", [])]


def render(directory: Path) -> list[dict]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kust) - {"apiVersion", "kind", "resources", "images", "patches"}
    assert not unsupported, f"{directory}: kustomize fields this renderer doesn't implement: {unsupported}"
    objects: list[dict] = []
    for resource in kust.get("resources", []):
        path = (directory / resource).resolve()
        objects += render(path) if path.is_dir() else load_yaml(path)
    for patch in kust.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only `path:` patches are supported"
        for doc in load_yaml(directory / patch["path"]):
            targets = [o for o in objects if key(o) == key(doc)]
            assert len(targets) == 1, f"{directory}: patch {key(doc)} matches {len(targets)} objects"
            merge(targets[0], doc)
    for image in kust.get("images", []):
        for container in containers(objects):
            name, _, _tag = container["image"].rpartition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return objects


RENDERED = {name: render(K8S / name) for name in KUSTOMIZATIONS}
SECRETS = load_yaml(K8S / "secrets.template.yaml")
TEMPLATE = json.loads((K8S / "job-template.json").read_text())
ENV_VARS = yaml.safe_load((K8S.parent / "env-vars.yaml").read_text())


def render_job(values: dict) -> dict:
    """The Job the kubernetes worker would submit for these job variables: Prefect's own
    templating over the variable defaults, then what KubernetesWorkerJobConfiguration's
    prepare_for_flow_run adds (env as a list, the command split into args, a generateName)."""
    variables = {name: spec["default"] for name, spec in TEMPLATE["variables"]["properties"].items()
                 if spec.get("default") is not None}
    variables.update(values)
    config = apply_values(TEMPLATE["job_configuration"], variables)
    job = config["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in config.get("env", {}).items()]
    # The worker's default command when the deployment sets none.
    container["args"] = shlex.split(config.get("command") or "prefect flow-run execute")
    job["metadata"]["generateName"] = "kelix-flow-run-"
    return job


def strict_k8s(job: dict) -> dict:
    """prefect-kubernetes insists on `parallelism`/`completions` inside the pod spec (its
    _get_base_job_manifest); the API server drops them as unknown fields, the strict schema
    would reject them. Everything else must validate strictly."""
    job = json.loads(json.dumps(job))
    pod = job["spec"]["template"]["spec"]
    assert pod.pop("parallelism") == 1 and pod.pop("completions") == 1
    return job


def all_objects() -> list[tuple[str, dict]]:
    return [(name, o) for name, objs in RENDERED.items() for o in objs] + [("secrets", s) for s in SECRETS]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly(version):
    for source, obj in all_objects():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{source} {key(obj)} invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_objects_are_unique_and_in_the_kelix_namespace(name):
    keys = [key(o) for o in RENDERED[name]]
    assert len(keys) == len(set(keys))
    for obj in RENDERED[name]:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, key(obj)


def test_overlays_contain_the_platform():
    for overlay in ("overlays/dev", "overlays/prod"):
        keys = {key(o) for o in RENDERED[overlay]}
        assert {("Namespace", "kelix"), ("ServiceAccount", "kelix-worker"), ("Role", "kelix-worker"),
                ("RoleBinding", "kelix-worker"), ("ConfigMap", "kelix-config"),
                ("PersistentVolumeClaim", "kelix-checkpoints"), ("Deployment", "kelix-prefect-worker"),
                ("Deployment", "kelix-mlflow"), ("Service", "kelix-mlflow")} <= keys
        # Secrets are created by hand: `kubectl apply -k` must never overwrite real credentials.
        assert not any(kind == "Secret" for kind, _ in keys)


def test_rbac_is_least_privilege():
    for name, objects in RENDERED.items():
        kinds = {o["kind"] for o in objects}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, name
    objects = RENDERED["base"]
    (role,) = [o for o in objects if o["kind"] == "Role"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResourceURLs tricks"
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == EXPECTED_RULES
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kelix-worker"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kelix-worker", "namespace": NAMESPACE}]


def assert_hardened(pod: dict, where: str) -> None:
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == UID, where
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod["containers"]:
        c = container["securityContext"]
        assert c["allowPrivilegeEscalation"] is False, where
        assert c["readOnlyRootFilesystem"] is True, where
        assert c["capabilities"] == {"drop": ["ALL"]}, where
        # A read-only root needs a writable /tmp.
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], where
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"], where
        assert resources["limits"]["memory"], where


def test_pods_are_non_root_read_only_and_sized():
    for name, objects in RENDERED.items():
        for pod in pod_specs(objects):
            assert_hardened(pod, name)
    assert_hardened(render_job({})["spec"]["template"]["spec"], "job-template.json")


def test_worker_polls_the_kubernetes_pool_as_kelix_worker():
    (worker,) = [o for o in RENDERED["base"] if key(o) == ("Deployment", "kelix-prefect-worker")]
    pod = worker["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kelix-worker"
    command = pod["containers"][0]["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert "--pool=kelix-k8s" in command and "--type=kubernetes" in command
    assert pod["containers"][0]["image"] == RuntimeConfig().image


def test_prod_pins_images_and_dev_uses_rwo_storage():
    for container in containers(RENDERED["overlays/prod"]):
        assert not container["image"].endswith(":latest"), container["image"]
    (pvc,) = [o for o in RENDERED["overlays/dev"] if o["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    (pvc,) = [o for o in RENDERED["base"] if o["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "kelix-checkpoints" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_secret_templates_hold_only_placeholders():
    assert {s["metadata"]["name"] for s in SECRETS} == {"kelix-s3", "kelix-mlflow", "kelix-mlflow-server"}
    for secret in SECRETS:
        assert secret["metadata"]["annotations"]["kelix.dev/template"] == "true"
        assert "data" not in secret, "templates use readable stringData"
        for name, value in secret["stringData"].items():
            if any(word in name for word in ("SECRET", "ACCESS_KEY", "PASSWORD", "BACKEND_STORE_URI")):
                assert "REPLACE_ME" in value, f"{secret['metadata']['name']}.{name} looks like a real value"


def test_job_template_variables_are_all_wired():
    properties = TEMPLATE["variables"]["properties"]
    assert set(TEMPLATE) == {"job_configuration", "variables"}
    assert {"image", "gpus", "cpu", "memory", "node_selector", "tolerations", "namespace",
            "service_account_name", "env_from", "env", "command"} <= set(properties)
    used = {p.name for p in find_placeholders(json.dumps(TEMPLATE["job_configuration"]))}
    # Prefect ignores a variable that job_configuration doesn't reference, and leaves out a
    # field whose placeholder has no variable: both would be silent misconfigurations.
    assert used == set(properties)
    assert properties["namespace"]["default"] == RuntimeConfig().namespace
    assert properties["image"]["default"] == RuntimeConfig().image
    assert properties["service_account_name"]["default"] == "kelix-worker"
    config_maps = {o["metadata"]["name"] for o in RENDERED["base"] if o["kind"] == "ConfigMap"}
    secrets = {s["metadata"]["name"] for s in SECRETS}
    for source in properties["env_from"]["default"]:
        ((kind, ref),) = source.items()
        assert ref["name"] in (config_maps if kind == "configMapRef" else secrets)


def test_job_pods_get_every_documented_env_var():
    provided = set()
    for source in TEMPLATE["variables"]["properties"]["env_from"]["default"]:
        ((kind, ref),) = source.items()
        if kind == "configMapRef":
            (cm,) = [o for o in RENDERED["base"] if key(o) == ("ConfigMap", ref["name"])]
            provided |= set(cm["data"])
        else:
            (secret,) = [s for s in SECRETS if s["metadata"]["name"] == ref["name"]]
            provided |= set(secret["stringData"])
    assert set(ENV_VARS) <= provided, set(ENV_VARS) - provided


def test_job_template_meets_prefect_kubernetes_requirements():
    """What prefect-kubernetes 0.8.0 validates before it accepts a pool's template: its base
    manifest (_get_base_job_manifest) must be contained, with these exact values."""
    required = {"apiVersion": "batch/v1", "kind": "Job", "spec": {"template": {"spec": {
        "parallelism": 1, "completions": 1, "restartPolicy": "Never",
        "containers": [{"name": "prefect-job"}]}}}}

    def contains(actual, expected) -> bool:
        if isinstance(expected, dict):
            return isinstance(actual, dict) and all(k in actual and contains(actual[k], v) for k, v in expected.items())
        if isinstance(expected, list):
            return isinstance(actual, list) and all(contains(a, e) for a, e in zip(actual, expected))
        return actual == expected

    assert contains(TEMPLATE["job_configuration"]["job_manifest"], required)


PRESET_VALUES = {
    preset: {
        "gpus": rt.default_resources.gpus, "cpu": rt.default_resources.cpu,
        "memory": rt.default_resources.memory, "node_selector": rt.node_selector,
        "tolerations": rt.tolerations, "image": rt.image, "namespace": rt.namespace,
    }
    for preset, rt in ((p, runtime_preset(p)) for p in ("tiny", "small", "paper"))
}


@pytest.mark.parametrize("preset", sorted(PRESET_VALUES))
def test_job_template_renders_a_valid_job(preset):
    values = dict(PRESET_VALUES[preset], name="kelix-train",
                  labels={"prefect.io/flow-run-id": "0"}, env={"KELIX_PRESET": preset})
    job = render_job(values)
    for version in VERSIONS:
        kubernetes_validate.validate(strict_k8s(job), version, strict=True)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == values["gpus"]
    assert container["resources"]["requests"] == {"cpu": values["cpu"], "memory": values["memory"]}
    assert pod["nodeSelector"] == values["node_selector"] and pod["tolerations"] == values["tolerations"]
    assert pod["serviceAccountName"] == "kelix-worker" and job["metadata"]["namespace"] == NAMESPACE
    # The image's entry point runs one stage; Prefect's command must replace it, not follow it.
    assert container["command"] == ["/usr/bin/env"] and container["args"] == ["prefect", "flow-run", "execute"]
    assert {"name": "KELIX_PRESET", "value": preset} in container["env"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["kelix-checkpoints"]


def test_the_mlflow_server_accepts_its_service_names_and_a_port_forward():
    """MLflow 3 checks the Host header against --allowed-hosts, which replaces its localhost default."""
    from mlflow.server.security_utils import is_allowed_host_header

    (deploy,) = [o for o in RENDERED["mlflow"] if o["kind"] == "Deployment"]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    for host in ("kelix-mlflow:5000", "kelix-mlflow.kelix.svc.cluster.local:5000", "localhost:5000", "localhost:8080", "127.0.0.1:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example:5000")
