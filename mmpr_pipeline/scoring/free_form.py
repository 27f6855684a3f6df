"""Free-form answers (text, VQA, document, chart words): what the rules know, and nothing more.

`compare(pred, gold)` says "correct", "wrong" or "undecided" for one reference. The rules are sure
only of these:
- correct: the same text after normalisation (case, punctuation, articles, number words); the same
  number ("$1,250.00" = "1250", "50%" = "0.5"), date ("March 3, 2019" = "03/03/2019") or time
  ("3 pm" = "15:00") written another way, with nothing else said; a yes/no reference and an answer
  that leads with the same yes/no ("Yes, it is."); the same list in the same order with other joiners
  ("red, white" = "red and white"); a fraction or mixed number in words ("one and a half" = "1.5");
- wrong: a different single letter; an answer that leads with the other yes/no; a different date
  or time; a different number where the words around it are the same ("2 dogs" for "3 dogs") or
  the reference is a bare number and the answer's numbers are others with no unit that could
  convert them ("4 dogs" for "3"); basic colours that neither include the other ("blue" for "red",
  "red and blue" for "red and white"); the same words with one side of a contrast swapped ("the man
  on the right" for "the man on the left").
Everything else is undecided: a paraphrase, a longer answer containing the reference, a reordered
list, a unit or scale written another way ("1.5 km" for "1500 m"), an ambiguous date (03/04/2019),
and answers that share no word with the reference, since synonyms and abbreviations share none
("couch" for "sofa", "plane" for "airplane", "IBM" for "International Business Machines").
"""

from __future__ import annotations

import re

from mmpr_pipeline.scoring.answer_numbers import (
    WORD_NUMBER,
    find_numbers,
    fraction_in_words,
    normalize_text,
    numbers_equal,
    word_number_value,
)

CORRECT, WRONG, UNDECIDED = "correct", "wrong", "undecided"

_LETTER = re.compile(r"^[(\[]?([A-Za-z])[)\]]?[.:]?$")
_LEADING_YES_NO = re.compile(r"(?i)^\W*(yes|no)\b")
_YES_NO_HEDGE = re.compile(r"(?i)\b(?:yes|no)\b[ \t]*(?:/|\bor\b|\band\b)[ \t]*\b(?:yes|no)\b")
_NEGATION = re.compile(r"(?i)\b(?:not|no|never|neither|nor|without)\b|n't\b")
_HEDGE = re.compile(r"(?i)\bor\b|\beither\b|\bbetween\b|\babout\b|\baround\b|\bapprox|~|±|\\pm")

_MONTHS = {
    name: i
    for i, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ],
        1,
    )
    for name in names
}
_MONTH = r"(?P<month>" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DAY = r"(?P<day>[0-9]{1,2})(?:st|nd|rd|th)?"
_YEAR = r"(?P<year>[0-9]{4})"
_DATE_PATTERNS = [
    re.compile(rf"(?i)\b{_MONTH}[ \t]+{_DAY},?[ \t]+{_YEAR}\b"),  # March 3, 2019
    re.compile(rf"(?i)\b{_DAY}(?:[ \t]+of)?[ \t]+{_MONTH},?[ \t]+{_YEAR}\b"),  # 3 March 2019
    re.compile(r"\b(?P<iso_y>[0-9]{4})-(?P<iso_m>[0-9]{1,2})-(?P<iso_d>[0-9]{1,2})\b"),  # 2019-03-03
    re.compile(
        r"(?<![0-9./-])(?P<a>[0-9]{1,2})([/.-])(?P<b>[0-9]{1,2})\2(?P<y>[0-9]{4}|[0-9]{2})(?![0-9./-])"
    ),
    re.compile(rf"(?i)\b{_MONTH}[ \t]+{_YEAR}\b"),  # March 2019
]
_TIME = re.compile(
    r"(?i)(?<![0-9:.])(?P<h>[0-9]{1,2})(?::(?P<m>[0-9]{2}))?(?::[0-9]{2})?[ \t]*"
    r"(?P<half>a\.?m\.?|p\.?m\.?|o'?clock)?(?![0-9:])"
)
_DATE_FILLER = {"on", "of", "date", "dated", "is", "it", "was", "the", "day"}

