"""Each prompt template's own format rule (the `format:` key of `prompts/*.yaml`).

A response that breaks the rule of the template it was asked with is *format-failed*: the judge
gives it no extracted answer and the reason "wrong format", so the pipeline makes it the rejected
side of a "format" pair and never the chosen side of a correctness pair, whatever its answer.

- `final_answer_line` (cot_final_answer, cot_final_answer_zh, raw): the judge's own extraction, as
  calibrated on real models' responses (the last `Final answer:` / `答案:` / `最终答案：` line, then
  its fallbacks). It adds nothing: a response with no final answer at all is already a format pair.
- `boxed` (cot_boxed): the final answer is in a `\\boxed{...}` after any thinking; an answer given
  only in words ("Final answer: 5", "the answer is 5") breaks it.
- `think_then_boxed` (r1_think_boxed; InternVL's R1 prompt): exactly one `<think>...</think>` block,
  at the start of the response and not empty, then a `\\boxed{...}` answer after `</think>`. Two
  think blocks, none, one that never closes, text before it, or an answer only inside the thinking
  break it. Boxes inside the thinking are scratch work and are ignored.

`violation(rule, response)` says why a response breaks its rule ("" when it keeps it); only the
structure is checked here, the answer itself is the judge's business.
"""

from __future__ import annotations

import re

from mmpr_pipeline.scoring.extract import after_thinking, all_boxed

RULES = ("final_answer_line", "boxed", "think_then_boxed")
WRONG_FORMAT = "wrong format"  # Verdict.reason of a response that breaks its template's rule

_THINK_OPEN = re.compile(r"(?i)<think>")
_THINK_CLOSE = re.compile(r"(?i)</think>")


def _think_violation(response: str) -> str:
    opens, closes = list(_THINK_OPEN.finditer(response)), list(_THINK_CLOSE.finditer(response))
    if not opens and not closes:
        return "no <think> block"
    if len(opens) > 1 or len(closes) > 1:
        return "more than one <think> block"
    if not closes:
        return "<think> block never closed"
    if not opens or closes[0].start() < opens[0].start():
        return "</think> without <think>"
    if response[: opens[0].start()].strip():
        return "text before <think>"
    if not response[opens[0].end() : closes[0].start()].strip():
        return "empty <think> block"
    if not all_boxed(response[closes[0].end() :]):
        return "no \\boxed{} answer after </think>"
    return ""


def violation(rule: str, response: str) -> str:
    """Why `response` breaks format rule `rule`; "" when it keeps it."""
    if rule == "final_answer_line":
        return ""
    if rule == "boxed":
        answer_part = after_thinking(response)
        if answer_part is not None and not all_boxed(answer_part):
            return "no \\boxed{} answer"
        return ""  # an unclosed <think> has no answer at all: the judge's "no final answer"
    if rule == "think_then_boxed":
        return _think_violation(response)
    raise ValueError(f"unknown format rule {rule!r} (expected one of: {', '.join(RULES)})")
