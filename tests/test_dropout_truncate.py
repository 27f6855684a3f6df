"""DropoutNTP's truncation rule and pair rule on hand-written responses."""

import pytest

from mmpr_pipeline.pairing import pair_dropout, prefix_of, truncate


def test_keeps_first_half_of_words_exactly_as_written():
    text = "The image  shows\ta red circle, and a blue square.\nNothing else."
    prefix, kept = truncate(text, 0.5, 4)
    assert kept == 6  # 12 words -> 6
    assert prefix == "The image  shows\ta red circle,"
    assert text.startswith(prefix)


@pytest.mark.parametrize("ratio,kept", [(0.25, 2), (0.5, 5), (0.75, 7)])
def test_ratios(ratio, kept):
    text = "one two three four five six seven eight nine ten"
    assert truncate(text, ratio, 4)[1] == kept


def test_punctuation_stays_with_its_word():
    prefix, kept = truncate("Hello, world! This is fine. Really fine, yes.", 0.5, 4)
    assert prefix == "Hello, world! This is" and kept == 4


def test_too_short_is_not_cut():
    assert truncate("too short", 0.5, 8) is None
    assert truncate("", 0.5, 2) is None
    assert truncate("word", 0.5, 1) is None  # would keep nothing


def test_non_ascii_text():
    text = "Das Bild zeigt einen roten Kreis — und ein blaues Quadrat. 图片 显示 一个 圆。"
    prefix, kept = truncate(text, 0.5, 4)
    assert text.startswith(prefix) and len(prefix.split()) == kept == 7
    assert prefix_of(text, 2) == "Das Bild"


def _row(responses, prefix_words, continuations):
    return dict(responses=responses, prefix_words=prefix_words, continuations=continuations)


def test_pairs_drop_empty_and_identical_continuations():
    original = "one two three four five six seven eight"
    row = _row(
        [original, original, original, "short"],
        [4, 4, 4, -1],
        [" nine ten", "   ", " five six seven eight", ""],
    )
    pairs, counts = pair_dropout(row)
    assert [p["rejected"] for p in pairs] == ["one two three four nine ten"]
    assert pairs[0]["chosen"] == original and pairs[0]["prefix_words"] == 4
    assert counts == dict(too_short=1, continued=2, empty_continuation=1, identical=1)


def test_min_words_boundary_is_inclusive():
    """A response of exactly `min_words` words is cut; one word fewer is not."""
    eight = "one two three four five six seven eight"
    assert truncate(eight, 0.5, 8) == ("one two three four", 4)
    assert truncate(eight, 0.5, 9) is None