# Basic colour terms (Berlin and Kay): two different ones never name the same colour; finer names
# (navy, maroon, violet, beige) may be either, so they decide nothing.
_COLOURS = {
    "red": "red",
    "orange": "orange",
    "yellow": "yellow",
    "green": "green",
    "blue": "blue",
    "purple": "purple",
    "pink": "pink",
    "brown": "brown",
    "black": "black",
    "white": "white",
    "gray": "gray",
    "grey": "gray",
}
# Word pairs where one for the other, all else the same, changes the answer.
_CONTRASTS = {
    frozenset(p.split())
    for p in (
        "left right",
        "top bottom",
        "upper lower",
        "up down",
        "above below",
        "front back",
        "front behind",
        "inside outside",
        "before after",
        "open closed",
        "on off",
        "male female",
        "man woman",
        "men women",
        "boy girl",
        "day night",
        "morning evening",
        "north south",
        "east west",
        "increase decrease",
        "increasing decreasing",
        "increased decreased",
        "higher lower",
        "more less",
        "most least",
        "larger smaller",
        "largest smallest",
        "highest lowest",
        "true false",
        "positive negative",
        "first last",
        "empty full",
    )
}
# Units and scales that let one quantity be written with other digits ("1.5 km" = "1500 m").
_UNITS = set(
    """
    mm cm m km in inch inches ft foot feet yd yard yards mi mile miles meter meters metre metres
    millimeter millimeters centimeter centimeters kilometer kilometers mg g kg gram grams kilogram
    kilograms lb lbs pound pounds oz ounce ounces ton tons tonne tonnes ml l liter liters litre
    litres gallon gallons s sec secs second seconds min mins minute minutes h hr hrs hour hours day
    days week weeks month months year years yr yrs decade decades century centuries cent cents
    dollar dollars usd eur euro euros gbp k bn thousand thousands million millions billion billions
    trillion trillions hundred hundreds dozen dozens pair pairs couple percent percentage pct degree
    degrees c f kelvin mph kph kmh rpm w kw watt watts v volt volts hz khz mhz ghz kb mb gb tb byte
    bytes calorie calories kcal cal sq square cubic ha acre acres hectare hectares half quarter
    """.split()
)
_ATTACHED_UNIT = re.compile(r"^[0-9.,]+([a-z°%]+)$")  # "5km", "1990s", "3rd"
_ORDINAL_SUFFIX = {"st", "nd", "rd", "th"}
_PERCENT = {"%", "percent", "pct"}


