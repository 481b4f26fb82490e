"""When a finished stage runs again: `force` as a point in time, and outputs that are out of date.

`force` is True ("now") or a Unix time. Outputs finished before it are redone, later ones are kept, so a retry
of a forced stage (a flow retry, a replaced pod with its command baked in) keeps what the forced run finished.
Outputs are also out of date when an input was rerun after they were made (`ArtifactStore.stale_inputs`).
Light on purpose: the orchestrator and the Kubernetes manifests use it without importing torch.
"""
from __future__ import annotations

import time

from kelix.artifacts import SUCCESS, ArtifactStore

Force = bool | float

# `kelix stage run`'s exit code when another process is running the same stage into the same folder (EX_TEMPFAIL):
# the runners retry it later, when the other run has finished and this one finds its outputs.
EXIT_BUSY = 75
# Part of that refusal's message. Under torchrun the exit code does not survive (torchrun exits 1 when a rank
# fails), so a runner that sees only the pod's exit code finds the refusal in its log instead.
BUSY_PHRASE = "is already running from"


def force_cutoff(force: Force | None) -> float | None:
    if force is True:
        return time.time()
    if force is False or force is None:
        return None
    return float(force)


def force_args(force: Force | None) -> list[str]:
    """The `kelix stage run` flags that carry `force` to a child process or pod."""
    if force is True:
        return ["--force"]
    return [] if force_cutoff(force) is None else ["--force-before", repr(float(force))]


def up_to_date(store: ArtifactStore, name: str, key: str, force: Force | None = None) -> bool:
    """Finished, from the runs of its inputs in the store now, intact, and not forced (finished before the cutoff).

    Intact: its files still have the sizes the marker recorded (`ArtifactStore.damaged`); a damaged stage runs
    again."""
    status = store.status(name, key) or {}
    if status.get("status") != SUCCESS or store.stale_inputs(name, key):
        return False
    if store.damaged(name, key):
        return False
    cutoff = force_cutoff(force)
    return cutoff is None or float(status.get("time") or 0) >= cutoff
