"""Numbers and plain text as the answer rules read them: every number an answer writes (digits,
fractions, LaTeX, mixed numbers, number words up to ninety-nine, percents, degrees, scientific
notation), equality with the reference's stated precision, ChartQA's relaxed tolerance, and the
text normalisation (case, punctuation, articles) the free-form rules compare under.

Pure Python on short strings, with regexes that cannot backtrack catastrophically; used by
modes.py (the per-type scorers) and free_form.py (the free-form rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

NUMBER_SCAN_CHARS = 300  # numbers are looked for in an answer's first 300 characters
MAX_EXPONENT = 400  # 1e400 is a number; 1e99999 is an attack


@dataclass(frozen=True, slots=True)
class Number:
    value: Fraction
    percent: bool = False
    decimals: int | None = None  # digits after the point as written ("0.50" -> 2); None: exact form


_NUMBER = re.compile(
    r"""
    (?:(?<![\w)\]}])(?P<sign>[-+]))?
    (?<![\w.^_/])                                       # not inside a word, decimal, power or date
    (?P<mant>[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+)
    (?:
        [eE](?P<exp>[-+]?[0-9]{1,4})(?![0-9])
      | [ \t]*(?:\\times|\\cdot|×|\*|·|x)[ \t]*10[ \t]*(?:\^|\*\*)
        [ \t]*\{?[ \t]*(?P<exp10>[-+]?[0-9]{1,4})[ \t]*\}?
      | [ \t]*(?:\^|\*\*)[ \t]*\{?[ \t]*(?P<pow>[-+]?[0-9]{1,3})[ \t]*\}?(?![0-9.])
      | [ \t]*/[ \t]*(?P<den>[0-9]+(?:\.[0-9]+)?)(?![0-9.,/])
    )?
    (?P<pct>[ \t]*(?:\\?%|percent\b|per[ \t]?cent\b))?
    """,
    re.VERBOSE | re.IGNORECASE,
)
_LATEX_FRAC = re.compile(
    r"\\[dt]?frac[ \t]*\{[ \t]*([-+]?[0-9.,]+)[ \t]*\}[ \t]*\{[ \t]*([-+]?[0-9.,]+)[ \t]*\}"
)
_MIXED = re.compile(
    r"(?<![0-9.])([0-9]{1,9})[ \t]*\\[dt]?frac"
    r"[ \t]*\{[ \t]*([0-9]{1,9})[ \t]*\}[ \t]*\{[ \t]*([0-9]{1,9})[ \t]*\}"
)
_LATEX_FRAC_SHORT = re.compile(r"\\[dt]?frac[ \t]*([0-9])[ \t]*([0-9])")
DEGREES = re.compile(r"\^?[ \t]*\{?[ \t]*\\circ[ \t]*\}?|°|\\degree")
WORD_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve "
        "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
    )
}
WORD_TENS = {
    w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())
}
WORD_NUMBER = re.compile(
    r"(?i)\b(?:({})(?:[- ]({}))?|({}))\b".format(
        "|".join(WORD_TENS), "|".join(list(WORD_UNITS)[1:10]), "|".join(WORD_UNITS)
    )
)
_HEDGE = re.compile(r"(?i)\bor\b|\beither\b|\bbetween\b|\bto\b|~|–|—|±|\\pm|[0-9][ \t]*-[ \t]*[0-9]")
_SYMBOLIC = re.compile(r"\\(?:sqrt|pi|frac|dfrac|tfrac|log|ln|sin|cos|tan|infty|e\b)|√|π|\bsqrt\b|\bpi\b")


def needs_symbolic(text: str) -> bool:
    """Does the answer hold math that plain number parsing cannot read (\\sqrt{2}, \\frac{\\pi}{2})?"""
    return bool(_SYMBOLIC.search(_prepare_numbers(text)))


# A decimal comma: the whole answer is one number whose comma is followed by 1-2 or 4+ digits
# ("1000,99", "3,5 cm"), or that starts "0," ("0,111"); "1,234" stays a thousands separator.
_DECIMAL_COMMA = re.compile(
    r"^([ \t$]*[-+]?(?:0|[0-9]+(?=,(?:[0-9]{1,2}|[0-9]{4,})(?![0-9])))),([0-9]+)"
    r"(?=[ \t]*(?:\\?%|[^\W\d_]|°|\\circ|$))"
)


def _prepare_numbers(text: str) -> str:
    text = text[:NUMBER_SCAN_CHARS].replace("−", "-").replace("{,}", ",").replace("\\%", "%")
    text = _DECIMAL_COMMA.sub(r"\1.\2", text.strip())
    text = _MIXED.sub(lambda m: f"{int(m[1]) * int(m[3]) + int(m[2])}/{m[3]}", text)  # 2\frac{1}{2}
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    text = _LATEX_FRAC_SHORT.sub(r"\1/\2", text)
    return DEGREES.sub(" ", text).replace("\\!", "").replace("\\,", "")


def _number(m: re.Match) -> Number | None:
    mant = m.group("mant").replace(",", "")
    value = Fraction(mant)
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    exp = m.group("exp") or m.group("exp10")
    if exp is not None:
        if abs(int(exp)) > MAX_EXPONENT:
            return None
        value *= Fraction(10) ** int(exp)
        decimals = None
    elif m.group("pow") is not None:
        if abs(int(m.group("pow"))) > MAX_EXPONENT or value == 0 and int(m.group("pow")) < 0:
            return None
        value **= int(m.group("pow"))
        decimals = None
    elif m.group("den") is not None:
        den = Fraction(m.group("den"))
        if den == 0:
            return None
        value /= den
        decimals = None
    if m.group("sign") == "-":
        value = -value
    return Number(value, bool(m.group("pct")), decimals)


def word_number_value(m: re.Match) -> int:
    """The value of a WORD_NUMBER match: "seven" 7, "twenty-one" 21, "forty" 40."""
    if m.group(3):
        return WORD_UNITS[m.group(3).lower()]
    unit = WORD_UNITS[m.group(2).lower()] if m.group(2) else 0
    return WORD_TENS[m.group(1).lower()] + unit


def find_numbers(text: str) -> list[Number]:
    """Every number in `text`: signs, thousands separators, decimals, %, 1e5, 3 x 10^5, 1/2,
    \\frac{1}{2}, degrees; number words ("three") when there are no digits."""
    text = _prepare_numbers(text)
    numbers = [n for n in (_number(m) for m in _NUMBER.finditer(text)) if n is not None]
    if not numbers and not re.search(r"[0-9]", text):
        numbers = [Number(Fraction(word_number_value(m)), False, 0) for m in WORD_NUMBER.finditer(text)]
    return numbers


# A whole answer that is a fraction in words: "half", "a third", "two thirds", "three quarters", and
# mixed numbers: "one and a half", "2 and a quarter". "third" alone is an ordinal, so it needs a count.
_FRACTION_WORDS = re.compile(
    r"(?i)^(?:(?P<whole>[0-9]{1,9}|[a-z]+(?:-[a-z]+)?)[ \t]+and[ \t]+)?"
    r"(?:(?P<count>a|an|one|two|three)[ \t-]+)?(?P<part>half|halves|third|thirds|quarter|quarters)$"
)
_FRACTION_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_DENOMINATORS = {"hal": 2, "thi": 3, "qua": 4}


def fraction_in_words(text: str) -> Number | None:
    """`text` as one fraction or mixed number written in words ("three quarters" is 3/4, not 3;
    "one and a half" is 3/2, not 1), else None."""
    m = _FRACTION_WORDS.match(text.strip().rstrip(".").strip())
    if m is None:
        return None
    part, count = m["part"].lower(), m["count"] and m["count"].lower()
    if count is None and part != "half":
        return None
    whole = 0
    if m["whole"] is not None:
        whole_word = WORD_NUMBER.fullmatch(m["whole"])
        if m["whole"].isdigit():
            whole = int(m["whole"])
        elif whole_word is None:
            return None
        else:
            whole = word_number_value(whole_word)
    fraction = Fraction(_FRACTION_COUNTS.get(count, 1), _DENOMINATORS[part[:3]])
    return Number(whole + fraction)


def strict_number(text: str) -> Number | None:
    """`text` as one number and nothing else (besides %, degrees, $), else None."""
    prepared = _prepare_numbers(text).strip().lstrip("$").strip()
    m = _NUMBER.fullmatch(prepared)
    return _number(m) if m else None


def pick_number(text: str) -> tuple[Number | None, str]:
    """The one number an answer states: ("ok" | "none" | "ambiguous").

    After an "=", the numbers after the last "=" count ("2 + 3 = 5"). Two different values joined
    by a hedge ("3 or 4", "between 3 and 4", "3-4") are ambiguous; otherwise the first one counts
    ("2 (two red circles)")."""
    numbers = find_numbers(text)
    if "=" in text:
        numbers = find_numbers(text[text.rfind("=") + 1 :]) or numbers
    if not numbers:
        return None, "none"
    if len({n.value for n in numbers}) > 1 and _HEDGE.search(_prepare_numbers(text)):
        return None, "ambiguous"
    return numbers[0], "ok"


def alternatives(n: Number) -> list[tuple[Fraction, int | None]]:
    """A number and, for a percentage, its fraction of one (50% is 50 and 0.5)."""
    out = [(n.value, n.decimals)]
    if n.percent:
        out.append((n.value / 100, None if n.decimals is None else n.decimals + 2))
    return out


def numbers_equal(pred: Number, gold: Number, rounding: bool = True) -> bool:
    """Exactly equal, or (with `rounding`) `pred` is `gold` rounded to the 2+ decimals `pred`
    shows (0.33 for 1/3; not 0.3, not 0.34)."""
    for p, decimals in alternatives(pred):
        for g, _ in alternatives(gold):
            if p == g:
                return True
            if (
                rounding
                and decimals is not None
                and decimals >= 2
                and abs(p - g) <= Fraction(1, 2 * 10**decimals)
            ):
                return True
    return False


def relaxed_equal(pred: Number, gold: Number, tolerance: float = 0.05) -> bool:
    """ChartQA relaxed accuracy: within 5% of the reference. Years (whole 1900-2100) must be exact:
    a 5% band would accept 1920 for 2019 (a deliberate deviation from the original metric)."""
    if gold.decimals == 0 and not gold.percent and 1900 <= gold.value <= 2100:
        return pred.value == gold.value and not pred.percent
    for p, _ in alternatives(pred):
        for g, _ in alternatives(gold):
            if p == g or (g != 0 and abs(p - g) <= abs(g) * Fraction(tolerance)):
                return True
    return False


# ---------------------------------------------------------------- text normalisation

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCT = re.compile(r"[!\"#$&'()*+,/:;<=>?@\[\\\]^_`{|}~]")
_STRAY_PERIOD = re.compile(r"(?<![0-9])\.|\.(?![0-9])")


def normalize_text(s: str) -> str:
    """Lower case, no punctuation (decimal points kept), no articles, number words up to
    nineteen as digits, single spaces."""
    s = _PUNCT.sub(" ", s.lower())
    s = _STRAY_PERIOD.sub(" ", s)
    return " ".join(str(WORD_UNITS.get(w, w)) for w in _ARTICLES.sub(" ", s).split())
