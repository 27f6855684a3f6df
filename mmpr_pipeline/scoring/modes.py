"""How an extracted answer is compared with the reference, per answer type.

Each `score_<type>(pred, golds, options, deadline)` takes the cleaned final answer, the list of
acceptable reference answers and the option texts, and returns an `Outcome`. All of it is pure
Python on short strings (answers are capped at 1000 characters), with regexes that cannot
backtrack catastrophically; only `math`, and `number` answers that need symbolic work, reach
`safe_math.symbolic_check`.
"""

from __future__ import annotations

import functools
import re
import string
import time
from dataclasses import dataclass

from mmpr_pipeline.scoring import free_form, safe_math
from mmpr_pipeline.scoring.answer_numbers import (
    DEGREES,
    Number,
    alternatives,
    fraction_in_words,
    needs_symbolic,
    normalize_text,
    numbers_equal,
    pick_number,
    relaxed_equal,
    strict_number,
)
from mmpr_pipeline.scoring.extract import has_words

LETTERS = string.ascii_uppercase
ANLS_MAX_CHARS = 300  # Levenshtein is quadratic: compare at most this much

# Stable reason strings (documented in mmpr_pipeline/scoring/__init__.py).
CORRECT = "correct"
WRONG = "wrong answer"
PARTIAL = "partial match"
AMBIGUOUS = "ambiguous answer"
UNPARSABLE = "unparsable answer"
UNSAFE = "unsafe math rejected"
TIMEOUT = "math check timed out"
MATH_ERROR = "math check failed"
UNDECIDED = "undecided"  # the rules cannot tell (a paraphrase, a unit or date written another way)
# Reasons of a response the rules did not rule on: neither chosen nor rejected, left to a judge model.
UNDECIDED_REASONS = frozenset({UNDECIDED, PARTIAL, UNPARSABLE, TIMEOUT, MATH_ERROR})
JUDGE_ERROR = "judge error"  # reason prefix of a response whose check crashed (stages/score.py)


def undecided(reason: str) -> bool:
    """Is this verdict open: the rules could not tell, or the check itself failed? Such a response
    is neither chosen nor rejected and counts for no pass rate (correct is then False, and means
    nothing), so a right answer is never taught as wrong. The one rule pairing, select and the
    judge model's stage all read."""
    return reason in UNDECIDED_REASONS or reason.startswith(JUDGE_ERROR)


@dataclass(frozen=True, slots=True)
class Outcome:
    extracted: str
    score: float
    correct: bool
    reason: str


def _result(extracted: str, score: float, correct: bool | None = None, reason: str | None = None) -> Outcome:
    correct = score > 0.9 if correct is None else correct
    return Outcome(extracted, float(score), correct, reason or (CORRECT if correct else WRONG))


# ---------------------------------------------------------------- numbers


def _free_form(pred: str, golds: list[str], score: float | None = None) -> Outcome:
    """The free-form rules (free_form.py): correct, wrong, or undecided where they cannot tell."""

    found = free_form.verdict(pred, golds)
    if found == free_form.CORRECT:
        return _result(pred, 1.0, True)
    if found == free_form.WRONG:  # a graded score stays as it was: "March 4, 2019" has ANLS 0.92
        return _result(pred, score or 0.0, False, WRONG)
    return _result(pred, score or 0.0, False, PARTIAL if score else UNDECIDED)


def score_text(pred: str, golds: list[str], options: list[str], deadline: float) -> Outcome:
    return _free_form(pred, golds)


# ---------------------------------------------------------------- yes / no

_YES_NO = re.compile(r"(?i)\b(yes|no)\b")
_YES_NO_HEDGE = re.compile(r"(?i)\b(?:yes|no)\b[ \t]*(?:/|\bor\b|\band\b)[ \t]*\b(?:yes|no)\b")


