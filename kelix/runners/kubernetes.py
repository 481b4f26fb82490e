"""The Kubernetes runner: one training stage = one Job (an Indexed Job across nodes), followed to the end.

It publishes the dataset into the artifact store (once per content fingerprint) so any pod can fetch it,
starts the Job built by `manifests.py` (or attaches to the one a previous orchestrator left running for the
same work; another run's Job of the same name is left alone, with an error), polls it, streams its pods'
logs into the flow's log (reconnecting a dropped stream), and turns the ways a Job ends into errors a person
can act on: OOMKilled, an image that cannot be pulled, a missing Secret, a deadline, a pod that never starts, and
eviction or preemption, which raise `TransientStageError` so the flow's retry reruns the stage and it resumes
from its checkpoint on the shared volume. A cancelled run deletes its Job. Stage outputs stay in the (remote)
artifact store; nothing large is downloaded here. Reading the Job's and pods' status is `job_status.py`,
following their logs `pod_logs.py`.
"""
from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kelix.env import user_at_host
from kelix.rerun import BUSY_PHRASE, EXIT_BUSY, force_cutoff, up_to_date
from kelix.runners import job_status, manifests, pod_logs
from kelix.runners.base import (ImagePullError, StageConfigError, StageDeadlineExceeded, StageFailed, StageOOMKilled,
                                TransientStageError, check_inputs, finished_result, is_transient, marker_error,
                                params_yaml, skipped_result, stage_logger)

if TYPE_CHECKING:
    from kelix.config import KelixConfig
    from kelix.stages.run import StageResult
    from kelix.tracking import StageRun



class StageStartTimeout(StageFailed):
    """No pod of the stage's Job started within the runner's `schedule_timeout` (unschedulable, stuck creating).

    Permanent: the runner already waited `schedule_timeout` for capacity, and the usual causes (no GPU quota, a
    node selector or tolerations no node matches, a volume that cannot attach) do not fix themselves, so each
    retry would only hold the run for another `schedule_timeout`.
    """


class StageJobConflict(StageFailed):
    """A live Job of the stage's name runs other work (another artifact store, image or data): another run's.

    Permanent: the runner neither follows nor deletes it; a person decides (wait, delete it, another namespace).
    """


