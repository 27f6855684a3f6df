"""The run folder: made by this tool (marked), owned by one recipe, used by one build at a time.

`prepare_run_dir` refuses a folder that is not ours or was built with another recipe (unless
--overwrite, which removes only what the tool made); `run_lock` holds the folder for the build: an
flock on a local folder, a conditionally written lock object on object storage (object_lock.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

from mmpr_pipeline import shards
from mmpr_pipeline.errors import RunFolderError
from mmpr_pipeline.recipe import Recipe, to_json
from mmpr_pipeline.storage import ObjectPath, as_path, remove_tree

log = logging.getLogger(__name__)

RUN_MARKER = ".mmpr-run"  # marks a folder as a run folder made by this tool
LOCK_FILE = ".mmpr-lock"
TOOL_DIRS = ("samples", "pairs", "rejects", "data", "figures")  # what a run folder holds of ours


def check_run_dir(run: Path) -> None:
    """--out is missing, empty, or a run folder this tool made (marked by RUN_MARKER)."""
    run = as_path(run)
    if run.exists() and not run.is_dir():
        raise RunFolderError(f"--out {run} is a file, not a folder")
    if run.is_dir() and any(p.name != LOCK_FILE for p in run.iterdir()) and not (run / RUN_MARKER).exists():
        raise RunFolderError(
            f"--out {run} is not empty and is not a run folder of mmpr; "
            f"give a new or empty folder (nothing in {run} was changed)"
        )


def prepare_run_dir(run: Path, recipe: Recipe, overwrite: bool) -> None:
    """A run folder is missing, empty or made by this tool, and belongs to one recipe: resuming with a
    changed recipe would mix outputs. Only files the tool made are ever removed."""
    run = as_path(run)
    check_run_dir(run)
    recipe_file = run / "recipe.json"
    if recipe_file.exists():
        try:
            old = json.loads(recipe_file.read_text())
        except ValueError:
            old = None
        if old != json.loads(to_json(recipe)):
            if not overwrite:
                changed = (
                    sorted(
                        k for k in set(old) | set(recipe.to_dict()) if old.get(k) != recipe.to_dict().get(k)
                    )
                    if isinstance(old, dict)
                    else ["recipe.json is unreadable"]
                )
                raise RunFolderError(
                    f"{run} was built with a different recipe (changed: {', '.join(changed)}). "
                    f"Use another --out, or --overwrite to discard its samples and start over."
                )
            log.warning("--overwrite: discarding the samples in %s", run)
            for sub in TOOL_DIRS:
                remove_tree(run / sub)
    run.mkdir(parents=True, exist_ok=True)
    (run / RUN_MARKER).write_text(
        "made by mmpr-pipeline; its samples/, pairs/, rejects/, data/ are rebuilt by it\n"
    )
    for sub in TOOL_DIRS:  # temporary files of a run that was killed mid-write (ours only)
        for tmp in (run / sub).rglob(".*.tmp") if (run / sub).is_dir() else []:
            tmp.unlink()
    shards.write_text(recipe_file, to_json(recipe))


class RunLock:
    """One process per run folder: a second `mmpr build` on the same --out is refused, naming the
    process that holds it. The lock is an flock, so it goes away with its process, even on kill -9."""

    def __init__(self, run: Path):
        self.path = Path(run) / LOCK_FILE
        self.fh = None

    def __enter__(self) -> RunLock:
        check_run_dir(self.path.parent)  # never create a lock in a folder that is not ours
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise RunFolderError(
                f"{self.path.parent} is in use by {holder}; wait for it, or use another --out"
            ) from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"mmpr build (pid {os.getpid()})")
        self.fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def run_lock(run):
    """The build's lock on `run`: an flock in a local folder (RunLock), a lock object created with a
    conditional write on object storage (object_lock.py)."""
    if isinstance(run, ObjectPath):
        from mmpr_pipeline.object_lock import ObjectRunLock

        check_run_dir(run)  # never create a lock in a folder that is not ours
        return ObjectRunLock(run)
    return RunLock(run)