def score_yes_no(pred: str, golds: list[str], options: list[str], deadline: float) -> Outcome:
    words = [w.lower() for w in _YES_NO.findall(pred)]
    if not words:
        return _result(pred, 0.0, reason=UNPARSABLE)
    if _YES_NO_HEDGE.search(pred):
        return _result(pred, 0.0, reason=AMBIGUOUS)
    first = words[0]
    if not re.match(r"(?i)^\W*(?:yes|no)\b", pred) and len(set(words)) > 1:
        return _result(pred, 0.0, reason=AMBIGUOUS)  # "it could be yes, but no" without a lead
    said = first.capitalize()
    ok = any(normalize_text(g) in (first, "y" if first == "yes" else "n") for g in golds)
    return _result(said, 1.0 if ok else 0.0)


# ---------------------------------------------------------------- multiple choice

# Option labels are letters (A-Z, then AA, AB, ... as spreadsheets count) or numbers ("1.", "(2)"), as the
# source writes them. The patterns are built per kind of label: `{L}` is a label in capitals (or digits),
# `{l}` one in any case, `{NB}` what may not stand just before a bare label ("2.5" names no option 5).
_LABEL_KINDS = {
    "letter": (r"[A-Z]", r"[A-Za-z]", r"(?<![\w'’])"),  # up to 26 options
    "letters": (r"[A-Z]{1,3}", r"[A-Za-z]{1,3}", r"(?<![\w'’])"),  # more: AA, AB, ...
    "number": (r"[0-9]{1,3}", r"[0-9]{1,3}", r"(?<![\w'’.,])"),
}
_LABEL_TEMPLATES = dict(
    alone=r"^[(\[]?({l})[)\]]?[.:]?$",
    lead_keyword=r"(?i)^(?:option|choice)[ \t]*[(\[]?({l})(?![\w'’])[)\]]?[ \t.:)\-]*(.*)$",
    lead_bracket=r"^[(\[]({l})[)\]][ \t.:\-]*(.*)$",
    lead_delimited=r"^({L})(?:[.:)]|[ \t]*[-–—])(?![0-9])[ \t]*(.*)$",
    lead_spaced=r"^({L})[ \t]+(.+)$",
    lead_reason=r"^({L})[ \t]+((?:because|since|as|given)\b.*)$",  # "B because ..."
    dressed=(
        r"[(\[]({L})[)\]]"  # (B) [B]
        r"|(?i:\b(?:option|choice)[ \t]*[(\[]?)({l})(?![\w'’])"  # option B
        r"|{NB}({L})(?=[.)]?[ \t]*(?:$|[,;/]|\bor\b|\band\b))"  # "A or", "B."
        r"|(?:\bor\b|\band\b|[,;/])[ \t]*({L})(?![\w'’])"  # ", B" "or B"
    ),
    leads_with_label=r"[(\[]?{L}[.):\]]",  # "B.", "(B)", "B)", "B:", "[B]"
    or_label=r"(?i:\bor\b|/)[ \t]*(?i:maybe|possibly|perhaps|option)?[ \t]*[(\[]?({L})(?![\w'’])",
)


@functools.cache
def _label_patterns(kind: str) -> dict[str, re.Pattern]:
    upper, any_case, not_before = _LABEL_KINDS[kind]
    return {
        name: re.compile(t.format(L=upper, l=any_case, NB=not_before)) for name, t in _LABEL_TEMPLATES.items()
    }


def letter_label(i: int) -> str:
    """The letter of option i (from 0), as spreadsheets count columns: A..Z, AA..AZ, BA.., ZZ, AAA..."""
    label = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        label = LETTERS[r] + label
    return label


_LABEL = r"([A-Za-z]{1,3}|[0-9]{1,3})"
_OWN_LABEL = re.compile(rf"^[ \t]*(?:\({_LABEL}\)|\[{_LABEL}\]|{_LABEL}[.):])[ \t]+(\S.*)$", re.S)


