"""The answer judge: `judge(response, answer, answer_type, options=None) -> Verdict`.

In the correctness pipeline the verdict *is* the label: a correct response becomes a chosen one,
a wrong one a rejected one, and a response without a final answer a "format" pair. The rules say
only what they know: a verdict is correct, wrong, or undecided (`undecided(reason)`,
`Verdict.undecided`; `correct` is then False), and an undecided response is neither chosen nor
rejected (stages/pair.py) and counts for no pass rate (selection.py); a judge model may decide it.

Answer types (mmpr_pipeline.recipe.ANSWER_TYPES) and how each is scored:
- `multiple_choice`: the option letter, in any dress (B, (B), B., B) text, **B**, option B) or
  the option's text; reference: the letter. Two letters (a hedge) are wrong.
- `number`: numeric equality; 1/2 = 0.5 = \\frac{1}{2} = 50% (when the reference is a fraction of
  one); thousands separators, signs, units, degrees, scientific notation; a decimal with two or
  more places may be the reference rounded to those places (0.33 for 1/3), nothing looser.
- `yes_no`: yes / no, any case and punctuation.
- `text`: free_form.py: the same text after normalisation (case, punctuation, articles, white
  space), number, date or time is correct; a different yes/no, single letter, date, time, number
  (same words around it, or a bare reference), basic colour, or a swapped contrast (left/right) is
  wrong; anything else (a paraphrase, a longer answer, a reordered list, a unit written another
  way, a synonym) is undecided.
- `math`: symbolic equivalence with math-verify (github.com/huggingface/Math-Verify, on sympy):
  expressions, intervals, sets, matrices, `x = 3` against `3`, `x \\geq 5` against `[5, \\infty)`;
  when the final answer is a sentence ("The largest $n$ is 34.") or holds several boxes,
  math-verify's own extraction (boxed first, then LaTeX and plain numbers) reads the raw
  final-answer segment. A decimal equals a value when both agree to 6 decimal places (stated
  precision, as math-verify's float_rounding=6: 0.0833333333 = 1/12; 0.33 != 1/3); a decimal
  comma (1000,99) is read as a decimal point. Bounded and isolated (safe_math.py).
- `vqa`: VQA accuracy, min(1, #annotators agreeing / 3) averaged leave-one-out, with the
  official answer normalisation (Antol et al. 2015, "VQA: Visual Question Answering";
  github.com/GT-Vision-Lab/VQA); an annotator also agrees when the free-form rules say correct
  ("Yes, it is." for "yes"). Correct when >= 3 annotators agree (score >= 0.9 of 10); wrong when
  the rules are sure for every annotator's answer; else undecided ("partial match" when 1-2 agree).
- `chart`: ChartQA relaxed accuracy, numbers within 5% of the reference (Masry et al. 2022,
  "ChartQA"; as in pix2struct's `relaxed_correctness`); whole years must be exact; a number
  outside it with a unit or scale ("1.5 million") is undecided; other answers as `text`.
- `document`: as `text`, with ANLS (1 - normalised Levenshtein distance, 0 below 0.5; Biten et al.
  2019, DocVQA) as the graded score; a high ANLS alone is undecided ("partial match"): it cannot
  tell an OCR slip from another word or digit ("March 4, 2019" for "March 3, 2019": wrong).
A single letter never equals another letter under any type ("E" is not "d", also in `math`).

Verdict.reason is one of these stable strings (REASONS):
- "correct", "wrong answer";
- undecided (UNDECIDED_REASONS): "undecided" (the rules cannot tell), "partial match" (graded
  modes: 0 < score, not sure), "unparsable answer" (no letter, number or yes/no found where the
  type needs one), "math check timed out", "math check failed";
- "no final answer", "answer too long": nothing usable was found, `extracted` is None; the
  pipeline makes these "format" pairs;
- "wrong format": the response breaks its prompt template's format rule (`judge(...,
  format_rule=...)`, see format_rules.py: two think blocks, an answer outside its box ...);
  `extracted` is None, and the pipeline makes it a "format" pair's rejected side;
- "ambiguous answer": the response names two different final answers (a hedge between options
  or values, two different boxes side by side, or a response's only box disagreeing with its
  later Final answer line; several earlier boxes are intermediate results and do not count);
- "unsafe math rejected": the symbolic check refused the text (wrong); "math check timed out",
  "math check failed": it ran past its bound or failed (undecided).
Verdict.format_ok reports the paper's format (rationale, then one final-answer line) separately.
"""

from mmpr_pipeline.scoring.extract import NO_ANSWER, TOO_LONG, Extraction, extract
from mmpr_pipeline.scoring.format_rules import RULES as FORMAT_RULES
from mmpr_pipeline.scoring.format_rules import WRONG_FORMAT
from mmpr_pipeline.scoring.judge import DEFAULT_TIMEOUT, Verdict, judge
from mmpr_pipeline.scoring.modes import (
    AMBIGUOUS,
    CORRECT,
    JUDGE_ERROR,
    MATH_ERROR,
    PARTIAL,
    TIMEOUT,
    UNDECIDED,
    UNDECIDED_REASONS,
    UNPARSABLE,
    UNSAFE,
    WRONG,
    undecided,
)
from mmpr_pipeline.scoring.safe_math import screen, symbolic_check, warm_up

REASONS = (
    CORRECT,
    WRONG,
    PARTIAL,
    NO_ANSWER,
    TOO_LONG,
    AMBIGUOUS,
    UNPARSABLE,
    UNSAFE,
    TIMEOUT,
    MATH_ERROR,
    WRONG_FORMAT,
    UNDECIDED,
)
FORMAT_REASONS = (NO_ANSWER, TOO_LONG, WRONG_FORMAT)  # extracted is None

__all__ = [
    "judge",
    "Verdict",
    "undecided",
    "JUDGE_ERROR",
    "UNDECIDED_REASONS",
    "extract",
    "Extraction",
    "warm_up",
    "screen",
    "symbolic_check",
    "REASONS",
    "FORMAT_REASONS",
    "FORMAT_RULES",
    "DEFAULT_TIMEOUT",
]
