"""Write tests/data/free_form_corpus.jsonl: labelled free-form answers for the rules' safety figures.

    python scripts/make_free_form_corpus.py

Each item below is (answer type, reference, answer, label, note): the label is what a person would
say (is this answer right?), not what the rules can tell. Items are the issue's probe and its kin:
paraphrases, longer answers, reordered lists, units, dates, times and number words written another
way, synonyms and abbreviations, and near misses (another number, date, time, colour, side, yes/no).
Each item is written in three real models' answer styles (InternVL's "Final answer:" line, Qwen2.5-VL's
boxed answer, LLaVA's terse one-line answer), so the corpus has 3 x items cases. The rules must
never call a right answer wrong (pair safety) nor a wrong one right (false accepts); the share they
decide at all is reported (tests/test_rules_undecided.py, benchmarks/bench_judge.py).
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "free_form_corpus.jsonl"
T, F = True, False


def vqa(*counts: tuple[str, int]) -> list[str]:
    """Ten annotators' answers: vqa(("red", 7), ("maroon", 3))."""
    return [answer for answer, n in counts for _ in range(n)]


TEXT = [
    ("umbrella", "a black umbrella", T, "longer answer containing the reference"),
    ("umbrella", "An umbrella.", T, "article and full stop"),
    ("umbrella", "umbrellas", T, "plural"),
    ("umbrella", "a black dog", F, "another thing"),
    ("the man on the left", "the man standing on the left side", T, "paraphrase"),
    ("the man on the left", "the man on the right", F, "other side"),
    ("the man on the left", "the woman on the left", F, "other person"),
    ("red and white", "white and red", T, "reordered list"),
    ("red and white", "red, white", T, "list written with a comma"),
    ("red and white", "red and blue", F, "one colour changed"),
    ("playing tennis", "He is playing tennis.", T, "sentence containing the reference"),
    ("playing tennis", "playing baseball", F, "another sport"),
    ("3 pm", "15:00", T, "24-hour clock"),
    ("3 pm", "3:00 PM", T, "minutes written out"),
    ("3 pm", "4 pm", F, "another hour"),
    ("3 pm", "3 am", F, "am for pm"),
    ("3 pm", "15:30", F, "another time"),
    ("sofa", "couch", T, "synonym"),
    ("television", "TV", T, "abbreviation"),
    ("airplane", "plane", T, "short form"),
    ("dog", "puppy", T, "a young dog"),
    ("cat", "dog", F, "another animal"),
    ("kitchen", "in the kitchen", T, "prepositional phrase"),
    ("kitchen", "bathroom", F, "another room"),
    ("blue", "navy blue", T, "a shade of the colour"),
    ("blue", "red", F, "another basic colour"),
    ("blue", "The color is blue.", T, "sentence"),
    ("blue", "The color is red.", F, "sentence, another colour"),
    ("surfing", "The man is surfing on a wave.", T, "sentence"),
    ("surfing", "skateboarding", F, "another activity"),
    ("2", "two", T, "number word"),
    ("2", "There are two dogs.", T, "number word in a sentence"),
    ("2", "3", F, "another number"),
    ("2", "There are three dogs.", F, "another number in a sentence"),
    ("left", "on the left", T, "phrase"),
    ("left", "right", F, "other side"),
    ("top", "at the top of the picture", T, "phrase"),
    ("top", "bottom", F, "other end"),
    ("increasing", "decreasing", F, "opposite trend"),
    ("Paris", "Paris, France", T, "city and country"),
    ("Paris", "London", F, "another city"),
    ("New York City", "NYC", T, "abbreviation"),
    ("United States", "USA", T, "abbreviation"),
    ("summer", "winter", F, "another season"),
    ("wood", "wooden", T, "adjective"),
    ("1500 m", "1.5 km", T, "another unit"),
    ("1500 m", "1.2 km", F, "another unit, another length"),
    ("5 km", "5 kilometers", T, "unit spelled out"),
    ("5 km", "6 km", F, "another number, same unit"),
    ("$20", "20 dollars", T, "currency in words"),
    ("$20", "$25", F, "another amount"),
    ("10%", "10 percent", T, "percent in words"),
    ("10%", "15%", F, "another percentage"),
    ("1990s", "the nineties", T, "decade in words"),
    ("March 3, 2019", "3 March 2019", T, "day first"),
    ("March 3, 2019", "March 4, 2019", F, "another day"),
    ("twelve", "12", T, "digits for the word"),
    ("a dozen", "12", T, "dozen as a number"),
    ("yes", "Yes, there is.", T, "yes with a clause"),
    ("no", "No, there isn't.", T, "no with a clause"),
    ("yes", "No.", F, "the other answer"),
    ("no", "There is no dog in the picture.", T, "no inside a sentence"),
    ("male", "female", F, "the other sex"),
    ("male", "a man", T, "noun for the adjective"),
    ("night", "daytime", F, "the other time of day"),
    ("day", "night", F, "the other time of day"),
    ("open", "closed", F, "the opposite state"),
    ("on the table", "under the table", F, "another place"),
    ("frisbee", "A white frisbee.", T, "longer answer"),
    ("frisbee", "kite", F, "another toy"),
    ("eating", "He is eating a sandwich.", T, "sentence"),
    ("sitting", "standing", F, "another posture"),
    ("cloudy", "overcast", T, "synonym"),
    ("north", "south", F, "the other direction"),
    ("4th", "fourth", T, "ordinal in words"),
    ("100", "one hundred", T, "number in words"),
    ("the red car", "the blue car", F, "another colour"),
    ("the boy", "the girl", F, "the other child"),
    ("umbrella", "a black umbrella and a bag", F, "names a second thing"),
]

