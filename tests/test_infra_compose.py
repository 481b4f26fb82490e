"""docker-compose.yml and .env.example: the service stack's shape, health checks, volumes, and
that credentials only ever come from .env. No Docker engine here, so this checks the file itself."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE_CODE = re.sub(r"(?m)(^|\s+)#.*$", "", COMPOSE_TEXT)   # without comments
COMPOSE = yaml.safe_load(COMPOSE_TEXT)   # resolves the x-* anchors and `<<:` merges
SERVICES = COMPOSE["services"]
ENV_VARS = yaml.safe_load((ROOT / "infra" / "env-vars.yaml").read_text())
BUCKETS = {"kelix-artifacts", "kelix-dvc", "kelix-mlflow"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY")
# ${VAR}, ${VAR:-default}, ${VAR:?error}; `$${VAR}` is the container's own shell variable.
INTERPOLATION = re.compile(r"(?<!\$)\$\{(\w+)(:?[-?][^}]*)?\}")


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def long_running() -> dict[str, dict]:
    """Services `docker compose up` starts and keeps up (not one-shots, not tool profiles)."""
    return {n: s for n, s in SERVICES.items() if "profiles" not in s and s.get("restart") != "no"}


def test_services_present():
    assert set(SERVICES) == {"postgres", "minio", "minio-init", "mlflow", "prefect-server",
                             "prefect-worker", "kelix"}
    assert SERVICES["kelix"]["profiles"] == ["tools"]
    assert "minio/mc:" in SERVICES["minio-init"]["image"]


def test_long_running_services_have_health_checks():
    assert set(long_running()) == {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"}
    for name, service in long_running().items():
        assert service["healthcheck"]["test"], name
        assert service["restart"] == "unless-stopped", name


def test_startup_order_waits_for_health():
    deps = {n: s.get("depends_on", {}) for n, s in SERVICES.items()}
    assert deps["mlflow"] == {"postgres": {"condition": "service_healthy"},
                              "minio-init": {"condition": "service_completed_successfully"}}
    assert deps["prefect-server"]["postgres"]["condition"] == "service_healthy"
    assert deps["minio-init"]["minio"]["condition"] == "service_healthy"
    assert deps["prefect-worker"]["prefect-server"]["condition"] == "service_healthy"
    assert deps["prefect-worker"]["minio-init"]["condition"] == "service_completed_successfully"


def test_ports_published_on_loopback_only():
    published = {p for s in SERVICES.values() for p in s.get("ports", [])}
    assert published == {"127.0.0.1:9000:9000", "127.0.0.1:9001:9001", "127.0.0.1:5000:5000",
                         "127.0.0.1:4200:4200"}
    assert "127.0.0.1:5000:5000" in SERVICES["mlflow"]["ports"]
    assert "127.0.0.1:4200:4200" in SERVICES["prefect-server"]["ports"]


def test_named_volumes_declared_and_used_for_state():
    declared = set(COMPOSE["volumes"])
    used = set()
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == declared
    assert "postgres-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert "minio-data:/data" in SERVICES["minio"]["volumes"]


def test_postgres_creates_one_database_per_service():
    script = (ROOT / "infra" / "compose" / "postgres-init.sh").read_text()
    assert re.search(r"for db in mlflow prefect\b", script)
    mount = [v for v in SERVICES["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert mount and mount[0].startswith("./infra/compose/postgres-init.sh:")
    assert SERVICES["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    prefect_db = SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("@postgres:5432/prefect")


def test_buckets_created_and_policy_limited_to_them():
    init = SERVICES["minio-init"]
    assert set(init["environment"]["KELIX_BUCKETS"].split()) == BUCKETS
    assert "./infra/compose:/kelix:ro" in init["volumes"]
    policy = json.loads((ROOT / "infra" / "compose" / "minio-kelix-policy.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{b}{suffix}" for b in BUCKETS for suffix in ("", "/*")}


def test_mlflow_server_uses_postgres_and_minio():
    mlflow = SERVICES["mlflow"]
    assert "--artifacts-destination=s3://kelix-mlflow" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["build"]["dockerfile"] == "Dockerfile.mlflow"


def test_worker_and_tools_share_the_project_image():
    worker, kelix = SERVICES["prefect-worker"], SERVICES["kelix"]
    assert worker["build"] == kelix["build"] and worker["image"] == kelix["image"]
    assert worker["build"]["dockerfile"] == "infra/docker/Dockerfile.cpu"
    entry = worker["entrypoint"]
    assert entry[:3] == ["prefect", "worker", "start"]
    assert "--pool=kelix-process" in entry and "--type=process" in entry
    assert "entrypoint" not in kelix, "the tools service keeps the image's stage entry point"


def test_every_documented_env_var_is_set_for_the_stack():
    example = env_example()
    for name in ENV_VARS:
        assert example.get(name), f"{name} missing from .env.example"
        for service in ("prefect-worker", "kelix"):
            assert SERVICES[service]["environment"].get(name), f"{name} not set for {service}"
    assert SERVICES["prefect-worker"]["environment"]["KELIX_ARTIFACTS"] == "s3://kelix-artifacts"
    assert SERVICES["prefect-worker"]["environment"]["KELIX_DVC_REMOTE_URL"] == "s3://kelix-dvc"


def test_credentials_only_come_from_env_file():
    example = env_example()
    for name, service in SERVICES.items():
        for var, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(var):
                assert INTERPOLATION.fullmatch(str(value)), f"{name}.{var} is a literal"
    # user:password@ inside connection URLs (interpolations masked first: their messages have spaces)
    masked = INTERPOLATION.sub(lambda m: f"<{m.group(1)}>", COMPOSE_CODE)
    userinfos = re.findall(r"://([^\s/@]+)@", masked)
    assert len(userinfos) == 2, userinfos   # MLflow's and Prefect's Postgres URLs
    for userinfo in userinfos:
        assert re.fullmatch(r"<\w+>:<\w+>", userinfo), userinfo
    # Every required ${VAR} has an entry in .env.example; optional ones (${VAR:-default}) may not.
    for var, modifier in INTERPOLATION.findall(COMPOSE_CODE):
        if not modifier.startswith(":-"):
            assert var in example, f"${{{var}}} used by docker-compose.yml but not in .env.example"
    for var, value in example.items():
        if SECRET_NAME.search(var) and var != "AWS_ACCESS_KEY_ID":
            assert value.startswith("change-me"), f".env.example {var} must be an obvious placeholder"


def test_env_file_is_never_committed_or_shipped():
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()
