"""The judge's regression suite (tests/data/judge_corpus.jsonl) and the two figures it must keep.

Each case is a model response with a label: should the judge call it correct? The suite is the
judge's own development set, so agreement on it is a regression check, not an accuracy estimate.
The two figures that matter for preference data:
- pair safety: responses labelled correct that the judge calls wrong *with an extracted answer*.
  Each one would become a *rejected* response beside a correct one (a response without an answer
  only feeds format pairs). Must be 0.
- false accepts: responses labelled wrong that the judge calls correct (a wrong *chosen*). Must be 0.
An undecided verdict (scoring.undecided) is neither: it makes no pair. Agreement counts the decided
verdicts that match their label; the decided share is how many the rules ruled on at all.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mmpr_pipeline.scoring.modes import undecided

# The styles of real models' final answers in the suite (see the corpus's "style" field).
REAL_MODEL_STYLES = frozenset(
    {
        "internvl-final",
        "internvl-answer",
        "internvl-boxed",  # InternVL2.5/3: "Final answer:", "Answer:", boxed
        "qwen25vl-boxed",
        "qwen25vl-display",  # Qwen2.5-VL: \boxed{}, \[ \boxed{} \]
        "llava-final",
        "minerva",  # LLaVA / Minerva: "The final answer is ..."
        "r1-think",
        "chinese",  # R1 <think>...</think>; 最终答案
    }
)


@dataclass
class SuiteReport:
    cases: int = 0
    agree: int = 0
    per_type: dict = field(default_factory=lambda: collections.defaultdict(lambda: [0, 0]))
    undecided: int = 0  # verdicts the rules left open (no pair either way)
    pair_unsafe: list = field(default_factory=list)  # ids: labelled correct, judged wrong with an answer
    false_accepts: list = field(default_factory=list)  # ids: labelled wrong, judged correct
    disagreements: list = field(default_factory=list)  # (id, note, verdict) of every disagreement

    def table(self) -> str:
        lines = [
            f"  {t:16} {good:4d}/{n:<4d} {good / n:7.1%}" for t, (good, n) in sorted(self.per_type.items())
        ]
        lines.append(f"  {'all':16} {self.agree:4d}/{self.cases:<4d} {self.agree / max(self.cases, 1):7.1%}")
        return "\n".join(lines)

    @property
    def decided(self) -> int:
        return self.cases - self.undecided

    def figures(self) -> str:
        return (
            f"decided: {self.decided}/{self.cases} ({self.decided / max(self.cases, 1):.1%}), "
            f"of which agree with the label: {self.agree}\n"
            "pair safety (labelled correct, judged wrong with an extracted answer): "
            f"{len(self.pair_unsafe)}\n"
            f"false accepts (labelled wrong, judged correct): {len(self.false_accepts)}"
        )

    def as_dict(self) -> dict:
        return {
            "cases": self.cases,
            "agree": self.agree,
            "decided": self.decided,
            "undecided": self.undecided,
            "pair_unsafe": self.pair_unsafe,
            "false_accepts": self.false_accepts,
            "per_type": {t: {"agree": a, "cases": n} for t, (a, n) in sorted(self.per_type.items())},
        }


def load_corpus(path: str | Path) -> list[dict]:
    """The suite's cases; a bad line raises a one-line error naming the file and line."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: not a JSON object ({e})") from None
        missing = {"id", "answer_type", "response", "answer", "options", "expected"} - row.keys()
        if missing:
            raise ValueError(f"{path}:{number}: missing key(s) {', '.join(sorted(missing))}")
        rows.append(row)
    return rows


def run_suite(rows: list[dict], judge_fn: Callable) -> SuiteReport:
    """Judge every case with `judge_fn(response, answer, answer_type, options)` (a Verdict-like
    object with .correct, .extracted and .reason) and count agreement, the decided share and the
    two figures. Per type: (decided and agreeing, cases)."""
    report = SuiteReport()
    for r in rows:
        v = judge_fn(r["response"], r["answer"], r["answer_type"], r["options"])
        open_ = undecided(getattr(v, "reason", ""))
        ok = not open_ and v.correct == r["expected"]
        report.cases += 1
        report.undecided += open_
        report.agree += ok
        report.per_type[r["answer_type"]][0] += ok
        report.per_type[r["answer_type"]][1] += 1
        if r["expected"] and not v.correct and v.extracted is not None and not open_:
            report.pair_unsafe.append(r["id"])
        if v.correct and not r["expected"]:
            report.false_accepts.append(r["id"])
        if not ok and not open_:
            report.disagreements.append((r["id"], r.get("note", ""), v))
    return report
