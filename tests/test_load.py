"""Load: every loader, and a corpus of broken rows that must be set aside with their reason."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmpr_pipeline import tasks
from mmpr_pipeline.recipe import Fields, Source
from mmpr_pipeline.sources import SourceError
from stages.load import load_source


def _png(w=32, h=32):
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), "red")
    img.putpixel((0, 0), (0, 0, 0))  # not one flat colour: a blank image is set aside
    img.save(buf, format="PNG")
    return buf.getvalue()


GOOD = _png()
# (row, expected reason substring); None means the row is good
BROKEN_CASES = [
    (dict(image=GOOD, question="How many?", answer="3"), None),
    (dict(image=GOOD, question="Number answer?", answer=7), None),
    (dict(image=GOOD[: len(GOOD) // 2], question="q", answer="1"), "corrupt image"),
    (dict(image=b"this is not an image", question="q", answer="1"), "corrupt image"),
    (dict(image=b"", question="q", answer="1"), "zero bytes"),
    (dict(image=_png(100000, 1), question="q", answer="1"), "absurd image dimensions 100000x1"),
    (dict(image=None, question="q", answer="1"), "missing image"),
    (dict(image=GOOD, question=None, answer="1"), "missing question"),
    (dict(image=GOOD, question="   ", answer="1"), "empty question"),
    (dict(image=GOOD, question="q", answer=None), "missing answer"),
    (dict(image=GOOD, question="q", answer=""), "empty answer"),
    (dict(image=GOOD, question="q", answer=True), "answer is not text"),
    (dict(image=GOOD, question="bad \ufffd text", answer="1"), "broken text encoding"),
    (dict(image=GOOD, question="How many?", answer="3"), "duplicate"),
    (dict(image=GOOD, question="Kind?", answer="3", kind="essay"), "unknown answer_type 'essay'"),
]


def _source(**kw):
    base = dict(name="src", loader="parquet", answer_type="number")
    base.update(kw)
    return Source(**base)


def test_broken_rows_are_set_aside_with_reasons(tmp_path):
    # JSON Lines keeps each value's own type (Parquet would force one type per column).
    jsonl = tmp_path / "rows.jsonl"
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    with jsonl.open("w") as f:
        for i, (row, _) in enumerate(BROKEN_CASES):
            out = dict(row)
            if row["image"] is not None:
                (img_dir / f"{i}.png").write_bytes(row["image"])
                out["image"] = f"img/{i}.png"
            f.write(json.dumps(out) + "\n")
        f.write("{not json\n")
    src = _source(loader="jsonl", path=str(jsonl), answer_type=None, fields=Fields(answer_type="kind"))
    questions, rejects, n_rows = load_source(src, unit_size=4)
    expected_bad = [(i, reason) for i, (_, reason) in enumerate(BROKEN_CASES) if reason]
    assert n_rows == len(BROKEN_CASES) + 1
    assert len(questions) + len(rejects) == n_rows  # nothing dropped silently
    by_index = {r["row_index"]: r["reason"] for r in rejects}
    for i, reason in expected_bad:
        assert reason in by_index[i], (i, by_index.get(i))
    assert "unreadable JSON" in by_index[len(BROKEN_CASES)]
    assert [q["answer"] for q in questions] == ["3", "7"]
    assert all(r["source"] == "src" for r in rejects)


def test_parquet_bytes_and_units(tmp_path):
    rows = list(tasks.generate(10, seed=3))
    table = pa.Table.from_pylist(
        [
            dict(image=r["image"], question=r["question"], answer=r["answer"], kind=r["answer_type"])
            for r in rows
        ]
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    src = _source(
        path=str(tmp_path / "*.parquet"), answer_type=None, fields=Fields(answer_type="kind"), limit=7
    )
    questions, rejects, n_rows = load_source(src, unit_size=3)
    assert n_rows == 7 and not rejects
    assert [q["unit"] for q in questions] == [0, 0, 0, 1, 1, 1, 2]
    assert questions[0]["images"] == [rows[0]["image"]]  # bytes kept as they were
    assert [q["answer_type"] for q in questions] == [r["answer_type"] for r in rows[:7]]
    again, _, _ = load_source(src, unit_size=3)
    assert [q["qid"] for q in again] == [q["qid"] for q in questions]  # stable ids


def test_datasets_saved_to_disk_with_image_feature(tmp_path):
    import datasets

    rows = list(tasks.generate(4, seed=5))
    ds = datasets.Dataset.from_dict(
        {
            "img": [Image.open(io.BytesIO(r["image"])) for r in rows],
            "q": [r["question"] for r in rows],
            "a": [r["answer"] for r in rows],
        }
    ).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    src = _source(
        loader="hf_disk",
        path=str(tmp_path / "ds"),
        answer_type="text",
        fields=Fields(image="img", question="q", answer="a"),
    )
    questions, rejects, _ = load_source(src, unit_size=8)
    assert len(questions) == 4 and not rejects
    assert Image.open(io.BytesIO(questions[0]["images"][0])).size == (112, 112)


def test_dropout_source_needs_no_answer_and_takes_a_given_response(tmp_path):
    rows = [dict(image=GOOD, question="Describe this image.", response="A red square fills the picture.")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    src = _source(
        path=str(tmp_path / "d.parquet"),
        pipeline="dropout_ntp",
        answer_type=None,
        fields=Fields(response="response"),
    )
    questions, rejects, _ = load_source(src, unit_size=8)
    assert not rejects and questions[0]["given_response"] == "A red square fills the picture."
    assert questions[0]["answer"] == ""


def test_a_source_that_cannot_be_opened_stops_with_its_name(tmp_path):
    with pytest.raises(SourceError, match="'src'.*no Parquet files"):
        load_source(_source(path=str(tmp_path / "nothing-*.parquet")), unit_size=4)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="'src'.*cannot be opened"):
        load_source(_source(path=str(tmp_path / "bad.parquet")), unit_size=4)