DOCUMENT = [
    ("$1,250.00", "1250", T, "no currency sign or decimals"),
    ("$1,250.00", "$1,250", T, "no decimals"),
    ("$1,250.00", "1,250.00", T, "no currency sign"),
    ("$1,250.00", "$1,350.00", F, "another amount"),
    ("$1,250.00", "1205", F, "digits swapped"),
    ("March 3, 2019", "03/03/2019", T, "numeric date"),
    ("March 3, 2019", "2019-03-03", T, "ISO date"),
    ("March 3, 2019", "3rd March 2019", T, "ordinal day first"),
    ("March 3, 2019", "March 4, 2019", F, "another day (ANLS 0.92)"),
    ("March 3, 2019", "March 3, 2018", F, "another year"),
    ("March 3, 2019", "03/04/2019", F, "another day either way it is read"),
    ("April 3, 2019", "03/04/2019", T, "day-first numeric date"),
    ("Acme Corporation Ltd", "Acme Corporation Limited", T, "Ltd spelled out"),
    ("Acme Corporation Ltd", "Acme Corp.", T, "short name"),
    ("Acme Corporation Ltd", "Apex Industries Inc", F, "another company"),
    ("Acme Corporation Ltd", "Acme Corporaton Ltd", T, "one letter dropped in reading"),
    ("John Smith", "J. Smith", T, "initial"),
    ("John Smith", "Dr. John Smith", T, "title"),
    ("John Smith", "Mary Jones", F, "another person"),
    ("INV-2231", "INV-2232", F, "another invoice number"),
    ("INV-2231", "2231", T, "number without its prefix"),
    ("555-0123", "555 0123", T, "space for the hyphen"),
    ("555-0123", "555-0124", F, "another phone number"),
    ("42 Main Street", "42 Main St.", T, "abbreviated street"),
    ("42 Main Street", "24 Main Street", F, "another house number"),
    ("10:30 AM", "10:30 a.m.", T, "a.m. with dots"),
    ("10:30 AM", "10:30", T, "no am/pm"),
    ("10:30 AM", "11:30 AM", F, "another hour"),
    ("15%", "15 percent", T, "percent in words"),
    ("15%", "0.15", T, "fraction of one"),
    ("15%", "51%", F, "digits swapped"),
    ("Department of Health", "Dept. of Health", T, "abbreviation"),
    ("Department of Health", "Department of Wealth", F, "another word, one letter apart"),
    ("R&D", "Research and Development", T, "expansion"),
    ("Total", "Subtotal", F, "another line of the invoice"),
    ("1,234", "1234", T, "no thousands separator"),
    ("Chicago, IL", "Chicago, Illinois", T, "state spelled out"),
    ("Chicago, IL", "Springfield, IL", F, "another city"),
    ("7", "seven", T, "number word"),
    ("7", "17", F, "another number"),
    ("2.5 mg", "2.5mg", T, "no space before the unit"),
    ("2.5 mg", "5 mg", F, "another dose"),
    ("Q3 2019", "third quarter of 2019", T, "quarter in words"),
    ("June 2020", "06/2020", T, "numeric month"),
    ("June 2020", "July 2020", F, "another month"),
]

