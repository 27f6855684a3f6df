"""Only our lines on the terminal during a build; Ray's and vLLM's go to RUN_DIR/logs/.

Ray's core worker writes its error lines straight to file descriptor 2 from C++ (e.g. Ray Data's
actor pool, whose constructor arguments sit in the object store, always gets a `core_worker.cc`
"max_restarts > 0" line), and Ray's Python loggers have their own stderr handlers; the engine's
processes write to Ray's session logs, which are never forwarded (`log_to_driver=False`). So while
a build runs, descriptor 2 points at RUN_DIR/logs/driver.log, our own log records, progress bars
and summary go to the terminal, and at the end the Ray session's logs of the build (the engine's
output among them) are copied to RUN_DIR/logs/ray/. `--verbose` leaves everything on the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

LOGS = "logs"  # under the run folder
DRIVER_LOG = "driver.log"
MAX_COPIED_LOG_BYTES = 50 * 2**20  # a longer Ray log stays in Ray's session folder only


def logs_dir(run: str | Path) -> Path:
    """RUN_DIR/logs; for a run on object storage a local folder (storage.local_twin): Ray's descriptor
    2 needs a file."""
    from mmpr_pipeline.storage import ObjectPath, as_path, local_twin

    run = as_path(run)
    return (local_twin(run) if isinstance(run, ObjectPath) else run) / LOGS


_terminal: TextIO | None = None  # where our own lines go while a build runs quietly


def terminal() -> TextIO:
    """The stream for our own lines (progress bars): the terminal, even while fd 2 goes to the logs."""
    return _terminal or sys.stderr


class RunLogs:
    """`start()` sends descriptor 2 (Ray's and vLLM's output in this process) to
    RUN_DIR/logs/driver.log and moves the root logger's stderr handlers, and `terminal()`, to the
    terminal; leaving the `with` block undoes it. Started only once the run folder is known to be
    ours; with `verbose` it does nothing."""

    def __init__(self, run: str | Path, verbose: bool = False):
        self.logs = logs_dir(run)
        self.verbose = verbose
        self.saved_fd: int | None = None
        self.moved: list[logging.StreamHandler] = []
        self.started_at = 0.0

    def __enter__(self) -> RunLogs:
        return self

    def start(self) -> None:
        global _terminal
        if self.verbose:
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        sys.stderr.flush()
        self.saved_fd = os.dup(2)
        log_fd = os.open(self.logs / DRIVER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        _terminal = os.fdopen(os.dup(self.saved_fd), "w", buffering=1)
        self.moved = [
            h
            for h in logging.getLogger().handlers
            if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__)
        ]
        for handler in self.moved:
            handler.setStream(_terminal)

    def __exit__(self, *exc) -> None:
        global _terminal
        if self.saved_fd is None:
            return
        _copy_ray_logs(self.logs, self.started_at)
        for handler in self.moved:
            handler.setStream(sys.stderr)
        _terminal.flush()
        sys.stderr.flush()
        os.dup2(self.saved_fd, 2)
        os.close(self.saved_fd)
        _terminal.close()
        _terminal, self.saved_fd = None, None


def _copy_ray_logs(logs: Path, since: float) -> None:
    """Copy this Ray session's worker and core-worker logs written since `since` (the engine's output
    among them) to RUN_DIR/logs/ray/; a copy, not a link, so the run folder stays self-contained."""
    import shutil

    try:
        import ray

        if not ray.is_initialized():
            return
        session_logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API
        target = logs / "ray"
        target.mkdir(exist_ok=True)
        for path in session_logs.glob("*"):
            if not path.is_file() or not path.name.startswith(("worker-", "python-core-", "raylet")):
                continue
            st = path.stat()
            if st.st_mtime >= since and 0 < st.st_size <= MAX_COPIED_LOG_BYTES:
                shutil.copyfile(path, target / path.name)
    except Exception:  # noqa: BLE001 - copying logs never fails a build (driver.log is there anyway)
        pass
