"""The Kubernetes runner against kmock's in-memory Kubernetes API over HTTP, with S3 from moto.

kmock runs no controllers, so `Cluster` below plays the Job controller and the kubelet: it waits for the
Job the runner creates, does what the pod would do (pull the published dataset, resolve the config from the
params in the pod's environment, run the stage against S3), creates pods with the statuses a real cluster
reports (Completed, OOMKilled, ImagePullBackOff, Evicted...) and sets the Job's conditions.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

import kelix.stages.catalogue as catalogue
from kelix.artifacts import ArtifactStore
from kelix.config import load_config
from kelix.runners import (ImagePullError, StageConfigError, StageDeadlineExceeded, StageFailed, StageOOMKilled,
                           TransientStageError, is_transient)
from kelix.runners.job_status import COMPLETION_INDEX
from kelix.runners.kubernetes import KubernetesRunner, StageJobConflict, StageStartTimeout
from kelix.runners.manifests import DATA_STAGE, LABEL_JOB, PARAMS_ENV
from kelix.stages.keys import data_fingerprint, stage_keys
from kelix.stages.run import run_stage

BUCKET = "kelix-test"
TOY: dict = {"crash": False}


def toy_stage(ctx) -> dict[str, float]:
    ckpt = ctx.out_dir / "checkpoints"
    resumed = ckpt.exists() and any(ckpt.iterdir())
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "step_0000001").write_text("1")
    ctx.logger.log({"loss": 0.5}, step=1)
    if TOY["crash"]:
        raise TOY["crash"] if isinstance(TOY["crash"], BaseException) else ConnectionError("node went away")
    (ctx.out_dir / "model").mkdir(exist_ok=True)
    return {"loss": 0.5, "resumed": float(resumed), "images": float(len(list((ctx.data_dir / "images").rglob("*"))))}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def kube():
    """kmock's KubernetesEmulator served on loopback from its own event loop thread.

    One per test: the emulator keeps every request and matches each new one against that history, so a
    long-lived one slows down as polling requests pile up.
    """
    import kmock
    import kubernetes

    logs: dict[str, str | Callable] = {}
    state: dict = {}
    ready = threading.Event()

    class Emulator(kmock.KubernetesEmulator):
        async def _handle(self, request):
            # The API server gives each new object a uid (kmock does not): owner references name it.
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                request.data.setdefault("metadata", {}).setdefault("uid", str(uuid.uuid4()))
            return await super()._handle(request)

    def serve_log(req) -> bytes:
        log = logs.get(req.name, "")
        return _as_kubelet(log(req) if callable(log) else log, req.params).encode()

    def serve() -> None:
        async def main() -> None:
            state["stop"] = asyncio.Event()
            async with Emulator() as emu, kmock.Server(emu) as srv:
                # Declared, so listing them before the first object exists is an empty list, as on a cluster.
                for resource in ("batch/v1/jobs", "v1/pods", "v1/services"):
                    emu.resources[resource] = {}
                # The emulator stores objects but has no kubelet: pod logs come from this dict, as text or as
                # fn(request) -> text (to change between requests).
                emu["get", kmock.resource("v1/pods"), kmock.subresource("log")] << serve_log
                state.update(url=str(srv.url).rstrip("/"), loop=asyncio.get_running_loop(), emu=emu)
                ready.set()
                await state["stop"].wait()

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30), "kmock did not start"
    conf = kubernetes.client.Configuration()
    conf.host = state["url"]

    def on_server(fn):
        """Run fn(emulator) on the server's loop (e.g. to add a reaction) and return its result."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(state["emu"]))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                done.set_exception(exc)

        state["loop"].call_soon_threadsafe(call)
        return done.result(10)

    yield {"api": kubernetes.client.ApiClient(conf), "logs": logs, "on_server": on_server}
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(10)


def _as_kubelet(log: str, params: dict[str, str]) -> str:
    """A pod's log as the kubelet serves it: with timestamps=true each line starts with its time (here line i
    was written i nanoseconds after midnight, so the times stay the same across requests); tailLines=N gives
    the last N lines. sinceSeconds is not honoured: the runner must skip what it has already seen."""
    lines = log.splitlines(keepends=True)
    if params.get("timestamps", "").lower() == "true":
        lines = [f"2026-01-01T00:00:00.{i:09d}Z {line}" for i, line in enumerate(lines)]
    if params.get("tailLines"):
        lines = lines[-int(params["tailLines"]):]
    return "".join(lines)


@pytest.fixture(scope="module")
def s3():
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client may point at another test's endpoint
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def env(kube, s3, tmp_path, monkeypatch):
    monkeypatch.setattr(catalogue, "STAGES", {n: dataclasses.replace(s, entry=f"{__name__}:toy_stage")
                                              for n, s in catalogue.STAGES.items()})
    monkeypatch.setenv("KELIX_CACHE", str(tmp_path / "shared-volume"))  # the orchestrator's and pods' mirror
    TOY["crash"] = False
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "manifest.jsonl").write_text('{"key": "a"}\n')
    (data / "images" / "a.png").write_bytes(b"\x89PNG fake")
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    return {"namespace": namespace, "data": data, "artifacts": f"s3://{BUCKET}/{namespace}",
            "cluster": Cluster(kube, namespace, tmp_path), "cfg": load_config("tiny")}


# ---------------------------------------------------------------------------------------------- the cluster


