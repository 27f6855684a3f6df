"""Seeded synthetic answer pairs for the demo judge: does a short answer mean the same as a reference?

Each case is a question, a reference answer, a proposed answer and whether the two are equivalent.
Families (the free-form kinds the rules cannot settle, each with near misses):
- `number`    : digits and words ("23" / "twenty-three"); near miss: another number
- `date`      : "March 3, 2019" / "03/03/2019" (US order) / "2019-03-03" / "3 March 2019";
                near miss: another day, month or year
- `unit`      : "5 km" / "5 kilometers"; near miss: another number or another unit
- `money`     : "$1,250.00" / "1250" / "1,250 dollars"; near miss: other digits
- `time`      : "3 pm" / "15:00" / "3:00 PM"; near miss: another hour, or am for pm
- `phrase`    : "umbrella" / "a black umbrella" / "It is an umbrella."; near miss: another thing
- `order`     : "red and white" / "white and red"; near miss: one item changed
- `yes_no`    : "yes" / "Yes, it is."; near miss: the opposite
The same (seed, index) always gives the same case; training and held-out rows use disjoint seeds.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

FAMILIES = ("number", "date", "unit", "money", "time", "phrase", "order", "yes_no")
MONTHS = "January February March April May June July August September October November December".split()
_UNITS_WORDS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
_UNITS_WORDS += "fifteen sixteen seventeen eighteen nineteen"
UNITS_WORDS = _UNITS_WORDS.split()
TENS_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
UNITS = (("km", "kilometers"), ("kg", "kilograms"), ("m", "meters"), ("cm", "centimeters"), ("g", "grams"))
UNITS += (("%", " percent"), ("h", "hours"), ("min", "minutes"), ("L", "liters"), ("mm", "millimeters"))
THINGS = "umbrella dog cat car bus bicycle kite clock table chair pizza banana horse train boat hat".split()
ADJECTIVES = "black red white blue small large green old".split()
ACTIVITIES = "playing tennis|riding a horse|eating pizza|reading a book|flying a kite|surfing|skiing".split(
    "|"
)
COLORS = "red white blue green yellow black orange purple".split()
WHO = ("he", "she", "the man", "the woman", "the boy", "the girl")


def number_words(n: int) -> str:
    """0..99 in words: 'twenty-three'."""
    if n < 20:
        return UNITS_WORDS[n]
    tens, units = divmod(n, 10)
    return TENS_WORDS[tens - 2] + (f"-{UNITS_WORDS[units]}" if units else "")


def _other(rng: random.Random, value: int, lo: int, hi: int, spread: int = 3) -> int:
    """A value near `value` but not equal to it (near misses are close, not random)."""
    choices = [v for v in range(max(lo, value - spread), min(hi, value + spread) + 1) if v != value]
    return rng.choice(choices)


def _number(rng: random.Random, same: bool) -> tuple[str, str, str]:
    n = rng.randint(0, 99)
    thing = rng.choice(THINGS)
    m = n if same else _other(rng, n, 0, 99)
    forms = [str(n), number_words(n)]
    rng.shuffle(forms)
    other = str(m) if forms[0] == number_words(n) else number_words(m)
    if same and rng.random() < 0.3:
        other = f"There are {number_words(m)}." if forms[0] == str(n) else f"{m} {thing}s"
    return f"How many {thing}s are there?", forms[0], other


def _date_text(rng: random.Random, y: int, mo: int, d: int) -> str:
    return rng.choice(
        [
            f"{MONTHS[mo - 1]} {d}, {y}",
            f"{mo:02d}/{d:02d}/{y}",
            f"{y}-{mo:02d}-{d:02d}",
            f"{d} {MONTHS[mo - 1]} {y}",
            f"{MONTHS[mo - 1][:3]} {d}, {y}",
        ]
    )


def _date(rng: random.Random, same: bool) -> tuple[str, str, str]:
    y, mo, d = rng.randint(1990, 2029), rng.randint(1, 12), rng.randint(1, 28)
    y2, mo2, d2 = y, mo, d
    if not same:
        which = rng.choice(("day", "day", "month", "year"))
        if which == "day":
            d2 = _other(rng, d, 1, 28, 2)
        elif which == "month":
            mo2 = _other(rng, mo, 1, 12, 2)
        else:
            y2 = _other(rng, y, 1990, 2029, 2)
    first = _date_text(rng, y, mo, d)
    second = _date_text(rng, y2, mo2, d2)
    while same and second == first:
        second = _date_text(rng, y2, mo2, d2)
    return "What is the date on the document?", first, second


def _unit(rng: random.Random, same: bool) -> tuple[str, str, str]:
    n = rng.randint(1, 99)
    short, long = rng.choice(UNITS)
    first = f"{n}{short}" if short == "%" else f"{n} {short}"
    if same:
        second = f"{n}{long}" if long.startswith(" ") else f"{n} {long}"
    elif rng.random() < 0.6:
        m = _other(rng, n, 1, 99)
        second = rng.choice(
            [f"{m}{long}" if long.startswith(" ") else f"{m} {long}", first.replace(str(n), str(m))]
        )
    else:
        other_short, other_long = rng.choice([u for u in UNITS if u[0] != short])
        second = f"{n}{other_long}" if other_long.startswith(" ") else f"{n} {other_long}"
    pair = [first, second]
    rng.shuffle(pair)
    return "What is the value shown?", pair[0], pair[1]


def _money_text(rng: random.Random, cents: int) -> str:
    dollars, c = divmod(cents, 100)
    forms = [f"${dollars:,}.{c:02d}", f"{dollars:,} dollars", f"${dollars}"]
    if c == 0:
        forms += [str(dollars), f"{dollars:,}"]
    else:
        forms = [f"${dollars:,}.{c:02d}", f"{dollars}.{c:02d}"]
    return rng.choice(forms)


def _money(rng: random.Random, same: bool) -> tuple[str, str, str]:
    dollars = rng.choice([rng.randint(1, 99), rng.randint(100, 9999)])
    cents = dollars * 100 if rng.random() < 0.8 else dollars * 100 + rng.randint(1, 99)
    other = cents
    if not same:
        digits = list(str(dollars))
        if len(digits) > 1 and rng.random() < 0.5:  # swapped digits: 1250 -> 1205
            i = rng.randrange(len(digits) - 1)
            digits[i], digits[i + 1] = digits[i + 1], digits[i]
        d2 = int("".join(digits))
        if d2 == dollars:
            d2 = _other(rng, dollars, 1, 9999, 5)
        other = d2 * 100 + cents % 100
    first, second = _money_text(rng, cents), _money_text(rng, other)
    while same and second == first:
        second = _money_text(rng, other)
    return "What is the total amount?", first, second


def _time_text(rng: random.Random, hour: int) -> str:
    h12 = hour % 12 or 12
    suffix = "am" if hour < 12 else "pm"
    return rng.choice([f"{h12} {suffix}", f"{hour:02d}:00", f"{h12}:00 {suffix.upper()}", f"{h12}{suffix}"])


def _time(rng: random.Random, same: bool) -> tuple[str, str, str]:
    hour = rng.randint(0, 23)
    other = hour
    if not same:
        other = (hour + 12) % 24 if rng.random() < 0.4 else _other(rng, hour, 0, 23, 2)
    first, second = _time_text(rng, hour), _time_text(rng, other)
    while same and second == first:
        second = _time_text(rng, other)
    return "What time does the clock show?", first, second


def _phrase(rng: random.Random, same: bool) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        thing = rng.choice(THINGS)
        other = thing if same else rng.choice([t for t in THINGS if t != thing])
        adj = rng.choice(ADJECTIVES)
        article = "an" if other[0] in "aeiou" else "a"
        second = rng.choice(
            [f"{article} {adj} {other}", f"the {other}", f"It is {article} {other}.", f"{article} {other}"]
        )
        return "What is in the picture?", thing, second
    act = rng.choice(ACTIVITIES)
    other = act if same else rng.choice([a for a in ACTIVITIES if a != act])
    who = rng.choice(WHO)
    verb = "are" if who == "they" else "is"
    second = rng.choice([f"{who.capitalize()} {verb} {other}.", f"{who} {verb} {other}", other])
    if same and second == act:
        second = f"{who} {verb} {other}"
    return "What is the person doing?", act, second


def _order(rng: random.Random, same: bool) -> tuple[str, str, str]:
    k = rng.choice((2, 2, 3))
    items = rng.sample(COLORS, k)
    other = list(items)
    if not same:
        other[rng.randrange(k)] = rng.choice([c for c in COLORS if c not in items])
    rng.shuffle(other)
    while same and other == items:
        rng.shuffle(other)

    def join(xs: list[str]) -> str:
        return " and ".join(xs) if len(xs) == 2 else f"{xs[0]}, {xs[1]} and {xs[2]}"

    return "What colors are the flag?", join(items), join(other)


def _yes_no(rng: random.Random, same: bool) -> tuple[str, str, str]:
    ref = rng.choice(("yes", "no"))
    ans = ref if same else ("no" if ref == "yes" else "yes")
    forms = {
        "yes": ["Yes", "Yes, it is.", "yes, there is", "Yes."],
        "no": ["No", "No, it is not.", "no, there isn't", "No."],
    }
    return "Is there a dog in the image?", ref, rng.choice(forms[ans])


_MAKERS = {
    "number": _number,
    "date": _date,
    "unit": _unit,
    "money": _money,
    "time": _time,
    "phrase": _phrase,
    "order": _order,
    "yes_no": _yes_no,
}
HELDOUT_SEED = 7  # held-out cases: a seed the training never uses


def generate(n: int, seed: int = 0, families=FAMILIES, offset: int = 0) -> Iterator[dict[str, Any]]:
    """`n` cases (half equivalent, half near misses), cycling through `families`."""
    for i in range(offset, offset + n):
        family = families[i % len(families)]
        rng = random.Random(f"judge-{seed}-{i}")
        same = rng.random() < 0.5
        question, reference, answer = _MAKERS[family](rng, same)
        yield dict(family=family, question=question, reference=reference, answer=answer, equivalent=same)


# The answer type a source of each family would have (the rules' view of the case).
ANSWER_TYPES = {
    "number": "text",
    "date": "document",
    "unit": "text",
    "money": "document",
    "time": "text",
    "phrase": "text",
    "order": "text",
    "yes_no": "text",
}


def rules_verdicts(cases: list[dict]) -> list[dict]:
    """The rules' verdict of each case: the row columns the judge stage reads (correct, reason,
    extracted). A case's `response` is judged as written (a corpus case), else its answer as a
    response's final-answer line (a synthetic case). A judge error is undecided, as the score stage
    has it."""
    from mmpr_pipeline.scoring import judge

    out = []
    for c in cases:
        response = c.get("response") or f"Final answer: {c['answer']}"
        answer_type = c.get("answer_type") or ANSWER_TYPES[c["family"]]
        try:
            v = judge(response, c["reference"], answer_type, options=c.get("options"))
            out.append(dict(correct=v.correct, reason=v.reason, extracted=v.extracted))
        except Exception as e:  # noqa: BLE001
            out.append(dict(correct=False, reason=f"judge error: {e}", extracted=""))
    return out


def corpus_cases(path) -> list[dict]:
    """A labelled judge corpus (tests/data/*corpus*.jsonl: response, answer, answer_type, options,
    expected) as cases: the rules read the response as written; the judge model sees the references
    and the final answer the rules extracted."""
    import json
    from pathlib import Path

    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        c = json.loads(line)
        answers = c["answer"] if isinstance(c["answer"], list) else [c["answer"]]
        out.append(
            dict(
                id=c.get("id"),
                family=c["answer_type"],
                answer_type=c["answer_type"],
                question=c.get("question") or "",
                reference=answers,
                response=c["response"],
                options=c.get("options"),
                equivalent=bool(c["expected"]),
            )
        )
    return out


def case_references(case: dict) -> list[str]:
    """A case's reference answers as a list (a synthetic case has one, a corpus case may have several)."""
    return case["reference"] if isinstance(case["reference"], list) else [case["reference"]]


def judge_requests(cases: list[dict], rules: list[dict], only_undecided: bool = False) -> dict[int, tuple]:
    """{case index: (question, references, extracted answer)}: what the judge model is asked about
    each case that has a final answer (with `only_undecided`, only those the rules left undecided:
    all that rules+model asks, agreement samples aside)."""
    from mmpr_pipeline.scoring import model_judge as mj

    out = {}
    for i, (c, r) in enumerate(zip(cases, rules)):
        if not r["extracted"] or len(r["extracted"]) > mj.MAX_ANSWER_CHARS:
            continue
        if only_undecided and mj.rules_verdict(r["correct"], r["reason"], r["extracted"]) != mj.UNDECIDED_V:
            continue
        out[i] = (c["question"], case_references(c), r["extracted"])
    return out


def mode_figures(cases: list[dict], rules: list[dict], judged: dict[int, bool | None], mode: str) -> dict:
    """Decided share, false accepts, pair-safety misses and agreement of `mode` on labelled cases.
    `rules`: rules_verdicts(cases); `judged`: {case index: the judge model's verdict (None: undecided)}
    for the cases it was asked about. A false accept is a non-equivalent answer judged correct; a
    pair-safety miss an equivalent one judged wrong (it would become a rejected response)."""
    from mmpr_pipeline.scoring import model_judge as mj

    decided = false_accepts = misses = both = agree = 0
    for i, (case, r) in enumerate(zip(cases, rules)):
        state = mj.rules_verdict(r["correct"], r["reason"], r["extracted"])
        verdict = None if state == mj.UNDECIDED_V else state == mj.CORRECT_V
        if state == mj.FORMAT_V:
            verdict = False
        model = mj.decision(judged.get(i), r["extracted"] or "", case_references(case))
        if i in judged and verdict is not None and model is not None:
            both += 1
            agree += verdict == model
        if mode == mj.MODEL and state != mj.FORMAT_V:
            verdict = model
        elif mode == "rules+model" and verdict is None:
            verdict = model
        if verdict is None:
            continue
        decided += 1
        false_accepts += verdict and not case["equivalent"]
        misses += (not verdict) and case["equivalent"]
    n = len(cases)
    return dict(
        mode=mode,
        cases=n,
        decided=decided,
        decided_share=round(decided / n, 4) if n else 0.0,
        false_accepts=false_accepts,
        pair_safety_misses=misses,
        both_decided=both,
        agreement=round(agree / both, 4) if both else None,
    )


def write_count_words_source(folder, n: int, seed: int = 5) -> str:
    """A JSON Lines source of generated counting questions whose reference is a short phrase in words
    ("three circles"), as a free-form (`text`) source would have it: the policy answers a bare digit,
    which the rules leave undecided when the number is the same (a longer reference) and call wrong when
    it differs, so the judge model has work. Returns the file's path."""
    import json
    import re
    from pathlib import Path

    from mmpr_pipeline import tasks

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(tasks.generate(n, seed=seed, families=["count"])):
        (folder / f"{i}.png").write_bytes(row["image"])
        k, things = int(row["answer"]), re.search(r"How many (\w+)", row["question"])[1]
        answer = f"{number_words(k)} {things if k != 1 else things[:-1]}"
        lines.append(json.dumps(dict(image=f"{i}.png", question=row["question"], answer=answer)))
    path = folder / "count_words.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# -- structural cases: what the demo judge is trained on ----------------------------------------------
# A tiny model cannot know that "couch" is a "sofa"; it can learn to line up the two answers' words.
# So the demo judge learns one structural notion of "the same answer", and to abstain elsewhere:
#   yes    : one answer's words are all in the other's, and the extra words add no second item or
#            negation ("a black umbrella" / "umbrella", "on the left side" / "left"), or the same
#            words reordered where no number moves ("white and red" / "red and white");
#   no     : the longer one adds a second item or a negation ("umbrella and a bag", "not red");
#   unsure : anything else (different words, a word changed, a word glued to another, numbers moved):
#            synonyms, units and near misses look alike by their words, so only a real judge can tell.
# Words come from a pool of made-up syllable words as well as real ones, so the model learns to
# match words, not to remember them.
VERDICT_YES, VERDICT_NO, VERDICT_UNSURE = "yes", "no", "unsure"
_ONSETS = "b c d f g h j k l m n p r s t v w z br bl ch cr dr fl gr pl pr sh sl sp st tr th".split()
_NUCLEI = "a e i o u ai ea ee oa oo ou ie".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "ck", "nd", "st", "ng"]
FILLER_WORDS = (
    "a an the this that it is it's there are was in on at of to by for from near side part picture image "
    "photo color shown here one some very big small large dark light bright old new black white red blue "
    "he she they man woman boy girl people is are was being his her its their top left right front back"
).split()
# words that make the longer answer say more than the shorter (a second item, a negation)
JOINERS = ("and", "or", "with", "plus", "but", "not", "no", "never", "without", "except")
QUESTIONS = (
    "",
    "What is in the picture?",
    "What is the person doing?",
    "Where is it?",
    "What color is it?",
    "How many are there?",
    "What does the sign say?",
    "Which one is it?",
    "What is shown on the chart?",
    "What is written on the document?",
)


_REAL_WORDS = [w.lower() for w in THINGS + ADJECTIVES + COLORS + MONTHS + UNITS_WORDS + TENS_WORDS]


def made_up_word(rng: random.Random) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
        for _ in range(rng.choice((1, 2, 2, 3)))
    )


def _word(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.45:
        return made_up_word(rng)
    if r < 0.55:
        return str(rng.choice([rng.randint(0, 99), rng.randint(100, 99999)]))
    if r < 0.6:
        return rng.choice(
            [f"{rng.randint(1, 99)}.{rng.randint(0, 9)}", f"{rng.randint(1, 12)}:{rng.randint(10, 59)}"]
        )
    return rng.choice(_REAL_WORDS)


def _words(rng: random.Random, k: int, avoid: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        w = _word(rng)
        if w not in avoid and w not in out and w not in JOINERS:
            out.append(w)
    return out


def _extras(rng: random.Random, core: list[str], k: int) -> list[str]:
    """`core` with k extra words (fillers or any words) around it, the core kept in order."""
    before = rng.randint(0, k)
    pick = [rng.choice(FILLER_WORDS) if rng.random() < 0.6 else _word(rng) for _ in range(k)]
    pick = [w for w in pick if w not in JOINERS]
    return pick[:before] + core + pick[before:]


def _styled(rng: random.Random, words: list[str]) -> str:
    text = " ".join(words)
    if rng.random() < 0.3:
        text = text[:1].upper() + text[1:]
    if rng.random() < 0.15:
        text += "."
    return text


def _structural(rng: random.Random) -> tuple[list[str], list[str], str]:
    core = _words(rng, rng.choice((1, 1, 1, 2, 2, 3)))
    r = rng.random()
    if r < 0.32:  # contained, harmless extras
        return core, _extras(rng, core, rng.randint(1, 4)), VERDICT_YES
    if r < 0.38:  # the same words reordered (no numbers), joined by "and" or commas
        items = _words(rng, rng.choice((2, 2, 3)))
        items = [w for w in items if not any(ch.isdigit() for ch in w)] or ["red", "white"]
        if len(items) < 2:
            items.append("white" if items[0] != "white" else "red")
        other = list(items)
        while other == items:
            rng.shuffle(other)

        def join(xs):
            return " and ".join(xs) if len(xs) == 2 else f"{xs[0]}, {xs[1]} and {xs[2]}"

        return join(items).split(), join(other).split(), VERDICT_YES
    if r < 0.55:  # contained, but the longer one adds an item or a negation
        longer = _extras(rng, core, rng.randint(0, 2))
        joiner = rng.choice(JOINERS)
        added = (
            [joiner] + ([rng.choice(("a", "the"))] if rng.random() < 0.4 else []) + _words(rng, 1, set(core))
        )
        if joiner in ("not", "no", "never") and rng.random() < 0.5:
            longer = [joiner] + longer
        elif rng.random() < 0.3:
            longer = added + longer
        else:
            longer = longer + added
        return core, longer, VERDICT_NO
    if r < 0.72:  # different words, with or without the same fillers
        other = _words(rng, len(core), set(core))
        k = rng.randint(0, 3)
        return _extras(rng, core, k) if rng.random() < 0.5 else core, _extras(rng, other, k), VERDICT_UNSURE
    if r < 0.84:  # one word of several changed
        if len(core) == 1:
            core = _extras(rng, core, rng.randint(1, 3))
        other = list(core)
        i = rng.randrange(len(other))
        other[i] = _words(rng, 1, set(core))[0]
        return core, other, VERDICT_UNSURE
    if r < 0.93:  # a word glued to another piece: "total" / "subtotal", "wood" / "wooden"
        word = core[-1]
        glued = word + rng.choice(["s", "es", "en", "ed", "ing", "er", made_up_word(rng)])
        if rng.random() < 0.5:
            glued = rng.choice(["sub", "un", "re", "over", made_up_word(rng)]) + word
        return core, core[:-1] + [glued], VERDICT_UNSURE
    # numbers moved: "3/4" / "4/3", "12 5" / "5 12"
    a, b = rng.sample(range(1, 60), 2)
    sep = rng.choice(["/", " ", "-", ":", " to "])
    return f"{a}{sep}{b}".split(), f"{b}{sep}{a}".split(), VERDICT_UNSURE


def structural(n: int, seed: int = 0, offset: int = 0) -> Iterator[dict[str, Any]]:
    """`n` structural cases (question, reference, answer, verdict yes/no/unsure), either answer in
    either place."""
    for i in range(offset, offset + n):
        rng = random.Random(f"structural-{seed}-{i}")
        first, second, verdict = _structural(rng)
        pair = [_styled(rng, first), _styled(rng, second)]
        rng.shuffle(pair)
        yield dict(
            family="structural",
            question=rng.choice(QUESTIONS),
            reference=pair[0],
            answer=pair[1],
            verdict=verdict,
            equivalent={VERDICT_YES: True, VERDICT_NO: False}.get(verdict),
        )