def option_labels(options: list[str]) -> tuple[list[str], list[str], str]:
    """(labels, option texts without their labels, kind of label) of a question's options. Options
    that all carry their own labels, in order ("1. cat", "(2) dog"; "a) cat", "b) dog"), keep them;
    other options are lettered A, B, ..., Z, AA, AB, ... Kind: "letter" (at most 26 single
    letters), "letters" or "number"."""
    n = len(options)
    own = [_OWN_LABEL.match(o) for o in options]
    if n and all(own):
        found = [next(g for g in m.groups()[:3] if g).upper() for m in own]
        texts = [m.group(4).strip() for m in own]
        if found == [str(i + 1) for i in range(n)]:
            return found, texts, "number"
        if found == [letter_label(i) for i in range(n)]:
            return found, texts, "letter" if n <= 26 else "letters"
    return [letter_label(i) for i in range(n)], list(options), "letter" if n <= 26 else "letters"


def labelled_by_question(question: str, options: list[str]) -> list[str]:
    """The options as the question lists them: numbered ("2. dog") when the question writes every
    option after its number, in order ("1. cat", "(2) dog", "3) bird"), else unchanged (options are
    lettered by default, as most sources letter them)."""
    if not options or option_labels(options)[2] == "number":
        return list(options)
    for k, o in enumerate(options, 1):
        text = re.escape(o.strip())
        if not re.search(rf"(?:\({k}\)|(?<![\w.(]){k}[.):])[ \t]*{text}", question):
            return list(options)
    return [f"{k}. {o}" for k, o in enumerate(options, 1)]


def _plain(s: str) -> str:
    return " ".join(s.lower().split()).strip(" .,;:!?\"'")


def _lead_label(text: str, p: dict[str, re.Pattern], normalized_options: list[str]) -> tuple[str | None, str]:
    """The label an answer opens with ("B", "(B) 4", "Option B: 4") and the text after it; a label
    followed by a bare space counts only when that text is an option's."""
    m = p["alone"].match(text)
    if m:
        return m.group(1).upper(), ""
    for pattern in (p["lead_keyword"], p["lead_bracket"], p["lead_delimited"], p["lead_reason"]):
        m = pattern.match(text)
        if m:
            return m.group(1).upper(), m.group(2)
    m = p["lead_spaced"].match(text)
    if m and normalize_text(m.group(2)) in normalized_options:
        return m.group(1), m.group(2)
    return None, ""


def _contained_options(norm: str, normalized_options: list[str]) -> list[int]:
    """Indices of the options whose text appears as whole words in the normalized answer."""
    contained = [
        i
        for i, o in enumerate(normalized_options)
        if o and re.search(rf"(?<![\w]){re.escape(o)}(?![\w])", norm)
    ]
    # "dark red" also contains "red": keep only options not inside another matched option
    return [
        i
        for i in contained
        if not any(j != i and normalized_options[i] in normalized_options[j] for j in contained)
    ]


def option_letter(
    text: str, options: list[str], labels: list[str], kind: str = "letter"
) -> tuple[str | None, str]:
    """The option a free-text answer picks: (label, "ok") or (None, "none" | "ambiguous").

    Labels (`option_labels`: letters, or numbers) in their usual dresses (B, (B), B., B) text, **B**,
    option B), else the option's text. Two different labels, or a label whose attached text is another
    option's, is ambiguous."""
    p = _label_patterns(kind)
    valid, n_letters = labels, len(labels)
    norm = normalize_text(text)
    normalized_options = [normalize_text(o) for o in options]
    plain = _plain(text)  # keeps articles: "A. yield" is not the option "yield"
    exact = [valid[i] for i, o in enumerate(options[:n_letters]) if plain and _plain(o) == plain]
    if len(exact) == 1:
        return exact[0], "ok"

    lead, rest = _lead_label(text, p, normalized_options)
    if lead:  # "C. A and B are wrong" explains; only "or <letter>" after a lead is a hedge
        found = [lead] + [m.group(1).upper() for m in p["or_label"].finditer(rest)]
    else:
        found = [next(g for g in m.groups() if g).upper() for m in p["dressed"].finditer(text)]
    letters = {x for x in found if x in valid}
    if len(letters) > 1:
        return None, "ambiguous"
    if letters:
        letter = letters.pop()
        named = [
            valid[i] for i, o in enumerate(normalized_options[:n_letters]) if o and o == normalize_text(rest)
        ]
        if rest and named and letter not in named:
            return None, "ambiguous"  # "C. 4" when 4 is option B's text
        return letter, "ok"

    contained = _contained_options(norm, normalized_options[:n_letters])
    if len(contained) == 1:
        return valid[contained[0]], "ok"
    return None, "ambiguous" if contained else "none"