class KubernetesRunner:
    kind = "kubernetes"

    def __init__(
        self,
        api_client: Any = None,
        *,
        namespace: str | None = None,
        options: manifests.JobOptions | None = None,
        poll_interval: float = 5.0,
        image_pull_grace: float = 120.0,
        pod_data_dir: str | None = None,
        pod_tracking_uri: str | None = None,
        timeout: float | None = None,
        schedule_timeout: float | None = 1800.0,
        delete_timeout: float = 120.0,
        tail_lines: int = 40,
        log_resumes: int = 20,
    ):
        self._api = api_client
        self.namespace = namespace
        self.options = options or manifests.JobOptions()
        self.poll_interval = poll_interval
        # ErrImagePull is sometimes a registry blip; fail only if the pod is still stuck after this long.
        self.image_pull_grace = image_pull_grace
        # None: publish the dataset to the artifact store and pull it in the pod; else a path inside the pod.
        self.pod_data_dir = pod_data_dir
        # The MLflow URL as seen from inside the cluster, when it differs from the orchestrator's.
        self.pod_tracking_uri = pod_tracking_uri
        self.timeout = timeout
        # Fail a Job whose pods do not start within this long (None: wait for capacity forever).
        self.schedule_timeout = schedule_timeout
        # How long to wait for a replaced Job to be gone before giving up (pods stuck terminating).
        self.delete_timeout = delete_timeout
        self.tail_lines = tail_lines
        # How many times to reconnect one pod's dropped log stream (API server restarts, idle timeouts).
        self.log_resumes = log_resumes

    # Every wait in the runner goes through this, so a test can stand in for time passing (or for Ctrl-C).
    _sleep = staticmethod(time.sleep)

    # ---- clients ----

    @property
    def api(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.ApiClient()
        return self._api

    @property
    def batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.api)

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """An API call retried a few times on transient trouble (a restarting API server must not fail a stage)."""
        for attempt in range(5):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - filtered by is_transient
                if attempt == 4 or not is_transient(exc):
                    raise
                time.sleep(min(self.poll_interval, 1.0) * (attempt + 1))
        raise AssertionError("unreachable")

    def _json(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        """GET as a plain camelCase dict (None on 404), independent of the client's model classes."""
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self._call(fn, *args, _preload_content=False, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(resp.data)

    # ---- the stage ----

    def manifests(self, name: str, cfg: "KelixConfig", key: str, artifacts: str, *, data_key: str | None,
                  force: bool | float = False, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The objects this runner creates for a stage: the Job, and the rendezvous Service across nodes."""
        from kelix.stages.catalogue import stage_resources

        resources = stage_resources(cfg, name)
        namespace = self.namespace or cfg.runtime.namespace
        job = manifests.stage_job(
            name, key, namespace=namespace, image=cfg.runtime.image, preset=cfg.preset,
            params_yaml=params_yaml(cfg), artifacts=artifacts, resources=resources,
            node_selector=cfg.runtime.node_selector, tolerations=cfg.runtime.tolerations, env=env or {},
            options=self.options, data_dir=self.pod_data_dir, data_key=data_key, force=force,
            started_by=user_at_host())
        objs = [job]
        if resources.num_nodes > 1:
            objs.append(manifests.rendezvous_service(name, key, namespace=namespace))
        return objs

    def run(self, name: str, cfg: "KelixConfig", data_dir: str | Path, artifacts: str, *, force: bool | float = False,
            tracking: "StageRun | None" = None) -> "StageResult":
        from kelix.artifacts import ArtifactStore
        from kelix.stages.keys import data_fingerprint, stage_keys

        store = ArtifactStore(artifacts)
        if not store.remote:
            raise StageConfigError(
                f"the kubernetes runner needs an artifact store pods can reach (s3://...), not {artifacts!r}: "
                "pass --artifacts s3://bucket/prefix or set runtime.artifacts", stage=name)
        fingerprint = data_fingerprint(data_dir)
        keys = stage_keys(cfg, fingerprint, [name])
        key = keys[name]
        if up_to_date(store, name, key, force):
            return skipped_result(store, name, key)
        check_inputs(name, store, keys)
        log = stage_logger()
        if self.pod_data_dir is None and not store.is_done(manifests.DATA_STAGE, fingerprint):
            log.info("%s: publishing dataset %s (%s) to %s for the pods", name, fingerprint, data_dir, store.uri)
            store.publish(manifests.DATA_STAGE, fingerprint, data_dir, source=str(Path(data_dir).resolve()))
        env = tracking.env(remote=True) if tracking else {}
        if tracking and self.pod_tracking_uri:
            env = {**tracking.env(), "MLFLOW_TRACKING_URI": self.pod_tracking_uri}
        objs = self.manifests(name, cfg, key, artifacts, data_key=fingerprint, force=force, env=env)
        job = objs[0]
        jname, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        t0 = time.perf_counter()
        try:
            self._start(objs, force=force, log=log)
            self._wait(name, key, jname, namespace, store, log)
        except BaseException as exc:
            if isinstance(exc, _cancellations()):
                self._cancel(jname, namespace, log)
            raise
        return finished_result(store, name, key, time.perf_counter() - t0)

    def _cancel(self, jname: str, namespace: str, log: Any) -> None:
        """Delete the Job of a cancelled run, whose GPUs would otherwise stay busy with work nobody waits for.
        One request with a timeout, no retries and no waiting for the pods: a cancellation must not hang."""
        try:
            self.batch.delete_namespaced_job(jname, namespace, propagation_policy="Foreground", _request_timeout=10)
        except Exception as exc:  # noqa: BLE001 - the cancellation, re-raised by the caller, matters more
            if getattr(exc, "status", None) != 404:  # an ApiException 404: already gone
                log.warning("run cancelled, but deleting job %s/%s failed (%s); delete it yourself: "
                            "kubectl delete job -n %s %s", namespace, jname, getattr(exc, "reason", None) or exc,
                            namespace, jname)
            return
        log.warning("run cancelled: deleted job %s/%s and its pods", namespace, jname)

    def _start(self, objs: list[dict[str, Any]], *, force: bool | float, log: Any) -> None:
        """Create the stage's Job, or attach to the live one of its name when it does the same work."""
        job = objs[0]
        jname, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        existing = self._json(self.batch.read_namespaced_job, jname, namespace)
        if existing is not None and job_status.live(existing):
            if not job_status.same_work(existing, job):
                # Another run's Job (the name is only stage and key): following it would wait for work this
                # run did not ask for, and deleting it (even with force) would kill someone else's stage.
                raise _conflict(existing, job)
            cutoff = force_cutoff(force)
            if cutoff is None or job_status.created_at(existing) >= cutoff:
                # A previous orchestrator started it and is gone, or this run's own forced Job (a retry after
                # an API blip): follow it instead of starting over.
                log.info("attaching to running job %s/%s", namespace, jname)
                self._ensure_services(objs, existing, log)
                return
        if existing is not None:
            what = ("finished" if job_status.job_state(existing) else "running" if job_status.live(existing)
                    else "deleted")
            log.info("replacing %s job %s/%s", what, namespace, jname)
            self._delete_job(jname, namespace, wait=True)
        # Another run may create a Job of this name between our read and our create: that is a conflict.
        created = self._create(self.batch.create_namespaced_job, self.batch.read_namespaced_job, namespace, job,
                               other_work=lambda other: _conflict(other, job))
        resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
        log.info("started job %s/%s (image %s, %s node(s), limits %s)", namespace, jname,
                 job["spec"]["template"]["spec"]["containers"][0]["image"], job["spec"].get("completions", 1),
                 resources["limits"])
        self._ensure_services(objs, created, log)

    def _ensure_services(self, objs: list[dict[str, Any]], job: dict[str, Any], log: Any) -> None:
        """Make sure the rendezvous Service of a multi-node Job exists and is owned by this Job's uid.

        An earlier same-named Job's Service can outlive it: its ownerReference does not block the Job's
        Foreground deletion, so the garbage collector removes it only after the Job is gone. The worker's Role
        may not delete Services (infra/k8s/base/rbac.yaml), so wait for the collector, up to `delete_timeout`,
        then create this Job's. On attach, the Service may be missing (lost with an earlier crash): create it.
        """
        meta = job.get("metadata") or {}
        uid = meta.get("uid")
        for obj in objs[1:]:
            if uid:
                obj["metadata"]["ownerReferences"] = [manifests.job_owner(meta["name"], uid)]
            self._ensure_service(obj, uid, log)

    def _ensure_service(self, body: dict[str, Any], uid: str | None, log: Any) -> None:
        from kubernetes.client.exceptions import ApiException

        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        deadline = time.monotonic() + self.delete_timeout
        waited = False
        while True:
            existing = self._json(self.core.read_namespaced_service, name, namespace)
            if existing is not None and job_status.owned_by(existing, uid):
                return
            if existing is None:
                try:
                    self._create(self.core.create_namespaced_service, self.core.read_namespaced_service, namespace,
                                 body)
                    return
                except ApiException as exc:  # 409: a stale one showed up between the read and the create
                    if exc.status != 409 or time.monotonic() > deadline:
                        raise
            elif time.monotonic() > deadline:
                raise self._stale_service(existing, uid)
            elif not waited:
                waited = True
                log.info("waiting for the service %s/%s of an earlier job to be garbage-collected", namespace, name)
            self._sleep(self.poll_interval)

    def _stale_service(self, service: dict[str, Any], uid: str | None) -> TransientStageError:
        """Transient: the garbage collector is usually just slow; a rerun attaches to the Job and tries again."""
        meta = service["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        owners = sorted(job_status.owner_uids(service), key=str)
        return TransientStageError(
            f"service {namespace}/{name}, which the pods of job {namespace}/{name} need for their rendezvous, is "
            f"left from an earlier job (owner uids {owners or 'none'}, not this job's {uid}) and was not removed "
            f"within {self.delete_timeout:g} s. The garbage collector removes it once its job is gone; if it "
            f"stays (or has no owner), delete it: kubectl delete service -n {namespace} {name}. A rerun then "
            f"attaches to the job and creates the service.",
            stage=(meta.get("labels") or {}).get(manifests.LABEL_STAGE, ""))

    def _create(self, create: Callable[..., Any], read: Callable[..., Any], namespace: str, body: dict[str, Any],
                other_work: Callable[[dict[str, Any]], Exception] | None = None) -> dict[str, Any]:
        """Create an object, or take the one an earlier attempt made: when the API server acted but its answer
        was lost (a 503/504 on the way back), `_call`'s retry meets 409 AlreadyExists. Names come from the stage
        key, so a live object of that name with the same owner and work is the one this call made. One being
        deleted or owned by another Job (an earlier run's Service) is not taken: the 409 stands. One doing other
        work (another run's Job of the same name) raises `other_work(it)` when given, else the 409."""
        from kubernetes.client.exceptions import ApiException

        try:
            return json.loads(self._call(create, namespace, body, _preload_content=False).data)
        except ApiException as exc:
            existing = self._json(read, body["metadata"]["name"], namespace) if exc.status == 409 else None
            if existing is not None and other_work is not None and not job_status.same_work(existing, body):
                raise other_work(existing) from exc
            meta = (existing or {}).get("metadata") or {}
            if (existing is None or meta.get("deletionTimestamp")
                    or job_status.owner_uids(existing) != job_status.owner_uids(body)
                    or not job_status.same_work(existing, body)):
                raise
            return existing

    def _delete_job(self, jname: str, namespace: str, wait: bool = False) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            # Foreground: the Job disappears only after its pods, so a new Job of the same name never meets
            # the old one's pods. Not the Service, which does not block it: see _ensure_services.
            self._call(self.batch.delete_namespaced_job, jname, namespace, propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status != 404:
                raise
        deadline = time.monotonic() + self.delete_timeout
        while wait and (job := self._json(self.batch.read_namespaced_job, jname, namespace)) is not None:
            if time.monotonic() > deadline:
                raise self._stuck_deleting(job)
            self._sleep(self.poll_interval)

    def _stuck_deleting(self, job: dict[str, Any]) -> TransientStageError:
        """Transient: pods left on a lost node are usually collected within minutes, and then a rerun proceeds."""
        meta = job["metadata"]
        jname, namespace = meta["name"], meta["namespace"]
        stuck = [p["metadata"]["name"] for p in self._pods(jname, namespace, meta.get("uid"))]
        return TransientStageError(
            f"job {namespace}/{jname} is still being deleted after {self.delete_timeout:g} s; its pods "
            f"{', '.join(stuck) or '(none listed)'} are stuck terminating, often on a node that went away. A rerun "
            f"tries again; if they stay, check their node (kubectl get pods -n {namespace} -o wide) and, once "
            f"sure they stopped, force-delete them: kubectl delete pod -n {namespace} --grace-period=0 --force "
            f"{' '.join(stuck)}", stage=(meta.get("labels") or {}).get(manifests.LABEL_STAGE, ""))

    def _pods(self, jname: str, namespace: str, uid: str | None) -> list[dict[str, Any]]:
        """The pods of the Job `jname` with this `uid`, not those of an earlier same-named Job still being
        deleted (they carry the same labels), which would otherwise be taken for this Job's."""
        listing = self._json(self.core.list_namespaced_pod, namespace,
                             label_selector=f"{manifests.LABEL_JOB}={jname}") or {}
        # Filter again: the selector is the server's job, but a lax server (or test double) may ignore it.
        pods = [p for p in listing.get("items", [])
                if (p.get("metadata", {}).get("labels") or {}).get(manifests.LABEL_JOB) == jname
                and (uid is None or uid in job_status.owner_uids(p))]
        return sorted(pods, key=lambda p: p["metadata"]["name"])

    def _wait(self, name: str, key: str, jname: str, namespace: str, store: Any, log: Any) -> None:
        followers: dict[str, pod_logs.LogFollower] = {}
        stuck_since: dict[str, float] = {}
        pending_since: dict[str, float] = {}
        warned: set[str] = set()
        start = time.monotonic()
        try:
            while True:
                job = self._json(self.batch.read_namespaced_job, jname, namespace)
                if job is None:
                    raise TransientStageError(f"job {namespace}/{jname} of stage {name} disappeared while running",
                                              stage=name)
                pods = self._pods(jname, namespace, job["metadata"].get("uid"))
                for pod in pods:
                    self._inspect_pod(name, jname, namespace, pod, followers, stuck_since, warned, log)
                state = job_status.job_state(job)
                if state == "Complete":
                    pod_logs.drain(followers)
                    log.info("job %s/%s completed", namespace, jname)
                    return
                if state == "Failed":
                    pod_logs.drain(followers)
                    fetched = self._missing_tails(namespace, pods, followers, log)
                    raise self._failure(name, key, job, pods, pod_logs.tails(followers, fetched), store)
                if self.timeout and time.monotonic() - start > self.timeout:
                    self._delete_job(jname, namespace)
                    raise StageDeadlineExceeded(
                        f"stage {name}: job {namespace}/{jname} did not finish within {self.timeout:g} s; deleted it",
                        stage=name, logs=pod_logs.tails(followers))
                self._check_started(name, jname, namespace, pods, pending_since)
                self._sleep(self.poll_interval)
        finally:
            for f in followers.values():
                f.stop()

    def _inspect_pod(self, name: str, jname: str, namespace: str, pod: dict[str, Any],
                     followers: dict[str, "pod_logs.LogFollower"], stuck_since: dict[str, float], warned: set[str],
                     log: Any) -> None:
        pname = pod["metadata"]["name"]
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and pname not in warned:
                warned.add(pname)
                log.warning("%s: pod %s is not scheduled yet: %s", name, pname, cond.get("message") or cond.get("reason"))
        if status.get("phase") == "Failed" and job_status.disrupted(pod) and f"{pname}/disrupted" not in warned:
            warned.add(f"{pname}/disrupted")
            log.warning("%s: pod %s was evicted or preempted (%s); the stage resumes from its last checkpoint",
                        name, pname, status.get("message") or status.get("reason"))
        for cs in status.get("containerStatuses") or []:
            state = cs.get("state") or {}
            waiting = state.get("waiting") or {}
            reason = waiting.get("reason")
            if reason in job_status.IMAGE_PULL_REASONS | job_status.CONFIG_REASONS:
                since = stuck_since.setdefault(f"{pname}/{reason}", time.monotonic())
                if time.monotonic() - since >= self.image_pull_grace:
                    self._delete_job(jname, namespace)
                    detail = waiting.get("message") or reason
                    if reason in job_status.IMAGE_PULL_REASONS:
                        raise ImagePullError(
                            f"stage {name}: pod {pname} cannot pull image {cs.get('image')!r} ({reason}: {detail}); "
                            "check runtime.image and the registry credentials. Deleted job "
                            f"{namespace}/{jname}.", stage=name)
                    raise StageConfigError(
                        f"stage {name}: pod {pname} cannot start its container ({reason}: {detail}); a Secret or "
                        f"ConfigMap it reads is probably missing (infra/k8s/secrets.template.yaml). Deleted job "
                        f"{namespace}/{jname}.", stage=name)
            elif state.get("running") or state.get("terminated"):
                self._follow(name, namespace, pname, followers, bool(state.get("running")), log)

    def _follow(self, name: str, namespace: str, pname: str, followers: dict[str, "pod_logs.LogFollower"],
                running: bool, log: Any) -> None:
        """Follow a pod's log. When its stream ended while the container still runs (an API server restart, a
        load balancer's idle timeout), follow it again from where it stopped, up to `log_resumes` times."""
        old = followers.get(pname)
        if old is None:
            follower = pod_logs.LogFollower(self.core, pname, namespace, log, f"{name}/{pname}", self.tail_lines)
        elif not running or old.is_alive() or old.gave_up:
            return
        elif old.resumes >= self.log_resumes or not old.resumable:
            old.gave_up = True
            log.warning("[%s] log stream ended %d time(s) while the pod runs; no longer following it. Read it "
                        "with: kubectl logs -f -n %s %s", old.prefix, old.resumes + 1, namespace, pname)
            return
        else:
            log.info("[%s] log stream ended while the pod runs; reconnecting", old.prefix)
            follower = old.resumed()
        followers[pname] = follower
        follower.start()

    def _check_started(self, name: str, jname: str, namespace: str, pods: list[dict[str, Any]],
                       pending_since: dict[str, float]) -> None:
        """Delete the Job and fail when a pod (or, with none created, the Job) has waited `schedule_timeout` to
        start: unschedulable, stuck in ContainerCreating, or refused by a ResourceQuota."""
        if self.schedule_timeout is None:
            return
        now = time.monotonic()
        # Keyed by pod name; "" while the Job has no pod at all. A pod that started leaves the count.
        waiting = {"": None} if not pods else {p["metadata"]["name"]: p for p in pods if job_status.not_started(p)}
        for k in set(pending_since) - set(waiting):
            del pending_since[k]
        for k, pod in waiting.items():
            if now - pending_since.setdefault(k, now) < self.schedule_timeout:
                continue
            self._delete_job(jname, namespace)
            if pod is None:
                what = (f"no pod of job {namespace}/{jname} was created within {self.schedule_timeout:g} s (a "
                        f"ResourceQuota may refuse it: kubectl describe job -n {namespace} {jname})")
            else:
                what = (f"pod {pod['metadata']['name']} did not start within {self.schedule_timeout:g} s "
                        f"({job_status.why_pending(pod)})")
            raise StageStartTimeout(
                f"stage {name}: {what}; check the namespace's GPU quota and that runtime.node_selector and "
                f"runtime.tolerations match a node with free GPUs, or raise the runner's schedule_timeout if the "
                f"cluster is just busy. Deleted job {namespace}/{jname}.", stage=name)

    def _missing_tails(self, namespace: str, pods: list[dict[str, Any]], followers: dict[str, "pod_logs.LogFollower"],
                       log: Any) -> dict[str, list[str]]:
        """The last lines of each failed pod whose log stream gave none (it dropped, or the pod failed between
        two polls), read once without following, so the error still shows why the stage failed."""
        fetched: dict[str, list[str]] = {}
        for pod in job_status.newest(pods):
            pname = pod["metadata"]["name"]
            if (pod.get("status") or {}).get("phase") != "Failed" or (pname in followers and followers[pname].tail):
                continue
            try:
                resp = self._call(self.core.read_namespaced_pod_log, pname, namespace, container=manifests.CONTAINER,
                                  tail_lines=self.tail_lines, _preload_content=False)
                fetched[pname] = resp.data.decode(errors="replace").splitlines()[-self.tail_lines:]
            except Exception as exc:  # noqa: BLE001 - the failure itself matters more than its log
                log.warning("could not read the log of failed pod %s/%s: %s", namespace, pname, exc)
        return fetched

    def _failure(self, name: str, key: str, job: dict[str, Any], pods: list[dict[str, Any]], logs: str,
                 store: Any) -> Exception:
        """The clearest error for a failed Job, and whether retrying it makes sense (by its type)."""
        cond = next((c for c in (job.get("status") or {}).get("conditions") or []
                     if c.get("type") == "Failed" and c.get("status") == "True"), {})
        jname = job["metadata"]["name"]
        where = f"stage {name}: job {job['metadata'].get('namespace')}/{jname} failed"
        tail = f"\n--- last log lines ---\n{logs}" if logs else ""
        if cond.get("reason") == "DeadlineExceeded":
            return StageDeadlineExceeded(f"{where}: it ran past activeDeadlineSeconds ({cond.get('message', '')})",
                                         stage=name, logs=logs)
        # A replaced pod (preempted, ignored by the podFailurePolicy) stays listed; the Job failed because of
        # its replacement, so only the newest pod of each completion index tells why.
        pods = job_status.newest(pods)
        terminated = [t for pod in pods for t in job_status.terminations(pod)]
        for t in terminated:
            if t.get("reason") == "OOMKilled":
                limit = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].get("memory")
                return StageOOMKilled(
                    f"{where}: the container was OOMKilled at its memory limit {limit}; raise "
                    f"runtime.resources.{name}.memory (e.g. --set 'runtime.resources={{\"{name}\": {{\"memory\": "
                    f"\"64Gi\"}}}}') or lower the stage's batch size{tail}", stage=name, logs=logs)
        if any(job_status.disrupted(pod) for pod in pods):
            return TransientStageError(f"{where}: its pod was evicted or preempted; a rerun resumes from the last "
                                       f"checkpoint{tail}", stage=name, logs=logs)
        codes = sorted({t.get("exitCode") for t in terminated if t.get("exitCode") is not None})
        if 2 in codes:
            return StageConfigError(f"{where}: the stage rejected its arguments or config (exit code 2){tail}",
                                    stage=name, logs=logs)
        if EXIT_BUSY in codes or BUSY_PHRASE in logs:
            return TransientStageError(f"{where}: another process is running this stage into the same folder; "
                                       f"a retry, if attempts remain, finds it finished{tail}", stage=name, logs=logs)
        error, transient = marker_error(store, name, key)
        if transient:
            return TransientStageError(f"{where}: {error}{tail}", stage=name, logs=logs)
        if set(codes) & {137, 143}:
            return TransientStageError(f"{where}: the container was killed (exit codes {codes}), e.g. by a node "
                                       f"shutdown; a rerun resumes from the last checkpoint{tail}", stage=name, logs=logs)
        reason = f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".strip(": ")
        return StageFailed(f"{where} ({reason}; exit codes {codes or 'unknown'}){': ' + error if error else ''}{tail}",
                           stage=name, logs=logs)


def _conflict(existing: dict[str, Any], job: dict[str, Any]) -> "StageJobConflict":
    meta, mine = existing["metadata"], job_status.annotations(job)
    jname, namespace = meta["name"], meta.get("namespace") or job["metadata"]["namespace"]
    labels = meta.get("labels") or {}
    theirs = job_status.annotations(existing)
    if manifests.ANNOTATION_WORK in theirs:
        whose = (f"started by {theirs.get(manifests.ANNOTATION_STARTED_BY, 'an unknown user')} for artifacts "
                 f"{theirs.get(manifests.ANNOTATION_ARTIFACTS)}, image {theirs.get(manifests.ANNOTATION_IMAGE)}, "
                 f"data {theirs.get(manifests.ANNOTATION_DATA)}")
    else:
        whose = (f"started by an older kelix or by hand, without a {manifests.ANNOTATION_WORK} annotation; stage "
                 f"{labels.get(manifests.LABEL_STAGE)}, key {labels.get(manifests.LABEL_KEY)}")
    stage = (job["metadata"].get("labels") or {}).get(manifests.LABEL_STAGE, "")
    return StageJobConflict(
        f"stage {stage}: job {namespace}/{jname} already exists and runs other work ({whose}); this run wants "
        f"artifacts {mine.get(manifests.ANNOTATION_ARTIFACTS)}, image {mine.get(manifests.ANNOTATION_IMAGE)}, "
        f"data {mine.get(manifests.ANNOTATION_DATA)}. The name comes from the stage and its key only, so the two "
        f"collide. It was left alone (even with force: it is not this run's to delete). Wait for it to finish "
        f"and rerun, delete it if you are sure it is abandoned (kubectl delete job -n {namespace} {jname}), or "
        f"run in another namespace (--set runtime.namespace=NAME)", stage=stage)


def _cancellations() -> tuple[type[BaseException], ...]:
    """What cancels a run: Ctrl-C, a cancelled asyncio task, and a Prefect cancellation. Prefect's type is
    looked up only if prefect is already imported (it is slow to import, and nothing else raises it)."""
    kinds: tuple[type[BaseException], ...] = (KeyboardInterrupt, asyncio.CancelledError)
    signal = getattr(sys.modules.get("prefect.exceptions"), "TerminationSignal", None)
    return kinds + (signal,) if isinstance(signal, type) else kinds