VQA = [
    (vqa(("umbrella", 10)), "a black umbrella", T, "longer answer"),
    (vqa(("yes", 10)), "Yes, it is.", T, "yes with a clause"),
    (vqa(("yes", 10)), "No.", F, "the other answer"),
    (vqa(("yes", 10)), "No, it is not.", F, "the other answer with a clause"),
    (vqa(("no", 10)), "There is no cat in the image.", T, "no inside a sentence"),
    (vqa(("2", 10)), "two", T, "number word"),
    (vqa(("2", 10)), "There are two dogs.", T, "number word in a sentence"),
    (vqa(("2", 10)), "3", F, "another number"),
    (vqa(("2", 10)), "There are three dogs.", F, "another number in a sentence"),
    (vqa(("red", 7), ("maroon", 3)), "red", T, "majority answer"),
    (vqa(("red", 7), ("maroon", 3)), "blue", F, "another colour"),
    (vqa(("red", 10)), "dark red", T, "a shade"),
    (vqa(("red", 10)), "blue", F, "another colour"),
    (vqa(("sofa", 10)), "couch", T, "synonym"),
    (vqa(("airplane", 10)), "plane", T, "short form"),
    (vqa(("airplane", 10)), "jet", T, "a kind of airplane"),
    (vqa(("airplane", 10)), "bird", F, "another thing"),
    (vqa(("tennis", 10)), "playing tennis", T, "phrase"),
    (vqa(("tennis", 10)), "baseball", F, "another sport"),
    (vqa(("kitchen", 10)), "in the kitchen", T, "phrase"),
    (vqa(("kitchen", 10)), "living room", F, "another room"),
    (vqa(("left", 10)), "right", F, "other side"),
    (vqa(("left", 10)), "on the left side", T, "phrase"),
    (vqa(("wood", 6), ("wooden", 4)), "wooden", T, "four annotators"),
    (vqa(("dog", 4), ("puppy", 3), ("labrador", 3)), "puppy", T, "three annotators"),
    (vqa(("cat", 8), ("dog", 2)), "dog", F, "two annotators only"),
    (vqa(("10", 10)), "ten", T, "number word"),
    (vqa(("12:30", 10)), "12:30 pm", T, "pm added"),
    (vqa(("3:00", 10)), "4:00", F, "another time"),
    (vqa(("summer", 10)), "winter", F, "another season"),
    (vqa(("giraffe", 10)), "giraffes", T, "plural"),
    (vqa(("yes", 10)), "Yes", T, "the answer"),
    (vqa(("sheep", 10)), "lamb", T, "a young sheep"),
    (vqa(("motorcycle", 10)), "motorbike", T, "synonym"),
    (vqa(("motorcycle", 10)), "bicycle", F, "another vehicle"),
    (vqa(("1", 10)), "one", T, "number word"),
    (vqa(("1", 10)), "none", F, "zero for one"),
    (vqa(("4", 10)), "4 dogs", T, "number with its noun"),
    (vqa(("cloudy", 10)), "sunny", F, "other weather"),
    (vqa(("white", 10)), "white", T, "the answer"),
    (vqa(("white", 10)), "black", F, "another colour"),
    (vqa(("frisbee", 9), ("disc", 1)), "a frisbee", T, "article"),
    (vqa(("pizza", 10)), "a slice of pizza", T, "longer answer"),
    (vqa(("pizza", 10)), "sandwich", F, "another food"),
    (vqa(("on the table", 10)), "on the floor", F, "another place"),
]

