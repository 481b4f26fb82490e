"""Following a pod's log into the flow's log, and taking over a dropped stream where it broke off."""
from __future__ import annotations

import collections
import datetime
import re
import threading
import time
from typing import Any

from kelix.runners import manifests

# A resumed log stream asks for this much more than it lost; the repeated lines are skipped by timestamp.
LOG_RESUME_SLACK = 30
# RFC 3339 at the start of a line, as the kubelet writes it with timestamps=True, then one space.
_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) ")


def drain(followers: dict[str, "LogFollower"]) -> None:
    for f in followers.values():
        f.join(timeout=10)


def tails(followers: dict[str, "LogFollower"], fetched: dict[str, list[str]] | None = None) -> str:
    """The followers' last lines, with those `fetched` for pods whose follower got none."""
    by_pod = {name: list(f.tail) for name, f in followers.items()}
    by_pod.update(fetched or {})
    return "\n".join(f"[{name}] {line}" for name, lines in by_pod.items() for line in lines)


def split_timestamp(line: str) -> tuple[tuple[int, int] | None, str]:
    """The kubelet's timestamp (asked for with timestamps=True) as (epoch seconds, nanoseconds), and the line
    without it. None when the line has none (a server that ignored the option)."""
    match = _TIMESTAMP.match(line)
    if not match:
        return None, line
    zone = "+00:00" if match[3] == "Z" else match[3]
    seconds = int(datetime.datetime.fromisoformat(match[1] + zone).timestamp())
    return (seconds, int((match[2] or "0").ljust(9, "0"))), line[match.end():]


class LogFollower(threading.Thread):
    """Streams one pod's log into the flow's logger (follow=True until the container ends).

    Lines come with the kubelet's timestamps, so a follower that takes over after a dropped stream (`resumed`)
    asks only for the last while (since_seconds) and skips the lines already emitted: those older than the
    last one, and as many of its own time as were emitted.
    """

    def __init__(self, core: Any, pod: str, namespace: str, log: Any, prefix: str, tail_lines: int,
                 after: "LogFollower | None" = None):
        super().__init__(name=f"logs-{pod}", daemon=True)
        self.core, self.pod, self.namespace, self.log, self.prefix = core, pod, namespace, log, prefix
        self.tail: collections.deque[str] = after.tail if after else collections.deque(maxlen=tail_lines)
        self.resumes = after.resumes + 1 if after else 0
        # The kubelet's time of the last whole line emitted, how many lines had that time, and when the last
        # one arrived (monotonic): where a resumed stream picks up.
        self.last: tuple[int, int] | None = after.last if after else None
        self.at_last = after.at_last if after else 0
        self.last_at = after.last_at if after else 0.0
        self._repeats = self.at_last  # lines of time `last` the resumed stream sends again
        self.error: Exception | None = None
        self.gave_up = False
        self._resp: Any = None

    def resumed(self) -> "LogFollower":
        """A follower (not started) that continues this one's ended stream."""
        return LogFollower(self.core, self.pod, self.namespace, self.log, self.prefix, self.tail.maxlen or 0, self)

    @property
    def resumable(self) -> bool:
        """False when the API server refused the stream (403, 404...): asking again would not help."""
        status = getattr(self.error, "status", None)
        return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))

    def _since(self) -> dict[str, int]:
        if self.last is None:
            return {}  # nothing emitted yet: all of it
        # Generous, as repeated lines are skipped but missed ones are lost: the longer of the time since the
        # last line arrived and its age by its own timestamp (the stream may have stalled before it dropped),
        # plus slack for the clocks of this host and the node.
        lag = max(time.monotonic() - self.last_at, time.time() - self.last[0])
        return {"since_seconds": int(lag) + LOG_RESUME_SLACK}

    def run(self) -> None:
        try:
            self._resp = self.core.read_namespaced_pod_log(self.pod, self.namespace, container=manifests.CONTAINER,
                                                           follow=True, timestamps=True, _preload_content=False,
                                                           **self._since())
            buf = b""
            for chunk in self._resp.stream(4096):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._line(line)
            if buf:
                self._line(buf, whole=False)
        except Exception as exc:  # noqa: BLE001 - a lost log stream must not fail the stage
            self.error = exc
            if self._resp is not False:
                self.log.warning("[%s] log stream ended: %s", self.prefix, exc)

    def _line(self, raw: bytes, whole: bool = True) -> None:
        when, line = split_timestamp(raw.decode(errors="replace").rstrip("\r"))
        if when is not None and self.last is not None:
            if when < self.last:
                return
            if when == self.last and self._repeats > 0:
                self._repeats -= 1
                return
        # A line cut off by a dropped stream is emitted but not counted: the resumed stream sends it whole.
        if when is not None and whole:
            self.at_last = self.at_last + 1 if when == self.last else 1
            self.last, self.last_at = when, time.monotonic()
        self._emit(line)

    def _emit(self, line: str) -> None:
        self.tail.append(line)
        self.log.info("[%s] %s", self.prefix, line)

    def stop(self) -> None:
        resp, self._resp = self._resp, False
        if resp:
            try:
                resp.close()
            except Exception:  # noqa: BLE001
                pass
