"""The paper's pairing rules for the correctness pipeline, as a pure function of one question.

MMPR (Sec. 3.2): responses whose final answer matches the ground truth are *chosen*, those with a
wrong answer *rejected*. Responses with no parsable final answer are kept apart as *format* pairs
(correct vs. unparsable), which teach the model to finish with an answer. A question whose samples
are all right, or all wrong, gives no pairs (there is nothing to contrast).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from mmpr_pipeline.records import stable_hash


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


def pair_correctness(responses: list[str], correct: list[bool], extracted: list[str | None], *,
                     qid: str, seed: int = 0, max_pairs_per_question: int = 15,
                     format_pairs: bool = True, unjudged: frozenset[int] = frozenset()) -> QuestionPairs:
    """`unjudged`: responses the judge could not rate; they are neither chosen nor rejected."""
    judged = [i for i in range(len(responses)) if i not in unjudged]
    if not judged:
        return QuestionPairs()
    right = [i for i in judged if correct[i]]
    wrong = [i for i in judged if not correct[i] and extracted[i] is not None]
    unparsable = [i for i in judged if not correct[i] and extracted[i] is None]
    out = QuestionPairs(all_right=len(right) == len(judged), all_wrong=not right)
    if out.all_right or out.all_wrong:
        return out
    out.correctness = _sample(_candidates(responses, right, wrong), max_pairs_per_question, seed, qid, "correctness")
    if format_pairs:
        out.format = _sample(_candidates(responses, right, unparsable), max_pairs_per_question, seed, qid, "format")
    return out
