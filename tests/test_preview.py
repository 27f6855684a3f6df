"""RUN_DIR/preview.html, opened in a real headless Chromium (tests/_browser.py).

The run folders are the realistic ones of _run_fixture (real generated images and questions, real
Parquet in the pipeline's schemas), with an extra work unit holding an all-right and an all-wrong
question. The build itself writing the preview is checked in test_build_e2e.py on a real build.
"""

from __future__ import annotations

import base64
import io
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _browser import chromium_path, preview_facts
from _run_fixture import _sample_row, finish_unit, make_run, read_pairs
from PIL import Image

from mmpr_pipeline import cli, preview, records, tasks
from mmpr_pipeline.pairing import prefix_of

HOSTILE = (
    '<script>document.title="owned"</script> <img src=x onerror="document.title=\'owned\'"> '
    "</textarea><textarea> & \"quoted\" 'single'"
)


@pytest.fixture(scope="session", autouse=True)
def _chromium():
    if chromium_path() is None:
        pytest.fail("chromium is not installed: `make browser` (or scripts/install_chromium.sh) installs it")


def _add_extreme_questions(run):
    """A second shapes unit: one question answered right 3 times (the 4th broke the judge: not a
    verdict, so still all right), one answered wrong 4 times."""
    right, wrong = tasks.generate(2, seed=9)
    rows = [
        _sample_row(right, "shapes", "correctness", 1, 100, [right["response"]] * 4, [True] * 3 + [False]),
        _sample_row(
            wrong,
            "shapes",
            "correctness",
            1,
            101,
            [f"{wrong['rationale']}\nFinal answer: Z"] * 4,
            [False] * 4,
        ),
    ]
    rows[0]["reason"][3] = "judge error: RecursionError: maximum recursion depth exceeded"
    rows[1]["extracted"] = ["Z"] * 4
    pq.write_table(
        pa.Table.from_pylist(rows, schema=records.SAMPLE_SCHEMA),
        run / "samples" / "shapes" / "unit-00001.parquet",
    )
    finish_unit(run / "samples" / "shapes" / "unit-00001.parquet")
    return rows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("preview") / "run")
    _add_extreme_questions(run)
    return run


@pytest.fixture(scope="module")
def facts(run_dir, tmp_path_factory):
    """The default preview (20 pairs per source) as Chromium renders it at 1280 px, with a screenshot."""
    path = preview.write_preview(run_dir)
    shot = tmp_path_factory.mktemp("shot") / "preview.png"
    return dict(preview_facts(path, screenshot=shot), screenshot=shot, path=path)


def test_page_renders_every_pair_card_and_image_without_errors(facts, run_dir):
    pairs = read_pairs(run_dir)
    # shapes: 12 correctness + 6 format pairs, scenes: 6 DropoutNTP pairs; all fit under 20 per source
    assert facts["by_source"] == {"shapes": 18, "scenes": 6}
    assert facts["pair_cards"] == len(pairs) == 24
    assert facts["console_errors"] == []
    assert facts["images"] == facts["thumbnails"] == 24 + 2  # one per pair card and per question card
    assert facts["images_not_loaded"] == 0
    assert facts["scripts"] == 0
    # and each embedded image is whole (a browser shows a truncated PNG's first rows without an error)
    embedded = re.findall(
        r'width="(\d+)" height="(\d+)" src="data:image/\w+;base64,([^"]+)"',
        facts["path"].read_text(encoding="utf-8"),
    )
    assert len(embedded) == facts["images"]
    for w, h, data in embedded:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.load()
        assert img.size == (int(w), int(h)) and max(img.size) <= preview.THUMB_PX


def test_readable_at_1280_px(facts):
    assert facts["viewport_width"] == 1280
    assert facts["scroll_width"] <= 1280  # no horizontal scrolling
    assert facts["min_font_px"] >= 12
    assert all(c["side_by_side"] for c in facts["cards"])  # chosen left of rejected, each >= 300 px
    shot = Image.open(facts["screenshot"])
    assert shot.size == (1280, 900)
    colors = shot.convert("RGB").getcolors(1 << 16)  # None: more than 65536 colours
    assert colors is None or len(colors) > 50  # a drawn page, not a blank one


def test_first_difference_and_cut_point_are_marked(facts, run_dir):
    by_text = {(p["chosen"], p["rejected"]): p for p in read_pairs(run_dir)}
    kinds = set()
    for card in facts["cards"]:
        c, r = card["chosen"], card["rejected"]
        pair = by_text[(c["before"] + c["after"], r["before"] + r["after"])]  # the texts, whole and in order
        kinds.add(card["type"])
        assert card["type"] == pair["pair_type"]
        if card["type"] == "dropout_ntp":
            # the cut: the prefix is shared, then the original and the image-free continuation
            assert c["before"] == r["before"] == prefix_of(pair["chosen"], pair["prefix_words"])
        else:
            # everything before the mark is identical, and the mark sits at a word start
            assert c["before"] == r["before"]
            assert c["after"].split()[:1] != r["after"].split()[:1]  # the first marked words differ
            assert not c["before"] or c["before"][-1].isspace()
    assert kinds == {"correctness", "format", "dropout_ntp"}


