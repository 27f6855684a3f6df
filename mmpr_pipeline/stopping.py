"""Stopping on SIGTERM as on Ctrl-C: SIGTERM is how Kubernetes, SLURM and spot instances end a job.

The first SIGTERM raises `Terminated` (a KeyboardInterrupt, so every path that cleans up after Ctrl-C
cleans up after it too) in the main thread; the command then ends the processes it started (`end_run`:
Ray's, the vLLM engine's, DataLoader workers) and exits with 143. A second SIGTERM ends them at once
and exits. Either way the run folder stays resumable: every file of it is written whole or not at all.
Ray's driver installs a SIGTERM handler of its own (a C++ stack trace, then an abort, with the
engine's processes left behind), so `install` runs again after `ray.init`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time

EXIT_CODE = 128 + signal.SIGTERM  # 143, as a shell reports a process ended by SIGTERM
GRACE_S = 5.0  # how long a process of the run gets to exit after SIGTERM before SIGKILL

_received = 0


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _on_sigterm(signum, frame) -> None:
    global _received
    _received += 1
    if _received == 1:
        raise Terminated()
    # A second SIGTERM: no more waiting on clean-up (the folder is resumable as it is).
    end_processes(descendants(), grace_s=0)
    os._exit(EXIT_CODE)


def install() -> None:
    """SIGTERM raises `Terminated` in the main thread (signal handlers can only be set there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def descendants() -> list:
    """Every process this one started, and the ones they started (psutil.Process objects)."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def end_processes(procs: list, grace_s: float = GRACE_S) -> None:
    """SIGTERM to each of `procs`, then SIGKILL to those still there after `grace_s`."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            if grace_s > 0:
                p.terminate()
            else:
                p.kill()
    _, alive = psutil.wait_procs(procs, timeout=grace_s if grace_s > 0 else 1.0)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=2.0)


def end_run() -> None:
    """End what this command started: its Ray (disconnected cleanly, so a cluster also ends the run's
    actors) and every process left under this one. The engine process of a Ray actor is no longer
    under this process once Ray has killed the actor, so the list is taken first."""
    procs = descendants()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        settle_before_ray_shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        # ray.shutdown puts SIGTERM back to the default action underneath Python (signal.getsignal
        # still names ours): a second SIGTERM from here on killed the command (-15) before it ended
        # the processes below. Set ours again, as after ray.init.
        install()
    end_processes([p for p in procs if p.is_running()])


RAY_DATA_EXECUTORS_WAIT_S = 10.0


def ray_data_executors() -> list[threading.Thread]:
    """Ray Data's streaming executors still running (each is a Thread of a class from ray.data). A
    closed stream's block prefetcher thread stays parked: it calls Ray only when handed blocks."""
    return [t for t in threading.enumerate() if type(t).__module__.startswith("ray.data")]


def settle_before_ray_shutdown(timeout_s: float = RAY_DATA_EXECUTORS_WAIT_S) -> None:
    """A thread that calls into Ray while `ray.shutdown` runs makes Ray end the whole process with exit
    code 1 ("The core worker has already been shutdown"), whatever the command meant to return: Ray
    Data's executor still scheduling, or the garbage collector freeing an object reference (an
    interrupted stream's frames hold many, in reference cycles) in any thread. So: free that garbage
    now, while Ray is up, and give the executors (stopped when the interrupted stream's iterator was
    closed) time to end."""
    gc.collect()
    deadline = time.monotonic() + timeout_s
    for t in ray_data_executors():
        t.join(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def ctrl_c_reaches_only_this_process():
    """Processes started inside the block ignore SIGINT (an ignored signal stays ignored across exec,
    and Python then installs no KeyboardInterrupt handler). A terminal's Ctrl-C goes to the whole
    process group: without this Ray's GCS, raylet and workers die of it at the moment the command
    starts cleaning up, and Ray's driver then ends the process with exit code 1 before it can say how
    to resume. With it the command alone receives Ctrl-C and ends them itself (`end_run`). The price:
    a Ctrl-C during the block itself (Ray's start, seconds) is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def deferred():
    """SIGTERM and SIGINT that arrive inside the block take effect when it ends: what it writes (a
    checkpoint) is finished first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda n, _f: caught.append(n)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            os.kill(os.getpid(), caught[0])  # now, to the handler the block ran under