def score_multiple_choice(pred: str, golds: list[str], options: list[str], deadline: float) -> Outcome:
    # any number of options: lettered past Z (AA, AB, ...), or numbered as the source numbers them
    labels, texts, kind = option_labels(options) if options else (list(LETTERS), [], "letter")
    p = _label_patterns(kind)
    gold_letters = set()
    for g in golds:
        m = p["alone"].match(g.strip())
        if m and (len(m.group(1)) == 1 or m.group(1).upper() in labels):
            gold_letters.add(m.group(1).upper())
        elif texts and any(normalize_text(o) == normalize_text(g) for o in texts):
            gold_letters.update(
                labels[i] for i, o in enumerate(texts) if normalize_text(o) == normalize_text(g)
            )
        else:  # a reference that leads with its letter, as many sources write it: "B. red", "(C) 12"
            letter, status = option_letter(g, texts, labels, kind)
            if status == "ok" and p["leads_with_label"].match(g.strip()):
                gold_letters.add(letter)
    if not options:  # no option list: as many letters as the reference implies, at least A-D
        labels = labels[: max(4, *(LETTERS.index(x) + 1 for x in gold_letters or {"A"}))]
    letter, status = option_letter(pred, texts, labels, kind)
    if status == "ambiguous":
        return _result(pred, 0.0, reason=AMBIGUOUS)
    if letter is None:
        if not gold_letters:  # a reference given as text, no options
            return score_text(pred, golds, options, deadline)
        return _result(pred, 0.0, reason=UNPARSABLE)
    return _result(letter, 1.0 if letter in gold_letters else 0.0)


# ---------------------------------------------------------------- number and math


def _symbolic(
    pred: str,
    golds: list[str],
    deadline: float,
    mode: str = "plain",
    shown: str | None = None,
    plain: str | None = None,
) -> Outcome:
    status, detail = safe_math.symbolic_check(
        pred, golds, timeout=max(deadline - time.monotonic(), 0.05), mode=mode, plain=plain
    )
    shown = pred if shown is None else shown
    if status == "equal":
        return _result(shown, 1.0)
    reason = {"different": WRONG, "unparsable": UNPARSABLE, "unsafe": UNSAFE, "timeout": TIMEOUT}.get(
        status, MATH_ERROR
    )
    return _result(shown, 0.0, reason=reason)


def score_number(pred: str, golds: list[str], options: list[str], deadline: float) -> Outcome:

    number, status = fraction_in_words(pred), "ok"  # "three quarters" is not 3
    if number is None:
        number, status = pick_number(pred)
    if status == "ambiguous":
        return _result(pred, 0.0, reason=AMBIGUOUS)
    gold_numbers = [strict_number(g) or pick_number(g)[0] for g in golds]
    symbolic = needs_symbolic(pred)
    if number is not None and not symbolic:
        if any(g is not None and numbers_equal(number, g) for g in gold_numbers):
            return _result(pred, 1.0)
        if free_form.has_unit(pred) or any(free_form.has_unit(g) for g in golds):
            return _result(pred, 0.0, False, UNDECIDED)  # "1.5 km" for "1500": a unit written another way
        if all(g is not None for g in gold_numbers):
            return _result(pred, 0.0)
    if number is None and not symbolic:
        return _result(pred, 0.0, reason=UNPARSABLE)
    return _symbolic(pred, golds, deadline)  # \sqrt{2}, \frac{\pi}{2}, 2^{10}, ...


