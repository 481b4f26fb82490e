"""What a Job's and its pods' status say, read from the API's plain dicts: whether the Job ended and how,
which pods are the current attempt, why a pod has not started, whether it was evicted or preempted, and
whether an existing Job does the work this run wants (`manifests.ANNOTATION_WORK`)."""
from __future__ import annotations

import datetime
from typing import Any

from kelix.runners import manifests

IMAGE_PULL_REASONS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError"}
DISRUPTION_REASONS = {"Evicted", "Preempting", "PreemptionByScheduler", "EvictionByEvictionAPI",
                      "DeletionByTaintManager", "TerminationByKubelet", "DeletionByPodGC", "NodeLost", "Shutdown"}
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def job_state(job: dict[str, Any]) -> str | None:
    """"Complete", "Failed" or None (still running) from a Job's status."""
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "Complete"
        if cond.get("type") == "Failed":
            return "Failed"
    completions = (job.get("spec") or {}).get("completions") or 1
    if (status.get("succeeded") or 0) >= completions:
        return "Complete"
    return None


def created_at(obj: dict[str, Any]) -> float:
    """An object's creationTimestamp as a Unix time (0 when it has none, e.g. a lax test double)."""
    stamp = obj["metadata"].get("creationTimestamp")
    if not stamp:
        return 0.0
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def live(job: dict[str, Any]) -> bool:
    """Still running and not being deleted."""
    return job_state(job) is None and not (job.get("metadata") or {}).get("deletionTimestamp")


def owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    """Not being deleted, and owned by the object with this uid (any owner when the uid is unknown)."""
    return not (obj.get("metadata") or {}).get("deletionTimestamp") and (uid is None or uid in owner_uids(obj))


def owner_uids(obj: dict[str, Any]) -> set[str | None]:
    return {r.get("uid") for r in (obj.get("metadata") or {}).get("ownerReferences") or []}


def annotations(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def same_work(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether an existing object does the work `wanted` describes. A Job without the annotation (started by
    an older kelix) cannot be told apart from another run's, so it does not count as the same."""
    return annotations(existing).get(manifests.ANNOTATION_WORK) == annotations(wanted).get(manifests.ANNOTATION_WORK)


def terminations(pod: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        for state in (cs.get("state") or {}, cs.get("lastState") or {}):
            if state.get("terminated"):
                out.append(state["terminated"])
    return out


def disrupted(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("reason") in DISRUPTION_REASONS:
        return True
    return any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
               for c in status.get("conditions") or [])


def newest(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest pod(s) of each completion index (all pods of a non-indexed Job share one index)."""
    def index(pod: dict[str, Any]) -> str | None:
        meta = pod["metadata"]
        return (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (meta.get("labels") or {}).get(COMPLETION_INDEX)

    def created(pod: dict[str, Any]) -> str:
        # RFC 3339 in UTC as the API server writes it: the strings order like the times. Whole seconds, so
        # ties keep every tied pod; without timestamps (a lax test double) every pod counts.
        return pod["metadata"].get("creationTimestamp") or ""

    latest: dict[str | None, str] = {}
    for pod in pods:
        latest[index(pod)] = max(latest.get(index(pod), ""), created(pod))
    return [pod for pod in pods if created(pod) == latest[index(pod)]]


def not_started(pod: dict[str, Any]) -> bool:
    """Still Pending (unscheduled or creating its container), not being deleted, and not waiting on an image
    pull or a missing Secret, which have their own, shorter, grace (`image_pull_grace`)."""
    status = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") or status.get("phase") not in (None, "", "Pending"):
        return False
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if state.get("running") or state.get("terminated"):
            return False
        if (state.get("waiting") or {}).get("reason") in IMAGE_PULL_REASONS | CONFIG_REASONS:
            return False
    return True


def why_pending(pod: dict[str, Any]) -> str:
    """The scheduler's or kubelet's word on why a pod has not started."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"{cond.get('reason') or 'Unschedulable'}: {cond.get('message') or 'no reason given'}"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting:
            return ": ".join(filter(None, (waiting.get("reason"), waiting.get("message"))))
    return status.get("message") or status.get("reason") or "Pending"
