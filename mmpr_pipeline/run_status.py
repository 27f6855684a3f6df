"""Whether a run folder is finished, for the commands that read one: `select`, `preview`, `export`, `train`.

A unit is finished when its counts file (`samples/<source>/unit-XXXXX.json`) is there: a build writes
it after the unit's samples and pairs. A build is finished when `stats.json` is there, no unit file
lacks its counts file and no build holds the folder: a build removes `stats.json` when it starts and
writes it after every unit and shard. A run that is not finished (killed, stopped, still running) is
read in one of two ways, each said in one line:

- `select` and `preview` use its finished units only (a look at a part, said to be a part);
- `export` and `train` refuse it: a dataset or model made from part of a run would pass for the whole.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from mmpr_pipeline.run_folder import LOCK_FILE
from mmpr_pipeline.storage import as_path

STATS_FILE = "stats.json"


RUN_MARKER = ".mmpr-run"


@dataclass
class RunStatus:
    run_dir: Path
    units: int  # unit files of samples/ (a unit not begun has none)
    done: int  # of them, finished (with a counts file)
    has_stats: bool
    holder: str | None  # "mmpr build (pid N)" while a build holds the folder

    @property
    def finished(self) -> bool:
        return self.has_stats and self.done == self.units and self.holder is None

    def why(self) -> str:
        """Why the run is not finished, in words."""
        if self.holder:
            return f"{self.holder} is still building it"
        parts = [f"{self.done} of {self.units} started work units are finished"] if self.units else []
        if not self.has_stats:
            parts.append(f"it has no {STATS_FILE} (a build was stopped before its end)")
        return "; ".join(parts) or "it is not finished"


def build_holder(run_dir: Path) -> str | None:
    """Who holds the run folder's build lock now (run_folder.RunLock), or None."""
    from mmpr_pipeline.storage import ObjectPath

    if isinstance(run_dir, ObjectPath):
        from mmpr_pipeline import object_lock

        return object_lock.holder(run_dir)
    try:
        fh = open(Path(run_dir) / LOCK_FILE)
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = fh.read().strip() or "another process"
            return None if holder.endswith(f"(pid {os.getpid()})") else holder  # the build itself
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def counts_file_of(unit_file: Path) -> Path:
    """The counts file of the unit that RUN/<kind>/<source>/unit-XXXXX.parquet belongs to."""
    unit_file = as_path(unit_file)
    return unit_file.parents[2] / "samples" / unit_file.parent.name / f"{unit_file.stem}.json"


def finished_unit_files(run_dir: str | Path, kind: str = "samples", source: str = "*") -> list[Path]:
    """Unit files of `kind` (samples, pairs) of finished units (of `source`), by source then unit."""
    files = sorted((as_path(run_dir) / kind).glob(f"{source}/unit-*.parquet"))
    return [f for f in files if counts_file_of(f).is_file()]


def status(run_dir: str | Path) -> RunStatus:
    run_dir = as_path(run_dir)
    units = sorted((run_dir / "samples").glob("*/unit-*.parquet"))
    return RunStatus(
        run_dir=run_dir,
        units=len(units),
        done=sum(counts_file_of(f).is_file() for f in units),
        has_stats=(run_dir / STATS_FILE).is_file(),
        holder=build_holder(run_dir),
    )


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder `path` is (or whose data/ folder it is), or None when it is not one of mmpr's."""
    p = as_path(path)
    for candidate in (p, p.parent) if p.name == "data" else (p,):
        if (candidate / RUN_MARKER).is_file():
            return candidate
    return None


def not_finished_error(run_dir: Path, st: RunStatus, what: str) -> str:
    """The one line of a command that refuses an unfinished run."""
    return (
        f"{run_dir} is not a finished run ({st.why()}): {what} would stand for the whole run; "
        "run the same `mmpr build` again to finish it first"
    )


def partial_note(st: RunStatus) -> str:
    """The one line of a command that reads the finished units of an unfinished run."""
    return (
        f"note: {st.run_dir} is not a finished run ({st.why()}): "
        f"using its {st.done} finished work unit(s) only"
    )