_MATH_NOISE = re.compile(r"\\left|\\right|\\[!,;: ]|\s+|\\displaystyle")


def _math_key(s: str) -> str:
    s = _MATH_NOISE.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return DEGREES.sub("", s).rstrip(".")


# One trailing word after an answer with no other words: a unit ("radians", "square units").
_TRAILING_UNIT = re.compile(
    r"(?<=[\w})\]])[ \t]+(?!(?:not|no|or|and|wrong|incorrect|false|true)\b)"
    r"(?:square[ \t]+|cubic[ \t]+)?[a-z]{2,12}\.?$"
)


_PI_WORD = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")


def math_numbers_equal(pred: Number, gold: Number) -> bool:
    """Exactly equal, or equal after rounding both to 6 decimal places (math-verify's
    float_rounding=6: 0.0833333333 and 0.083333 for 1/12, not 0.0833 nor 0.33 for 1/3)."""
    for p, _ in alternatives(pred):
        for g, _ in alternatives(gold):
            if p == g or round(p, 6) == round(g, 6):
                return True
    return False


def score_math(
    pred: str, golds: list[str], options: list[str], deadline: float, segment: str = ""
) -> Outcome:
    """Cheap checks first (same text; two plain numbers: exact, or equal to 6 decimals); then
    math-verify in the bounded worker: on the cleaned answer read as LaTeX, or, when the answer
    is a sentence, on the raw final-answer `segment` with math-verify's own extraction."""

    letters = [free_form.single_letter(g) for g in golds]
    if (letter := free_form.single_letter(pred)) and all(letters):  # "E" (an option, or e?) is never "d"
        return _result(pred, 1.0 if letter.lower() in {x.lower() for x in letters} else 0.0)
    # "pi" spelled out is the constant, not p times i
    pred, golds = _PI_WORD.sub(r"\\pi", pred), [_PI_WORD.sub(r"\\pi", g) for g in golds]
    if (words := fraction_in_words(pred)) is not None:  # "one and a half": math-verify reads words as symbols
        pred = str(words.value)
    key = _math_key(pred)
    if any(key == _math_key(g) for g in golds):
        return _result(pred, 1.0)
    pn = strict_number(pred)
    gold_numbers = [strict_number(g) for g in golds]
    if pn is not None and all(g is not None for g in gold_numbers):
        return _result(pred, 1.0 if any(math_numbers_equal(pn, g) for g in gold_numbers) else 0.0)
    if segment and (has_words(pred) or segment.count("\\boxed") > 1):  # a sentence; several boxes
        # the answer without a trailing unit is read as LaTeX too: "\\frac{\\pi}{2} radians" has no
        # delimiters for math-verify's extraction to find, and its plain-number reading is the 2
        return _symbolic(
            segment, golds, deadline, mode="text", shown=pred, plain=_TRAILING_UNIT.sub("", pred)
        )
    return _symbolic(pred, golds, deadline)


# ---------------------------------------------------------------- VQA, ChartQA, ANLS

_VQA_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Im": "I'm",
    "im": "i'm",
    "ive": "i've",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "let's": "let's",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "shant": "shan't",
    "shed": "she'd",
    "shes": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "somebodys": "somebody's",
    "someones": "someone's",
    "thats": "that's",
    "thered": "there'd",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "wed": "we'd",
    "weve": "we've",
    "werent": "weren't",
    "whats": "what's",
    "whered": "where'd",
    "wheres": "where's",
    "whos": "who's",
    "whove": "who've",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_VQA_NUMBERS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
_VQA_NUMBERS["none"] = "0"
_VQA_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_VQA_PERIOD = re.compile(r"(?<!\d)(\.)(?!\d)")
_VQA_COMMA = re.compile(r"(\d)(,)(\d)")


