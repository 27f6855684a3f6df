"""InternVL's pair options (issue 13 item 4): `pairing.answer_fix` and a reference rationale
(`fields.rationale`), both off by default and recorded in each pair's `provenance`.

Pure logic on hand-written responses and rows, then a real build (local Ray, vLLM on CPU, the
trained demo model: the "mc" source of the session's shared build, tests/_shared_build.py) of a few
multiple-choice questions whose references are written "(A)" while the model answers
"Final answer: A", with both options on; `mmpr select` runs on the same run folder
(tests/test_select.py checks it on a fixture run in detail).
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _shared_build import SOURCES, pairs, samples, shared_build

from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline import shards, tasks
from mmpr_pipeline.pairing import REFERENCE, fix_answer, pair_correctness
from mmpr_pipeline.recipe import RecipeError, Source
from stages.pair import pair_rows

MINE = SOURCES["answer_fix"]

REPO = Path(__file__).resolve().parent.parent


# --- fix_answer: the final answer's place, and nothing else ---------------------------------------


@pytest.mark.parametrize(
    "response, reference, fixed",
    [
        ("I count three.\nFinal answer: 3.0", "3", "I count three.\nFinal answer: 3"),
        ("Red is option B.\nFinal answer: (B)", "B. red", "Red is option B.\nFinal answer: B. red"),
        ("It is B.\nFinal Answer: **B**\n", "B. red", "It is B.\nFinal Answer: B. red\n"),
        # a box keeps its braces: only the content changes
        ("So x is three.\nThus \\boxed{3.0}.", "3", "So x is three.\nThus \\boxed{3}."),
        ("Steps.\nFinal answer: \\boxed{3.0}", "3", "Steps.\nFinal answer: \\boxed{3}"),
        ("<think>maybe 4.0</think>\nSo \\boxed{4.0}", "4", "<think>maybe 4.0</think>\nSo \\boxed{4}"),
        # the same text later in the response is not the answer: it stays
        ("Final answer: 3.0\nNote 3.0 is exact", "3", "Final answer: 3\nNote 3.0 is exact"),
        (
            "There are 3.0 of them, 3.0 in all.\r\nFinal answer: 3.0\r\n",
            "3",
            "There are 3.0 of them, 3.0 in all.\r\nFinal answer: 3\r\n",
        ),
        # the answer is looked for from the end: many earlier mentions do not hide it
        ("3.0, " * 8 + "so.\nFinal answer: 3.0", "3", "3.0, " * 8 + "so.\nFinal answer: 3"),
    ],
)
def test_fix_answer_rewrites_only_the_final_answer(response, reference, fixed):
    assert fix_answer(response, reference) == fixed


@pytest.mark.parametrize(
    "response",
    [
        "I count three.\nFinal answer: 3",  # already the reference's text
        "Just some words without an answer\nand more",  # nothing to fix
        "3",  # a terse answer has no answer line
        "I think the answer is 3.0",  # a phrase, not a final-answer line
    ],
)
def test_fix_answer_leaves_responses_without_a_final_answer_line_alone(response):
    assert fix_answer(response, "3") is None


def _row(responses, correct, extracted, answer="3", rationale="", reason=None):
    n = len(responses)
    return dict(
        qid="q1",
        source="s",
        task="t",
        images=[b"png"],
        question="How many?",
        answer=answer,
        pipeline="correctness",
        prompt_template="cot_final_answer",
        sampling="{}",
        error="",
        responses=responses,
        correct=correct,
        extracted=extracted,
        reason=reason or ["r"] * n,
        prefix_words=[],
        continuations=[],
        rationale=rationale,
    )


def _source(**pairing):
    return Source(name="s", loader="generated", pairing=recipe_mod.Pairing(**pairing))


def test_answer_fix_rewrites_the_chosen_side_only_and_records_it():
    row = _row(
        [
            "I count 3.\nFinal answer: 3.0",
            "I count 4.\nFinal answer: 4.0",
            "no idea",
            "It is 3.\nFinal answer: 3",
        ],
        [True, False, False, True],
        ["3.0", "4.0", None, "3"],
    )
    off, _ = pair_rows(row, _source(), seed=0, model="m")
    on, counts = pair_rows(row, _source(answer_fix=True), seed=0, model="m")
    assert [p["provenance"] for p in off] == ["{}"] * len(off)
    assert {p["chosen"] for p in off} == {row["responses"][0], row["responses"][3]}
    assert counts["correctness"] == 2 and counts["format"] == 2
    for p in on:
        assert p["rejected"] == row["responses"][p["rejected_index"]]  # the rejected side is as sampled
        if p["chosen_index"] == 0:
            assert p["chosen"] == "I count 3.\nFinal answer: 3"
            assert json.loads(p["provenance"]) == {"answer_fix": True}
        else:  # already the reference's text: nothing to record
            assert p["chosen"] == row["responses"][3] and p["provenance"] == "{}"
    assert {p["id"] for p in on} != {p["id"] for p in off}


def test_answer_fix_never_touches_a_response_judged_wrong_or_unjudged():
    from mmpr_pipeline.scoring import JUDGE_ERROR

    row = _row(
        ["A.\nFinal answer: 3.0", "B.\nFinal answer: 3.0", "C.\nFinal answer: 5.0"],
        [True, False, False],
        ["3.0", "3.0", "5.0"],
        reason=["r", f"{JUDGE_ERROR}: boom", "r"],
    )
    pairs, _ = pair_rows(row, _source(answer_fix=True), seed=0, model="m")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("A.\nFinal answer: 3", "C.\nFinal answer: 5.0")]


# --- the reference rationale: one more chosen candidate -----------------------------------------


def test_a_reference_rationale_is_paired_against_wrong_responses_even_when_all_are_wrong():
    responses = ["I see 4.\nFinal answer: 4", "I see 5.\nFinal answer: 5", "no answer"]
    plain = pair_correctness(responses, [False] * 3, ["4", "5", None], qid="q")
    assert plain.all_wrong and not plain.correctness and not plain.format
    ref = pair_correctness(
        responses, [False] * 3, ["4", "5", None], qid="q", reference="Three.\nFinal answer: 3"
    )
    assert ref.all_wrong  # still describes the samples
    assert ref.correctness == [(REFERENCE, 0), (REFERENCE, 1)] and ref.format == [(REFERENCE, 2)]
    all_right = pair_correctness(
        responses[:2], [True, True], ["3", "3"], qid="q", reference="Final answer: 3"
    )
    assert all_right.all_right and not all_right.correctness  # nothing wrong to contrast


def test_a_reference_rationale_counts_towards_the_pair_cap_and_changes_nothing_when_absent():
    responses = ["r0\nFinal answer: 3", "w1\nFinal answer: 4", "w2\nFinal answer: 5", "w3\nFinal answer: 6"]
    correct, extracted = [True, False, False, False], ["3", "4", "5", "6"]
    base = pair_correctness(responses, correct, extracted, qid="q", max_pairs_per_question=15)
    assert pair_correctness(responses, correct, extracted, qid="q", reference="  ") == base
    capped = pair_correctness(
        responses,
        correct,
        extracted,
        qid="q",
        max_pairs_per_question=4,
        reference="Worked out.\nFinal answer: 3",
    )
    assert len(capped.correctness) == 4
    assert {c for c, _ in capped.correctness} <= {0, REFERENCE}


def test_reference_pairs_carry_the_rationale_and_their_provenance():
    row = _row(
        ["I see 4.\nFinal answer: 4", "I see 3.\nFinal answer: 3.0"],
        [False, True],
        ["4", "3.0"],
        rationale="Three squares.\nFinal answer: 3",
    )
    pairs, counts = pair_rows(row, _source(answer_fix=True), seed=0, model="m")
    by_chosen = {p["chosen_index"]: p for p in pairs}
    assert set(by_chosen) == {1, REFERENCE} and counts["correctness"] == 2
    ref = by_chosen[REFERENCE]
    assert ref["chosen"] == "Three squares.\nFinal answer: 3" and ref["rejected"] == row["responses"][0]
    assert json.loads(ref["provenance"]) == {"chosen": "reference"}
    assert json.loads(by_chosen[1]["provenance"]) == {"answer_fix": True}


# --- the recipe: off by default, out of the fingerprint until turned on ---------------------------


def test_the_options_change_the_fingerprint_only_when_on():
    base = recipe_mod.load(REPO / "data_cards" / "demo.yaml")
    assert "answer_fix" not in base.to_dict()["sources"][0]["pairing"]
    assert "rationale" not in base.to_dict()["sources"][0]["fields"]
    explicit_off = recipe_mod.load(
        REPO / "data_cards" / "demo.yaml", {"sources[0].pairing.answer_fix": False}
    )
    assert explicit_off.fingerprint() == base.fingerprint()
    for key, value in (("sources[0].pairing.answer_fix", True), ("sources[0].fields.rationale", "response")):
        on = recipe_mod.load(REPO / "data_cards" / "demo.yaml", {key: value})
        assert on.fingerprint() != base.fingerprint()


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("sources[1].pairing.answer_fix", True, "correctness sources only"),
        ("sources[1].fields.rationale", "caption", "correctness sources only"),
        ("sources[0].pairing.answer_fix", "yes", "expected true or false"),
    ],
)
def test_the_options_are_refused_where_they_cannot_apply(key, value, reason):
    with pytest.raises(RecipeError) as e:
        recipe_mod.load(REPO / "data_cards" / "demo.yaml", {key: value})
    assert key.split(".", 1)[0] in str(e.value) and reason in str(e.value)


def test_load_reads_the_rationale_column_and_refuses_one_that_is_not_text(tmp_path):
    from stages.load import load_source

    q = next(tasks.generate(1, seed=3, families=["count"]))
    (tmp_path / "img.png").write_bytes(q["image"])
    rows = [
        dict(image="img.png", question=q["question"], answer=q["answer"], solution=q["response"]),
        dict(image="img.png", question="How many shapes?", answer="2"),
        dict(image="img.png", question="How many circles?", answer="1", solution=7),
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = Source(
        name="s",
        loader="jsonl",
        path=str(tmp_path / "q.jsonl"),
        answer_type="number",
        fields=recipe_mod.Fields(rationale="solution"),
    )
    questions, rejects, _ = load_source(src, unit_size=8)
    assert [x["rationale"] for x in questions] == [q["response"], ""]
    assert [r["reason"] for r in rejects] == ["rationale (field 'solution') is not text (int)"]


# --- one real build with both options on ------------------------------------------------------------


@pytest.fixture(scope="module")
def built(request, trained_model):
    """The "mc" source of the session's shared build (tests/_shared_build.py): 8 colour/bar questions
    (the demo model picks their letter at chance: right and wrong samples) whose reference is the
    letter in parentheses ("(A)"), with the task's worked solution as the rationale. (run, its stats,
    its pairs, its samples by qid, its rows by image bytes)."""
    run, stats = shared_build(request, trained_model)
    rows = [json.loads(line) for line in (run.parent / "mc.jsonl").read_text().splitlines()]
    return (
        run,
        stats["sources"]["mc"],
        pairs(run, MINE),
        {s["qid"]: s for s in samples(run, MINE)},
        {(run.parent / r["image"]).read_bytes(): r for r in rows},
    )


@pytest.mark.slow
def test_a_real_build_fixes_chosen_answer_lines_and_adds_reference_pairs(built):
    _, stats, pairs, samples, rows = built
    fixed = reference = 0
    for p in pairs:
        s = samples[p["qid"]]
        provenance = json.loads(p["provenance"])
        assert p["rejected"] == s["responses"][p["rejected_index"]] and not s["correct"][p["rejected_index"]]
        if p["chosen_index"] == REFERENCE:
            assert provenance == {"chosen": "reference"}
            assert p["chosen"] == s["rationale"] == rows[s["images"][0]]["solution"]
            reference += 1
            continue
        original = s["responses"][p["chosen_index"]]
        assert s["correct"][p["chosen_index"]]
        if provenance == {"answer_fix": True}:
            # the answer line carries the reference's own text; every line before it is as sampled
            head, _, line = p["chosen"].rpartition("\n")
            assert line == f"Final answer: {s['answer']}" and original.startswith(head + "\n")
            assert original.rpartition("\n")[2] != line
            fixed += 1
        else:
            assert provenance == {} and p["chosen"] == original
    assert fixed > 0 and reference > 0
    assert stats["pairs"]["correctness"] + stats["pairs"]["format"] == len(pairs)
    # every question whose samples are all wrong (with a wrong answer given) still gets the reference pair
    for qid, s in samples.items():
        if not any(s["correct"]) and any(x is not None for x in s["extracted"]):
            assert any(p["qid"] == qid and p["chosen_index"] == REFERENCE for p in pairs)


@pytest.mark.slow
def test_mmpr_select_on_the_real_run_keeps_the_questions_in_the_band(built, tmp_path):
    from datasets import load_dataset

    from mmpr_pipeline.cli import main

    run, _, _, samples, _ = built
    rates = {qid: sum(s["correct"]) / len(s["correct"]) for qid, s in samples.items() if not s["error"]}
    assert main(["select", str(run), "--pass-rate", "0:1", "--out", str(tmp_path / "all")]) == 0
    got = load_dataset("parquet", data_dir=str(tmp_path / "all" / "data"), split="train")
    got = got.filter(lambda row: row["source"] == "mc")  # the shared run's other sources aside
    assert sorted(got["qid"]) == sorted(rates)
    for row in got:
        assert row["pass_rate"] == pytest.approx(rates[row["qid"]])
        assert row["rationale"] == samples[row["qid"]]["rationale"] and row["image"][0].size[0] > 0
    for args, keep in (
        (["--pass-rate", "0.2:0.8"], lambda r: 0.2 <= r <= 0.8),
        (["--all-wrong"], lambda r: r == 0),
    ):
        out = tmp_path / args[0].strip("-")
        assert main(["select", str(run), *args, "--out", str(out)]) == 0
        selected = [
            r["qid"]
            for f in sorted((out / "data").glob("*.parquet"))
            for r in pq.read_table(f, columns=["qid", "source"]).to_pylist()
            if r["source"] == "mc"
        ]
        assert sorted(selected) == sorted(q for q, r in rates.items() if keep(r))


@pytest.mark.slow
def test_exports_and_the_preview_carry_the_provenance(built, tmp_path):
    import argparse
    import shutil

    from datasets import load_dataset

    from mmpr_pipeline import export
    from mmpr_pipeline.preview import write_preview

    run, _, pairs, _, _ = built
    run = shutil.copytree(run, tmp_path / "run")  # the page below is written into the run: a copy
    for fmt in ("trl", "internvl"):
        assert (
            export.cli_export(argparse.Namespace(run_dir=str(run), format=fmt, out=str(tmp_path / fmt))) == 0
        )
    trl = load_dataset("parquet", data_dir=str(tmp_path / "trl" / "data"), split="train")
    assert [r["provenance"] for r in trl if r["source"] == "mc"] == [p["provenance"] for p in pairs]
    lines = [
        json.loads(x) for x in (tmp_path / "internvl" / "annotations" / "mc.jsonl").read_text().splitlines()
    ]
    assert [x["provenance"] for x in lines] == [p["provenance"] for p in pairs]
    page = write_preview(run, per_source=len(pairs)).read_text()
    assert "reference rationale" in page  # not the verdict of the question's last sample


def test_a_run_resumed_across_the_new_column_still_writes_its_shards(tmp_path):
    """Regression: unit pair files written before `provenance` existed failed the shard cast
    ("field names are not matching"), so a resumed older run could not finish."""
    import pyarrow as pa

    from mmpr_pipeline.records import PAIR_SCHEMA

    old_schema = pa.schema([f for f in PAIR_SCHEMA if f.name != "provenance"])
    row = dict(
        id="p1",
        qid="q1",
        source="s",
        task="t",
        images=[],
        question="Q",
        answer="3",
        chosen="c",
        rejected="r",
        pair_type="correctness",
        model="m",
        prompt_template="raw",
        sampling="{}",
        chosen_index=0,
        rejected_index=1,
        cut_ratio=None,
        prefix_words=None,
    )
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), tmp_path / "unit-00000.parquet")
    written = shards.write_shard(
        [(str(tmp_path / "unit-00000.parquet"), 0, 1)], tmp_path / "shard.parquet", PAIR_SCHEMA
    )
    [back] = pq.read_table(written).to_pylist()
    assert back == {**row, "provenance": None}
