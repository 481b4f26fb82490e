"""The subprocess runner: each stage in a fresh `python -m kelix.stages run NAME` child process.

It isolates stages the way a pod does (own interpreter, own memory, a crash or leak ends with the process)
and exercises the exact entry point and config round trip the Kubernetes runner uses, on one machine. The
resolved config travels as a params file; the MLflow run id travels in the environment; the child's output
streams into the flow's log line by line.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kelix.rerun import EXIT_BUSY, force_args, up_to_date
from kelix.runners.base import (StageConfigError, StageFailed, TransientStageError, check_inputs, finished_result,
                                marker_error, params_yaml, skipped_result, stage_logger)

if TYPE_CHECKING:
    from kelix.config import KelixConfig
    from kelix.stages.run import StageResult
    from kelix.tracking import StageRun


class SubprocessRunner:
    kind = "subprocess"

    def __init__(self, python: str | None = None, env: dict[str, str] | None = None, tail_lines: int = 40,
                 timeout: float | None = None, module: str = "kelix.stages"):
        self.python = python or sys.executable
        # The entry module: `kelix.stages`, or a wrapper with the same command line (tests use one).
        self.module = module
        self.env = dict(env or {})
        self.tail_lines = tail_lines
        self.timeout = timeout

    def command(self, name: str, cfg: "KelixConfig", params_file: Path, data_dir: str | Path, artifacts: str,
                force: bool | float) -> list[str]:
        cmd = [self.python, "-m", self.module, "run", name, "--preset", cfg.preset, "--params", str(params_file),
               "--data", str(data_dir), "--artifacts", artifacts]
        return cmd + force_args(force)

    def run(self, name: str, cfg: "KelixConfig", data_dir: str | Path, artifacts: str, *, force: bool | float = False,
            tracking: "StageRun | None" = None) -> "StageResult":
        from kelix.artifacts import ArtifactStore
        from kelix.stages.keys import data_fingerprint, stage_keys

        store = ArtifactStore(artifacts)
        keys = stage_keys(cfg, data_fingerprint(data_dir), [name])
        key = keys[name]
        if up_to_date(store, name, key, force):
            return skipped_result(store, name, key)
        check_inputs(name, store, keys)
        log = stage_logger()
        env = {**os.environ, **self.env, **(tracking.env() if tracking else {}),
               "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        t0 = time.perf_counter()
        tail: collections.deque[str] = collections.deque(maxlen=self.tail_lines)
        with tempfile.TemporaryDirectory(prefix=f"kelix-{name}-") as tmp:
            params_file = Path(tmp) / "params.yaml"
            params_file.write_text(params_yaml(cfg))
            cmd = self.command(name, cfg, params_file, data_dir, artifacts, force)
            log.info("%s: %s", name, " ".join(cmd[1:]))
            # errors="replace": a stray non-UTF-8 byte in the child's output must not stop the reader thread.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    bufsize=1, start_new_session=True, errors="replace")
            # The output is read on a thread so that the timeout also stops a child that hangs without a word.
            reader = threading.Thread(target=_forward, args=(proc, name, tail, log), daemon=True)
            reader.start()
            try:
                rc = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _terminate(proc)
                reader.join(timeout=5)
                raise TransientStageError(
                    f"stage {name} (key {key}) ran past the runner's timeout of {self.timeout:g} s and was stopped; "
                    "a rerun resumes from its last checkpoint (raise the timeout if the stage needs longer)",
                    stage=name, logs="\n".join(tail)) from None
            except BaseException:
                # Interrupted (Ctrl-C, cancelled flow): stop the child's whole process group.
                _terminate(proc)
                raise
            # A grandchild that inherited the pipe can keep it open after the child exits: do not wait on it.
            reader.join(timeout=10)
        seconds = time.perf_counter() - t0
        if rc == 0:
            return finished_result(store, name, key, seconds)
        logs = "\n".join(tail)
        error, transient = marker_error(store, name, key)
        where = f"stage {name} (key {key}) exited with code {rc}"
        if rc < 0:
            sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
            raise TransientStageError(f"{where}: killed by {sig}; a rerun resumes from its last checkpoint",
                                      stage=name, logs=logs)
        if rc == 2:
            raise StageConfigError(f"{where}: the stage rejected its arguments or config\n{logs}", stage=name, logs=logs)
        if rc == EXIT_BUSY:
            raise TransientStageError(f"{where}: another process is running this stage (a retry, if attempts remain, "
                                      f"finds it finished)\n{logs}", stage=name, logs=logs)
        if transient:
            raise TransientStageError(f"{where}: {error}", stage=name, logs=logs)
        raise StageFailed(f"{where}: {error or 'see the log lines above'}\n{logs}", stage=name, logs=logs)


def _forward(proc: subprocess.Popen, name: str, tail: collections.deque, log) -> None:
    """Stream the child's output into the flow's log, keeping the last lines for the error message."""
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        try:
            log.info("[%s] %s", name, line)
        except Exception:  # noqa: BLE001 - a failing log handler must not stop the draining (the child would block)
            pass


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
