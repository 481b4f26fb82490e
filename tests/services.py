"""Real local servers for the services tests: `prefect server`, `mlflow server` and moto's S3, all on loopback.

Each is a context manager that starts the server, waits for its health endpoint and stops it (with the child
processes it started) on the way out.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def _server(cmd: list[str], env: dict[str, str], health: str, log: Path, what: str) -> Iterator[None]:
    with open(log, "w") as out:
        # Its own session: the servers run workers in child processes, and all of them must stop.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_healthy(health, proc, log, what)
            yield
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def prefect_server(tmp: Path) -> Iterator[dict]:
    """A Prefect API with its own home and SQLite database; yields {"url", "env"} (env points a client at it)."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_LOGGING_LEVEL": "WARNING"}
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with _server(cmd, env, f"http://127.0.0.1:{port}/api/health", tmp / "prefect-server.log", "prefect server"):
        yield {"url": env["PREFECT_API_URL"], "env": env}


@contextlib.contextmanager
def mlflow_server(tmp: Path, artifacts: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """An MLflow tracking server (SQLite backend store; artifacts proxied to `artifacts`, by default the folder
    tmp/mlflow-artifacts, or e.g. s3://bucket with S3 settings in `env`); yields its URL."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp / 'mlflow-server.db'}",
           "--artifacts-destination", artifacts or str(tmp / "mlflow-artifacts")]
    url = f"http://127.0.0.1:{port}"
    with _server(cmd, {**os.environ, **(env or {})}, f"{url}/health", tmp / "mlflow-server.log", "mlflow server"):
        yield url


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(*buckets: str) -> Iterator[str]:
    """moto's S3 server with `buckets` created; yields its endpoint URL. Use S3_CREDENTIALS as the client's env."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