CHART = [
    ("45", "45", T, "the value"),
    ("45", "46", T, "within ChartQA's 5%"),
    ("45", "60", F, "another value"),
    ("45", "45%", T, "percent sign"),
    ("45%", "0.45", T, "fraction of one"),
    ("45%", "54%", F, "digits swapped"),
    ("2019", "2018", F, "another year"),
    ("2019", "2019", T, "the year"),
    ("1500000", "1.5 million", T, "scale word"),
    ("1500000", "2.5 million", F, "scale word, another value"),
    ("1.5", "1.5 million", T, "chart in millions"),
    ("12.5", "12.50", T, "trailing zero"),
    ("12.5", "21.5", F, "digits swapped"),
    ("Asia", "asia", T, "case"),
    ("Asia", "Europe", F, "another region"),
    ("increasing", "decreasing", F, "opposite trend"),
    ("increasing", "It increases steadily.", T, "sentence"),
    ("blue", "the blue bar", T, "phrase"),
    ("blue", "red", F, "another colour"),
    ("2015", "In 2015", T, "phrase"),
    ("2015", "2016", F, "another year"),
    ("7.2", "approximately 7.2", T, "hedged value"),
    ("7.2", "about 9", F, "another value, hedged"),
    ("30", "thirty", T, "number word"),
    ("30", "30 million", T, "unit of the axis"),
    ("30", "13", F, "digits swapped"),
    ("$3.5 billion", "3.5", T, "axis unit left out"),
    ("Yes", "Yes", T, "the answer"),
    ("Yes", "No", F, "the other answer"),
    ("0.25", "25%", T, "percentage"),
    ("0.25", "1/4", T, "fraction"),
    ("2", "2.0", T, "decimal point"),
    ("16.7", "17", T, "rounded"),
    ("100", "105", T, "within ChartQA's 5%"),
    ("100", "110", F, "outside 5%"),
    ("58", "58 %", T, "spaced percent sign"),
    ("Germany", "Germany and France", F, "names a second country"),
]

NUMBER = [
    ("0.5", "half", T, "fraction word"),
    ("0.5", "one half", T, "fraction words"),
    ("0.5", "a third", F, "another fraction"),
    ("0.75", "three quarters", T, "fraction words"),
    ("0.25", "a quarter", T, "fraction words"),
    ("2/3", "two thirds", T, "fraction words"),
    ("23", "twenty-three", T, "number words"),
    ("23", "twenty three", T, "number words without hyphen"),
    ("23", "thirty-two", F, "digits swapped"),
    ("12", "a dozen", T, "dozen"),
    ("6", "half a dozen", T, "half a dozen"),
    ("3", "three", T, "number word"),
    ("3", "four", F, "another number"),
    ("0", "none", T, "none for zero"),
    ("0", "zero", T, "number word"),
    ("1000", "one thousand", T, "thousand in words"),
    ("1000000", "one million", T, "million in words"),
    ("2", "a couple", T, "a couple"),
    ("2", "a pair", T, "a pair"),
    ("40", "forty", T, "number word"),
    ("40", "fourteen", F, "another number"),
    ("15", "fifteen", T, "number word"),
    ("15", "fifty", F, "another number"),
    ("100", "a hundred", T, "hundred in words"),
    ("7", "seven apples", T, "number word with its noun"),
    ("7", "seventeen", F, "another number"),
    ("1.5", "one and a half", T, "mixed number in words"),
    ("90", "ninety degrees", T, "with its unit"),
    ("5", "5 people", T, "with its noun"),
    ("5", "6 people", F, "another number with its noun"),
    ("8", "eight", T, "number word"),
    ("8", "It is eight.", T, "number word in a sentence"),
    ("8", "There are nine.", F, "another number in a sentence"),
]

RATIONALE = {
    "text": "Looking at the image, I focus on the part the question asks about.",
    "vqa": "Looking at the image, I focus on the part the question asks about.",
    "document": "The document is a scanned page; I read the field the question asks for.",
    "chart": "Reading the chart, I compare the bars against the y-axis labels.",
    "number": "I count the objects and work out the quantity step by step.",
}


def styles(answer_type: str, answer: str) -> list[tuple[str, str]]:
    """(style, response) in three real models' answer styles."""
    boxed = answer.replace("$", "\\$").replace("%", "\\%")
    terse = answer[:1].upper() + answer[1:]
    return [
        ("internvl-final", f"{RATIONALE[answer_type]}\nFinal answer: {answer}"),
        ("qwen25vl-boxed", f"{RATIONALE[answer_type]}\n\nSo the answer is $\\boxed{{{boxed}}}$."),
        ("llava-terse", terse),
    ]


def cases() -> list[dict]:
    out = []
    for answer_type, items in [
        ("text", TEXT),
        ("document", DOCUMENT),
        ("vqa", VQA),
        ("chart", CHART),
        ("number", NUMBER),
    ]:
        for k, (reference, answer, label, note) in enumerate(items):
            for style, response in styles(answer_type, answer):
                out.append(
                    dict(
                        id=f"{answer_type}-{k:03d}-{style}",
                        answer_type=answer_type,
                        style=style,
                        response=response,
                        answer=reference,
                        options=[],
                        expected=label,
                        note=note,
                    )
                )
    return out


def main() -> None:
    rows = cases()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} cases ({sum(not r['expected'] for r in rows)} labelled wrong) -> {OUT}")


if __name__ == "__main__":
    main()
