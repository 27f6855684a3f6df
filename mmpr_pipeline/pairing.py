"""The paper's pairing rules for the correctness pipeline, as a pure function of one question.

MMPR (Sec. 3.2): responses whose final answer matches the ground truth are *chosen*, those with a
wrong answer *rejected*. Responses with no parsable final answer are kept apart as *format* pairs
(correct vs. unparsable), which teach the model to finish with an answer. A question whose samples
are all right, or all wrong, gives no pairs (there is nothing to contrast).

Two options of InternVL's MMPR pipeline, both off by default:
- a reference rationale (a source's ground-truth worked solution, `fields.rationale`) joins the
  chosen candidates like one more correct sample, so even a question answered all wrong gives
  pairs; its pairs have chosen index REFERENCE (-1);
- `answer_fix` (InternVL's `--answer-fix`): a response judged correct carries, on its final-answer
  line or in its last box, the reference answer's own text ("Final answer: 3.0" -> "Final answer:
  3"); the rest of it stays byte-identical (fix_answer).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from mmpr_pipeline.records import stable_hash
from mmpr_pipeline.scoring.extract import all_boxed, clean, extract

REFERENCE = -1  # chosen index of a pair whose chosen is the source's reference rationale
FIX_TRIES = 5  # occurrences of the answer text tried, from the end (see fix_answer)


@dataclass
class QuestionPairs:
    correctness: list[tuple[int, int]] = field(default_factory=list)  # (chosen idx, rejected idx)
    format: list[tuple[int, int]] = field(default_factory=list)
    all_right: bool = False
    all_wrong: bool = False


def _candidates(responses: list[str], good: list[int], bad: list[int]) -> list[tuple[int, int]]:
    """Every (good, bad) combination, minus those whose chosen text is contained in the rejected
    one (the rejected would then repeat a right answer), de-duplicated by text."""
    seen, out = set(), []
    for c in good:
        for r in bad:
            chosen, rejected = responses[c].strip(), responses[r].strip()
            if not chosen or chosen in rejected or (chosen, rejected) in seen:
                continue
            seen.add((chosen, rejected))
            out.append((c, r))
    return out


def _sample(pairs: list[tuple[int, int]], k: int, seed: int, qid: str, kind: str) -> list[tuple[int, int]]:
    if len(pairs) <= k:
        return pairs
    rng = random.Random(stable_hash(seed, qid, kind))  # independent of order and of other questions
    return sorted(rng.sample(pairs, k))


def pair_correctness(
    responses: list[str],
    correct: list[bool],
    extracted: list[str | None],
    *,
    qid: str,
    seed: int = 0,
    max_pairs_per_question: int = 15,
    format_pairs: bool = True,
    unjudged: frozenset[int] = frozenset(),
    reference: str = "",
) -> QuestionPairs:
    """`unjudged`: responses the judge could not rate; they are neither chosen nor rejected.
    `reference`: a ground-truth worked solution, a chosen candidate like a correct sample (pairs
    with chosen index REFERENCE); all_right / all_wrong still describe the samples alone."""
    judged = [i for i in range(len(responses)) if i not in unjudged]
    if not judged:
        return QuestionPairs()
    right = [i for i in judged if correct[i]]
    wrong = [i for i in judged if not correct[i] and extracted[i] is not None]
    unparsable = [i for i in judged if not correct[i] and extracted[i] is None]
    out = QuestionPairs(all_right=len(right) == len(judged), all_wrong=not right)
    texts, good = responses, right
    if reference.strip():  # the reference is one more text, at index len(responses)
        texts, good = [*responses, reference], [*right, len(responses)]
    if out.all_right or not good:
        return out

    def pairs(bad: list[int], kind: str) -> list[tuple[int, int]]:
        found = _sample(_candidates(texts, good, bad), max_pairs_per_question, seed, qid, kind)
        return [(REFERENCE if c == len(responses) else c, r) for c, r in found]

    out.correctness = pairs(wrong, "correctness")
    if format_pairs:
        out.format = pairs(unparsable, "format")
    return out


def fix_answer(response: str, reference: str) -> str | None:
    """`response` with its final answer (what the judge read: the "Final answer:" line's answer, or
    the last `\\boxed{}`'s content) replaced by the reference answer's own text, every other byte
    as it was; None when there is nothing to change or the answer's place cannot be found exactly.

    The place is found by trying spans (the last box when the answer came from it, else the
    answer's raw text, last occurrences first) and keeping the first after which the judge's
    extraction reads exactly the reference: a wrong span is never rewritten."""
    reference = reference.strip()
    found = extract(response)
    if not reference or found.answer is None or found.source not in ("marker", "boxed"):
        return None
    spans: list[tuple[int, int]] = []
    boxes = all_boxed(response)
    if boxes and (found.source == "boxed" or "\\boxed" in found.segment or "\\fbox" in found.segment):
        content, _, end = boxes[-1]
        spans.append((end - 1 - len(content), end - 1))  # inside the braces: the box stays
    if found.source == "marker" and found.segment:
        at = len(response)
        for _ in range(FIX_TRIES):
            at = response.rfind(found.segment, 0, at)
            if at < 0:
                break
            spans.append((at, at + len(found.segment)))
    want = clean(reference)
    for start, end in spans:
        fixed = response[:start] + reference + response[end:]
        check = extract(fixed)
        if check.answer == want and check.source == found.source:
            return fixed if fixed != response else None
    return None


# -- DropoutNTP: the cut, and the pairs of a question whose prefixes were continued ---------------

_WORD = re.compile(r"\S+")


def prefix_of(text: str, words: int) -> str:
    """The text up to the end of its `words`-th whitespace-separated word, exactly as written."""
    for k, match in enumerate(_WORD.finditer(text), 1):
        if k == words:
            return text[: match.end()]
    return text


def truncate(text: str, ratio: float, min_words: int) -> tuple[str, int] | None:
    """(prefix, words kept): the text up to the end of its first int(N * ratio) whitespace-separated
    words, exactly as written (so prefix is a true prefix of text). None when text has fewer than
    `min_words` words, or the cut would keep nothing or everything."""
    words = list(_WORD.finditer(text))
    keep = int(len(words) * ratio)
    if len(words) < min_words or keep < 1 or keep >= len(words):
        return None
    return prefix_of(text, keep), keep


def pair_dropout(row: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """DropoutNTP (paper, Sec. 3.2) for one question: pairs (chosen = original, rejected = prefix +
    continuation) and counts of what was dropped."""
    counts = dict(too_short=0, continued=0, empty_continuation=0, identical=0)
    pairs = []
    for i, text in enumerate(row["responses"]):
        kept = row["prefix_words"][i]
        if kept < 0:
            counts["too_short"] += 1
            continue
        prefix = prefix_of(text, kept)
        continuation = row["continuations"][i]
        if not continuation.strip():
            counts["empty_continuation"] += 1
            continue
        counts["continued"] += 1
        if continuation.strip() == text[len(prefix) :].strip():
            counts["identical"] += 1
            continue
        pairs.append(
            dict(
                chosen=text,
                rejected=prefix + continuation,
                chosen_index=i,
                rejected_index=i,
                prefix_words=kept,
            )
        )
    return pairs, counts
