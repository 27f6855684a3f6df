"""How tests and benchmarks run `mmpr build`: in a process of its own (`start`, `run`), or in the test's
own process on the session's Ray (`in_session`).

A process of its own is for what only a process shows: a kill (MMPR_KILL_AT, see shards.kill_point),
a signal, a dead engine, its own Ray start, its exit code and printed output. It costs a Ray start,
the driver's imports and fresh Ray workers (about a minute of suite time more than `in_session`), so
a build that nothing kills or signals runs in the session instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def command(recipe, out, *, model=None, sets=(), limit=None, args=()) -> list[str]:
    """`python -m mmpr_pipeline.cli build RECIPE --out OUT [--model] [--limit] [--set KEY=VALUE ...] ARGS`."""
    cmd = [sys.executable, "-m", "mmpr_pipeline.cli", "build", str(recipe), "--out", str(out)]
    if model is not None:
        cmd += ["--model", str(model)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    cmd += [a for s in sets for a in ("--set", s)]
    return cmd + [str(a) for a in args]


def environment(
    kill_at: str | None = None, ray_address: str | None = None, env: dict | None = None, repo: Path = REPO
) -> dict:
    """This process's environment without what a test or the session leaves in it (MMPR_* such as
    MMPR_KILL_AT, RAY_ADDRESS): the build starts its own local Ray unless `ray_address` names one, and
    is killed at `kill_at` if given. Offline, 1 GiB of KV cache, `repo`'s code; `env` adds (or, with
    None, removes)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("MMPR_") and k != "RAY_ADDRESS"}
    out.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    if kill_at:
        out["MMPR_KILL_AT"] = kill_at
    if ray_address:
        out["RAY_ADDRESS"] = ray_address
    for k, v in (env or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def start(
    recipe,
    out,
    log: Path,
    *,
    model=None,
    sets=(),
    limit=None,
    args=(),
    kill_at=None,
    ray_address=None,
    env=None,
) -> subprocess.Popen:
    """The build running, its output (stdout and stderr) going to `log` (a file the test may read while
    it runs: a pipe nobody reads would stall it). In a new session: `kill_group` reaches every process
    it started, and a signal to the group is what a terminal's Ctrl-C sends."""
    with open(log, "w") as f:
        return subprocess.Popen(
            command(recipe, out, model=model, sets=sets, limit=limit, args=args),
            cwd=REPO,
            env=environment(kill_at, ray_address, env),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to what is left of the build's process group (Ray's helpers after a kill)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run(
    recipe,
    out,
    *,
    model=None,
    sets=(),
    limit=None,
    args=(),
    kill_at=None,
    ray_address=None,
    env=None,
    timeout: float | None = 900,
    repo: Path = REPO,
) -> subprocess.CompletedProcess:
    """The build run to its end (a kill at `kill_at` ends it too) with `repo`'s code (a benchmark may
    time another checkout); its output (stdout and stderr together) in `.stdout`. Whatever it leaves
    running is killed."""
    cmd = command(recipe, out, model=model, sets=sets, limit=limit, args=args)
    proc = subprocess.Popen(
        cmd,
        cwd=repo,
        env=environment(kill_at, ray_address, env, repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def in_session(request, recipe, out, *, model=None, sets=(), limit=None) -> dict:
    """The same build in this process, on the session's local Ray (conftest's `ray_local`): what
    `mmpr build` does after its checks, without a process, Ray and engine workers of its own. Returns
    the stats `pipeline.build` returned (and wrote to stats.json)."""
    from mmpr_pipeline import pipeline
    from mmpr_pipeline import recipe as recipe_mod

    request.getfixturevalue("ray_local")
    overrides = recipe_mod.parse_overrides(list(sets))
    if model is not None:
        overrides["model"] = str(model)
    if limit is not None:
        overrides["limit"] = limit
    return pipeline.build(recipe_mod.load(recipe, overrides), out)
