"""Select a run's prompts by pass rate: `mmpr select RUN_DIR --pass-rate LO:HI --out DIR` (or `--all-wrong`).

A question's pass rate is its sampled accuracy: of its responses the judge ruled on, the share judged
correct (responses it could not rule on, stages/pair.undecided, count for neither side, as in
pairing). `samples/` already holds every verdict, so selection needs no engine. MMPR-Tiny keeps the
prompts with a pass rate in 0.2-0.8 for online RL: the model solves them sometimes, so they still
have something to teach; `--all-wrong` keeps those never solved (hard-prompt mining).

The selection is a dataset of questions, not pairs: `DIR/data/train-XXXXX-of-YYYYY.parquet` with the
columns a recipe's `parquet` loader reads by default (`image`, a list of images; `question`, the
source question before templating; `answer`; `answer_type`; `options`; `task`) plus `answers`,
`rationale`, the pass rate and its counts, and the `datasets` features in the Parquet metadata, so
`load_dataset("parquet", data_dir="DIR/data")` decodes the images. `DIR/selection.json` says what was
selected from which run. Only correctness sources have a pass rate; DropoutNTP sources are skipped.

It streams: one unit file of `samples/` at a time (its verdict columns first, the images only of the
rows kept), written out in parts, so memory does not grow with the run.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmpr_pipeline.records import IMAGE_STRUCT
from mmpr_pipeline.run_status import finished_unit_files, partial_note, status
from mmpr_pipeline.scoring.modes import undecided
from mmpr_pipeline.shards import staging_folder
from mmpr_pipeline.storage import as_path, parquet_source

PART_ROWS = 5000  # questions per output part
PART_BYTES = 256 * 2**20  # and about this many bytes of images
MARKER = "selection.json"
VERDICT_COLUMNS = ["qid", "source", "pipeline", "error", "correct", "reason"]
QUESTION_COLUMNS = [
    "qid",
    "source",
    "task",
    "images",
    "question",
    "answer",
    "answers",
    "answer_type",
    "options",
    "rationale",
]

SELECTION_SCHEMA = pa.schema(
    [
        ("qid", pa.string()),  # the question's id in the run it was selected from
        ("source", pa.string()),  # its source in that run
        ("task", pa.string()),
        ("image", pa.list_(IMAGE_STRUCT)),  # the question's images (a recipe's default `fields.image`)
        ("question", pa.string()),  # the source question, before the prompt template
        ("answer", pa.string()),
        (
            "answers",
            pa.list_(pa.string()),
        ),  # every acceptable answer (`fields: {answer: answers}` keeps them all)
        ("answer_type", pa.string()),
        ("options", pa.list_(pa.string())),
        ("rationale", pa.string()),  # the source's reference worked solution, "" when none
        ("pass_rate", pa.float64()),  # n_correct / n_judged
        ("n_correct", pa.int64()),
        ("n_judged", pa.int64()),  # responses the judge ruled on
    ]
)


class SelectError(ValueError):
    """Bad arguments or a run folder that cannot be read; the message names which and why."""


def parse_band(text: str) -> tuple[float, float]:
    """`LO:HI` (e.g. `0.2:0.8`) as two numbers with 0 <= LO <= HI <= 1."""
    lo, sep, hi = str(text).partition(":")
    try:
        band = float(lo), float(hi)
    except ValueError:
        band = None
    if not sep or band is None:
        raise SelectError(f"--pass-rate {text!r}: expected LO:HI, two numbers between 0 and 1 (e.g. 0.2:0.8)")
    if not (0 <= band[0] <= band[1] <= 1):
        raise SelectError(f"--pass-rate {text!r}: need 0 <= LO <= HI <= 1")
    return band


def pass_rate(correct: list[bool], reason: list[str]) -> tuple[int, int]:
    """(correct, judged) of one question's responses; unrated responses count for neither."""
    judged = [ok for ok, why in zip(correct, reason) if not undecided(why)]
    return sum(bool(ok) for ok in judged), len(judged)


@dataclass
class Rated:
    """One unit file's correctness questions that have a pass rate: (row, correct, judged) each."""

    path: Path
    rows: list[tuple[int, str, str, int, int]] = field(
        default_factory=list
    )  # (row, qid, source, correct, judged)
    unrated: dict[str, int] = field(default_factory=dict)  # source -> questions without one
    responses: dict[str, int] = field(default_factory=dict)  # source -> responses (no engine error)
    undecided: dict[str, int] = field(default_factory=dict)  # source -> of those, left undecided