def normalize_vqa(s: str) -> str:
    """The official VQA evaluation's answer normalisation (punctuation, number words, articles,
    contractions), from github.com/GT-Vision-Lab/VQA (vqaEval.py)."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    out = s
    for p in _VQA_PUNCT:
        if (p + " " in s or " " + p in s) or _VQA_COMMA.search(s):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_VQA_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def score_vqa(pred: str, golds: list[str], options: list[str], deadline: float) -> Outcome:
    """VQA accuracy: min(1, #annotators who gave the answer / 3), averaged over the leave-one-out
    subsets when there are 4+ references (10 in VQAv2). Correct when at least three references
    (all of them, if fewer than three) give the answer; with 10 references that is score >= 0.9."""

    p = normalize_vqa(pred) or pred.strip().lower()  # "A" is a letter, not an article: never "an"
    verdicts = {}
    for g in golds:  # an annotator agrees when the official normalisation or the free-form rules say so
        if g not in verdicts:
            same = (normalize_vqa(g) or g.strip().lower()) == p
            verdicts[g] = free_form.CORRECT if same else free_form.compare(pred, g)
    agree = [verdicts[g] == free_form.CORRECT for g in golds]
    matches = sum(agree)
    if len(golds) >= 4:
        score = sum(min(1.0, (matches - a) / 3) for a in agree) / len(golds)
    else:
        score = matches / len(golds)
    if matches >= min(3, len(golds)):
        return _result(pred, score, True)
    if all(v == free_form.WRONG for v in verdicts.values()):
        return _result(pred, score, False, WRONG)
    return _result(pred, score, False, PARTIAL if matches else UNDECIDED)  # 1-2 annotators, or unsure


def score_chart(pred: str, golds: list[str], options: list[str], deadline: float) -> Outcome:
    """ChartQA relaxed accuracy (Masry et al. 2022): numbers within 5% of the reference, other
    answers by the free-form rules; best over the references. A number outside the 5% is wrong
    when it is all the answer says, undecided when a unit or scale might convert it ("1.5 million")."""

    number, status = fraction_in_words(pred), "ok"
    if number is None:
        number, status = pick_number(pred)
    found = set()
    for g in golds:
        gold_number = strict_number(g)
        if gold_number is not None:
            if status == "ambiguous":
                return _result(pred, 0.0, reason=AMBIGUOUS)
            if number is not None and relaxed_equal(number, gold_number):
                return _result(pred, 1.0)
            found.add(free_form.WRONG if strict_number(pred) is not None else free_form.compare(pred, g))
        else:
            found.add(free_form.compare(pred, g))
    if free_form.CORRECT in found:
        return _result(pred, 1.0)
    return _result(pred, 0.0, False, WRONG if found == {free_form.WRONG} else UNDECIDED)


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(pred: str, gold: str, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one pair (Biten et al. 2019): 1 - NL, or 0
    when NL >= threshold; lower-cased, whitespace collapsed, both capped at 300 characters."""
    p = " ".join(pred.lower().split())[:ANLS_MAX_CHARS]
    g = " ".join(gold.lower().split())[:ANLS_MAX_CHARS]
    if not p and not g:
        return 1.0
    nl = levenshtein(p, g) / max(len(p), len(g))
    return 1.0 - nl if nl < threshold else 0.0


def score_document(pred: str, golds: list[str], options: list[str], deadline: float) -> Outcome:
    """The free-form rules decide; ANLS is the graded score. ANLS alone never makes an answer
    correct: it forgives one letter, and cannot tell an OCR slip ("Corporaton") from another word
    ("Wealth" for "Health") or another digit ("March 4, 2019"), so a high ANLS is undecided."""
    return _free_form(pred, golds, max(anls(pred, g) for g in golds))


SCORERS = {
    "multiple_choice": score_multiple_choice,
    "number": score_number,
    "yes_no": score_yes_no,
    "text": score_text,
    "math": score_math,
    "vqa": score_vqa,
    "chart": score_chart,
    "document": score_document,
}