class Cluster:
    """Plays the Job controller and the kubelet for the Jobs the runner creates."""

    def __init__(self, kube: dict, namespace: str, tmp: Path):
        from kubernetes import client

        self.batch, self.core = client.BatchV1Api(kube["api"]), client.CoreV1Api(kube["api"])
        self.logs, self.namespace, self.tmp = kube["logs"], namespace, tmp
        self.on_server = kube["on_server"]  # fn(emulator) on the server's loop: to add reactions, read requests
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def job(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = json.loads(self.batch.list_namespaced_job(self.namespace, _preload_content=False).data)["items"]
            live = [j for j in jobs if not (j.get("status") or {}).get("conditions")]
            if live:
                return live[-1]
            time.sleep(0.1)
        raise AssertionError("the runner created no job")

    def services(self) -> list[dict]:
        return json.loads(self.core.list_namespaced_service(self.namespace, _preload_content=False).data)["items"]

    def collect_garbage(self) -> None:
        """Play the garbage collector (kmock has none): delete the Services whose owner Jobs are gone."""
        jobs = json.loads(self.batch.list_namespaced_job(self.namespace, _preload_content=False).data)["items"]
        uids = {j["metadata"].get("uid") for j in jobs}
        for service in self.services():
            owners = {r.get("uid") for r in service["metadata"].get("ownerReferences") or []}
            if owners and not owners & uids:
                self.core.delete_namespaced_service(service["metadata"]["name"], self.namespace)

    def service_owned_by(self, job: dict, timeout: float = 10) -> dict:
        """The Service of `job`, once the runner has made one that this Job owns."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for service in self.services():
                owners = {r.get("uid") for r in service["metadata"].get("ownerReferences") or []}
                if service["metadata"]["name"] == job["metadata"]["name"] and job["metadata"]["uid"] in owners:
                    return service
            time.sleep(0.1)
        raise AssertionError(f"no service owned by job {job['metadata']['name']} ({job['metadata']['uid']})")

    def pod(self, job: dict, suffix: str, status: dict, log: str = "", **meta) -> str:
        """A pod of `job` as its controller makes it (owned by the Job's uid, created now); `meta` overrides."""
        name = f"{job['metadata']['name']}-{suffix}"
        labels = job["spec"]["template"]["metadata"]["labels"]
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                 "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        metadata = {"name": name, "namespace": self.namespace, "labels": labels, "ownerReferences": [owner],
                    "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta}
        self.core.create_namespaced_pod(self.namespace, {
            "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": job["spec"]["template"]["spec"], "status": status})
        self.logs[name] = log
        return name

    def conclude(self, job: dict, ok: bool, reason: str = "", message: str = "") -> None:
        cond = {"type": "Complete" if ok else "Failed", "status": "True", "reason": reason, "message": message}
        status = {"conditions": [cond], **({"succeeded": 1} if ok else {"failed": 1})}
        self.batch.patch_namespaced_job_status(job["metadata"]["name"], self.namespace, {"status": status})

    def act_as_pod(self, job: dict) -> dict[str, float]:
        """What the container does: fetch the published dataset, resolve the config from its env, run the stage."""
        container = job["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        script = container["command"][2]
        artifacts = script.split("--artifacts ")[1].split()[0]
        data_key = script.split(f" {DATA_STAGE} ")[1].split()[0]
        data_dir = ArtifactStore(artifacts, cache_dir=self.tmp / "pod-scratch").pull(DATA_STAGE, data_key)
        params = Path(tempfile.mkdtemp(dir=self.tmp)) / "params.yaml"
        params.write_text(env[PARAMS_ENV])
        cfg = load_config(None, params)
        try:
            return run_stage(env["KELIX_STAGE"], cfg, data_dir, artifacts, progress=False).metrics
        except ConnectionError:
            return {}

    def play(self, scenario) -> None:
        def target() -> None:
            try:
                scenario(self)
            except BaseException as exc:  # noqa: BLE001 - surfaced by join(); the runner then times out
                self.error = exc
                logging.getLogger(__name__).exception("cluster scenario failed")

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(30)
        if self.error:
            raise self.error
        assert not self.thread.is_alive(), "the cluster scenario did not finish within 30s"


def _terminated(reason: str, code: int) -> dict:
    return {"phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [{"name": "stage", "image": "x", "ready": False, "restartCount": 0, "imageID": "",
                                   "state": {"terminated": {"reason": reason, "exitCode": code}}}]}


def _play_finished_job(env, pod: str) -> None:
    """Play a Job whose pod runs the stage (act_as_pod) and completes."""
    def scenario(c: Cluster) -> None:
        job = c.job()
        c.act_as_pod(job)
        c.pod(job, pod, _terminated("Completed", 0))
        c.conclude(job, ok=True)

    env["cluster"].play(scenario)


def _play_failed_job(env, pod: str, reason: str, code: int, log: str = "",
                     before: Callable[[Cluster, dict], None] | None = None) -> None:
    """Play a Job whose pod ends with `reason` / exit `code` (after `before(cluster, job)`, if given), then hits
    its backoff limit."""
    def scenario(c: Cluster) -> None:
        job = c.job()
        if before is not None:
            before(c, job)
        c.pod(job, pod, _terminated(reason, code), log=log)
        c.conclude(job, ok=False, reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit")

    env["cluster"].play(scenario)


def _running() -> dict:
    running = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    return {"phase": "Running", "containerStatuses": [{"name": "stage", "image": "x", "ready": True, "restartCount": 0,
                                                       "imageID": "", "state": running}]}


def _wait_for(predicate, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def _runner(env, **kw) -> KubernetesRunner:
    kw.setdefault("poll_interval", 0.2)
    kw.setdefault("timeout", 90)  # a broken scenario fails the test instead of hanging it
    return KubernetesRunner(env["cluster"].batch.api_client, namespace=env["namespace"], **kw)


def _run(env, runner=None, stage="tokenizer-1", cfg=None):
    return (runner or _runner(env)).run(stage, cfg or env["cfg"], env["data"], env["artifacts"])


# ---------------------------------------------------------------------------------------------- tests


def test_stage_job_runs_streams_logs_and_is_skipped_after(env, runner_log):
    def scenario(c: Cluster) -> None:
        job = c.job()
        c.act_as_pod(job)
        c.pod(job, "x7k2p", _terminated("Completed", 0), log="step 1/2 loss=0.9\nstep 2/2 loss=0.5\n")
        c.conclude(job, ok=True)

    env["cluster"].play(scenario)
    result = _run(env)
    env["cluster"].join()
    assert not result.skipped and result.metrics["loss"] == 0.5 and result.metrics["images"] == 1.0
    job_name = f"kelix-tokenizer-1-{result.key[:10]}"
    assert f"[tokenizer-1/{job_name}-x7k2p] step 2/2 loss=0.5" in runner_log
    store = ArtifactStore(env["artifacts"])
    assert store.is_done("tokenizer-1", result.key)
    # Finished for this key: no second job, whatever the cluster would do.
    again = _run(env)
    assert again.skipped and again.metrics["loss"] == 0.5


def test_oom_killed_is_a_clear_permanent_error(env):
    _play_failed_job(env, "a1", "OOMKilled", 137, log="allocating activations\n")
    with pytest.raises(StageOOMKilled, match=r"OOMKilled at its memory limit 8Gi.*runtime.resources.tokenizer-1.memory") as info:
        _run(env)
    env["cluster"].join()
    assert not is_transient(info.value)
    assert "allocating activations" in str(info.value)


def test_image_that_cannot_be_pulled_fails_fast_and_deletes_the_job(env):
    from kubernetes.client.exceptions import ApiException

    seen: dict = {}

    def scenario(c: Cluster) -> None:
        job = seen["job"] = c.job()
        c.pod(job, "b2", {"phase": "Pending", "containerStatuses": [{
            "name": "stage", "image": "ghcr.io/kelix-platform/kelix:nope", "ready": False, "restartCount": 0, "imageID": "",
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "kelix:nope"'}}}]})

    env["cluster"].play(scenario)
    with pytest.raises(ImagePullError, match="cannot pull image.*ImagePullBackOff") as info:
        _run(env, _runner(env, image_pull_grace=0))
    env["cluster"].join()
    assert not is_transient(info.value)
    with pytest.raises(ApiException) as gone:
        env["cluster"].batch.read_namespaced_job(seen["job"]["metadata"]["name"], env["namespace"])
    assert gone.value.status == 404


def test_missing_secret_is_reported_as_a_config_error(env):
    def scenario(c: Cluster) -> None:
        job = c.job()
        c.pod(job, "c3", {"phase": "Pending", "containerStatuses": [{
            "name": "stage", "image": "x", "ready": False, "restartCount": 0, "imageID": "",
            "state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "kelix-s3" not found'}}}]})

    env["cluster"].play(scenario)
    with pytest.raises(StageConfigError, match='secret "kelix-s3" not found'):
        _run(env, _runner(env, image_pull_grace=0))
    env["cluster"].join()


def test_deadline_exceeded(env):
    def scenario(c: Cluster) -> None:
        c.conclude(c.job(), ok=False, reason="DeadlineExceeded", message="Job was active longer than specified deadline")

    env["cluster"].play(scenario)
    with pytest.raises(StageDeadlineExceeded, match="activeDeadlineSeconds"):
        _run(env)
    env["cluster"].join()


def test_eviction_is_transient_and_the_rerun_replaces_the_job_and_resumes(env, runner_log):
    def evicted(c: Cluster) -> None:
        job = c.job()
        TOY["crash"] = True
        c.act_as_pod(job)  # it trained up to a checkpoint on the shared volume, then the node was drained
        c.pod(job, "d4", {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."})
        c.conclude(job, ok=False, reason="BackoffLimitExceeded")

    env["cluster"].play(evicted)
    with pytest.raises(TransientStageError, match="evicted or preempted") as info:
        _run(env)
    env["cluster"].join()
    assert is_transient(info.value)
    assert any("was evicted or preempted" in line for line in runner_log)

    def recovered(c: Cluster) -> None:
        job = c.job()
        TOY["crash"] = False
        c.act_as_pod(job)
        c.pod(job, "e5", _terminated("Completed", 0))
        c.conclude(job, ok=True)

    env["cluster"].play(recovered)
    result = _run(env)  # what the flow's retry does
    env["cluster"].join()
    assert result.metrics["resumed"] == 1.0
    assert any(line.startswith("replacing finished job") for line in runner_log)


def test_multi_node_stage_gets_an_indexed_job_and_a_rendezvous_service(env, runner_log):
    cfg = load_config("tiny", overrides=['runtime.resources={"tokenizer-1": {"gpus": 2, "num_nodes": 2}}'])
    seen: dict = {}

    def scenario(c: Cluster) -> None:
        job = seen["job"] = c.job()
        name = job["metadata"]["name"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the runner creates the Service right after the Job
            services = json.loads(c.core.list_namespaced_service(c.namespace, _preload_content=False).data)["items"]
            if services:
                seen["service"] = services[0]
                break
            time.sleep(0.1)
        c.act_as_pod(job)
        for index in range(2):
            c.pod(job, str(index), _terminated("Completed", 0), log=f"rank {index}: done\n",
                  annotations={COMPLETION_INDEX: str(index)})
        c.conclude(job, ok=True)
        seen["name"] = name

    env["cluster"].play(scenario)
    result = _run(env, cfg=cfg)
    env["cluster"].join()
    assert not result.skipped
    spec = seen["job"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 2 and spec["parallelism"] == 2
    assert seen["service"]["metadata"]["name"] == seen["name"]
    assert seen["service"]["spec"]["selector"] == {LABEL_JOB: seen["name"]}
    assert "nvidia.com/gpu" in spec["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert any(line.endswith("rank 0: done") for line in runner_log)
    assert any(line.endswith("rank 1: done") for line in runner_log)


def test_attaches_to_a_job_a_previous_orchestrator_left_running(env, runner_log):
    runner = _runner(env)
    store = ArtifactStore(env["artifacts"])
    fingerprint = data_fingerprint(env["data"])
    key = stage_keys(env["cfg"], fingerprint, ["tokenizer-1"])["tokenizer-1"]
    store.publish(DATA_STAGE, fingerprint, env["data"])
    job = runner.manifests("tokenizer-1", env["cfg"], key, env["artifacts"], data_key=fingerprint)[0]
    env["cluster"].batch.create_namespaced_job(env["namespace"], job)

    _play_finished_job(env, "f6")
    result = runner.run("tokenizer-1", env["cfg"], env["data"], env["artifacts"])  # a second create would be a 409
    env["cluster"].join()
    assert result.key == key and not result.skipped
    assert any(line.startswith("attaching to running job") for line in runner_log)


def test_a_local_artifact_store_is_refused(env, tmp_path):
    with pytest.raises(StageConfigError, match="s3://"):
        _runner(env).run("tokenizer-1", env["cfg"], env["data"], str(tmp_path / "artifacts"))


def test_runner_timeout_deletes_a_job_that_never_finishes(env):
    from kubernetes.client.exceptions import ApiException

    seen: dict = {}

    def scenario(c: Cluster) -> None:  # the pod runs and runs; the Job never gets a condition
        job = seen["job"] = c.job()
        c.pod(job, "g7", _running(), log="epoch 1 of forever\n")

    env["cluster"].play(scenario)
    start = time.monotonic()
    with pytest.raises(StageDeadlineExceeded, match=r"stage tokenizer-1: job ns-\w+/kelix-tokenizer-1-\w+ did not "
                                                    r"finish within 2 s; deleted it") as info:
        _run(env, _runner(env, timeout=2))
    elapsed = time.monotonic() - start
    env["cluster"].join()
    assert 2 <= elapsed < 20
    assert not is_transient(info.value)  # the same Job would hang again: no retry
    assert "epoch 1 of forever" in info.value.logs  # what the pod said so far comes with the error
    with pytest.raises(ApiException) as gone:
        env["cluster"].batch.read_namespaced_job(seen["job"]["metadata"]["name"], env["namespace"])
    assert gone.value.status == 404


def test_a_job_deleted_while_followed_is_a_clear_transient_error(env, runner_log):
    def scenario(c: Cluster) -> None:
        job = c.job()
        pod = c.pod(job, "h8", _running(), log="step 1\n")
        # Only once the runner is demonstrably following the Job (its pod's log reached the flow's log)...
        _wait_for(lambda: any(line.endswith(f"{pod}] step 1") for line in list(runner_log)))
        c.batch.delete_namespaced_job(job["metadata"]["name"], c.namespace)  # ... someone deletes it

    env["cluster"].play(scenario)
    with pytest.raises(TransientStageError, match=r"job ns-\w+/kelix-tokenizer-1-\w+ of stage tokenizer-1 "
                                                  r"disappeared while running") as info:
        _run(env)
    env["cluster"].join()
    assert is_transient(info.value) and info.value.stage == "tokenizer-1"


@pytest.mark.parametrize("code", [75, 1], ids=["one-process", "under-torchrun"])
def test_a_stage_another_process_is_running_is_retried_later(env, code):
    """Rank 0 found the stage folder locked (a pod the node lost still holds it). Alone it exits 75; under
    torchrun the pod exits 1, and the refusal is found in the log instead."""
    log = ("error: stage tokenizer-1 [0123] is already running from /checkpoints/kelix/tokenizer-1/0123: "
           '{"pid": 7, "host": "old-pod"}. Wait for it to finish, or stop that process, then rerun\n')
    _play_failed_job(env, "b5", "Error", code, log=log)
    with pytest.raises(TransientStageError, match="another process is running this stage") as info:
        _run(env)
    env["cluster"].join()
    assert is_transient(info.value)


def test_exit_code_1_is_a_permanent_stage_failure(env):
    _play_failed_job(env, "i9", "Error", 1, log="Traceback (most recent call last):\nKeyError: 'lr'\n")
    with pytest.raises(StageFailed) as info:
        _run(env)
    env["cluster"].join()
    assert type(info.value) is StageFailed and not is_transient(info.value)
    message = str(info.value)
    assert "stage tokenizer-1: job" in message
    assert "failed (BackoffLimitExceeded: Job has reached the specified backoff limit; exit codes [1])" in message
    assert "KeyError: 'lr'" in message and "KeyError: 'lr'" in info.value.logs


def test_exit_code_1_carries_the_stage_recorded_error(env):
    def crash(c: Cluster, job: dict) -> None:
        TOY["crash"] = ValueError("vocab_size must be positive")
        try:
            c.act_as_pod(job)  # the stage writes a FAILED marker naming its error, then the process exits 1
        except ValueError:
            pass

    _play_failed_job(env, "j1", "Error", 1, before=crash)
    with pytest.raises(StageFailed, match=r"exit codes \[1\]\): ValueError: vocab_size must be positive") as info:
        _run(env)
    env["cluster"].join()
    assert not is_transient(info.value)


def test_exit_code_1_after_a_recorded_connection_error_is_transient(env):
    def interrupted(c: Cluster, job: dict) -> None:
        TOY["crash"] = True  # ConnectionError: the marker records an interruption, not a bug
        c.act_as_pod(job)

    _play_failed_job(env, "k2", "Error", 1, before=interrupted)
    with pytest.raises(TransientStageError, match="ConnectionError: node went away") as info:
        _run(env)
    env["cluster"].join()
    assert is_transient(info.value)


@pytest.mark.parametrize("code", [137, 143])
def test_a_killed_container_is_transient(env, code):
    _play_failed_job(env, "l3", "Error", code)  # SIGKILL / SIGTERM from outside, not OOMKilled
    with pytest.raises(TransientStageError, match=rf"the container was killed \(exit codes \[{code}\]\).*resumes from "
                                                  r"the last checkpoint") as info:
        _run(env)
    env["cluster"].join()
    assert is_transient(info.value) and not isinstance(info.value, StageFailed)


def _unavailable(env, action, resource: str, times: int):
    """The first `times` such requests in the test's namespace get an empty HTTP 503 (kmock records them)."""
    import kmock

    return env["cluster"].on_server(
        lambda emu: emu[action, kmock.resource(resource), kmock.namespace(env["namespace"])][:times] << 503)


def _served(env, reaction) -> int:
    return env["cluster"].on_server(lambda emu: len(list(reaction)))


def test_api_server_503s_are_retried_and_the_stage_still_finishes(env):
    import kmock

    reads = _unavailable(env, kmock.action.FETCH, "batch/v1/jobs", 2)
    lists = _unavailable(env, kmock.action.LIST, "v1/pods", 1)

    _play_finished_job(env, "m4")
    result = _run(env, _runner(env, poll_interval=0.1))
    env["cluster"].join()
    assert not result.skipped and result.metrics["loss"] == 0.5
    # The runner did meet the 503s (so _call retried them), and they did not fail the stage.
    assert _served(env, reads) == 2 and _served(env, lists) == 1


def test_a_create_whose_answer_was_lost_takes_the_job_it_made(env, monkeypatch):
    """The API server creates the Job but its answer is lost (503): the retry meets 409 and follows that Job."""
    import kubernetes
    from kubernetes.client.exceptions import ApiException

    runner = _runner(env, poll_interval=0.1)
    real_create, answers = kubernetes.client.BatchV1Api.create_namespaced_job, []

    def create_then_lose_the_answer(api, *args, **kwargs):
        try:
            result = real_create(api, *args, **kwargs)  # the real request to the emulator
        except ApiException as exc:
            answers.append(exc.status)
            raise
        answers.append(201)
        if len(answers) == 1:
            raise ApiException(status=503, reason="Service Unavailable")  # the answer is lost on the way back
        return result

    monkeypatch.setattr(kubernetes.client.BatchV1Api, "create_namespaced_job", create_then_lose_the_answer)

    _play_finished_job(env, "q1")
    result = _run(env, runner)
    env["cluster"].join()
    assert answers == [201, 409]  # created, then the retry met the Job it had made
    assert not result.skipped and result.metrics["loss"] == 0.5


def test_an_api_server_that_stays_unavailable_fails_transiently_after_five_tries(env):
    import kmock
    from kubernetes.client.exceptions import ApiException

    reads = _unavailable(env, kmock.action.FETCH, "batch/v1/jobs", 100)
    with pytest.raises(ApiException) as info:
        _run(env, _runner(env, poll_interval=0.1))
    assert info.value.status == 503 and is_transient(info.value)  # the flow's retry takes over from here
    assert _served(env, reads) == 5
    creates = env["cluster"].on_server(lambda emu: list(emu[kmock.action.CREATE, kmock.namespace(env["namespace"])]))
    assert creates == []  # it gave up before starting anything


def test_a_409_takes_only_a_live_object_this_job_owns(env):
    """A Service of the stage's name left by an earlier Job (another owner uid), or one being deleted, is not
    taken for the one this Job wanted: the 409 stands. One with this Job's uid is taken."""
    from kubernetes.client.exceptions import ApiException

    runner, ns, core = _runner(env), env["namespace"], env["cluster"].core

    def service(name: str, owner_uid: str, deleting: bool = False) -> dict:
        meta = {"name": name, "namespace": ns,
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "kelix-x", "uid": owner_uid}]}
        if deleting:
            # Foreground deletion: the object stays, marked, until its dependents are gone.
            meta.update(deletionTimestamp="2026-11-28T00:00:00Z", finalizers=["foregroundDeletion"])
        return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
                "spec": {"clusterIP": "None", "ports": [{"port": 29500}]}}

    def create(body: dict) -> dict:
        return runner._create(core.create_namespaced_service, core.read_namespaced_service, ns, body)

    create(service("mine", "uid-1"))
    assert create(service("mine", "uid-1"))["metadata"]["name"] == "mine"  # the lost answer's object: taken
    create(service("earlier", "uid-0"))
    with pytest.raises(ApiException) as info:
        create(service("earlier", "uid-1"))  # an earlier run's Service: not ours
    assert info.value.status == 409
    create(service("going", "uid-1", deleting=True))
    with pytest.raises(ApiException) as info:
        create(service("going", "uid-1"))  # being deleted: it will vanish under us
    assert info.value.status == 409


# ---------------------------------------------------------------------------------------------- cancellation,
# pods that never start, stuck deletions, replaced and foreign pods


def _stage_objs(env, runner: KubernetesRunner, cfg=None) -> list[dict]:
    """The Job (and Service) `runner` would make for tokenizer-1 with env's data and artifact store."""
    cfg = cfg or env["cfg"]
    store = ArtifactStore(env["artifacts"])
    fingerprint = data_fingerprint(env["data"])
    key = stage_keys(cfg, fingerprint, ["tokenizer-1"])["tokenizer-1"]
    store.publish(DATA_STAGE, fingerprint, env["data"])
    return runner.manifests("tokenizer-1", cfg, key, env["artifacts"], data_key=fingerprint)


def test_a_forced_retry_attaches_to_the_job_its_own_run_started(env, runner_log):
    """The flow passes `force` as the moment the run started. A retry (after an API blip) of a forced stage must
    follow the Job that run already started, not delete it and start the training over."""
    runner = _runner(env)
    started = time.time() - 60  # the run started a minute ago; its Job was created after that
    _existing_job(env, runner, uid="this-runs",
                  creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started + 30)))
    _play_finished_job(env, "f7")
    result = runner.run("tokenizer-1", env["cfg"], env["data"], env["artifacts"], force=started)
    env["cluster"].join()
    assert not result.skipped
    assert any(line.startswith("attaching to running job") for line in runner_log)
    assert not any(line.startswith("replacing") for line in runner_log)


def _existing_job(env, runner: KubernetesRunner, *, uid: str, cfg=None, **meta) -> dict:
    """The stage's Job as an earlier run left it (with a uid, as the API server gives), created directly."""
    job = _stage_objs(env, runner, cfg)[0]
    job["metadata"].update(uid=uid, **meta)
    env["cluster"].batch.create_namespaced_job(env["namespace"], job)
    return job


def _gone(env, job: dict) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        env["cluster"].batch.read_namespaced_job(job["metadata"]["name"], env["namespace"])
    except ApiException as exc:
        return exc.status == 404
    return False


def _termination_signal():
    from prefect.exceptions import TerminationSignal

    return TerminationSignal(15)


@pytest.mark.parametrize("cancel", [KeyboardInterrupt, asyncio.CancelledError, _termination_signal],
                         ids=["ctrl-c", "asyncio", "prefect"])
def test_a_cancelled_run_deletes_its_job(env, runner_log, monkeypatch, cancel):
    seen: dict = {}

    def scenario(c: Cluster) -> None:  # the pod trains; the Job would run on after the run is cancelled
        job = seen["job"] = c.job()
        c.pod(job, "n1", _running(), log="step 1\n")

    runner, polls = _runner(env), []

    def sleep(seconds: float) -> None:  # the user cancels the run a few polls after the pod started
        polls.append(seconds)
        if len(polls) >= 3 and not env["cluster"].thread.is_alive():
            raise cancel()
        time.sleep(seconds)

    monkeypatch.setattr(runner, "_sleep", sleep)
    env["cluster"].play(scenario)
    with pytest.raises(type(cancel())):
        _run(env, runner)
    env["cluster"].join()
    assert _gone(env, seen["job"])
    assert any(line.startswith("run cancelled: deleted job") for line in runner_log)


def test_an_api_error_while_following_leaves_the_job_for_the_retry(env):
    """Not a cancellation: the flow's retry attaches to the Job, which must still be there."""
    import kmock
    from kubernetes.client.exceptions import ApiException

    seen: dict = {}

    def scenario(c: Cluster) -> None:
        seen["job"] = c.job()
        _unavailable(env, kmock.action.LIST, "v1/pods", 100)

    env["cluster"].play(scenario)
    with pytest.raises(ApiException) as info:
        _run(env, _runner(env, poll_interval=0.1))
    env["cluster"].join()
    assert info.value.status == 503 and not _gone(env, seen["job"])


@pytest.mark.parametrize("status,why", [
    ({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                          "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]},
     r"\(Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.\)"),
    ({"phase": "Pending", "containerStatuses": [{
        "name": "stage", "image": "x", "ready": False, "restartCount": 0, "imageID": "",
        "state": {"waiting": {"reason": "ContainerCreating"}}}]},
     r"\(ContainerCreating\)"),
    (None, "no pod of job .* was created within 1 s"),  # e.g. a ResourceQuota refuses the pod
], ids=["unschedulable", "container-creating", "no-pod"])
def test_a_pod_that_never_starts_fails_after_the_schedule_timeout(env, status, why):
    seen: dict = {}

    def scenario(c: Cluster) -> None:
        job = seen["job"] = c.job()
        if status is not None:
            c.pod(job, "o1", status)

    env["cluster"].play(scenario)
    start = time.monotonic()
    with pytest.raises(StageStartTimeout, match=why) as info:
        _run(env, _runner(env, schedule_timeout=1, timeout=15))
    env["cluster"].join()
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "GPU quota" in message and "runtime.tolerations" in message and "schedule_timeout" in message
    assert not is_transient(info.value)  # already waited schedule_timeout; a retry would wait as long again
    assert _gone(env, seen["job"])


@pytest.mark.timeout(60)
def test_a_job_stuck_deleting_fails_transiently_naming_its_pods(env):
    runner = _runner(env, delete_timeout=1)
    # Foreground deletion: the API server keeps the Job, marked, until its pods are gone; they stay Terminating.
    job = _existing_job(env, runner, uid="old-uid", finalizers=["foregroundDeletion"])
    env["cluster"].batch.patch_namespaced_job_status(job["metadata"]["name"], env["namespace"], {"status": {
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}})
    pod = env["cluster"].pod(job, "zz9", _running(), deletionTimestamp="2026-01-01T00:00:00Z",
                             finalizers=["batch.kubernetes.io/job-tracking"])
    with pytest.raises(TransientStageError, match=rf"still being deleted after 1 s; its pods {pod} are stuck "
                                                  rf"terminating.*--force {pod}") as info:
        runner.run("tokenizer-1", env["cfg"], env["data"], env["artifacts"])
    assert is_transient(info.value) and info.value.stage == "tokenizer-1"


def test_a_preempted_pod_does_not_make_its_replacements_failure_transient(env):
    def scenario(c: Cluster) -> None:
        job = c.job()
        preempted = {"phase": "Failed", **_terminated("Error", 143),  # SIGTERM when preempted
                     "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]}
        c.pod(job, "p1", preempted, creationTimestamp="2026-01-01T00:00:00Z")
        c.pod(job, "p2", _terminated("Error", 1), log="KeyError: 'lr'\n", creationTimestamp="2026-01-01T00:05:00Z")
        c.conclude(job, ok=False, reason="BackoffLimitExceeded")

    env["cluster"].play(scenario)
    with pytest.raises(StageFailed, match=r"exit codes \[1\]") as info:
        _run(env)
    env["cluster"].join()
    assert type(info.value) is StageFailed and not is_transient(info.value)


def _earlier_jobs_pods(env, job: dict) -> None:
    """Pods of an earlier Job of the same name, still terminating: same labels, another owner uid."""
    for suffix, status in [("old1", _terminated("OOMKilled", 137)), ("old2", {"phase": "Pending", "containerStatuses": [
            {"name": "stage", "image": "x", "ready": False, "restartCount": 0, "imageID": "",
             "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]})]:
        env["cluster"].pod({**job, "metadata": {**job["metadata"], "uid": "earlier-uid"}}, suffix, status,
                           deletionTimestamp="2026-01-01T00:00:00Z", finalizers=["batch.kubernetes.io/job-tracking"])


def test_pods_of_an_earlier_job_of_the_same_name_are_ignored(env, runner_log):
    runner = _runner(env, image_pull_grace=0)  # the earlier pod's ImagePullBackOff would fail the run at once
    _earlier_jobs_pods(env, _existing_job(env, runner, uid="this-uid"))

    def scenario(c: Cluster) -> None:
        _wait_for(lambda: any(line.startswith("attaching to running job") for line in list(runner_log)))
        job = c.job()
        c.act_as_pod(job)
        c.pod(job, "r1", _terminated("Completed", 0))
        c.conclude(job, ok=True)

    env["cluster"].play(scenario)
    result = _run(env, runner)
    env["cluster"].join()
    assert not result.skipped and result.metrics["loss"] == 0.5


def test_an_earlier_jobs_oom_is_not_taken_for_this_jobs_failure(env, runner_log):
    runner = _runner(env)
    _earlier_jobs_pods(env, _existing_job(env, runner, uid="this-uid"))
    _play_failed_job(env, "s1", "Error", 1, before=lambda c, job: _wait_for(
        lambda: any(line.startswith("attaching to running job") for line in list(runner_log))))
    with pytest.raises(StageFailed, match=r"exit codes \[1\]") as info:
        _run(env, runner)
    env["cluster"].join()
    assert type(info.value) is StageFailed


# ---------------------------------------------------------------------------------------------- another run's
# Job of the same name, dropped log streams, stale rendezvous Services


@pytest.mark.parametrize("force", [False, True], ids=["attach", "force"])
def test_a_live_job_of_another_run_is_neither_followed_nor_deleted(env, runner_log, force):
    """Runs of one stage and key into two artifact stores get Jobs of one name (stage + key[:10]). The second
    must not follow the first's Job (its outputs go to the other store) nor, even with force, delete it."""
    runner = _runner(env, timeout=5)  # had it attached, it would wait (in vain) this long
    theirs = _existing_job(env, runner, uid="their-uid")  # the first user's run, still going
    mine = f"s3://{BUCKET}/{env['namespace']}-other-user"
    with pytest.raises(StageJobConflict) as info:
        runner.run("tokenizer-1", env["cfg"], env["data"], mine, force=force)
    name, ns = theirs["metadata"]["name"], env["namespace"]
    message = str(info.value)
    assert f"job {ns}/{name} already exists and runs other work" in message
    assert f"for artifacts {env['artifacts']}," in message and f"this run wants artifacts {mine}," in message
    assert f"kubectl delete job -n {ns} {name}" in message and "runtime.namespace" in message
    assert not is_transient(info.value) and info.value.stage == "tokenizer-1"
    assert not _gone(env, theirs)
    assert not any(line.startswith(("attaching", "replacing")) for line in runner_log)


def test_another_runs_job_created_between_our_read_and_our_create_is_a_conflict(env, monkeypatch):
    """The other run's Job appears after this run looked (no Job yet) and before it creates its own: the create
    meets 409, and the Job found then is named as the conflict, read once."""
    runner = _runner(env, timeout=5)
    _existing_job(env, runner, uid="their-uid")
    real, reads = runner._json, []

    def first_read_sees_no_job(read, *args):
        reads.append(read.__name__)
        if reads.count("read_namespaced_job") == 1 and read.__name__ == "read_namespaced_job":
            return None  # the look before the other run's create
        return real(read, *args)

    monkeypatch.setattr(runner, "_json", first_read_sees_no_job)
    with pytest.raises(StageJobConflict, match="already exists and runs other work"):
        runner.run("tokenizer-1", env["cfg"], env["data"], f"s3://{BUCKET}/{env['namespace']}-other-user")
    assert reads.count("read_namespaced_job") == 2  # the look, and once after the 409


def test_a_dropped_log_stream_is_resumed_without_repeating_lines(env, runner_log):
    requests: list[dict] = []

    def log(req) -> str:  # the first stream drops after two lines; the pod goes on logging
        requests.append(dict(req.params))
        return "step 1\nstep 2\n" if len(requests) == 1 else "step 1\nstep 2\nstep 3\n"

    def scenario(c: Cluster) -> None:
        job = c.job()
        pod = c.pod(job, "t1", _running(), log=log)
        try:
            _wait_for(lambda: any(line.endswith(f"{pod}] step 3") for line in list(runner_log)), timeout=10)
        finally:
            c.act_as_pod(job)
            c.conclude(job, ok=True)

    env["cluster"].play(scenario)
    _run(env)
    env["cluster"].join()
    for step in (1, 2, 3):
        assert len([line for line in runner_log if line.endswith(f"] step {step}")]) == 1, step
    assert requests[0]["timestamps"] == "true" and "sinceSeconds" not in requests[0]
    assert int(requests[1]["sinceSeconds"]) > 0  # only the last while, not the whole log again


def test_log_stream_reconnects_are_bounded(env, runner_log):
    requests: list[dict] = []

    def log(req) -> str:  # every stream ends at once, though the pod runs on
        requests.append(dict(req.params))
        return "epoch 1\n"

    def scenario(c: Cluster) -> None:
        job = c.job()
        pod = c.pod(job, "v1", _running(), log=log)
        try:
            _wait_for(lambda: any("no longer following" in line for line in list(runner_log)), timeout=10)
            time.sleep(0.5)  # a few more polls: no more reconnects
        finally:
            c.act_as_pod(job)
            c.conclude(job, ok=True)
        seen["pod"] = pod

    seen: dict = {}
    env["cluster"].play(scenario)
    _run(env, _runner(env, log_resumes=2))
    env["cluster"].join()
    assert len(requests) == 3  # the first stream and two reconnects
    warning = next(line for line in runner_log if "no longer following" in line)
    assert f"kubectl logs -f -n {env['namespace']} {seen['pod']}" in warning
    assert len([line for line in runner_log if line.endswith("] epoch 1")]) == 1


def test_a_failed_pods_log_is_read_when_its_stream_gave_nothing(env):
    def log(req) -> str:  # the follow stream drops before a line; a plain read still works
        return "" if req.params.get("follow") == "true" else "Traceback (most recent call last):\nKeyError: 'lr'\n"

    _play_failed_job(env, "u1", "Error", 1, log=log)
    with pytest.raises(StageFailed) as info:
        _run(env)
    env["cluster"].join()
    assert "KeyError: 'lr'" in str(info.value) and "KeyError: 'lr'" in info.value.logs


def _multi_node_cfg():
    return load_config("tiny", overrides=['runtime.resources={"tokenizer-1": {"gpus": 2, "num_nodes": 2}}'])


def _play_multi_node_job(env, seen: dict, before: Callable[[Cluster, dict], None] = lambda c, job: None) -> None:
    """Play a two-node Job that runs only once the runner made a Service this Job owns (seen["service"])."""
    def scenario(c: Cluster) -> None:
        job = seen["job"] = c.job()
        before(c, job)
        seen["service"] = c.service_owned_by(job)
        c.act_as_pod(job)
        for index in range(2):
            c.pod(job, str(index), _terminated("Completed", 0), annotations={COMPLETION_INDEX: str(index)})
        c.conclude(job, ok=True)

    env["cluster"].play(scenario)


def test_a_stale_rendezvous_service_gives_way_to_one_this_job_owns(env, runner_log):
    """An earlier same-named Job's Service outlives it (its owner reference does not block the Job's deletion)
    until the garbage collector removes it: the new Job must still get its own, not a raw 409."""
    runner, cfg = _runner(env), _multi_node_cfg()
    stale = _stage_objs(env, runner, cfg)[1]
    stale["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job",
                                             "name": stale["metadata"]["name"], "uid": "earlier-uid"}]
    env["cluster"].core.create_namespaced_service(env["namespace"], stale)

    def collect_later(c: Cluster, job: dict) -> None:
        _wait_for(lambda: any(line.startswith("waiting for the service") for line in list(runner_log)))
        c.collect_garbage()

    seen: dict = {}
    _play_multi_node_job(env, seen, before=collect_later)
    result = _run(env, runner, cfg=cfg)
    env["cluster"].join()
    assert not result.skipped
    owners = [r["uid"] for r in seen["service"]["metadata"]["ownerReferences"]]
    assert owners == [seen["job"]["metadata"]["uid"]] and owners != ["earlier-uid"]


def test_a_stale_service_that_stays_is_a_transient_error_saying_what_to_delete(env):
    runner, cfg = _runner(env, delete_timeout=1), _multi_node_cfg()
    stale = _stage_objs(env, runner, cfg)[1]  # no owner: the garbage collector never removes it
    env["cluster"].core.create_namespaced_service(env["namespace"], stale)
    name, ns = stale["metadata"]["name"], env["namespace"]
    with pytest.raises(TransientStageError, match=rf"kubectl delete service -n {ns} {name}") as info:
        _run(env, runner, cfg=cfg)
    assert is_transient(info.value) and info.value.stage == "tokenizer-1"


def test_attaching_to_a_multi_node_job_creates_its_missing_service(env, runner_log):
    runner, cfg = _runner(env), _multi_node_cfg()
    _existing_job(env, runner, uid="this-uid", cfg=cfg)  # its Service is gone (or was never made)
    seen: dict = {}
    _play_multi_node_job(env, seen)
    result = _run(env, runner, cfg=cfg)
    env["cluster"].join()
    assert not result.skipped and any(line.startswith("attaching to running job") for line in runner_log)
    assert [r["uid"] for r in seen["service"]["metadata"]["ownerReferences"]] == ["this-uid"]