def rate_units(run_dir: str | Path) -> Iterator[Rated]:
    """Each finished unit file of RUN_DIR/samples/, with the pass rate of each correctness question in
    it (from the verdict columns only: no image is read). Questions with an engine error or no rated
    response have none. A unit a stopped build left unfinished is not read (run_status)."""
    files = finished_unit_files(run_dir, "samples")
    for path in files:
        try:
            table = pq.read_table(parquet_source(path), columns=VERDICT_COLUMNS)
        except (OSError, pa.ArrowException) as e:
            raise SelectError(f"{path}: cannot be read as a samples unit file ({e})") from None
        rated = Rated(path)
        for i, row in enumerate(table.to_pylist()):
            if row["pipeline"] != "correctness":
                continue
            n_correct, n_judged = pass_rate(row["correct"] or [], row["reason"] or [])
            if not row["error"]:  # what the pass rates leave out: responses the judge did not rule on
                n = len(row["correct"] or [])
                rated.responses[row["source"]] = rated.responses.get(row["source"], 0) + n
                rated.undecided[row["source"]] = rated.undecided.get(row["source"], 0) + n - n_judged
            if row["error"] or not n_judged:
                rated.unrated[row["source"]] = rated.unrated.get(row["source"], 0) + 1
                continue
            rated.rows.append((i, row["qid"], row["source"], n_correct, n_judged))
        yield rated


@functools.cache
def selection_schema() -> pa.Schema:
    """SELECTION_SCHEMA with its `datasets` features (`image` as a list of `Image`) in the metadata."""
    from datasets import Features, Image, List

    features = Features.from_arrow_schema(SELECTION_SCHEMA)
    features["image"] = List(Image())
    return SELECTION_SCHEMA.with_metadata(
        {b"huggingface": json.dumps({"info": {"features": features.to_dict()}}).encode()}
    )


def _kept_rows(path: Path, keep: list[tuple[int, str, str, int, int]]) -> list[dict]:
    """The kept questions of one unit file, read whole (images included) for those rows only."""
    names = set(pq.read_schema(parquet_source(path)).names)
    table = pq.read_table(parquet_source(path), columns=[c for c in QUESTION_COLUMNS if c in names]).take(
        [k[0] for k in keep]
    )
    out = []
    for row, (_, qid, _, n_correct, n_judged) in zip(table.to_pylist(), keep):
        assert row["qid"] == qid, f"{path}: rows moved while reading"
        out.append(
            dict(
                qid=qid,
                source=row["source"],
                task=row["task"] or "",
                image=[{"bytes": b, "path": None} for b in row["images"] or []],
                question=row["question"],
                answer=row["answer"],
                answers=row["answers"] or [row["answer"]],
                answer_type=row["answer_type"],
                options=row["options"] or [],
                rationale=row.get("rationale") or "",
                pass_rate=n_correct / n_judged,
                n_correct=n_correct,
                n_judged=n_judged,
            )
        )
    return out


