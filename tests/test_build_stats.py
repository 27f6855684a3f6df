"""stats.json from the units' counts files (units.BuildStats): pure logic on hand-written counts."""

from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline.units import BuildStats, SourceStats


def _counts(rows, correct, samples, pairs, seconds, all_wrong=()):
    stats = SourceStats(
        rows=rows,
        questions=rows,
        samples=samples,
        correct=correct,
        pairs=dict(correctness=pairs, format=1, dropout_ntp=0),
        seconds=dict(sample=seconds, **{"continue": 0.0}, score=0.5),
    )
    return dict(stats=stats.to_dict(), all_wrong_qids=list(all_wrong), pair_seconds=0.25, write_seconds=0.5)


def test_build_stats_sum_the_units_and_keep_the_stats_json_layout():
    rec = recipe_mod.from_dict(
        dict(
            name="r",
            sources=[
                dict(name="math", loader="generated", pipeline="correctness"),
                dict(name="captions", loader="generated", pipeline="dropout_ntp"),
            ],
        )
    )
    stats = BuildStats.for_recipe(rec)
    stats.add_unit("math", _counts(4, correct=6, samples=16, pairs=5, seconds=2.0, all_wrong=["q1"]))
    stats.add_unit("math", _counts(2, correct=2, samples=8, pairs=1, seconds=1.0, all_wrong=["q7"]))
    stats.add_unit("captions", _counts(3, correct=0, samples=3, pairs=0, seconds=4.0))
    d = stats.to_dict()
    math = d["sources"]["math"]
    assert (math["rows"], math["samples"], math["correct"], math["pairs"]["correctness"]) == (6, 24, 8, 6)
    assert math["pipeline"] == "correctness" and math["correct_rate"] == round(8 / 24, 4)
    assert d["sources"]["captions"]["correct_rate"] is None  # no verdicts without a reference answer
    assert d["totals"]["rows"] == 9 and d["totals"]["pairs"] == dict(correctness=6, format=3, dropout_ntp=0)
    assert d["all_wrong_qids"] == {"math": ["q1", "q7"]}
    # per-question seconds summed over sources; the units' pair/write seconds summed over units
    assert d["stage_seconds"]["sample"] == 7.0 and d["stage_seconds"]["score"] == 1.5
    assert d["stage_seconds"]["pair"] == 0.75 and d["stage_seconds"]["write"] == 1.5
    assert set(d) == {
        "recipe",
        "model",
        "fingerprint",
        "created",
        "sources",
        "totals",
        "all_wrong_qids",
        "stage_seconds",
        "shards",
        "resume",
    }
