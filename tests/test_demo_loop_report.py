"""The demo loop's report line and pair analysis, as pure logic on stored and hand-written data.

`make demo-loop` itself takes 15-20 minutes on 2 cores (a build, two trainings, three evaluations of
400 questions), far over this suite's budget, so its exact output on the shipped models is checked
through what it stored: benchmarks/results/demo_loop_report.json (a real run's report.json), from
which the report's one line and report.md are rebuilt here, and which the README quotes.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmpr_pipeline.demo_loop import (
    chain_check,
    first_difference,
    mpo_vs_sft_line,
    pair_analysis,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent
STORED = REPO / "benchmarks" / "results" / "demo_loop_report.json"


def _acc(a, lo, hi):
    return {"accuracy": a, "ci95": [lo, hi], "questions": 400, "pass_at_n": a}


def _report(mpo, sft, disjoint):
    return {
        "accuracy": {"mpo": {"greedy": _acc(mpo, 0, 1)}, "sft": {"greedy": _acc(sft, 0, 1)}},
        "comparisons": {
            "mpo vs sft": {"greedy": {"points": round(100 * (mpo - sft), 1), "intervals_disjoint": disjoint}}
        },
    }


def test_the_line_says_the_gap_and_whether_the_goal_is_met():
    assert mpo_vs_sft_line(_report(0.752, 0.767, False)) == (
        "mpo vs sft: greedy -1.5 points (75.2% vs 76.7%, intervals overlap); "
        "goal (greedy >= +3, disjoint) not met"
    )
    assert mpo_vs_sft_line(_report(0.85, 0.75, True)).endswith(
        "95% intervals disjoint); goal (greedy >= +3, disjoint) met"
    )
    # +3 points with overlapping intervals, or disjoint but under +3: not met
    assert mpo_vs_sft_line(_report(0.80, 0.77, False)).endswith("not met")
    assert mpo_vs_sft_line(_report(0.79, 0.77, True)).endswith("not met")


def test_the_stored_run_gives_the_line_in_report_json_report_md_and_the_readme(tmp_path):
    stored = json.loads(STORED.read_text())
    line = mpo_vs_sft_line(stored)
    assert line.startswith("mpo vs sft: greedy ")
    if "mpo_vs_sft" in stored:  # runs since the line exists store it: the same text
        assert stored["mpo_vs_sft"] == line
    md = write_report(tmp_path, {**stored, "mpo_vs_sft": line}).read_text().splitlines()
    assert md[2] == line  # right under the title
    assert line in (REPO / "README.md").read_text()


def _pairs(tmp_path, rows):
    (tmp_path / "data").mkdir()
    table = pa.Table.from_pylist(
        [dict(qid=f"q{i}", pair_type="correctness", **r) for i, r in enumerate(rows)]
    )
    pq.write_table(table, tmp_path / "data" / "part-0.parquet")
    return tmp_path


COUNT_OK = (
    "I look at the image and count the squares: one square, one square. "
    "In total there are 2.\nFinal answer: 2"
)


def test_chain_check_reads_the_demo_chains():
    assert chain_check("count", COUNT_OK) == {"contradicts": False, "chain_sound": True}
    # the right total after the wrong shapes: a right answer from an unsound chain
    wrong_shape = COUNT_OK.replace("one square, one square", "one circle, one square")
    assert chain_check("count", wrong_shape) == {"contradicts": False, "chain_sound": False}
    assert chain_check("count", COUNT_OK.replace("Final answer: 2", "Final answer: 3"))["contradicts"] is True
    compare = "I count 2 circles and 3 squares. 2 is not more than 3.\nFinal answer: No"
    assert chain_check("compare", compare) == {"contradicts": False, "chain_sound": True}
    assert chain_check("compare", compare.replace("2 is", "1 is")) == {
        "contradicts": False,
        "chain_sound": False,
    }
    assert chain_check("compare", compare.replace("No", "Yes"))["contradicts"] is True
    # with the reference chain, sound means that chain word for word
    truth = compare.replace("2 circles", "1 circles").replace("2 is", "1 is")
    assert chain_check("compare", compare, truth)["chain_sound"] is False
    assert chain_check("compare", truth, truth)["chain_sound"] is True
    assert chain_check("compare", "no idea") == {"contradicts": None, "chain_sound": None}


def test_first_difference_places_where_two_chains_part():
    same_chain = COUNT_OK.replace("Final answer: 2", "Final answer: 3")
    assert first_difference(COUNT_OK, same_chain) == "final answer only"
    assert first_difference(COUNT_OK, COUNT_OK.replace("I look", "We look")) == "chain, first third"
    assert first_difference(COUNT_OK, COUNT_OK.replace("there are 2", "there are 3")) == "chain, last third"


def test_pair_analysis_shares_by_task(tmp_path):
    rejected = COUNT_OK.replace("one square, one square", "one square").replace("are 2", "are 1")
    rejected = rejected.replace("answer: 2", "answer: 1")
    run = _pairs(
        tmp_path,
        [
            dict(task="count", chosen=COUNT_OK, rejected=rejected),
            dict(task="count", chosen=COUNT_OK, rejected=COUNT_OK.replace("answer: 2", "answer: 5")),
            dict(task="count", chosen=COUNT_OK.replace("answer: 2", "answer: 4"), rejected=rejected),
            dict(
                task="compare",
                chosen="I count 1 circles and 0 squares. 1 is more than 0.\nFinal answer: Yes",
                rejected="I count 0 circles and 0 squares. 0 is more than 0.\nFinal answer: Yes",
            ),
            dict(task="compare", chosen="Final answer: Yes", rejected="Final answer: No"),
        ],
    )
    got = pair_analysis(run)
    assert got["count"]["pairs"] == 3 and got["compare"]["pairs"] == 2 and got["*"]["pairs"] == 5
    assert got["count"]["chains_agree_to_final_answer"] == round(1 / 3, 3)
    assert got["count"]["chosen_contradicts_final_answer"] == round(1 / 3, 3)
    assert got["count"]["chosen_chain_unsound"] == round(1 / 3, 3)  # the self-contradicting one
    # every rejected count chain is sound up to its answer (a one-square chain; the chosen's chain)
    assert got["count"]["rejected_chain_sound"] == 1.0
    # a chosen chain the task's phrasing does not parse is unparsed (and unsound), not a contradiction
    assert (
        got["compare"]["chosen_unparsed"] == 0.5 and got["compare"]["chosen_contradicts_final_answer"] == 0.0
    )
    assert got["compare"]["chosen_chain_unsound"] == 0.5 and got["compare"]["rejected_chain_sound"] == 0.0
    assert sum(got["*"]["first_difference"].values()) == 1.0
