"""The judge's regression suite (tests/data/judge_corpus.jsonl) and the two figures it must keep.

Each case is a model response with a label: should the judge call it correct? The suite is the
judge's own development set, so agreement on it is a regression check, not an accuracy estimate.
The two figures that matter for preference data:
- pair safety: responses labelled correct that the judge calls wrong *with an extracted answer*.
  Each one would become a *rejected* response beside a correct one (a response without an answer
  only feeds format pairs). Must be 0.
- false accepts: responses labelled wrong that the judge calls correct (a wrong *chosen*). Must be 0.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    pair_unsafe: list = field(default_factory=list)  # ids: labelled correct, judged wrong with an answer
    false_accepts: list = field(default_factory=list)  # ids: labelled wrong, judged correct
    disagreements: list = field(default_factory=list)  # (id, note, verdict) of every disagreement

    def table(self) -> str:
        lines = [
            f"  {t:16} {good:4d}/{n:<4d} {good / n:7.1%}" for t, (good, n) in sorted(self.per_type.items())
        ]
        lines.append(f"  {'all':16} {self.agree:4d}/{self.cases:<4d} {self.agree / max(self.cases, 1):7.1%}")
        return "\n".join(lines)

    def figures(self) -> str:
        return (
            "pair safety (labelled correct, judged wrong with an extracted answer): "
            f"{len(self.pair_unsafe)}\n"
            f"false accepts (labelled wrong, judged correct): {len(self.false_accepts)}"
        )

    def as_dict(self) -> dict:
        return {
            "cases": self.cases,
            "agree": self.agree,
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
    object with .correct and .extracted) and count agreement and the two figures."""
    report = SuiteReport()
    for r in rows:
        v = judge_fn(r["response"], r["answer"], r["answer_type"], r["options"])
        ok = v.correct == r["expected"]
        report.cases += 1
        report.agree += ok
        report.per_type[r["answer_type"]][0] += ok
        report.per_type[r["answer_type"]][1] += 1
        if r["expected"] and not v.correct and v.extracted is not None:
            report.pair_unsafe.append(r["id"])
        if v.correct and not r["expected"]:
            report.false_accepts.append(r["id"])
        if not ok:
            report.disagreements.append((r["id"], r.get("note", ""), v))
    return report