def _plain(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def normalized(s: str) -> str:
    """normalize_text, or, when that leaves nothing ("A", "the": only articles), the lower-cased
    words, so that the letter "A" never equals "the"."""
    return normalize_text(s) or _plain(s)


def single_letter(s: str) -> str | None:
    m = _LETTER.match(s.strip())
    return m.group(1) if m else None


# ---------------------------------------------------------------- dates and times


def _year(text: str) -> list[int]:
    y = int(text)
    return [y] if len(text) == 4 else [1900 + y, 2000 + y]


def dates(text: str) -> list[tuple[list[tuple], tuple[int, int]]]:
    """Each date in `text`: its possible readings as (year, month, day) (day None for "March 2019";
    03/04/2019 has two) and its span."""
    found, taken = [], []
    for pattern in _DATE_PATTERNS:
        for m in pattern.finditer(text):
            if any(m.start() < end and start < m.end() for start, end in taken):
                continue
            g = m.groupdict()
            if g.get("iso_y"):
                readings = [(int(g["iso_y"]), int(g["iso_m"]), int(g["iso_d"]))]
            elif g.get("a"):
                a, b = int(g["a"]), int(g["b"])
                readings = [(y, m_, d) for y in _year(g["y"]) for m_, d in {(a, b), (b, a)}]
            else:
                day = int(g["day"]) if g.get("day") else None
                readings = [(int(g["year"]), _MONTHS[g["month"].lower()], day)]
            readings = [r for r in readings if 1 <= r[1] <= 12 and (r[2] is None or 1 <= r[2] <= 31)]
            if readings:
                found.append((readings, m.span()))
                taken.append(m.span())
    return found


def times(text: str) -> list[tuple[list[int], tuple[int, int]]]:
    """Each clock time in `text` ("3 pm", "3:00 p.m.", "15:00", "3 o'clock") as its possible
    readings in minutes after midnight, and its span. A bare number is not a time."""
    found = []
    for m in _TIME.finditer(text):
        h, minutes, half = int(m["h"]), int(m["m"] or 0), (m["half"] or "").lower().replace(".", "")
        if (m["m"] is None and not half) or h > 24 or minutes > 59:
            continue
        if half in ("am", "pm"):
            if not 1 <= h <= 12:
                continue
            readings = [(h % 12 + (12 if half == "pm" else 0)) * 60 + minutes]
        elif 1 <= h <= 12:  # "3:00", "3 o'clock": morning or afternoon
            readings = [(h % 12) * 60 + minutes, (h % 12 + 12) * 60 + minutes]
        else:
            readings = [h % 24 * 60 + minutes]
        found.append((readings, m.span()))
    return found


def _relation(a, b) -> str:
    """Two readings of a date (or time): "equal", "conflict" (a field both give differs) or
    "compatible" (one is less precise: "March 2019" and "March 3, 2019")."""
    if isinstance(a, int):
        return "equal" if a == b else "conflict"
    if any(x is not None and y is not None and x != y for x, y in zip(a, b)):
        return "conflict"
    return "equal" if a == b else "compatible"


def _readings_verdict(pred_found: list, gold_found: list, pred: str) -> str | None:
    """Dates (or times) of the answer against the reference's single one; None: none to compare."""
    if len(gold_found) != 1 or not pred_found:
        return None if not gold_found and not pred_found else UNDECIDED
    gold_readings = gold_found[0][0]
    relations = [{_relation(p, g) for p in readings for g in gold_readings} for readings, _ in pred_found]
    if all(r == {"conflict"} for r in relations):
        return WRONG
    start, end = pred_found[0][1]
    rest = set(_plain(pred[:start] + " " + pred[end:]).split()) - _DATE_FILLER
    if len(pred_found) == 1 and relations[0] == {"equal"} and not rest:
        return CORRECT
    return UNDECIDED


# ---------------------------------------------------------------- numbers


def _digits(text: str) -> str:
    """Number words as digits ("twenty-one" -> "21"), so that both sides count alike."""
    return WORD_NUMBER.sub(lambda m: str(word_number_value(m)), text)


def _numbers(text: str) -> tuple[list, list[str], bool]:
    """(the numbers, the other words, has a unit or scale) of an answer."""
    if (fraction := fraction_in_words(text)) is not None:  # "one and a half" is 1.5, not 1 and a unit
        return [fraction], [], False
    text = _digits(text)
    values = find_numbers(text)
    words, unit = [], False
    for token in normalize_text(text).replace("%", " % ").split():
        attached = _ATTACHED_UNIT.match(token)
        if attached:  # "2.5mg" says what "2.5 mg" says
            if attached.group(1) not in _ORDINAL_SUFFIX:
                unit, token = True, attached.group(1)
                words.append(token)
        elif re.search(r"[0-9]", token):
            continue
        elif token not in _PERCENT:  # find_numbers reads a percentage in any of these spellings
            unit = unit or token in _UNITS or token == "°"
            words.append(token)
    return values, words, unit


def has_unit(text: str) -> bool:
    """Does the answer carry a unit or scale that could write its quantity with other digits?
    (A percentage does not: numbers_equal reads 50% as 0.5 too.)"""
    return _numbers(text)[2]


def _same_numbers(a: list, b: list) -> bool:
    return len(a) == len(b) and all(numbers_equal(x, y, rounding=False) for x, y in zip(a, b))


def _numbers_verdict(pred: str, gold: str) -> str | None:
    vp, wp, unit_p = _numbers(pred)
    vg, wg, unit_g = _numbers(gold)
    if not vp and not vg:
        return None
    if not vp or not vg:
        return UNDECIDED  # "a dozen" for "12", "the third of March" for "3/3"
    if wp == wg:  # the same words around the numbers ("2 dogs" / "3 dogs"; two bare numbers)
        return CORRECT if _same_numbers(vp, vg) else WRONG if len(vp) == len(vg) else UNDECIDED
    if _same_numbers(vp, vg):
        return None  # the same numbers: the words decide ("the one on the right" / "... left")
    if not wg and len(vg) == 1:  # a bare number as the reference
        if any(numbers_equal(p, vg[0], rounding=False) for p in vp) or unit_p or _HEDGE.search(pred):
            return UNDECIDED  # a longer answer containing it; a unit that might convert it
        return WRONG
    if not wp and len(vp) == 1 and len(vg) == 1 and not unit_g:  # "3" for "3 dogs"
        return CORRECT if numbers_equal(vp[0], vg[0], rounding=False) else WRONG
    return UNDECIDED


# ---------------------------------------------------------------- words


def _colours(words: list[str]) -> set[str]:
    return {_COLOURS[w] for w in words if w in _COLOURS}


def _words_verdict(pred: str, gold: str) -> str:
    wp, wg = normalized(pred).split(), normalized(gold).split()
    cp, cg = _colours(wp), _colours(wg)
    if cp and cg and not (cp <= cg or cg <= cp) and not _NEGATION.search(pred):
        return WRONG  # "blue" for "red"; "red and blue" for "red and white"
    if len(wp) == len(wg) and sorted(wp) != sorted(wg):  # a reordering ("white and red") is not a swap
        swapped = [(a, b) for a, b in zip(wp, wg) if a != b]
        if swapped and all(frozenset((a, b)) in _CONTRASTS for a, b in swapped):
            return WRONG  # "the man on the right" for "the man on the left"
    return UNDECIDED


def _list_items(s: str) -> list[str]:
    """The answer's words without the list joiner "and" (normalisation already drops commas and "&")."""
    return [w for w in normalized(s).split() if w != "and"]


def _yes_no(s: str) -> str | None:
    s = normalized(s)
    return s if s in ("yes", "no") else None


# Words an initialism may leave out ("DOE" for "Department of Energy") or write as "&" ("R&D").
_INITIALS_SKIP = {"of", "the", "for", "a", "an", "and", "&"}


def _initialism(short: str, long: str) -> bool:
    """Is `short`, written in capitals ("R&D", "NYC", "U.S."), the initials of `long`'s words?"""
    letters = short.strip().rstrip(".").replace(".", "").replace(" ", "")
    if not re.fullmatch(r"[A-Z&]{2,}", letters) or letters.count("&") == len(letters):
        return False
    words = re.findall(r"[A-Za-z]+|&", long)
    if len(words) < 2:
        return False
    every = "".join("&" if w.lower() in ("and", "&") else w[0] for w in words).lower()
    content = "".join(w[0] for w in words if w.lower() not in _INITIALS_SKIP).lower()
    return letters.lower() in (every, content) or letters.replace("&", "").lower() == content


def initialism_of_either(pred: str, golds: list[str]) -> bool:
    """Is one side an initialism of the other ("R&D" / "Research and Development")? The two may be the
    same answer or another expansion with the same initials ("Research and Design"): the rules cannot
    tell, and a judge model's "no" must not reject it either (model_judge.decision)."""
    return any(_initialism(pred, g) or _initialism(g, pred) for g in golds)


def compare(pred: str, gold: str) -> str:
    """The answer `pred` against one reference `gold`: "correct", "wrong" or "undecided"."""
    lp, lg = single_letter(pred), single_letter(gold)
    if lp and lg:  # a single letter is never another letter
        return CORRECT if lp.lower() == lg.lower() else WRONG
    if normalized(pred) == normalized(gold):
        return CORRECT
    items = _list_items(gold)
    if len(items) > 1 and _list_items(pred) == items and not re.search(r"[0-9]", pred + gold):
        return CORRECT  # the same items in the same order: "red, white" / "red and white" ("1,5" may be 1.5)
    if (yn := _yes_no(gold)) is not None:
        lead = _LEADING_YES_NO.match(pred)
        if lead is None or _YES_NO_HEDGE.search(pred):
            return UNDECIDED  # "There are two dogs." may well mean yes
        return CORRECT if lead.group(1).lower() == yn else WRONG
    for verdict in (
        _readings_verdict(dates(pred), dates(gold), pred),
        _readings_verdict(times(pred), times(gold), pred),
    ):
        if verdict is not None:
            return verdict
    verdict = _numbers_verdict(pred, gold)
    if verdict is not None:
        return verdict
    return _words_verdict(pred, gold)


def verdict(pred: str, golds: list[str]) -> str:
    """Against several acceptable references: correct if one says so, wrong if all do."""
    found = {compare(pred, g) for g in golds}
    return CORRECT if CORRECT in found else WRONG if found == {WRONG} else UNDECIDED
