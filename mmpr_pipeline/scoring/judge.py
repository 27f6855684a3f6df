"""`judge(response, answer, answer_type, options=None)`: one verdict per sampled response."""

from __future__ import annotations

import functools
import re
import time
from dataclasses import asdict, dataclass

from mmpr_pipeline.recipe import ANSWER_TYPES
from mmpr_pipeline.scoring.extract import NO_ANSWER, clean, extract, last_boxed
from mmpr_pipeline.scoring.format_rules import WRONG_FORMAT, violation
from mmpr_pipeline.scoring.modes import AMBIGUOUS, SCORERS, UNDECIDED, score_math, undecided

DEFAULT_TIMEOUT = 2.0  # seconds; bounds the symbolic check, the only step that can take long


@dataclass(frozen=True, slots=True)
class Verdict:
    extracted: str | None  # the final answer found (an option letter, "Yes"/"No", else the text); None: none
    correct: bool  # False whenever extracted is None
    score: float  # in [0, 1]; graded for vqa / chart / document, else 0 or 1
    reason: str  # one of mmpr_pipeline.scoring.REASONS
    format_ok: bool  # rationale, then a single final-answer line (the paper's format)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def undecided(self) -> bool:
        """The rules could not rule (scoring.undecided(reason)): neither chosen nor rejected."""
        return undecided(self.reason)


_JOINED_BOXES = re.compile(
    r"\}[ \t]*(?:,|\\text\{[ \t]*(?:and|or)[ \t]*\}|\b(?:and|or)\b|\\quad)*[ \t]*"
    r"(?=\\boxed)"
)


@functools.lru_cache(maxsize=8192)
def _clean_reference(answer: str) -> str:
    """References get the same undressing as responses ("$\\frac{1}{2}$", "Inc.", "**B**").
    A reference with several boxes ("\\boxed{(2,2)} \\text{and} \\boxed{(6,2)}") is all of them."""
    if answer.count("\\boxed") > 1:
        joined = _JOINED_BOXES.sub("}, ", answer)
        while (box := last_boxed(joined)) is not None:
            joined = joined[: box[1]] + box[0] + joined[box[2] :]
        answer = joined
    return clean(answer) or answer.strip()


def _math_reference(answer: str) -> str:
    """A maths reference given as a worked solution (MATH's `solution`, a Minerva transcript) is
    its final answer, found as in a response."""
    if "\n" in answer.strip() or len(answer) > 200:
        found = extract(answer)
        if found.answer is not None:
            return found.answer
    return answer


def _as_list(answer, answer_type: str = "") -> list[str]:
    if answer is None:
        answers = []
    elif isinstance(answer, (str, int, float)):
        answers = [str(answer)]
    else:
        answers = [str(a) for a in answer if a is not None]  # list, tuple, numpy array
    if answer_type == "math":
        answers = [_math_reference(a) for a in answers]
    answers = [_clean_reference(a) for a in answers if a.strip()]
    if not answers:
        raise ValueError(f"judge: the reference answer is empty ({answer!r})")
    return answers


def judge(
    response: str,
    answer,
    answer_type: str,
    options=None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    format_rule: str | None = None,
) -> Verdict:
    """Judge one model `response` against the reference `answer` (a string or a list of
    acceptable answers; VQA's list of annotator answers) for `answer_type` (see
    mmpr_pipeline.recipe.ANSWER_TYPES). `options` are the multiple-choice option texts in letter
    order (A, B, ...). Returns within `timeout` seconds (plus microseconds) in any thread, once
    the math server is up (see safe_math.warm_up). `format_rule` is the prompt template's format
    rule (scoring.format_rules); a response that breaks it is judged "wrong format", with no answer.
    """
    if answer_type not in SCORERS:
        raise ValueError(
            f"judge: unknown answer_type {answer_type!r} (expected one of: {', '.join(ANSWER_TYPES)})"
        )
    if not isinstance(response, str):
        raise TypeError(f"judge: response must be a string, got {type(response).__name__}")
    golds = _as_list(answer, answer_type)
    options = [str(o) for o in options] if options is not None else []
    deadline = time.monotonic() + timeout

    if format_rule is not None and violation(format_rule, response):
        return Verdict(None, False, 0.0, WRONG_FORMAT, False)
    found = extract(response)
    if found.answer is None:
        if answer_type == "math" and found.reason == NO_ANSWER and found.segment:
            # no marker, but a last line with maths ("Therefore $x \\geq 5$ is the solution."):
            # counted only when it is right; otherwise it stays a response without a final answer
            outcome = score_math(clean(found.segment), golds, options, deadline, segment=found.segment)
            if outcome.correct:
                return Verdict(outcome.extracted, True, outcome.score, outcome.reason, False)
        return Verdict(None, False, 0.0, found.reason, False)
    scorer = SCORERS[answer_type]
    if answer_type == "math":
        outcome = score_math(found.answer, golds, options, deadline, segment=found.segment)
    else:
        outcome = scorer(found.answer, golds, options, deadline)
    states = {_state(outcome)}
    for other in found.others:  # a box beside the "Final answer:" line
        states.add(_state(scorer(other, golds, options, deadline)))
    if {"correct", "wrong"} <= states:  # two different final answers, one right: a hedge
        return Verdict(found.answer, False, 0.0, AMBIGUOUS, found.format_ok)
    if len(states) > 1:  # one of them undecided: so is the response
        return Verdict(found.answer, False, outcome.score, UNDECIDED, found.format_ok)
    return Verdict(outcome.extracted, outcome.correct, outcome.score, outcome.reason, found.format_ok)


def _state(outcome) -> str:
    return "undecided" if undecided(outcome.reason) else "correct" if outcome.correct else "wrong"
