"""Work units: the resumable pieces a build is cut into, and the counts each one reports.

A unit is a run of consecutive rows of one input (file) of one source. The driver plans units from
a scan of each input (row count and each row's qid, so duplicates across the whole source are known
before any unit is read); Ray workers read, sample, score, pair and write each unit on their own.
A unit is finished when its counts file (`samples/<source>/unit-XXXXX.json`) exists and names the
same plan (`key`): it is written last, after the unit's samples and pairs. The key covers the rows'
qids too, so a row edited in place (same row count) between a run and its resume redoes its unit.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpr_pipeline.records import stable_hash
from mmpr_pipeline.storage import as_path

PAIR_TYPES = ("correctness", "format", "dropout_ntp")
VERDICT_COUNTS = ("rules", "model", "undecided")
# asked: answers the judge model rated; cache_hits: of those, verdicts from an earlier batch or run;
# failed / off_format / disagreed: left undecided for that cause; both_decided / agree: rules and model
# both decided (correct or wrong), and how often the same way
JUDGE_MODEL_COUNTS = ("asked", "cache_hits", "failed", "off_format", "disagreed", "both_decided", "agree")
DROPOUT_COUNTS = ("sampled", "cut", "too_short", "continued", "empty_continuation", "identical")


@dataclass(frozen=True)
class WorkUnit:
    source: str
    unit: int  # index within the source
    path: str  # the input file ("" for generated and `datasets` sources)
    start: int  # first row within the input
    stop: int  # one past the last row within the input
    first_row: int  # index of row `start` in the whole source (for rejects and audit)
    byte_offset: int = 0  # JSON Lines: where row `start` begins
    duplicates: tuple[int, ...] = ()  # source row indices that repeat an earlier row's qid
    qids_digest: str = ""  # digest of the unit's rows' qids (None for a bad row), in order
    # (source row, first source, its row): rows showing an earlier row's image and question
    near_duplicates: tuple[tuple[int, str, int], ...] = ()
    benchmarks: str = ""  # identity of the benchmark index the unit's rows are checked against

    @property
    def key(self) -> str:
        """Identifies what the unit covers, its rows' content included: a resumed run redoes a unit
        whose plan or rows changed."""
        return stable_hash(
            "unit",
            self.source,
            self.path,
            self.start,
            self.stop,
            self.first_row,
            list(self.duplicates),
            self.qids_digest,
            *self._set_aside_plan(),
        )

    def _set_aside_plan(self) -> list[dict]:
        # in the key only when present, so units planned before these checks keep their key
        plan = {"near_duplicates": self.near_duplicates, "benchmarks": self.benchmarks}
        return [{k: v for k, v in plan.items() if v}] if any(plan.values()) else []

    def to_item(self) -> dict[str, Any]:
        return {"unit_plan": json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> WorkUnit:
        d = json.loads(item["unit_plan"])
        near = tuple(tuple(n) for n in d.get("near_duplicates", ()))
        return cls(**{**d, "duplicates": tuple(d["duplicates"]), "near_duplicates": near})


def plan_source(source, scans: list[dict[str, Any]], unit_size: int, earlier=None) -> list[WorkUnit]:
    """Units of `unit_size` rows over a source's scanned inputs, in order, up to `source.limit`
    rows; a row whose qid appeared earlier in the source is marked a duplicate, and, given
    `earlier` (decontam.EarlierRows, shared by the sources in recipe order), a row whose scan key
    repeats an earlier row's of any source is marked a near-duplicate of that row."""
    units: list[WorkUnit] = []
    seen: set[str] = set()
    first_row, remaining = 0, source.limit
    for scan in scans:
        qids = scan["qids"] if remaining is None else scan["qids"][:remaining]
        keys = scan.get("keys") or [None] * len(qids)
        for start in range(0, len(qids), unit_size):
            stop = min(start + unit_size, len(qids))
            duplicates, near = [], []
            for k in range(start, stop):
                if qids[k] is None:
                    continue
                if qids[k] in seen:
                    duplicates.append(first_row + k)
                elif earlier is not None and keys[k] is not None:
                    first = earlier.first(keys[k], source.name, first_row + k)
                    if first is not None:
                        near.append((first_row + k, *first))
                seen.add(qids[k])
            offsets = scan.get("offsets") or []
            units.append(
                WorkUnit(
                    source.name,
                    len(units),
                    scan["path"],
                    start,
                    stop,
                    first_row + start,
                    offsets[start // unit_size] if offsets else 0,
                    tuple(duplicates),
                    stable_hash(qids[start:stop]),
                    tuple(near),
                )
            )
        first_row += len(qids)
        if remaining is not None:
            remaining -= len(qids)
            if remaining <= 0:
                break
    return units


def unit_file(run_dir: str | Path, kind: str, source: str, unit: int, suffix: str = "parquet") -> Path:
    """samples/, pairs/ or rejects/<source>/unit-XXXXX.<suffix> (a Path, or an ObjectPath on S3)."""
    return as_path(run_dir) / kind / source / f"unit-{unit:05d}.{suffix}"


def counts_file(run_dir: str | Path, unit: WorkUnit) -> Path:
    return unit_file(run_dir, "samples", unit.source, unit.unit, "json")


def is_done(run_dir: str | Path, unit: WorkUnit) -> bool:
    path = counts_file(run_dir, unit)
    try:
        return json.loads(path.read_text()).get("key") == unit.key
    except (OSError, ValueError):
        return False


@dataclass
class SourceStats:
    """What one unit, or a whole source (the sum of its units), produced: the per-source part of
    stats.json."""

    rows: int = 0
    rejects: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    leaks: dict[str, int] = field(default_factory=dict)  # benchmark -> rows set aside as its leaks
    near_duplicates: int = 0  # rows set aside as near-duplicates of an earlier row
    questions: int = 0
    samples: int = 0
    engine_errors: int = 0
    correct: int = 0
    unparsable: int = 0
    judge_errors: int = 0  # responses the judge failed on (reason "judge error: ..."): never paired
    all_right: int = 0
    all_wrong: int = 0
    questions_with_pairs: int = 0
    same_text_pairs: int = 0  # pairs dropped: chosen and rejected the same text up to white space
    image_tokens: int = 0  # image tokens in the sampling prompts (> 0: the engine saw the images)
    pairs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PAIR_TYPES, 0))
    dropout: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROPOUT_COUNTS, 0))
    # who decided the correctness verdicts (rules / model / undecided), and the judge model's figures
    # (scoring/model_judge.py: verdict_counts)
    verdicts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICT_COUNTS, 0))
    judge_model: dict[str, int] = field(default_factory=lambda: dict.fromkeys(JUDGE_MODEL_COUNTS, 0))
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("sample", "continue", "score"), 0.0)
    )

    def add(self, other: SourceStats) -> SourceStats:
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            else:
                setattr(self, f.name, mine + theirs)
        return self

    def add_row(self, row: dict[str, Any], counts: dict[str, Any]) -> None:
        """Count one scored question and what pairing made of it (stages/pair.py's counts)."""
        self.questions += 1
        self.samples += len(row["responses"])
        self.engine_errors += bool(row["error"])
        self.correct += sum(row["correct"])
        self.unparsable += sum(1 for e in row["extracted"] if e is None)
        self.all_right += counts["all_right"]
        self.all_wrong += counts["all_wrong"]
        self.judge_errors += counts.get("judge_errors", 0)
        self.same_text_pairs += counts.get("same_text", 0)
        self.image_tokens += row.get("image_tokens") or 0
        self.questions_with_pairs += any(counts[k] for k in PAIR_TYPES)
        for kind in PAIR_TYPES:
            self.pairs[kind] += counts[kind]
        if "dropout" in counts:
            self.dropout["sampled"] += len(row["responses"])
            self.dropout["cut"] += sum(1 for k in row["prefix_words"] if k >= 0)
            for k, v in counts["dropout"].items():
                self.dropout[k] += v
        if row["pipeline"] == "correctness":
            from mmpr_pipeline.scoring.model_judge import verdict_counts

            verdicts, judged = verdict_counts(row)
            for k, v in verdicts.items():
                self.verdicts[k] += v
            for k, v in judged.items():
                self.judge_model[k] += v
        for key in self.seconds:
            self.seconds[key] += row[f"{key}_seconds"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


STAGE_TIMES = ("plan", "sample", "continue", "score", "pair", "write", "generate_wall", "shards", "total")


@dataclass
class BuildStats:
    """stats.json: what a build produced, per source (the sum of its units' counts files) and in
    total, and where its time went. The driver fills it from the units' counts files at commit."""

    recipe: str
    model: str
    fingerprint: str
    pipelines: dict[str, str]  # source -> correctness | dropout_ntp, in recipe order
    sources: dict[str, SourceStats] = field(default_factory=dict)
    all_wrong_qids: dict[str, list[str]] = field(default_factory=dict)
    # Wall seconds of the driver's steps; sample/continue/score are summed over questions instead.
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGE_TIMES, 0.0))
    shards: list[str] = field(default_factory=list)
    resume: dict[str, int] = field(default_factory=dict)
    created: str | None = None
    # benchmark -> {rows, images, unreadable} of the decontamination index (empty without one)
    benchmarks: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def for_recipe(cls, recipe) -> BuildStats:
        return cls(
            recipe=recipe.name,
            model=recipe.model,
            fingerprint=recipe.fingerprint(),
            pipelines={s.name: s.pipeline for s in recipe.sources},
            sources={s.name: SourceStats() for s in recipe.sources},
        )

    def add_unit(self, source: str, counts: dict[str, Any]) -> None:
        """One finished unit's counts file (stages/write.py)."""
        self.sources[source].add(SourceStats.from_dict(counts["stats"]))
        if counts["all_wrong_qids"]:
            self.all_wrong_qids.setdefault(source, []).extend(counts["all_wrong_qids"])
        self.seconds["pair"] += counts["pair_seconds"]
        self.seconds["write"] += counts["write_seconds"]

    def correct_rate(self, source: str) -> float | None:
        s = self.sources[source]
        return (
            round(s.correct / s.samples, 4) if self.pipelines[source] == "correctness" and s.samples else None
        )

    def to_dict(self) -> dict[str, Any]:
        """The stats.json layout the card, the preview, `mmpr publish` and users read."""
        per_source = {
            name: dict(pipeline=self.pipelines[name], correct_rate=self.correct_rate(name), **s.to_dict())
            for name, s in self.sources.items()
        }
        seconds = dict(self.seconds)
        for key in ("sample", "continue", "score"):
            seconds[key] = sum(s.seconds[key] for s in self.sources.values())
        totals = {
            key: sum(s[key] for s in per_source.values())
            for key in ("rows", "rejects", "questions", "samples")
        }
        totals["pairs"] = {kind: sum(s["pairs"][kind] for s in per_source.values()) for kind in PAIR_TYPES}
        totals["near_duplicates"] = sum(s.near_duplicates for s in self.sources.values())
        decontamination = {
            name: dict(index, set_aside=sum(s.leaks.get(name, 0) for s in self.sources.values()))
            for name, index in self.benchmarks.items()
        }
        return dict(
            recipe=self.recipe,
            model=self.model,
            fingerprint=self.fingerprint,
            created=self.created,
            sources=per_source,
            totals=totals,
            all_wrong_qids=self.all_wrong_qids,
            stage_seconds={k: round(v, 3) for k, v in seconds.items()},
            shards=self.shards,
            resume=self.resume,
            **({"decontamination": decontamination} if decontamination else {}),
        )