def test_verdicts_come_from_the_samples(facts):
    correctness = [c for c in facts["cards"] if c["type"] == "correctness"]
    assert correctness
    for card in correctness:
        assert "sample #0" in card["chosen"]["verdict"] and "right" in card["chosen"]["verdict"]
        assert "judge: match" in card["chosen"]["verdict"]
        assert "sample #1" in card["rejected"]["verdict"] and "judge: mismatch" in card["rejected"]["verdict"]
        assert "extracted: x" in card["rejected"]["verdict"]


def test_all_right_and_all_wrong_questions_show_every_sample(facts):
    by_kind = {q["kind"]: q for q in facts["question_cards"]}
    assert set(by_kind) == {"all right", "all wrong"}
    assert by_kind["all right"]["samples"] == by_kind["all wrong"]["samples"] == 4
    assert by_kind["all wrong"]["text"].count("wrong") >= 4 and "Z" in by_kind["all wrong"]["text"]
    assert "Questions answered all right (1 in all" in facts["text"]


def test_reject_reasons_each_with_an_example_row(facts):
    assert len(facts["rejects"]) == 1
    reason, count, row_index, example = facts["rejects"][0].split("\t")
    assert (reason, count, row_index) == ("corrupt image", "1", "99")
    assert "\\x00" in example


def test_model_text_is_shown_as_text_never_run(tmp_path):
    run = make_run(tmp_path / "run", n_shapes=2, n_scenes=1, n_shards=1)
    shard = run / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(shard)
    rows = table.to_pylist()
    for row in rows:
        row["chosen"] = row["chosen"] + "\n" + HOSTILE
        row["question"] = HOSTILE
        row["answer"] = HOSTILE
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    unit = run / "samples" / "shapes" / "unit-00000.parquet"
    samples = pq.read_table(unit).to_pylist()
    for s in samples:
        s["reason"] = [HOSTILE] * len(s["reason"])
        s["extracted"] = [HOSTILE] * len(s["extracted"])
    pq.write_table(pa.Table.from_pylist(samples, schema=records.SAMPLE_SCHEMA), unit)
    pq.write_table(
        pa.Table.from_pylist(
            [dict(source="shapes", row_index=1, reason=HOSTILE, row=HOSTILE)], schema=records.REJECT_SCHEMA
        ),
        run / "rejects" / "shapes.parquet",
    )

    facts = preview_facts(preview.write_preview(run))
    assert facts["scripts"] == 0 and facts["textareas"] == 0
    assert facts["images"] == facts["thumbnails"]  # the hostile <img> is not an element
    assert facts["console_errors"] == []  # nothing was blocked either: there was nothing to block
    assert facts["pair_cards"] == len(rows)
    # shown verbatim, as text, in the question, the answer, the chosen response, the verdicts and rejects
    assert facts["text"].count('<script>document.title="owned"</script>') >= 3 * len(rows) + 1
    assert "</textarea><textarea> & \"quoted\" 'single'" in facts["text"]
    assert "judge: <script>" in facts["text"]


def test_the_pages_policy_runs_no_script_and_loads_nothing_from_the_network(facts, tmp_path):
    """Were escaping ever to fail, the page's Content-Security-Policy still holds: an inline script, an
    event handler and a remote image injected into a written page are all refused by the browser."""
    from _browser import Browser

    injected = (
        '<script>document.title = "ran"</script>'
        '<img src="data:," onerror="document.title = \'handler ran\'">'
        '<img id="remote" src="http://127.0.0.1:9/pixel.png">'
    )
    path = tmp_path / "preview.html"
    path.write_text(
        facts["path"].read_text(encoding="utf-8").replace("</body>", injected + "</body>"), encoding="utf-8"
    )
    with Browser() as browser:
        page = browser.open(path)
        title = page.evaluate("document.title")
        errors = page.console_errors()
    assert "ran" not in title
    refused = [e for e in errors if "Content Security Policy" in e]
    assert any("script" in e for e in refused) and any("127.0.0.1:9" in e for e in refused), errors


def test_size_is_capped_whatever_the_run(tmp_path):
    run = make_run(tmp_path / "run", n_shapes=40, n_scenes=4, n_shards=3)
    for shard in sorted((run / "data").glob("*.parquet")):
        table = pq.read_table(shard)
        rows = table.to_pylist()
        for row in rows:
            row["chosen"] = "word " * 40_000 + row["chosen"]  # 200 KB responses
            row["rejected"] = "word " * 40_000 + row["rejected"]
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    cap = 0.15
    path = preview.write_preview(run, per_source=20, seed=0, max_mb=cap)
    assert path.stat().st_size <= cap * 2**20
    text = path.read_text(encoding="utf-8")
    assert "more picked but not shown, to keep this file under 0.15 MB" in text
    assert "more characters]" in text  # long responses are clipped
    # the default cap holds too, and everything picked fits there
    path = preview.write_preview(run)
    assert path.stat().st_size <= preview.MAX_MB * 2**20
    assert (
        text.count('class="pair-card"')
        < path.read_text(encoding="utf-8").count('class="pair-card"')
        == 20 + 4
    )