class _Parts:
    """Writes rows into data/part files of at most PART_ROWS rows / about PART_BYTES, one at a time."""

    def __init__(self, folder: Path):
        self.folder, self.paths, self.writer, self.rows, self.bytes = folder, [], None, 0, 0

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self.writer is None or self.rows >= PART_ROWS or self.bytes >= PART_BYTES:
            self.close()
            self.paths.append(self.folder / f"part-{len(self.paths):05d}.parquet")
            self.writer = pq.ParquetWriter(self.paths[-1], selection_schema(), compression="zstd")
        table = pa.Table.from_pylist(rows, schema=selection_schema())
        self.writer.write_table(table)
        self.rows += table.num_rows
        self.bytes += table.nbytes

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer, self.rows, self.bytes = None, 0, 0

    def name_like_the_hub(self) -> list[str]:
        """Rename the parts train-XXXXX-of-YYYYY.parquet; none when nothing was selected (`datasets`
        cannot load a split without rows, so an empty file would only fail later)."""
        self.close()
        names = []
        for i, path in enumerate(self.paths):
            names.append(f"data/train-{i:05d}-of-{len(self.paths):05d}.parquet")
            path.rename(self.folder.parent / names[-1])
        return names


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SelectError(f"--out {out}: is a file or a link; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise SelectError(f"--out {out}: is not empty; give a new or empty folder (nothing was changed)")
    from mmpr_pipeline.preflight import first_file_above

    blocker = first_file_above(out)
    if blocker is not None:
        raise SelectError(f"--out {out}: {blocker} is a file, so no folder can be made under it")


def _write_selected(
    run_dir: Path, data: Path, band: tuple[float, float] | None, all_wrong: bool
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Stream the run's rated units, writing the selected questions' rows under `data`; returns the
    per-source counts and the shards' names (Hub naming)."""
    lo, hi = band if band is not None else (0.0, 0.0)
    per_source: dict[str, dict[str, int]] = {}

    def counts(source: str) -> dict[str, int]:
        return per_source.setdefault(source, dict(questions=0, selected=0, below=0, above=0, unrated=0))

    parts = _Parts(data)
    for rated in rate_units(run_dir):
        for source, n in rated.unrated.items():
            counts(source)["questions"] += n
            counts(source)["unrated"] += n
        keep = []
        for item in rated.rows:
            _, _, source, n_correct, n_judged = item
            rate, c = n_correct / n_judged, counts(source)
            c["questions"] += 1
            if (n_correct == 0) if all_wrong else (lo <= rate <= hi):
                keep.append(item)
                c["selected"] += 1
            else:
                c["below" if not all_wrong and rate < lo else "above"] += 1
        if keep:
            parts.write(_kept_rows(rated.path, keep))
    return per_source, parts.name_like_the_hub()


def select(
    run_dir: str | Path, out: str | Path, *, band: tuple[float, float] | None = None, all_wrong: bool = False
) -> dict:
    """Write the questions of `run_dir` whose pass rate lies in `band` (both ends included), or with
    `all_wrong` those never answered right, to `out`; return the summary also written to selection.json."""
    if (band is None) == (not all_wrong):
        raise SelectError("give either --pass-rate LO:HI or --all-wrong")
    run_dir, out = as_path(run_dir), Path(out).absolute()  # the run may be on S3, `out` is local
    if not (run_dir / "samples").is_dir():
        raise SelectError(f"{run_dir}: no samples/ folder (is this the folder of an `mmpr build`?)")
    _check_out(out)
    run_status = status(run_dir)
    if not run_status.finished:  # select what is there, and say it is a part
        print(partial_note(run_status), file=sys.stderr)
    with staging_folder(out, SelectError) as tmp:
        (tmp / "data").mkdir()
        per_source, shards = _write_selected(run_dir, tmp / "data", band, all_wrong)
        summary = dict(
            run_dir=str(run_dir.resolve()),
            selection="all-wrong" if all_wrong else "pass-rate",
            pass_rate=None if all_wrong else list(band),
            questions=sum(c["questions"] for c in per_source.values()),
            selected=sum(c["selected"] for c in per_source.values()),
            run_finished=run_status.finished,  # false: from the finished units of a stopped build
            sources=per_source,
            shards=shards,
        )
        (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    return summary


def format_summary(summary: dict, out: Path) -> str:
    """Per source: questions with a pass rate, how many were selected, how many fell below / above."""
    what = (
        "all wrong"
        if summary["selection"] == "all-wrong"
        else "pass rate {}-{}".format(*summary["pass_rate"])
    )
    if not summary["selected"]:
        lines_end = [f"no question matched ({what}): {out / 'data'} is empty"]
    else:
        lines_end = [
            f"selected {summary['selected']} of {summary['questions']} questions ({what}) into {out}",
            f'load with: load_dataset("parquet", data_dir="{out / "data"}", split="train"), or a recipe '
            f"source `loader: parquet`, `path: {out / 'data'}`, `fields: {{answer_type: answer_type}}`",
        ]
    lines = [f"{'source':<20} {'questions':>9} {'selected':>8} {'below':>6} {'above':>6} {'no rate':>7}"]
    for name, c in summary["sources"].items():
        lines.append(
            f"{name:<20} {c['questions']:>9} {c['selected']:>8} {c['below']:>6} {c['above']:>6} "
            f"{c['unrated']:>7}"
        )
    return "\n".join(lines + lines_end)


def cli_select(args) -> int:
    """`mmpr select RUN_DIR (--pass-rate LO:HI | --all-wrong) --out DIR`."""
    band = parse_band(args.pass_rate) if args.pass_rate is not None else None
    summary = select(args.run_dir, args.out, band=band, all_wrong=args.all_wrong)
    print(format_summary(summary, Path(args.out)))
    return 0
