"""The driver's reads at commit and at export, before and after a change, in one command.

    python benchmarks/bench_driver_memory.py [--before DIR] [--repeat 3]

Each measurement is a fresh process's peak (VmHWM, mmpr_pipeline/peak_memory.py) running one
checkout's code (this one, and with `--before` another, e.g. `git archive` of an older commit):
- rejects: `pipeline.write_rejects_file` of a source with 10, 40 and 80 units of rejects (0.9 MB of
  excerpts each): the peak over the process's imports;
- export: `mmpr export`'s TRL and InternVL writers on a 15 MB shard of 40 units (one row group each,
  real JPEGs) after warming up on a 2-unit shard: the rise of each.
Shapes from tests/test_driver_memory.py. Raw output: benchmarks/results/bench_driver_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_driver_memory import EXPORT, _phases, _photo_shard, _reject_units  # noqa: E402

from mmpr_pipeline import peak_memory  # noqa: E402

REJECTS = """
import sys
from pathlib import Path
from mmpr_pipeline import peak_memory
from mmpr_pipeline.pipeline import write_rejects_file

peak_memory.phase_end("import")
write_rejects_file(Path(sys.argv[1]), "photos")
peak_memory.phase_end("write")
"""


def measure(repo: Path, script: str, args: list[str], tmp: Path) -> dict:
    log = tmp / "peaks.jsonl"
    log.unlink(missing_ok=True)
    r = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=repo,
        env=dict(os.environ, **{peak_memory.ENV: str(log)}),
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise SystemExit(f"{repo}: {r.stderr[-2000:]}")
    return _phases(log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, default=None, help="checkout of the code before the change")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/bench_driver_memory.json")
    args = ap.parse_args()
    repos = {"after": REPO} | ({"before": args.before} if args.before else {})
    result: dict = dict(repeat=args.repeat, before=str(args.before), rejects={}, export={})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for units in (10, 40, 80):
            _reject_units(tmp / f"run-{units}", units)
        small, large = tmp / "small.parquet", tmp / "large.parquet"
        _photo_shard(small, 2)
        _photo_shard(large, 40)
        for name, repo in repos.items():
            rejects = {}
            for units in (10, 40, 80):
                rises = []
                for _ in range(args.repeat):
                    p = measure(repo, REJECTS, [str(tmp / f"run-{units}")], tmp)
                    rises.append(round(p["write"]["peak_mib"] - p["import"]["rss_mib"], 1))
                rejects[units] = rises
                print(f"{name:6} rejects, {units:2} units: peak over imports {rises} MiB", flush=True)
            export = {"trl": [], "internvl": []}
            for k in range(args.repeat):
                out = tmp / f"out-{name}-{k}"
                p = measure(repo, EXPORT, [str(small), str(large), str(out)], tmp)
                export["trl"].append(round(p["trl"]["peak_mib"] - p["warm"]["rss_mib"], 1))
                export["internvl"].append(round(p["internvl"]["peak_mib"] - p["trl"]["rss_mib"], 1))
            for fmt, rises in export.items():
                print(f"{name:6} export {fmt:8} of a 15 MB shard (40 units): rise {rises} MiB", flush=True)
            result["rejects"][name], result["export"][name] = rejects, export
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