def test_reads_batches_never_whole_files(run_dir, monkeypatch):
    def whole_file(*args, **kwargs):
        raise AssertionError("a whole Parquet file was read")

    monkeypatch.setattr(pq, "read_table", whole_file)
    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", whole_file)
    text = preview.render(run_dir, per_source=3)
    assert text.count('class="pair-card"') == 6


def test_sample_is_seeded_and_uniform_per_source(run_dir):
    shards = preview.pair_shards(run_dir)
    a, counts = preview.sample_pair_positions(shards, 5, seed=0)
    assert counts == {"shapes": 18, "scenes": 6}
    assert {k: len(v) for k, v in a.items()} == {"shapes": 5, "scenes": 5}
    assert preview.sample_pair_positions(shards, 5, seed=0)[0] == a
    picks = {tuple(preview.sample_pair_positions(shards, 5, seed=s)[0]["shapes"]) for s in range(20)}
    assert len(picks) > 10  # different seeds, different pairs
    hits = [p for s in range(300) for p in preview.sample_pair_positions(shards, 5, seed=s)[0]["shapes"]]
    per_pair = [hits.count(p) for p in set(hits)]
    assert len(per_pair) == 18 and min(per_pair) > 300 * 5 / 18 * 0.6  # every pair gets picked, evenly


def test_clip_keeps_the_marked_point():
    text = "a" * 10_000 + "HERE" + "b" * 10_000
    before, head, tail, after = preview.clip(text, 10_000, 1_000)
    assert tail.startswith("HERE") and len(head) + len(tail) == 1_000
    assert before.startswith("[… ") and after.endswith("more characters]")
    assert preview.clip("short", 2, 1_000) == ("", "sh", "ort", "")
    assert preview.first_difference("the cat sat", "the cow sat") == 4
    assert preview.first_difference("Final answer: 5", "Final answer: B") == len("Final answer: ")
    assert preview.first_difference("abc", "abd") == 0


def test_cli_writes_the_preview_and_names_a_bad_folder(run_dir, tmp_path, capsys):
    assert cli.main(["preview", str(run_dir), "--per-source", "2", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "preview.html")
    assert (run_dir / "preview.html").read_text(encoding="utf-8").count('class="pair-card"') == 4
    assert cli.main(["preview", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing" in err and "\n" not in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["preview", str(tmp_path / "empty")]) == 2
    assert "is this a run folder" in capsys.readouterr().err
    broken = tmp_path / "broken"
    (broken / "data").mkdir(parents=True)
    (broken / "data" / "train-00000-of-00001.parquet").write_bytes(b"not parquet")
    assert cli.main(["preview", str(broken)]) == 2
    assert "train-00000-of-00001.parquet: cannot be read as Parquet" in capsys.readouterr().err
    # a published dataset as downloaded (data/ and its card, no samples/): its shards are the pairs
    dataset = tmp_path / "dataset"
    shutil.copytree(run_dir / "data", dataset / "data")
    assert cli.main(["preview", str(dataset), "--per-source", "2", "--seed", "3"]) == 0
    assert "not a finished run" not in capsys.readouterr().err
    assert (dataset / "preview.html").read_text(encoding="utf-8").count('class="pair-card"') == 4


def test_recipe_switch_is_outside_the_fingerprint():
    from pathlib import Path

    from mmpr_pipeline import recipe as recipe_mod

    demo = Path(__file__).resolve().parent.parent / "data_cards" / "demo.yaml"
    on, off = recipe_mod.load(demo), recipe_mod.load(demo, {"preview": False})
    assert on.preview is True and off.preview is False
    assert on.fingerprint() == off.fingerprint()  # a finished run resumes with it switched either way
    with pytest.raises(recipe_mod.RecipeError, match="preview"):
        recipe_mod.load(demo, {"preview": "yes"})


def test_images_are_embedded_as_small_thumbnails_or_a_note():
    big = io.BytesIO()
    Image.new("RGB", (1000, 600), (200, 30, 30)).save(big, format="PNG")
    tag = preview.thumbnail(big.getvalue())
    w, h, data = re.fullmatch(
        r'<img class="thumb" alt="question image" width="(\d+)" height="(\d+)" '
        r'src="data:image/jpeg;base64,([^"]+)">',
        tag,
    ).groups()
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert img.size == (int(w), int(h)) == (preview.THUMB_PX, preview.THUMB_PX * 600 // 1000)
    assert len(data) < 20_000
    note = preview.thumbnail(b"\x89PNG\r\n\x1a\n truncated")
    assert "<img" not in note and "image not shown" in note


def test_card_links_to_the_preview_only_when_there_is_one(tmp_path):
    from mmpr_pipeline import card

    run = make_run(tmp_path / "run", n_shapes=2, n_scenes=1, n_shards=1)
    assert "preview.html" not in card.write_card(run).read_text()
    preview.write_preview(run)
    text = card.write_card(run).read_text()
    assert "[preview.html](preview.html)" in text
    assert card.check_card(run) == []
